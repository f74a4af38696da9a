"""The text side of image–text models: open_clip's BPE tokenizer (its vocabulary ships in the wheel, so it
works offline) and open_clip's causal text Transformer, pooled at the end-of-text token (as in CLIP).

Install with ``pip install -e ".[clip]"`` (open-clip-torch).
"""

from __future__ import annotations

import torch
from torch import nn

from src.utils.errors import UserError


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise UserError("method=clip needs open-clip-torch for its tokenizer and text tower; "
                        "run pip install -e '.[clip]'") from None
    return open_clip


class Tokenizer:
    """``tokenizer(["a photo of a dog.", ...]) -> LongTensor (B, context_length)``: lower-cased, cleaned
    (ftfy), BPE-encoded between start- and end-of-text tokens, zero-padded, and cut at ``context_length``
    (the last kept token is then the end-of-text token, which the text tower pools)."""

    def __init__(self, context_length: int = 77):
        if context_length < 3:
            raise UserError(f"method.context_length={context_length}: needs >= 3 (start, one word, end)")
        self.context_length = context_length
        self.bpe = _open_clip().tokenizer.SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self.bpe.encoder)
        self.eot_id = self.bpe.eot_token_id

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.bpe(list(texts), context_length=self.context_length)

    def decode(self, tokens: torch.Tensor) -> str:
        """The text of one row of tokens, without the special and padding tokens."""
        ids = [int(t) for t in tokens if int(t) not in (0, self.bpe.sot_token_id, self.eot_id)]
        return self.bpe.decode(ids).strip()


ACTIVATIONS = ("gelu", "quick_gelu")


class TextEncoder(nn.Module):
    """Token ids (B, L) -> text features (B, output_dim): open_clip's ``TextTransformer`` (token + position
    embeddings, ``layers`` causal pre-norm blocks with an MLP ``mlp_ratio`` times wider, a final LayerNorm, the
    end-of-text token's feature, a linear projection). ``act``: the MLP's activation, ``gelu`` (open_clip's own
    models) or ``quick_gelu`` (OpenAI's CLIP: x * sigmoid(1.702 x), the weights of CLIP snapshots)."""

    def __init__(self, vocab_size: int, context_length: int = 77, width: int = 512, heads: int = 8,
                 layers: int = 12, output_dim: int = 512, mlp_ratio: float = 4.0, act: str = "gelu"):
        super().__init__()
        if width % heads:
            raise UserError(f"method.text_width={width} is not divisible by method.text_heads={heads}")
        if act not in ACTIVATIONS:
            raise UserError(f"text tower activation {act!r}; allowed: {', '.join(ACTIVATIONS)}")
        transformer = _open_clip().transformer
        self.net = transformer.TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers,
            output_dim=output_dim, pool_type="argmax", mlp_ratio=mlp_ratio,
            act_layer=transformer.QuickGELU if act == "quick_gelu" else nn.GELU)
        self.out_dim = output_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)
