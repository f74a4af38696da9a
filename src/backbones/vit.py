"""Vision Transformers (Dosovitskiy et al. 2021) on timm's ``VisionTransformer``, with the token API that the
masked methods share.

    forward(x)              -> (B, D)            pooled: the CLS token (pool=cls) or the mean patch token (pool=mean)
    tokens(x, mask, token)  -> (B, L, D)         patch embeddings + position embedding, before the blocks; patches
                                                 where ``mask`` is True are replaced by ``token`` first (BEiT)
    encode(tokens, keep)    -> (B, 1 + K, D)     the blocks and the final norm on the CLS token and the patch tokens
                                                 ``keep`` (B, K) (all L when None): MAE encodes the visible ones only
    feature_map(x)          -> (B, D, h, w)      the patch tokens on their grid (dense heads read it)
    last_attention(x)       -> (B, heads, h, w)  the last block's CLS attention over the patches (pictures, segment)
    add_mask_token()        -> (1, D)            the ViT's own learned mask token (iBOT, DINOv2), created once
    patchify / unpatchify                       pixels <-> per-patch vectors (MAE's targets)

Inputs of another size than ``img_size`` (DINO's local crops) work as long as both sides are multiples of the
patch size: the position embedding is resampled (bicubic) to their grid. MAE and BEiT call this API and never
reach into timm themselves.

Register tokens (Darcet et al. 2024, "Vision Transformers Need Registers"; DINOv2's ``num_register_tokens``):
``reg_tokens`` learned tokens without a position embedding sit between the CLS token and the patches inside the
blocks; :meth:`encode` drops them from its output (the contract stays CLS + patches) and :meth:`last_attention`
leaves them out of the CLS attention. They and the mask token live in the timm network under DINOv2's own names
(``register_tokens``, ``mask_token``), so DINOv2 weight files load by name.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from src.backbones.pretrained import (
    dinov2_adapt,
    dinov2_names,
    dinov2_unused_problems,
    is_dinov2,
    load_pretrained,
    pretrained_problems,
)
from src.nn.tokens import patchify, sincos_2d, unpatchify

POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos")


class ViT(nn.Module):
    """``embed_dim``-wide ViT of ``depth`` blocks with ``num_heads`` heads on ``patch_size`` patches of
    ``img_size`` images (``in_channels`` channels). ``pos_embed=sincos`` fixes the position embedding to 2-D
    sine-cosine (MAE, MoCo v3); ``freeze_patch_embed`` keeps the random patch projection fixed (MoCo v3's
    stability trick); ``init_values`` turns on LayerScale (BEiT: 0.1); ``pretrained`` loads a weights file (timm,
    DINO, MAE, MoCo v3 or our own checkpoints; the position embedding is resampled to this grid)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_channels: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True, pool: str = "cls",
                 pos_embed: str = "learned", init_values: float | None = None, drop_path_rate: float = 0.0,
                 freeze_patch_embed: bool = False, pretrained: str | None = None, reg_tokens: int = 0,
                 drop_path_uniform: bool = False, norm_eps: float = 1e-6, act: str = "gelu", pre_norm: bool = False):
        super().__init__()
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import VisionTransformer

        for problem in vit_problems(img_size, patch_size, embed_dim, num_heads, pool, pos_embed, reg_tokens):
            raise ValueError(problem)
        self.net = VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_channels, num_classes=0,
                                     global_pool="token", fc_norm=False, embed_dim=embed_dim, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                     init_values=init_values, drop_path_rate=drop_path_rate,
                                     # other libraries' ViTs (src/backbones/hf.py): LayerNorm epsilon, MLP activation
                                     # (gelu_tanh, quick_gelu), CLIP's LayerNorm before the blocks (no patch bias)
                                     norm_layer=None if norm_eps == 1e-6 else functools.partial(LayerNorm, eps=norm_eps),
                                     act_layer=None if act == "gelu" else act, pre_norm=pre_norm)
        self.net.patch_embed.strict_img_size = False  # other sizes (multiple of the patch) are resampled below
        self.patch_size, self.out_dim, self.num_heads = patch_size, embed_dim, num_heads
        self.base_grid = (img_size // patch_size, img_size // patch_size)
        self.pool = pool
        self.pretrained = pretrained  # a weights file was loaded: methods that initialise the ViT leave it (MoCo v3)
        self.reg_tokens = reg_tokens
        if reg_tokens:  # DINOv2 with registers: N(0, 1e-6) like the CLS token, no position embedding
            self.net.register_tokens = nn.Parameter(torch.empty(1, reg_tokens, embed_dim))
            nn.init.normal_(self.net.register_tokens, std=1e-6)
        if drop_path_uniform and drop_path_rate > 0:  # DINOv2's drop_path_uniform: every block at the same rate
            from timm.layers import DropPath

            for block in self.net.blocks:
                block.drop_path1, block.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
        self._file_mask_token: Tensor | None = None  # a weights file's mask token, until add_mask_token wants it
        if pos_embed == "sincos":
            with torch.no_grad():
                self.net.pos_embed.zero_()
                self.net.pos_embed[0, 1:] = sincos_2d(self.base_grid, embed_dim)  # the CLS position stays 0
            self.net.pos_embed.requires_grad_(False)
        if pretrained:
            self._load(pretrained, f"this ViT ({embed_dim} wide, depth {depth})")
        if freeze_patch_embed:
            self.net.patch_embed.requires_grad_(False)

    def _load(self, path: str, what: str) -> None:
        """Load a weights file: DINOv2's layout (``mask_token``, ``register_tokens``, LayerScale, 518 px positions,
        chunked blocks) by :mod:`src.backbones.pretrained`'s DINOv2 rules, any other through timm's filter."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        layout = {}

        def prepare(source: dict[str, Tensor]) -> dict[str, Tensor]:
            layout["dinov2"] = is_dinov2(source)
            return dinov2_names(source, path) if layout["dinov2"] else source

        def adapt(found: dict[str, Tensor]) -> dict[str, Tensor]:
            if layout["dinov2"]:
                return dinov2_adapt(found, self.net, self.base_grid, self.patch_size, path)
            return checkpoint_filter_fn(found, self.net)

        unused = load_pretrained(self.net, path, what, adapt=adapt, prepare=prepare)
        if layout["dinov2"]:
            dinov2_unused_problems(unused, path)
            self._file_mask_token = unused.get("mask_token")

    def add_mask_token(self) -> nn.Parameter:
        """The learned token that replaces masked patch embeddings (iBOT's ``masked_embed``, DINOv2's ``mask_token``,
        (1, D), zeros at first, or the weights file's): created on the first call, then returned."""
        if getattr(self.net, "mask_token", None) is None:
            start = self._file_mask_token if self._file_mask_token is not None else torch.zeros(1, self.out_dim)
            self.net.mask_token = nn.Parameter(start.detach().clone().reshape(1, self.out_dim).float())
        return self.net.mask_token

    @classmethod
    def config_problems(cls, cfg) -> list[str]:
        """Pre-flight: the ViT's own settings, a missing weights file, and every view size (crops and the
        evaluation view) a multiple of the patch size."""
        b = cfg.backbone
        problems = vit_problems(b.img_size, b.patch_size, b.embed_dim, b.num_heads, b.pool, b.pos_embed,
                                b.get("reg_tokens", 0))
        problems += pretrained_problems(b.get("pretrained"))
        if problems or b.patch_size < 1:
            return problems
        sizes = [(f"views.crops[{i}].size", f"views.crops.{i}.size", g.get("size"))
                 for i, g in enumerate(cfg.views.get("crops", []))]
        sizes.append(("views.eval_size", "views.eval_size", cfg.views.get("eval_size")))
        for shown, key, size in sizes:
            if isinstance(size, int) and size % b.patch_size:
                lower, upper = size - size % b.patch_size, size - size % b.patch_size + b.patch_size
                problems.append(f"{shown}={size} is not a multiple of backbone.patch_size={b.patch_size}: a ViT cuts "
                                f"views into whole patches; set {key}={lower or upper} (or {upper})")
        return problems

    @property
    def in_channels(self) -> int:
        return self.net.patch_embed.proj.in_channels  # follows with_in_channels (colorization's L input)

    # ---- tokens ---------------------------------------------------------------------------------------
    def grid(self, x: Tensor) -> tuple[int, int]:
        """The patch grid (h, w) of images ``x`` (B, C, H, W)."""
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"ViT: a {H}x{W} input is not a multiple of the patch size {p}; use crop sizes that "
                             f"are multiples of backbone.patch_size={p}")
        return H // p, W // p

    def patch_pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """(1, h * w, D) position embedding of the patches of an h x w grid (resampled from the base grid)."""
        pos = self.net.pos_embed[:, 1:]
        if grid == self.base_grid:
            return pos
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(self.base_grid), num_prefix_tokens=0)

    def tokens(self, x: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> Tensor:
        """(B, C, H, W) -> (B, L, D) patch tokens with their position embedding, row-major. ``mask`` (B, L) bool:
        those patch embeddings are replaced by ``mask_token`` (D,) before the position embedding is added (the ViT's
        own, :meth:`add_mask_token`, when none is given)."""
        grid = self.grid(x)
        t = self.net.patch_embed(x)  # B x L x D
        if mask is not None:
            mask_token = mask_token if mask_token is not None else self.net.mask_token
            t = torch.where(mask.unsqueeze(-1), mask_token.to(t.dtype).reshape(1, 1, -1), t)
        return t + self.patch_pos_embed(grid)

    def encode(self, tokens: Tensor, keep: Tensor | None = None) -> Tensor:
        """Blocks + final norm on [CLS, registers, tokens] -> (B, 1 + K, D) (the registers dropped from the output);
        ``keep`` (B, K) long selects (and orders) the patch tokens that take part (MAE's visible patches); the others
        are not computed at all."""
        net = self.net
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        x = net.norm(net.blocks(self._prefixed(tokens)))
        r = self.reg_tokens
        return torch.cat([x[:, :1], x[:, 1 + r:]], dim=1) if r else x

    def _prefixed(self, tokens: Tensor) -> Tensor:
        """[CLS + its position, registers (no position), tokens] through timm's pre-block dropout and norm."""
        net, B = self.net, tokens.shape[0]
        parts = [(net.cls_token + net.pos_embed[:, :1]).expand(B, -1, -1)]
        if self.reg_tokens:
            parts.append(net.register_tokens.expand(B, -1, -1).to(tokens.dtype))
        return net.norm_pre(net.pos_drop(torch.cat([*parts, tokens], dim=1)))

    # ---- what evaluation and dense heads read -------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        out = self.encode(self.tokens(x))  # B x 1+L x D
        return out[:, 0] if self.pool == "cls" else out[:, 1:].mean(dim=1)

    def feature_map(self, x: Tensor) -> Tensor:
        h, w = self.grid(x)
        out = self.encode(self.tokens(x))[:, 1:]  # B x L x D
        return out.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def patchify(self, x: Tensor) -> Tensor:
        return patchify(x, self.patch_size)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, int], channels: int) -> Tensor:
        return unpatchify(tokens, self.patch_size, grid, channels)

    def last_attention(self, x: Tensor) -> Tensor:
        """(B, heads, h, w): how the CLS token of the last block attends to each patch, per head: the softmax over
        all keys, computed here from the block's own q/k projections (timm's fused attention never forms the
        matrix), with the CLS key (and the register keys) dropped and the rest renormalised to sum to 1 over the
        patches."""
        net, (h, w) = self.net, self.grid(x)
        z = self._prefixed(self.tokens(x))
        for block in net.blocks[:-1]:
            z = block(z)
        last = net.blocks[-1]
        attn = last.attn
        B, N, _ = z.shape
        qkv = attn.qkv(last.norm1(z)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # B x heads x N x hd
        weights = F.softmax((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1), dim=-1)[:, :, 0, 1 + self.reg_tokens:]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.reshape(B, attn.num_heads, h, w)


def vit_problems(img_size: int, patch_size: int, embed_dim: int, num_heads: int, pool: str, pos_embed: str,
                 reg_tokens: int = 0) -> list[str]:
    """One line per impossible ViT setting (shared by the constructor and the pre-flight check)."""
    problems = []
    if not isinstance(reg_tokens, int) or reg_tokens < 0:
        problems.append(f"backbone.reg_tokens={reg_tokens} must be a whole number >= 0 (DINOv2 with registers: 4)")
    if patch_size < 1 or img_size % patch_size:
        problems.append(f"backbone.img_size={img_size} is not a multiple of backbone.patch_size={patch_size}; use a "
                        "patch size that divides the crop (e.g. 4 for 28 or 32 px, 16 for 224 px)")
    if num_heads < 1 or embed_dim % num_heads:
        problems.append(f"backbone.embed_dim={embed_dim} is not a multiple of backbone.num_heads={num_heads}")
    elif pos_embed == "sincos" and embed_dim % 4:
        problems.append(f"backbone.pos_embed=sincos needs backbone.embed_dim divisible by 4, got {embed_dim}")
    if pool not in POOLS:
        problems.append(f"backbone.pool={pool!r}; allowed: {', '.join(POOLS)}")
    if pos_embed not in POS_EMBEDS:
        problems.append(f"backbone.pos_embed={pos_embed!r}; allowed: {', '.join(POS_EMBEDS)}")
    return problems


def has_token_api(backbone: nn.Module | type) -> bool:
    return all(callable(getattr(backbone, name, None)) for name in ("tokens", "encode", "patchify"))


def require_token_api(backbone: nn.Module, who: str) -> None:
    """Masked image modelling reads the token API: raise ValueError naming ``who`` for a backbone without it."""
    if not has_token_api(backbone):
        raise ValueError(f"{who} needs a ViT backbone (backbone=vit_cpu, vit_tiny, vit_small or vit_base); "
                         f"{type(backbone).__name__} has no token API")
