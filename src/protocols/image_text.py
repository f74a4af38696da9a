"""``image_text``: zero-shot classification and retrieval of models with a text tower (CLIP).

- ``zeroshot_top1`` / ``zeroshot_top5`` on the labelled evaluation split: class names x the data's prompt templates
  (:mod:`src.nn.image_text`);
- ``i2t_r{1,5,10}`` / ``t2i_r{1,5,10}`` on the held-out image–caption pairs (``datamodule.pairs``), with
  ``retrieval_images`` / ``retrieval_texts`` (counts; not repeated for the random-init baseline);

and a picture of the trained model (``image_text``): held-out images with their most probable captions, then
captions with their nearest images. Part of every final evaluation of a model with a text tower (training runs and
``python -m src.eval CKPT``); other models report nothing. Settings: ``protocols.image_text.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms.functional import to_tensor

from src.nn.image_text import caption_relevance, retrieval_recall, zeroshot_accuracy, zeroshot_weights
from src.protocols import Protocol, Subject, percent
from src.protocols.features import eval_mode, extract_features
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


def image_text_scores(model: Any, views: Any, dm: Any, device: torch.device, max_pairs: int | None = 1000,
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


class ImageText(Protocol):
    """Zero-shot accuracy on at most ``max_val_items`` evaluation images and retrieval on at most ``max_pairs``
    held-out pairs; ``num_pictures`` rows in the picture (0: none)."""

    name = "image_text"
    own_file = False  # its figures join the final evaluation's

    def __init__(self, max_pairs: int | None = 1000, max_val_items: int | None = None, num_pictures: int = 4):
        self.max_pairs, self.max_val_items, self.num_pictures = max_pairs, max_val_items, int(num_pictures)

    def applies_to(self, model: Any) -> bool:
        return has_text_tower(model)

    def run_baseline(self, subject: Subject) -> dict:
        return {k: v for k, v in self.run(subject, draw=False).items() if not k.startswith("retrieval_")}

    def run(self, subject: Subject, draw: bool = True) -> dict:
        model, dm = subject.model, subject.datamodule
        keep: dict = {}
        scores = image_text_scores(model, subject.views, dm, subject.device, self.max_pairs, self.max_val_items,
                                   subject.forward_context, keep)
        out = {k: v if isinstance(v, int) else percent(v) for k, v in scores.items()}
        if draw and keep and self.num_pictures > 0:
            subject.show(self.name, self.picture(model, dm, keep),
                         "held-out images with their top captions, then captions with their top images")
        return out

    def picture(self, model: Any, dm: Any, keep: dict) -> torch.Tensor:
        """Rows: a held-out image and its 3 most probable captions (softmax over the held-out captions at the
        learned logit scale); then a caption and its 5 nearest held-out images."""
        image_emb, text_emb, texts, captions = keep["image_emb"], keep["text_emb"], keep["texts"], keep["captions"]
        n = image_emb.shape[0]
        picks = torch.linspace(0, n - 1, min(self.num_pictures, n)).round().long().tolist()
        scale = float(getattr(model, "logit_scale", torch.tensor(0.0)).detach().exp())
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
