"""`python -m src.search CKPT --images FOLDER --query "a pair of trousers" [--top 8] [--out sheet.png]`:
text-to-image search over a folder with a trained image–text model (method=clip), or with a CLIP snapshot as it is:
`python -m src.search method=clip backbone=hf backbone.name=<CLIP snapshot> --images FOLDER --query ...`.

The model is rebuilt from the run config saved in the checkpoint (loaded safely, weights only), or from the
overrides. The folder's images (recursively) are embedded once and cached (:mod:`src.protocols.folder`, shared with
``src.embed``) next to the checkpoint (``CKPT.search/<folder hash>.pt``; for a snapshot under outputs/search/);
a later search embeds only the files that are new or changed (path, size and modification time) and drops
the removed ones; unreadable files are counted and left out (and not retried until they change). Prints the top
matches with their cosine similarity and writes a contact sheet PNG (default: beside the cache, named after the
query).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch

from src.protocols.image_text import encode_texts, has_text_tower
from src.utils.errors import UserError, one_line_errors
from src.utils.sheet import contact_sheet


class ImageEncoder(torch.nn.Module):
    """The normalised image embeddings of an image–text model, as a module (so feature extraction sets eval mode)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


def load_model(ckpt: Path | None, overrides: list[str] = ()):
    """The image–text model of a checkpoint, or of overrides (``method=clip backbone=hf backbone.name=<CLIP
    snapshot>``: the snapshot's two towers, no training), with its preprocessing (:class:`src.embed.Model`)."""
    from src.embed import from_checkpoint, from_overrides

    if ckpt is not None and overrides:
        raise UserError(f"{' '.join(overrides)}: a checkpoint brings its own config; overrides are for a model without "
                        "one (method=clip backbone=hf backbone.name=<CLIP snapshot>)")
    if ckpt is None and not any(o.startswith("data.captions=") for o in overrides):
        overrides = ["data.captions=class_prompts", *overrides]  # method=clip's check; search reads no captions
    model = from_checkpoint(ckpt) if ckpt is not None else from_overrides(list(overrides), method=True)
    if not has_text_tower(model.net):
        what = f"{ckpt} is a {type(model.net).__name__} checkpoint" if ckpt is not None else \
            f"method={type(model.net).__name__}"
        raise UserError(f"{what}, not an image–text one; search needs a checkpoint of method=clip (or method=clip "
                        "backbone=hf backbone.name=<CLIP snapshot>)")
    return model


def search(ckpt: Path | None, folder: Path, query: str, top: int = 8, out: Path | None = None,
           overrides: list[str] = ()) -> tuple[list[tuple[str, float]], Path]:
    from src.protocols.folder import embed_folder

    if not query.strip():
        raise UserError("--query is empty; pass a sentence such as --query 'a pair of trousers'")
    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder; pass a folder of images")
    model = load_model(ckpt, overrides)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    if ckpt is not None:
        cache = ckpt.with_name(ckpt.name + ".search") / f"{key}.pt"
    else:  # a snapshot: one cache per folder and model under outputs/search/
        key = hashlib.sha1(f"{folder.resolve()} {model.key}".encode()).hexdigest()[:16]
        cache = Path("outputs") / "search" / f"{key}.pt"
    found = embed_folder(ImageEncoder(model.net), model.views, model.decode, model.shape, folder, cache,
                         model.key + " encode_image")
    if not found.paths:
        raise UserError(f"--images {folder}: none of its {len(found.skipped)} image file(s) could be read")
    text_emb = encode_texts(model.net, [query], torch.device("cpu"))[0]
    scores = found.features @ text_emb
    best = scores.topk(min(top, len(found.paths)))
    matches = [(found.paths[i], float(s)) for s, i in zip(best.values, best.indices.tolist(), strict=True)]
    tiles = [(model.decode(p), f"{s:.3f} {Path(p).name}") for p, s in matches]
    slug = re.sub(r"[^a-z0-9]+", "_", query.lower()).strip("_")[:60] or "query"
    out = out or cache.with_name(f"{key}_{slug}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet([[(None, f'query: "{query}"\n{len(found.paths)} images in {folder}')] + tiles], tile=112).save(out)
    if found.skipped:
        print(f"skipped {len(found.skipped)} unreadable image file(s)", file=sys.stderr)
    return matches, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="+", help="a checkpoint of method=clip (outputs/<run>/checkpoints/last.ckpt), "
                                                 "or method=clip backbone=hf backbone.name=<CLIP snapshot>")
    parser.add_argument("--images", type=Path, required=True, help="folder of images to search (recursively)")
    parser.add_argument("--query", required=True, help="the sentence to search for")
    parser.add_argument("--top", type=int, default=8, help="how many matches to show (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="contact sheet PNG (default: next to the cache)")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.model)
    ckpt = Path(overrides.pop(0)) if "=" not in overrides[0] else None
    with one_line_errors():
        matches, out = search(ckpt, args.images, args.query, args.top, args.out, overrides)
    width = len(str(len(matches)))
    print(f'top {len(matches)} for "{args.query}":')
    for rank, (path, score) in enumerate(matches, 1):
        print(f"{rank:>{width}}. {score:.3f}  {path}")
    print(f"\ncontact sheet: {out}", flush=True)


if __name__ == "__main__":
    main()
