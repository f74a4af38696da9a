"""CLIP (Radford et al. 2021): an image and a text encoder trained so that each image's embedding is
closest to its own caption's among the batch (Figure 3's pseudocode):

    I_e = normalize(image_proj(backbone(view)))      # N x D
    T_e = normalize(text_encoder(tokens))            # N x D, the end-of-text token's feature, projected
    logits = exp(t) * I_e T_e^T                      # N x N (N x world*N with gathered candidates)
    loss = (CE(logits, labels) + CE(logits^T, labels)) / 2

``t`` is learned, initialised to log(1 / 0.07) and clamped after every optimizer step so that exp(t) <= 100.
The image encoder is any backbone of the framework; the text encoder is open_clip's Transformer over its
BPE tokenizer (src/nn/text.py). With ``backbone=hf`` on a CLIP snapshot (transformers' CLIPModel, or an open_clip
checkpoint), the snapshot's text tower, image projection and logit scale are loaded too (their sizes replace
``method.embed_dim``, ``context_length`` and ``text_*``): zero-shot, retrieval and search then use OpenAI's or
LAION's CLIP as it is. Batches carry the captions' tokens (``data.captions``: a caption file,
WebDataset shards, or ``class_prompts``); the tokenizer runs in the loader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from src.methods.base import SSLMethod
from src.nn.losses import clip_loss
from src.nn.text import TextEncoder, Tokenizer
from src.utils.errors import UserError


class CLIP(SSLMethod):
    min_views = 1  # one view of the image; its pair is the caption
    needs_captions = True

    def __init__(self, backbone, views, optimizer, embed_dim: int = 512, context_length: int = 77,
                 text_width: int = 512, text_heads: int = 8, text_layers: int = 12, init_temperature: float = 0.07,
                 max_logit_scale: float = 100.0, gather: bool = True, local_loss: bool = True, **kwargs):
        super().__init__(backbone, views, optimizer, **kwargs)
        if not (init_temperature > 0 and 1 / init_temperature <= max_logit_scale):
            raise UserError(f"method.init_temperature={init_temperature}: needs 0 < t and 1/t <= "
                            f"method.max_logit_scale={max_logit_scale}")
        self.gather, self.local_loss, self.max_logit_scale = gather, local_loss, max_logit_scale
        towers = getattr(backbone, "image_text", None)  # an image–text snapshot's text side (src/backbones/hf.py)
        mlp_ratio, act = 4.0, "gelu"
        if towers is not None:  # its sizes, not method.embed_dim / context_length / text_*
            t = towers.text
            embed_dim, context_length, text_width, text_heads, text_layers = (t.output_dim, t.context_length, t.width,
                                                                              t.heads, t.layers)
            mlp_ratio, act = t.mlp_ratio, t.act
        self.image_proj = nn.Linear(backbone.out_dim, embed_dim, bias=False)
        self.tokenizer = Tokenizer(context_length)
        if towers is not None and towers.text.vocab_size != self.tokenizer.vocab_size:
            raise UserError(f"backbone.name={towers.snapshot.name}: its text tower reads {towers.text.vocab_size} "
                            f"tokens, but method=clip tokenizes with CLIP's BPE of {self.tokenizer.vocab_size}; use "
                            "a CLIP snapshot with CLIP's own vocabulary")
        self.text = TextEncoder(self.tokenizer.vocab_size, context_length, text_width, text_heads, text_layers,
                                embed_dim, mlp_ratio=mlp_ratio, act=act)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        if towers is not None:
            self._load_towers(towers)

    def _load_towers(self, towers) -> None:
        """The text tower, the image projection and the logit scale of the snapshot the backbone was loaded from
        (its weights; none when the backbone has random weights)."""
        from lightning.pytorch.utilities import rank_zero_info

        t = towers.text
        what = (f"text tower of {t.layers} blocks x {t.width} ({t.heads} heads, {t.act}, {t.context_length} tokens), "
                f"{t.output_dim}-d embeddings")
        weights = towers.weights()
        if weights is None:
            rank_zero_info(f"method=clip: {what} as in {towers.snapshot.name}, random weights")
            return
        want = {k for k in self.state_dict() if k.startswith(("text.", "image_proj.")) or k == "logit_scale"}
        missing, extra = sorted(want - weights.keys()), sorted(weights.keys() - want)
        if missing or extra:
            raise UserError(f"backbone.name={towers.snapshot.name}: its text side does not fit method=clip "
                            f"(missing {missing[:2]}, unexpected {extra[:2]}); is it a complete CLIP snapshot?")
        self.load_state_dict(weights, strict=False)
        rank_zero_info(f"method=clip: {what}, image projection and logit scale (exp = "
                       f"{float(self.logit_scale.detach().exp()):.1f}) from {towers.snapshot.name}; method.embed_dim, "
                       "context_length and text_* are not used")

    # ---- the two towers (what zero-shot, retrieval and search read) -------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image embeddings (N, embed_dim) of normalised views."""
        return F.normalize(self.image_proj(self(x)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings (N, embed_dim) of token rows (N, context_length)."""
        return F.normalize(self.text(tokens), dim=-1)

    def setup(self, stage: str) -> None:
        """The loaders tokenize the captions with this model's tokenizer (in their workers)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            datamodule.tokenizer = self.tokenizer

    # ---- training -----------------------------------------------------------------------------------
    def batch_loss(self, batch: dict):
        if "text" not in batch:
            raise UserError("method=clip got a batch without captions; set data.captions (a caption file, "
                            "WebDataset shards, or class_prompts on a labelled dataset)")
        image = self.embed(batch["views"][:1], head=self.image_proj)[0]  # N x D (the probe may reuse its features)
        text = self.text(batch["text"])  # N x D
        loss = clip_loss(image, text, self.logit_scale, gather=self.gather, local=self.local_loss)
        return loss, {"logit_scale": self.logit_scale.detach().exp()}

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():  # exp(t) stays within [1, max_logit_scale] (the paper's clipping at 100)
            self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    @classmethod
    def config_problems(cls, cfg, global_batch: int, num_views: int) -> list[str]:
        problems = super().config_problems(cfg, global_batch, num_views)
        if not cfg.data.get("captions"):
            problems.append("method=clip needs image–text pairs: set data.captions=class_prompts on a labelled dataset "
                            "(captions made from class names), or data=captions data.captions=<caption file or shards>")
        width, heads = cfg.method.get("text_width", 512), cfg.method.get("text_heads", 8)
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
            problems.append(f"method.text_width={width} is not divisible by method.text_heads={heads}")
        return problems
