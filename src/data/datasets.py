"""Dataset builders: each returns uint8 image tensors (N, C, H, W) and int64 labels (-1 = unknown).

Small datasets live in memory as uint8; folder datasets are decoded lazily by :class:`FolderImages`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from src.utils.errors import UserError


@dataclass
class Split:
    """A split held in memory: images uint8 (N, C, H, W), labels int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] | None = None  # class names, where the dataset ships them

    def __len__(self) -> int:
        return len(self.labels)


class TensorImages(Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.images[i], self.split.labels[i]


def digits(image_size: int = 8) -> tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits (1,797 images); a fixed, stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    if image_size != 8:
        images = torch.nn.functional.interpolate(images.float(), size=image_size, mode="bilinear",
                                                 antialias=True, align_corners=False).round().clamp(0, 255).byte()
    labels = torch.from_numpy(d.target).long()
    tr, te = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=d.target)
    return Split(images[tr], labels[tr]), Split(images[te], labels[te])


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for base in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).exists():
                return base / name
    return None


FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def fashion_mnist(root: str, download: bool = True) -> tuple[Split, Split]:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 grayscale) from IDX files under ``root``, else
    from the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), else
    downloaded by torchvision into ``root`` when ``download`` is true."""
    root_p = Path(root)
    paths = [_find_idx(root_p, s) for s in FASHION_MNIST_FILES]
    if any(p is None for p in paths):
        paths = [_find_idx(DEBIAN_FASHION_MNIST, s) for s in FASHION_MNIST_FILES]
    if any(p is None for p in paths):
        if not download:
            raise UserError(f"Fashion-MNIST not found under data.root={root}; install the Debian package "
                            "dataset-fashion-mnist or set data.download=true")
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root_p), train=True, download=True)
            FashionMNIST(str(root_p), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            raise UserError(f"Fashion-MNIST is not under data.root={root} and downloading it failed "
                            f"({type(e).__name__}); run `apt-get install dataset-fashion-mnist` or set "
                            "data.root to a folder with the IDX files") from None
        paths = [_find_idx(root_p, s) for s in FASHION_MNIST_FILES]
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
    def to_split(x, y):
        return Split(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return to_split(xtr, ytr), to_split(xte, yte)


def _hwc(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def cifar(root: str, num_classes: int = 10, download: bool = True) -> tuple[Split, Split]:
    """CIFAR-10 / CIFAR-100 (50,000 / 10,000, 32x32 RGB) via torchvision, from ``root`` or downloaded."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if num_classes == 10 else CIFAR100
    try:
        tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"CIFAR-{num_classes} is not under data.root={root} and could not be downloaded "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:80]}); put the python version there "
                        "or set data.root") from None
    return (Split(_hwc(tr.data), torch.tensor(tr.targets), list(tr.classes)),
            Split(_hwc(te.data), torch.tensor(te.targets), list(te.classes)))


def stl10(root: str, download: bool = True, unlabeled: bool = True) -> tuple[Split, Split, Split]:
    """STL-10 (96x96 RGB): pre-training on train+unlabeled (105,000) and evaluation on train/test."""
    from torchvision.datasets import STL10

    try:
        tr = STL10(root, split="train", download=download)
        te = STL10(root, split="test", download=download)
        un = STL10(root, split="unlabeled", download=download) if unlabeled else None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"STL-10 is not under data.root={root} and could not be downloaded "
                        f"({type(e).__name__}); put stl10_binary there or set data.root") from None
    train, test = Split(torch.from_numpy(tr.data), torch.from_numpy(tr.labels).long()), Split(
        torch.from_numpy(te.data), torch.from_numpy(te.labels).long())
    pretrain = train if un is None else Split(
        torch.cat([train.images, torch.from_numpy(un.data)]),
        torch.cat([train.labels, torch.full((len(un.data),), -1, dtype=torch.long)]))
    return pretrain, train, test


def fake(num_train: int = 512, num_test: int = 128, image_size: int = 32, channels: int = 3,
         num_classes: int = 10, seed: int = 0) -> tuple[Split, Split]:
    """Generated images for tests only: class-dependent colour blobs on noise, so probes can learn."""
    g = torch.Generator().manual_seed(seed)
    def make(n):  # uint8 throughout: noise in [0, 127], plus up to 127 on the lower half by class
        labels = torch.randint(0, num_classes, (n,), generator=g)
        img = torch.randint(0, 128, (n, channels, image_size, image_size), generator=g, dtype=torch.uint8)
        level = (labels * 127 // max(num_classes - 1, 1)).to(torch.uint8).view(n, 1, 1, 1)
        img[:, :, image_size // 2:] += level
        return Split(img, labels, [f"pattern {c}" for c in range(num_classes)])
    return make(num_train), make(num_test)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class BadImageError(UserError):
    """An image that cannot be decoded while ``data.skip_bad_images=false``.

    A DataLoader worker re-raises it in the main process as ``BadImageError("Caught ... Original Traceback
    ...")``; the constructor keeps only the original one-line message, so the CLI still prints one line.
    """

    def __init__(self, text: str):
        if "Original Traceback" in text:
            last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
            text = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(text)


def image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, following links), sorted."""
    out = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        out += [os.path.join(dirpath, f) for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def has_image(folder: Path) -> bool:
    """Whether any image file lies under ``folder``; stops at the first one (cheap on ImageNet)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def to_mode(im: Image.Image, mode: str) -> Image.Image:
    """``im`` as an 8-bit ``mode`` ("L" or "RGB") image.

    - 16-bit grayscale ("I;16*") is scaled by its range, 0..65535 -> 0..255 (PIL's own conversion clips
      at 255); 32-bit "I" holding values in 0..65535 likewise, other "I"/"F" images are stretched from their
      min..max (a float image already in [0, 1] is multiplied by 255);
    - palette images ("P") go through RGBA when they have a transparent colour, else RGB;
    - images with alpha (RGBA, LA, PA, premultiplied RGBa/La) are composited on white: transparent pixels
      often hold arbitrary colours (often black) that dropping the alpha would show, and white is how a
      viewer shows them on a page;
    - CMYK, YCbCr, 1-bit and the rest use PIL's conversion; RGB -> L is ITU-R 601 luma, L -> RGB repeats L.
    """
    if im.mode in SIXTEEN_BIT or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode in SIXTEEN_BIT or (im.mode == "I" and lo >= 0 and hi <= 65535):
            a = a * (255.0 / 65535.0)
        elif im.mode == "F" and lo >= 0 and hi <= 1:
            a = a * 255.0
        else:
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im if im.mode == mode else im.convert(mode)


def square(im: Image.Image, image_size: int, resample: int = Image.BILINEAR) -> torch.Tensor:
    """A PIL image as uint8 (C, image_size, image_size): resized so its shorter side is ``image_size``
    (smaller images are upsampled), then centre-cropped. ``resample=Image.NEAREST`` for label maps (masks)."""
    w, h = im.size
    s = image_size / min(w, h)
    im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), resample,
                   reducing_gap=3.0)
    left, top = (im.size[0] - image_size) // 2, (im.size[1] - image_size) // 2
    arr = np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode(path: str, image_size: int, mode: str) -> torch.Tensor:
    """An image file as uint8 (C, image_size, image_size) in ``mode`` (see :func:`square`)."""
    with Image.open(path) as im:
        return square(to_mode(im, mode), image_size)


def _reason(e: Exception, path: str) -> str:
    """``Type: message`` on one line, without the file's path (the caller names it once)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.replace(f"'{path}'", "").replace(path, "").strip(" :")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _remove_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked DataLoader worker
        shutil.rmtree(path, ignore_errors=True)


class SkipLog:
    """Files (or shard samples) that failed to decode, recorded across DataLoader workers: workers hold copies
    of the dataset, so each process appends ``path<TAB>reason`` lines to ``<skip_dir>/<pid>.txt`` (a temporary
    folder made here, in the main process, before any worker starts, and removed with this object);
    :attr:`skipped` reads them all."""

    def __init__(self):
        self.skip_dir = tempfile.mkdtemp(prefix="sslkit-skipped-")
        weakref.finalize(self, _remove_dir, self.skip_dir, os.getpid())
        self._bad: set[str] = set()  # known bad in this process: skipped without decoding again

    def _record(self, path: str, reason: str) -> None:
        self._bad.add(path)
        reason = " ".join(reason.split())[:200]
        with open(os.path.join(self.skip_dir, f"{os.getpid()}.txt"), "a", encoding="utf-8") as f:
            f.write(f"{path}\t{reason}\n")  # one write per line; each process has its own file

    @property
    def skipped(self) -> dict[str, str]:
        """Every file that failed to decode so far, in any process: path -> reason, sorted by path."""
        found: dict[str, str] = {}
        for part in sorted(Path(self.skip_dir).glob("*.txt")):
            try:
                text = part.read_text(encoding="utf-8")
            except OSError:
                continue
            for line in text.splitlines(keepends=True):
                if line.endswith("\n") and "\t" in line:  # a line still being written is read next time
                    path, reason = line.rstrip("\n").split("\t", 1)
                    found.setdefault(path, reason)
        return dict(sorted(found.items()))


class FolderImages(SkipLog, Dataset):
    """Images under ``root`` decoded on the fly and resized (shorter side) + centre-cropped to a fixed
    ``image_size`` uint8 tensor, so batches stack and the random crops happen on the device.

    Class-per-folder trees give labels (sorted folder names); images directly in ``root`` or a tree
    with ``labelled=False`` give -1. Files are not opened when the dataset is built (ImageNet has 1.3M);
    a file that fails to decode (unreadable, truncated, not an image) is replaced by the next readable one,
    so a loader worker never dies, and recorded: :attr:`skipped` maps each such path to the reason. With
    ``skip_bad=False`` the first bad file is a :class:`BadImageError` naming it instead (see :class:`SkipLog`).
    """

    def __init__(self, root: str, image_size: int, channels: int = 3, labelled: bool = True, skip_bad: bool = True,
                 samples: list[tuple[str, int]] | None = None, classes: list[str] | None = None):
        self.root, self.image_size, self.mode = Path(root), image_size, "L" if channels == 1 else "RGB"
        self.skip_bad = skip_bad
        if samples is not None:  # a dataset's own file list (torchvision's split files: DTD, Flowers-102, Pets)
            self.classes, self.samples = list(classes or []), [(str(p), int(c)) for p, c in samples]
        else:
            classes = sorted(d.name for d in self.root.iterdir() if d.is_dir()) if labelled else []
            self.classes = classes
            if classes:
                self.samples = [(p, c) for c, name in enumerate(classes) for p in image_files(self.root / name)]
            else:
                self.samples = [(p, -1) for p in image_files(self.root)]
        if not self.samples:
            raise UserError(f"no images found under {root} (looked for {'/'.join(sorted(IMAGE_EXTENSIONS))} "
                            "files); point data.root at a folder with train/<class>/ image folders inside")
        self.samples.sort()
        super().__init__()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        return decode(path, self.image_size, self.mode)

    def readable(self, i: int) -> tuple[int, torch.Tensor]:
        """``(j, image)`` for the first readable sample ``j`` from ``i`` on (a bad file is replaced by the next
        readable one, so a worker never dies mid-epoch)."""
        last = ""
        for j in range(i, i + min(len(self), 100)):
            path = self.samples[j % len(self)][0]
            if path in self._bad:
                continue
            try:
                return j % len(self), self.load(path)
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; never kill a worker
                last = _reason(e, path)
                if not self.skip_bad:
                    raise BadImageError(f"cannot read image {path} ({last}); data.skip_bad_images=false stops at "
                                        "the first bad file: remove or replace it, or set data.skip_bad_images=true "
                                        "to skip such files") from None
                self._record(path, last)
        raise BadImageError(f"{min(len(self), 100)} consecutive unreadable images from {self.samples[i][0]} "
                            f"(last: {last}); check data.root={self.root}")

    def __getitem__(self, i: int):
        j, image = self.readable(i)
        return image, torch.tensor(self.samples[j][1])


# ---- foreground masks (protocol=segment) ---------------------------------------------------------------
MASK_FOUND, MASK_MISSING, MASK_UNREADABLE = 0, 1, 2
IGNORE = 255  # mask value of pixels that count neither as foreground nor as background (Pets' trimap border)


def nonzero_foreground(arr: np.ndarray) -> np.ndarray:
    """A folder mask's pixels as 1 (any non-zero colour channel: foreground) or 0; alpha is not a colour."""
    if arr.ndim == 3:
        arr = arr[..., : 3 if arr.shape[-1] >= 3 else 1]
        return (arr != 0).any(axis=-1).astype(np.uint8)
    return (arr != 0).astype(np.uint8)


class SegmentationPairs(Dataset):
    """``(image uint8 (C, S, S), mask uint8 (1, S, S), status)`` for each image of a :class:`FolderImages` split: the
    image as the split decodes it and its mask file (``mask_of(image path)``) through the same resize and centre
    crop (nearest neighbour), first resized to the image's own size when it has another. Mask values: 1 foreground,
    0 background, :data:`IGNORE`. ``status``: :data:`MASK_FOUND`, :data:`MASK_MISSING` (no file) or
    :data:`MASK_UNREADABLE` (a file that does not decode); then the mask is all :data:`IGNORE`. ``values`` turns the
    decoded mask array into those values (default: non-zero = foreground)."""

    def __init__(self, images: FolderImages, mask_of, values=nonzero_foreground):
        self.images, self.mask_of, self.values = images, mask_of, values

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        j, image = self.images.readable(i)
        path, size = self.images.samples[j][0], self.images.image_size
        mask_path = self.mask_of(path)
        if mask_path is None or not os.path.isfile(mask_path):
            return image, torch.full((1, size, size), IGNORE, dtype=torch.uint8), MASK_MISSING
        try:
            with Image.open(path) as im:
                own = im.size  # the image file's size (its header only)
            with Image.open(mask_path) as m:
                m.load()
                arr = self.values(np.asarray(m))
            mask = Image.fromarray(arr.astype(np.uint8), "L")
            if mask.size != own:
                mask = mask.resize(own, Image.NEAREST)
            return image, square(mask, size, Image.NEAREST), MASK_FOUND
        except Exception:  # noqa: BLE001 - a broken mask file is counted, like a broken image
            return image, torch.full((1, size, size), IGNORE, dtype=torch.uint8), MASK_UNREADABLE


def folder_mask_path(masks: str | Path, image: str, roots: list[str | Path]) -> str | None:
    """The mask of ``image`` under the folder ``masks``: its path relative to the first of ``roots`` that holds it
    (the dataset root, then the split folder), with a ``.png`` suffix; the first such file that exists (else the
    first candidate, to be reported missing)."""
    candidates = []
    for root in roots:
        try:
            rel = Path(image).relative_to(root)
        except ValueError:
            continue
        candidates.append(Path(masks) / rel.with_suffix(".png"))
    found = next((c for c in candidates if c.is_file()), None)
    return str(found or (candidates[0] if candidates else Path(masks) / Path(image).with_suffix(".png").name))
