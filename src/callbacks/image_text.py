"""Image–text evaluation of methods with a text tower (CLIP): zero-shot classification and retrieval.

Runs once in ``on_train_end`` for a method with ``encode_image``, ``encode_text`` and ``tokenizer`` (others are
left alone). ``self.results`` (percent, 2 decimals):

- ``zeroshot_top1`` / ``zeroshot_top5`` on the labelled evaluation split (``eval_val``): class names x the
  data's prompt templates (src/nn/image_text.py);
- ``i2t_r{1,5,10}`` / ``t2i_r{1,5,10}`` on the held-out image–caption pairs (``datamodule.pairs``), with
  ``retrieval_images`` / ``retrieval_texts`` (counts);
- with ``random_baseline``, the same for a freshly initialised model (both towers): ``random_zeroshot_top1``, ...

and, on rank 0, a picture ``<run>/pictures/image_text_<epoch>.png`` (+ W&B): held-out images with their most
probable captions, and caption queries with their nearest images. Every rank computes the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchvision.transforms.functional import to_tensor

from src.callbacks.pictures import save_picture
from src.nn.image_text import caption_relevance, retrieval_recall, zeroshot_accuracy, zeroshot_weights
from src.protocols.features import eval_mode, extract_features, own_rng
from src.utils.sheet import contact_sheet


def has_text_tower(model: Any) -> bool:
    return all(callable(getattr(model, name, None)) for name in ("encode_image", "encode_text", "tokenizer"))


@torch.no_grad()
def encode_texts(model: Any, texts: list[str], device: torch.device, batch_size: int = 256,
                 forward_context: Callable | None = None) -> torch.Tensor:
    """Normalised text embeddings (len(texts), D) on the CPU, in batches."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(texts[start:start + batch_size]).to(device)
        with forward_context() if forward_context is not None else contextlib.nullcontext():
            out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def encode_pairs(model: Any, views: Any, loader, device: torch.device, max_items: int | None,
                 forward_context: Callable | None = None) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """Image embeddings (N, D) of held-out pairs and the captions of each image, from a loader of
    ``(images, labels, [captions])`` batches."""
    feats, captions = [], []
    for images, _, caps in loader:
        x = views.eval_view(images.to(device, non_blocking=True))
        with forward_context() if forward_context is not None else contextlib.nullcontext():
            feats.append(model.encode_image(x).float().cpu())
        captions += caps
        if max_items is not None and len(captions) >= max_items:
            break
    n = len(captions) if max_items is None else min(max_items, len(captions))
    return (torch.cat(feats)[:n] if feats else torch.zeros(0, 0)), captions[:n]


def measure_image_text(model: Any, views: Any, dm: Any, device: torch.device, max_pairs: int | None = 1000,
                       max_val_items: int | None = None, forward_context: Callable | None = None,
                       keep: dict | None = None) -> dict[str, float]:
    """Zero-shot accuracy (labelled data) and retrieval recall (held-out pairs) of ``model`` on ``dm``'s splits.
    ``keep``, when given, receives what the picture needs (embeddings, captions, texts)."""
    scores: dict[str, float] = {}
    with eval_mode(model), eval_mode(views), torch.no_grad():
        if getattr(dm, "has_labels", False) and getattr(dm, "eval_val", None) is not None:
            weights = zeroshot_weights(model.encode_text, model.tokenizer, dm.zeroshot_class_names(),
                                       dm.prompt_templates, device)
            emb, labels = extract_features(model.encode_image, views, dm.eval_val_dataloader(), device,
                                                max_val_items, forward_context)
            scores.update(zeroshot_accuracy(emb, labels, weights.cpu()))
        loader = dm.pairs_dataloader() if callable(getattr(dm, "pairs_dataloader", None)) else None
        if loader is not None:
            image_emb, captions = encode_pairs(model, views, loader, device, max_pairs, forward_context)
            texts, relevant = caption_relevance(captions)
            text_emb = encode_texts(model, texts, device, forward_context=forward_context)
            scores.update(retrieval_recall(image_emb, text_emb, relevant))
            scores.update(retrieval_images=len(captions), retrieval_texts=len(texts))
            if keep is not None:
                keep.update(image_emb=image_emb, text_emb=text_emb, texts=texts, captions=captions)
    return scores


class ImageTextEvaluation(L.Callback):
    final = True  # an end-of-training evaluation: src/train.py runs it for a run resumed after its last epoch

    def __init__(self, random_backbone: Callable[[], nn.Module] | None = None, max_pairs: int | None = 1000,
                 max_val_items: int | None = None, num_pictures: int = 4, seed: int = 0):
        self.random_backbone, self.max_pairs, self.max_val_items = random_backbone, max_pairs, max_val_items
        self.num_pictures, self.seed = num_pictures, seed
        self.results: dict[str, Any] = {}
        self.saved = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not has_text_tower(pl_module):
            return
        dm, device, ctx = trainer.datamodule, pl_module.device, trainer.precision_plugin.forward_context
        keep: dict = {}
        scores = measure_image_text(pl_module, pl_module.views, dm, device, self.max_pairs, self.max_val_items, ctx, keep)
        if self.random_backbone is not None:
            with own_rng(self.seed, device):
                fresh = self.random_backbone().to(device)
                random = measure_image_text(fresh, pl_module.views, dm, device, self.max_pairs, self.max_val_items, ctx)
            scores.update({f"random_{k}": v for k, v in random.items() if not k.startswith("retrieval_")})
        self.results = {k: (v if isinstance(v, int) else round(float(v), 2)) for k, v in scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in self.results.items()}, step=trainer.global_step)
        rank_zero_info(f"image-text evaluation: {self.results}")
        if trainer.is_global_zero and keep and self.num_pictures > 0:
            grid = self.picture(pl_module, dm, keep)
            self.saved.append(save_picture(trainer, "image_text", grid, "held-out images with their top captions, "
                                                                         "then captions with their top images",
                                         epoch=trainer.current_epoch))  # training has ended: epochs done

    def picture(self, pl_module: Any, dm: Any, keep: dict) -> torch.Tensor:
        """Rows: a held-out image and its 3 most probable captions (softmax over the held-out captions at the
        learned logit scale); then a caption and its 5 nearest held-out images."""
        image_emb, text_emb, texts, captions = keep["image_emb"], keep["text_emb"], keep["texts"], keep["captions"]
        n = image_emb.shape[0]
        picks = torch.linspace(0, n - 1, min(self.num_pictures, n)).round().long().tolist()
        scale = float(getattr(pl_module, "logit_scale", torch.tensor(0.0)).detach().exp())
        probs = (scale * image_emb @ text_emb.T).softmax(dim=1)
        rows = []
        for i in picks:
            top = probs[i].topk(min(3, len(texts)))
            lines = [f"{100 * float(p):5.1f}%  {texts[j]}" + ("  (its caption)" if texts[j] in captions[i] else "")
                     for p, j in zip(top.values, top.indices.tolist(), strict=True)]
            rows.append([(dm.pairs[i][0], "held-out image"), (None, "\n".join(lines))])
        for i in picks[: max(1, len(picks) // 2)]:
            query = captions[i][0]
            q = texts.index(query)
            sims = image_emb @ text_emb[q]
            top = sims.topk(min(5, n))
            rows.append([(None, f'query: "{query}"')] + [
                (dm.pairs[j][0], f"{float(s):.3f}" + (" (its image)" if j == i else ""))
                for s, j in zip(top.values, top.indices.tolist(), strict=True)])
        return to_tensor(contact_sheet(rows, tile=64, text_width=320))
