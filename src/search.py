"""`python -m src.search CKPT --images FOLDER --query "a pair of trousers" [--top 8] [--out sheet.png]`:
text-to-image search over a folder with a trained image–text model (method=clip).

The model is rebuilt from the run config saved in the checkpoint (loaded safely, weights only). The folder's
images (recursively) are embedded once and cached next to the checkpoint (``CKPT.search/<folder hash>.pt``);
a later search embeds only the files that are new or changed (path, size and modification time) and drops
the removed ones; unreadable files are counted and left out (and not retried until they change). Prints the top matches with their cosine similarity and writes a contact sheet PNG
(default: beside the cache, named after the query).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

import torch

from src.callbacks.image_text import encode_texts, has_text_tower
from src.data.datasets import decode, image_files
from src.utils.checkpointing import atomic_torch_save
from src.utils.errors import UserError, fail
from src.utils.sheet import contact_sheet


def load_model(ckpt: Path):
    from src.utils.checkpointing import load_run_model

    state, model = load_run_model(ckpt, "search needs a CLIP checkpoint of this framework")
    target = str(state["config"]["method"].get("_target_", "?")).rsplit(".", 1)[-1]
    if not has_text_tower(model):
        raise UserError(f"{ckpt} is a {target} checkpoint, not an image–text one; search needs a checkpoint of "
                        "method=clip")
    return model, state["config"]


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of each image file under ``folder``."""
    out = []
    for path in image_files(folder):
        st = Path(path).stat()
        out.append((path, st.st_size, st.st_mtime_ns))
    return out


@torch.no_grad()
def index_folder(model, config: dict, folder: Path, cache: Path, batch_size: int = 64) -> tuple[list[str], torch.Tensor, int]:
    """(paths, normalised image embeddings (N, D), unreadable file count); embeds only what the cache lacks."""
    files = listing(folder)
    if not files:
        raise UserError(f"--images {folder}: no images in it (looked for jpg/png/webp/... files, recursively)")
    known: dict[tuple, torch.Tensor] = {}
    bad: set[tuple] = set()  # unreadable files (retried when they change)
    if cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            known = {tuple(k): e for k, e in zip(saved["files"], saved["embeddings"], strict=True)}
            bad = {tuple(k) for k in saved["bad"]}
        except Exception:  # noqa: BLE001 - a cache from another version or a broken write: rebuild it
            known, bad = {}, set()
    bad &= set(files)
    todo = [f for f in files if f not in known and f not in bad]
    size, channels = int(config["data"]["image_size"]), int(config["data"]["channels"])
    mode = "L" if channels == 1 else "RGB"
    if todo:
        print(f"embedding {len(todo)} image(s) of {folder} ({len(files) - len(todo)} cached)", file=sys.stderr)
    for start in range(0, len(todo), batch_size):
        batch, kept = [], []
        for f in todo[start:start + batch_size]:
            try:
                batch.append(decode(f[0], size, mode))
                kept.append(f)
            except Exception:  # noqa: BLE001 - unreadable files are counted and left out
                bad.add(f)
        if batch:
            emb = model.encode_image(model.views.eval_view(torch.stack(batch))).float()
            known.update(zip(kept, emb, strict=True))
    files = [f for f in files if f not in bad]
    if not files:
        raise UserError(f"--images {folder}: none of its {len(bad)} image file(s) could be read")
    embeddings = torch.stack([known[f] for f in files])
    if todo:
        atomic_torch_save({"files": [list(f) for f in files], "embeddings": embeddings, "bad": [list(f) for f in bad]},
                          cache)
    return [f[0] for f in files], embeddings, len(bad)


def search(ckpt: Path, folder: Path, query: str, top: int = 8, out: Path | None = None) -> tuple[list[tuple[str, float]], Path]:
    if not query.strip():
        raise UserError("--query is empty; pass a sentence such as --query 'a pair of trousers'")
    if top < 1:
        raise UserError(f"--top {top}: must be >= 1")
    if not folder.is_dir():
        raise UserError(f"--images {folder} is not a folder; pass a folder of images")
    model, config = load_model(ckpt)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:16]
    cache = ckpt.with_name(ckpt.name + ".search") / f"{key}.pt"
    paths, image_emb, bad = index_folder(model, config, folder, cache)
    text_emb = encode_texts(model, [query], torch.device("cpu"))[0]
    scores = image_emb @ text_emb
    best = scores.topk(min(top, len(paths)))
    matches = [(paths[i], float(s)) for s, i in zip(best.values, best.indices.tolist(), strict=True)]
    size, channels = int(config["data"]["image_size"]), int(config["data"]["channels"])
    tiles = [(decode(p, size, "L" if channels == 1 else "RGB"), f"{s:.3f} {Path(p).name}") for p, s in matches]
    slug = re.sub(r"[^a-z0-9]+", "_", query.lower()).strip("_")[:60] or "query"
    out = out or cache.with_name(f"{key}_{slug}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet([[(None, f'query: "{query}"\n{len(paths)} images in {folder}')] + tiles], tile=112).save(out)
    if bad:
        print(f"skipped {bad} unreadable image file(s)", file=sys.stderr)
    return matches, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a checkpoint of method=clip (outputs/<run>/checkpoints/last.ckpt)")
    parser.add_argument("--images", type=Path, required=True, help="folder of images to search (recursively)")
    parser.add_argument("--query", required=True, help="the sentence to search for")
    parser.add_argument("--top", type=int, default=8, help="how many matches to show (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="contact sheet PNG (default: next to the cache)")
    args = parser.parse_args(argv)
    try:
        matches, out = search(args.ckpt, args.images, args.query, args.top, args.out)
    except UserError as e:
        fail(str(e).splitlines())
    width = len(str(len(matches)))
    print(f'top {len(matches)} for "{args.query}":')
    for rank, (path, score) in enumerate(matches, 1):
        print(f"{rank:>{width}}. {score:.3f}  {path}")
    print(f"\ncontact sheet: {out}", flush=True)


if __name__ == "__main__":
    main()
