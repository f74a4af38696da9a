"""Image–caption pairs for image–text pre-training (CLIP).

Three kinds of source, each giving images with one or more captions:

- a caption file: CSV/TSV (open_clip's ``filepath`` / ``title`` columns by default), JSONL (same keys), or
  COCO-style captions JSON (``images`` + ``annotations``; several captions per image). Rows of one image
  are grouped, so it has several captions; image paths are relative to ``image_root`` (default: the
  file's folder);
- WebDataset tar shards (``jpg``/``png``/``jpeg``/``webp`` + ``txt`` per key, as img2dataset writes them),
  streamed without unpacking (:func:`web_pairs`);
- ``class_prompts``: a labelled dataset whose class names go through prompt templates
  (:class:`ClassPrompts`); this demonstrates the machinery, not open-vocabulary learning.

Training samples are ``(image uint8 (C, H, W), label, caption)``: one caption per image, drawn from its
captions by (run seed, image, epoch) alone, so a resumed run draws what an uninterrupted one would have.
With ``all_captions=True`` (held-out pairs for retrieval) the sample carries the tuple of all of them.
:class:`TokenizingCollate` stacks images and labels and tokenizes the captions in the loader workers.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from src.data.datasets import FolderImages, _reason, square, to_mode
from src.utils.errors import UserError
from src.utils.hashing import stable_hash

# Zero-shot prompts and class-prompt captions (our own short list; set data.prompt_templates to change it).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of the {}.",
    "a cropped photo of a {}.",
)

CLASS_NAMES = {
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "fashion_mnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "stl10": ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"],
}
WEB_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def readable_name(folder: str) -> str:
    """A class folder's name as words: ``n01440764`` stays, ``golden_retriever`` -> ``golden retriever``."""
    return folder.replace("_", " ").strip()


class CaptionChoice:
    """One caption per image and epoch, drawn from (run seed, image, epoch) alone (``epoch`` is set by the
    sampler, see :class:`src.data.sampler.EpochSampler`); ``all_captions``: the tuple of them all."""

    seed: int = 0
    epoch: int = 0
    all_captions: bool = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption(self, index: int, captions: tuple[str, ...]):
        if self.all_captions:
            return captions
        return captions[stable_hash(self.seed, index, self.epoch) % len(captions)]


# ---- caption files ------------------------------------------------------------------------------
def caption_format(source: str) -> str:
    """``csv``, ``tsv``, ``jsonl``, ``coco`` or ``webdataset``, from the file name (and a JSON's content)."""
    name = source.lower()
    if name.endswith(".tar") or ".tar" in name and "{" in name:
        return "webdataset"
    suffix = Path(name).suffix
    if suffix in TABLE_SUFFIXES:
        return suffix[1:]
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "coco"
    raise UserError(f"data.captions={source}: unknown caption file type; use a .csv, .tsv, .jsonl, COCO captions "
                    ".json or WebDataset .tar shards (or data.captions=class_prompts on a labelled dataset)")


def _group(rows: list[tuple[str, str]], base: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Rows ``(image, caption)`` grouped by image and sorted by path, paths made absolute, empty captions
    dropped (an image left with none is dropped too)."""
    grouped: dict[str, list[str]] = {}
    for image, caption in rows:
        caption = " ".join(str(caption or "").split())
        if caption:
            grouped.setdefault(str(image if os.path.isabs(image) else base / image), []).append(caption)
    return [(p, tuple(c)) for p, c in sorted(grouped.items())]


def read_caption_file(path: str, image_root: str | None = None, image_key: str = "filepath",
                      caption_key: str = "title") -> tuple[list[tuple[str, tuple[str, ...]]], list[str]]:
    """``([(image path, captions), ...], [where each empty caption was])`` from a CSV/TSV/JSONL/COCO file
    (``file:row N`` or ``file:annotation N``)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data.captions={path}: no such file; point it at a .csv/.tsv/.jsonl/COCO .json caption "
                        "file or WebDataset shards such as 'shards/{000000..000009}.tar'")
    base = Path(image_root) if image_root else file.parent
    kind = caption_format(path)
    rows: list[tuple[str, str]] = []
    try:
        if kind in ("csv", "tsv"):
            with open(file, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter=TABLE_SUFFIXES["." + kind])
                missing = [k for k in (image_key, caption_key) if k not in (reader.fieldnames or [])]
                if missing:
                    raise UserError(f"data.captions={path}: no column {missing[0]!r} (columns: "
                                    f"{', '.join(reader.fieldnames or [])}); set data.caption_keys=[<image column>, "
                                    "<caption column>]")
                rows = [(r[image_key], r[caption_key]) for r in reader]
        elif kind == "jsonl":
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if image_key not in record or caption_key not in record:
                        raise UserError(f"data.captions={path}: line {n} has no {image_key!r} or {caption_key!r} key; "
                                        "set data.caption_keys=[<image key>, <caption key>]")
                    rows.append((record[image_key], record[caption_key]))
        else:
            data = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
                raise UserError(f"data.captions={path}: not a COCO captions file (needs 'images' and 'annotations'); "
                                "use .jsonl for one JSON record per line")
            files = {im["id"]: im["file_name"] for im in data["images"]}
            rows = [(files[a["image_id"]], a.get("caption", "")) for a in data["annotations"] if a["image_id"] in files]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, KeyError, TypeError) as e:
        raise UserError(f"data.captions={path}: cannot be read as {kind} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:80]})") from None
    unit = "annotation" if kind == "coco" else "row"
    empty = [f"{path}:{unit} {n}" for n, (_, c) in enumerate(rows, 1) if not " ".join(str(c or "").split())]
    pairs = _group(rows, base)
    if not pairs:
        raise UserError(f"data.captions={path}: no image with a non-empty caption in it")
    return pairs, empty


class CaptionedImages(CaptionChoice, FolderImages):
    """Image files with captions: images decoded like :class:`FolderImages` (a bad file is replaced by the
    next readable one and recorded), each sample's caption chosen by :class:`CaptionChoice`."""

    def __init__(self, pairs: list[tuple[str, tuple[str, ...]]], image_size: int, channels: int = 3,
                 skip_bad: bool = True, seed: int = 0, all_captions: bool = False):
        pairs = sorted(pairs)
        super().__init__(str(Path(pairs[0][0]).parent), image_size, channels, labelled=False, skip_bad=skip_bad,
                         samples=[(p, -1) for p, _ in pairs])
        self.captions = [c for _, c in pairs]
        self.seed, self.all_captions = seed, all_captions

    def __getitem__(self, i: int):
        j, image = self.readable(i)
        return image, torch.tensor(-1), self.caption(j, self.captions[j])


class ClassPrompts(CaptionChoice, Dataset):
    """A labelled dataset of ``(image, label)`` as image–caption pairs: the captions of a label are the
    prompt templates filled with its class name."""

    def __init__(self, base: Dataset, class_names: list[str], templates: list[str], seed: int = 0,
                 all_captions: bool = False):
        self.base, self.seed, self.all_captions = base, seed, all_captions
        self.prompts = [tuple(t.format(name) for t in templates) for name in class_names]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return image, label, self.caption(i, self.prompts[int(label)])


class TokenizingCollate:
    """Collates ``(image, label, caption)`` samples into ``(images, labels, tokens (B, L))``; with no
    tokenizer (a method without a text tower) into ``(images, labels)``. Token rows of captions seen before
    are reused (class prompts repeat), up to ``cache_size`` captions per worker."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None, cache_size: int = 10_000):
        self.tokenizer, self.cache_size = tokenizer, cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def tokens(self, captions: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if new:
            for caption, row in zip(new, self.tokenizer(new), strict=True):
                self.cache[caption] = row
        for c in captions:
            self.cache.move_to_end(c)
        out = torch.stack([self.cache[c] for c in captions])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return out

    def __call__(self, samples: list[tuple]):
        images, labels = default_collate([s[:2] for s in samples])
        if self.tokenizer is None:
            return images, labels
        return images, labels, self.tokens([s[2] for s in samples])


def collate_pairs(samples: list[tuple]):
    """Held-out pairs for retrieval: ``(images, labels, [captions of each image])``."""
    images, labels = default_collate([s[:2] for s in samples])
    return images, labels, [tuple(s[2]) for s in samples]


# ---- WebDataset shards --------------------------------------------------------------------------
def shard_list(pattern: str) -> list[str]:
    """Shard files of ``pattern``: brace notation (``data/{000000..000009}.tar``), a glob, or one file."""
    import braceexpand

    files = [f for p in braceexpand.braceexpand(pattern) for f in (sorted(glob.glob(p)) or [p])]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"data.captions={pattern}: shard {missing[0]} does not exist "
                        f"({len(missing)} of {len(files)} missing); check the path and brace range")
    return files


def count_web_samples(shards: list[str]) -> int:
    """Samples (keys with an image) in ``shards``, from the tar headers alone (no image is decoded)."""
    total = 0
    for shard in shards:
        keys = set()
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    stem, _, ext = member.name.partition(".")
                    if ext.lower() in WEB_IMAGE_KEYS:
                        keys.add(stem)
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"data.captions: shard {shard} is not a readable tar file ({type(e).__name__}); "
                            "remove it from the list or rewrite it") from None
        total += len(keys)
    return total


def decode_bytes(data: bytes, image_size: int, mode: str) -> torch.Tensor:
    """Encoded image bytes as uint8 (C, image_size, image_size): shorter side resized, centre-cropped (as
    :func:`src.data.datasets.decode` does for files)."""
    with Image.open(io.BytesIO(data)) as im:
        return square(to_mode(im, mode), image_size)


def web_pairs(shards: list[str], image_size: int, channels: int, record: Callable[[str, str], None],
              all_captions: bool = False):
    """Yield ``(image, -1, caption)`` from the samples of ``shards`` in order (held-out pairs: ``(image, -1,
    (caption,))``); a sample whose image does not decode or whose caption is empty is recorded and skipped."""
    import webdataset as wds

    mode = "L" if channels == 1 else "RGB"
    for sample in wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False):
        yield from _web_sample(sample, image_size, mode, record, all_captions)


def _web_sample(sample: dict, image_size: int, mode: str, record, all_captions: bool = False):
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image = next((sample[k] for k in WEB_IMAGE_KEYS if k in sample), None)
    caption = " ".join(sample.get("txt", b"").decode("utf-8", errors="replace").split())
    if image is None:
        return record(where, "no jpg/png/jpeg/webp entry")
    if not caption:
        return record(where, "empty caption")
    try:
        x = decode_bytes(image, image_size, mode)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; never kill a worker
        return record(where, _reason(e, where))
    yield x, torch.tensor(-1), (caption,) if all_captions else caption


def web_stream(shards: list[str], image_size: int, channels: int, record, seed: int, shuffle_buffer: int,
               batch_size: int, batches_per_epoch: int, collate: Callable, num_workers: int):
    """The training stream over ``shards``: shards drawn at random with replacement (seeded by the run seed, the
    rank, the worker and the epoch), samples shuffled in a seeded buffer (raw bytes; decoded after it), batches of exactly ``batch_size``, and
    ``batches_per_epoch`` batches per epoch on every rank, so DDP ranks never wait for each other."""
    import webdataset as wds

    mode = "L" if channels == 1 else "RGB"
    pipeline = (wds.WebDataset(shards, resampled=True, shardshuffle=False, detshuffle=True, seed=seed,
                               handler=wds.warn_and_continue, nodesplitter=None, empty_check=False)
                .shuffle(shuffle_buffer, seed=seed)  # reproducible: the shards drawn differ by rank, worker, epoch
                .compose(lambda samples: (y for s in samples for y in _web_sample(s, image_size, mode, record)))
                .batched(batch_size, collation_fn=collate, partial=False))
    per_worker = -(-batches_per_epoch // max(num_workers, 1))
    loader = wds.WebLoader(pipeline.with_epoch(per_worker), batch_size=None, num_workers=num_workers,
                           persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    return loader.with_epoch(batches_per_epoch).with_length(batches_per_epoch)
