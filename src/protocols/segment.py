"""``protocol=segment``: a ViT's attention as foreground segmentation, scored by the Jaccard index (Caron et al. 2021,
DINO, sec. 4.2.1 and Table 7: "the self-attention maps ... thresholded to keep 60% of the mass"; the rule of
facebookresearch/dino ``visualize_attention.py`` ``--threshold 0.6``).

For each evaluation image (its deterministic eval view): the last block's CLS attention of every head over the
patches (register tokens left out), the patches holding ``mass`` of it (sorted, the smallest dropped while the rest
keeps at least ``mass``), upsampled to the image (nearest, patch by patch), and the Jaccard index |A n M| / |A u M|
against the foreground mask ``M`` (pixels marked "ignore" in the mask, Pets' trimap border, count on neither side).
Per image the best head is kept, as DINO's authors evaluate; the figure is the mean over the images x 100, beside
the random-init ViT (the protocols' baseline). Masks come from ``data.segmentation_pairs()``: Oxford-IIIT Pet's
trimaps (``data=pets``) or ``data.masks=<dir>`` beside a folder dataset; images without a mask, or with one that does
not decode, are counted and reported, not scored. A picture shows image, mask and the best head's attention mask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from src.data.datasets import IGNORE, MASK_FOUND, MASK_MISSING, MASK_UNREADABLE
from src.protocols import Protocol, Subject, percent
from src.protocols.features import eval_mode, evaluated_backbone, evenly_subsampled
from src.utils.errors import UserError


def mass_masks(attention: torch.Tensor, mass: float = 0.6) -> torch.Tensor:
    """(..., L) attention -> (..., L) bool: the patches that hold ``mass`` of it. As DINO: sort ascending, normalise,
    keep the patches whose cumulative sum (from the smallest) exceeds 1 - ``mass`` (the largest ones, down to the one
    that reaches ``mass``)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    values, order = torch.sort(attention.float(), dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    kept = torch.cumsum(values, dim=-1) > 1 - mass
    return torch.zeros_like(kept).scatter(-1, order, kept)


def jaccard(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) bool predictions against (B, H, W) masks (1 foreground, 0 background, IGNORE) -> (B, K) Jaccard
    indices over the pixels that are not ignored; 1 where both sides are empty."""
    valid = (mask != IGNORE).unsqueeze(1)
    fg = (mask == 1).unsqueeze(1)
    inter = (pred & fg & valid).flatten(2).sum(-1).float()
    union = ((pred | fg) & valid).flatten(2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def eval_geometry(masks: torch.Tensor, size: int | None) -> torch.Tensor:
    """(B, 1, H, W) uint8 masks through the eval view's geometry (shorter side to ``size``, centre crop), nearest
    neighbour, as :meth:`src.data.views.Views.eval_view` moves the images -> (B, S, S)."""
    H, W = masks.shape[-2:]
    if size is not None and (H, W) != (size, size):
        if min(H, W) != size:
            H, W = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
            masks = F.interpolate(masks, size=(H, W), mode="nearest")
        top, left = round((H - size) / 2), round((W - size) / 2)
        masks = masks[..., top: top + size, left: left + size]
    return masks[:, 0]


def attention_source(model):
    """The ViT whose attention is read: the model itself or the backbone a method's evaluation reads (DINO's family:
    the teacher's), if it has ``last_attention``."""
    for candidate in (model, evaluated_backbone(model)):
        if callable(getattr(candidate, "last_attention", None)):
            return candidate
    name = type(evaluated_backbone(model)).__name__
    raise UserError(f"protocol=segment reads a ViT's CLS attention, but {name} has none; evaluate a ViT checkpoint or "
                    "backbone (backbone=vit_cpu, vit_small, ...)")


class Segment(Protocol):
    """Jaccard (``segment_jaccard``, %) of the attention masks against the foreground masks, per image the best head;
    also the best single head over the images (``segment_jaccard_one_head``) and the counts of scored, unmasked and
    unreadable images. ``max_items`` evenly spaced evaluation images; ``pictures`` rows in the picture."""

    name = "segment"

    def __init__(self, mass: float = 0.6, max_items: int | None = 1000, batch_size: int = 64, pictures: int = 8):
        if not 0 < mass <= 1:
            raise ValueError(f"protocols.segment.mass={mass} must be in (0, 1] (DINO keeps 0.6 of the attention)")
        if batch_size < 1:
            raise ValueError(f"protocols.segment.batch_size={batch_size} must be >= 1")
        self.mass, self.max_items, self.batch_size, self.pictures = float(mass), max_items, int(batch_size), int(pictures)

    def run(self, subject: Subject) -> dict:
        vit = attention_source(subject.model)
        pairs = subject.datamodule.segmentation_pairs()
        loader = evenly_subsampled(DataLoader(pairs, batch_size=self.batch_size, shuffle=False,
                                              num_workers=getattr(subject.datamodule, "num_workers", 0)),
                                   self.max_items)
        best, per_head, shown = [], [], []
        counts = {MASK_FOUND: 0, MASK_MISSING: 0, MASK_UNREADABLE: 0}
        context = subject.forward_context or contextlib.nullcontext
        with eval_mode(vit), eval_mode(subject.views), torch.no_grad():
            for images, masks, status in loader:
                for k in counts:
                    counts[k] += int((status == k).sum())
                keep = status == MASK_FOUND
                if not keep.any():
                    continue
                x = subject.views.eval_view(images[keep].to(subject.device))
                gt = eval_geometry(masks[keep].to(subject.device), x.shape[-1])  # B x S x S
                with context():
                    attention = vit.last_attention(x).float()  # B x heads x h x w
                b, heads, h, w = attention.shape
                kept = mass_masks(attention.flatten(2), self.mass).view(b, heads, h, w)
                pred = F.interpolate(kept.float(), size=x.shape[-2:], mode="nearest") > 0.5  # B x heads x S x S
                scores = jaccard(pred, gt)  # B x heads
                best.append(scores.max(dim=1).values.cpu())
                per_head.append(scores.cpu())
                if len(shown) < self.pictures:
                    top = scores.argmax(dim=1)
                    shown += [(x[i], gt[i], pred[i, top[i]]) for i in range(min(b, self.pictures - len(shown)))]
        if counts[MASK_MISSING] or counts[MASK_UNREADABLE]:
            subject.say(f"protocol=segment: {counts[MASK_MISSING]} images have no mask and {counts[MASK_UNREADABLE]} a "
                        "mask that does not decode; they are not scored")
        if not best:
            raise UserError(f"protocol=segment: none of the {sum(counts.values())} evaluation images has a readable "
                            "mask; check data.masks (one PNG per image, at its path under data.root)")
        best_t, heads_t = torch.cat(best), torch.cat(per_head)
        out = {"segment_jaccard": percent(100 * best_t.mean()),
               "segment_jaccard_one_head": percent(100 * heads_t.mean(dim=0).max()),
               "segment_images": int(best_t.numel()), "segment_missing_masks": counts[MASK_MISSING],
               "segment_unreadable_masks": counts[MASK_UNREADABLE]}
        if shown and (subject.pictures is not None or subject.publish is not None):
            out.update(self.draw(subject, shown, float(100 * best_t.mean())))
        return out

    def draw(self, subject: Subject, shown: list, score: float) -> dict:
        """One row per image: the image, its mask (white foreground, grey ignored), the best head's attention mask
        over the image."""
        from torchvision.utils import make_grid

        tiles = []
        for x, gt, pred in shown:
            rgb = subject.views.denormalize(x.unsqueeze(0))[0].clamp(0, 1).float().cpu()
            rgb = rgb.expand(3, -1, -1) if rgb.shape[0] == 1 else rgb[:3]
            mask = torch.where(gt == IGNORE, 0.5, (gt == 1).float()).cpu().expand(3, -1, -1)
            overlay = rgb * 0.35 + pred.float().cpu().unsqueeze(0) * torch.tensor([1.0, 0.55, 0.0]).view(3, 1, 1) * 0.65
            tiles += [rgb, mask, overlay]
        tiles = torch.stack(tiles)
        scale = max(1, 96 // tiles.shape[-1])  # small images (28 px) drawn at least 84 px wide, pixel for pixel
        tiles = tiles.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        image = make_grid(tiles, nrow=3, padding=2, pad_value=1.0)
        what = "segment" if subject.name == "trained" else f"{subject.name}_segment"
        caption = (f"image / mask / attention mask ({100 * self.mass:.0f}% of the CLS attention, best head), "
                   f"{subject.name} model: Jaccard {score:.1f}")
        out = {}
        if subject.pictures is not None:
            from torchvision.utils import save_image

            path = subject.pictures(what)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image(image, path)
            out["segment_picture"] = str(path)
        if subject.publish is not None:
            subject.publish(what, image, caption)
        return out
