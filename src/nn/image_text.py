"""Zero-shot classification and image–text retrieval on embeddings (Lightning-free).

Zero-shot (Radford et al. 2021, sec. 3.1.4): each class's weight is the normalised mean of the normalised
embeddings of its name in every prompt template; an image is assigned the class of highest cosine.
Retrieval: Recall@K is the share of queries with a relevant item among their K nearest; captions are
deduplicated, and a caption is relevant to every image it describes (class prompts describe a whole class;
COCO images have several captions), so image->text and text->image both use one relevance matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy


@torch.no_grad()
def zeroshot_weights(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable[[list[str]], torch.Tensor],
                     class_names: Sequence[str], templates: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """(num_classes, D): per class, the renormalised mean of the normalised embeddings of its prompts."""
    weights = []
    for name in class_names:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(encode_text(tokens).float(), dim=-1)  # T x D
        weights.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(weights)


def zeroshot_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """``zeroshot_top1`` (and ``zeroshot_top5`` with more than 5 classes) in percent."""
    logits = F.normalize(image_emb.float(), dim=-1) @ weights.T.to(image_emb.device)
    num_classes = weights.shape[0]
    out = {}
    for k in (1, 5):
        if k == 1 or num_classes > 5:
            acc = multiclass_accuracy(logits, labels.to(logits.device), num_classes, top_k=k, average="micro")
            out[f"zeroshot_top{k}"] = 100 * float(acc)
    return out


def caption_relevance(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """The unique captions of ``captions`` (one sequence per image) and the (images, captions) boolean matrix of
    which caption describes which image."""
    texts = list(dict.fromkeys(c for group in captions for c in group))
    index = {t: j for j, t in enumerate(texts)}
    relevant = torch.zeros(len(captions), len(texts), dtype=torch.bool)
    for i, group in enumerate(captions):
        relevant[i, [index[c] for c in group]] = True
    return texts, relevant


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, relevant: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``i2t_r{k}`` and ``t2i_r{k}`` in percent: the share of images (texts) with a relevant text (image) among
    their ``k`` most similar, for ``relevant`` (images, texts)."""
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # I x T
    relevant = relevant.to(sim.device)
    out = {}
    for name, scores, rel in (("i2t", sim, relevant), ("t2i", sim.T, relevant.T)):
        for k in ks:
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices
            out[f"{name}_r{k}"] = 100 * float(rel.gather(1, top).any(1).float().mean())
    return out
