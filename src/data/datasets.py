"""Dataset builders: each returns uint8 image tensors (N, C, H, W) and int64 labels (-1 = unknown).

Small datasets live in memory as uint8; folder datasets are decoded lazily by :class:`FolderImages`.
"""

from __future__ import annotations

import gzip
import os
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
    return (Split(_hwc(tr.data), torch.tensor(tr.targets)), Split(_hwc(te.data), torch.tensor(te.targets)))


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
    def make(n):
        labels = torch.randint(0, num_classes, (n,), generator=g)
        noise = torch.rand(n, channels, image_size, image_size, generator=g) * 0.5
        level = (labels.float() / max(num_classes - 1, 1)).view(n, 1, 1, 1)
        yy = torch.linspace(0, 1, image_size).view(1, 1, image_size, 1)
        img = (noise + 0.5 * level * (yy > 0.5)).clamp(0, 1)
        return Split((img * 255).round().byte(), labels)
    return make(num_train), make(num_test)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


class FolderImages(Dataset):
    """Images under ``root`` decoded on the fly and resized (shorter side) + centre-cropped to a fixed
    ``image_size`` uint8 tensor, so batches stack and the random crops happen on the device.

    Class-per-folder trees give labels (sorted folder names); images directly in ``root`` or a tree
    with ``labelled=False`` give -1. Unreadable files are counted and skipped (``skipped`` lists them).
    """

    def __init__(self, root: str, image_size: int, channels: int = 3, labelled: bool = True):
        self.root, self.image_size, self.mode = Path(root), image_size, "L" if channels == 1 else "RGB"
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir()) if labelled else []
        self.classes = classes
        self.samples: list[tuple[str, int]] = []
        if classes:
            for c, name in enumerate(classes):
                for dirpath, _, files in os.walk(self.root / name, followlinks=True):
                    self.samples += [(os.path.join(dirpath, f), c) for f in sorted(files)
                                     if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        else:
            for dirpath, _, files in os.walk(self.root, followlinks=True):
                self.samples += [(os.path.join(dirpath, f), -1) for f in sorted(files)
                                 if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise UserError(f"no images found under data.root={root}; expected class folders of "
                            f"{'/'.join(sorted(IMAGE_EXTENSIONS))} files")
        self.samples.sort()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im = im.convert(self.mode)
            w, h = im.size
            s = self.image_size / min(w, h)
            im = im.resize((max(self.image_size, round(w * s)), max(self.image_size, round(h * s))),
                           Image.BILINEAR, reducing_gap=3.0)
            left, top = (im.size[0] - self.image_size) // 2, (im.size[1] - self.image_size) // 2
            im = im.crop((left, top, left + self.image_size, top + self.image_size))
            arr = np.asarray(im, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def __getitem__(self, i: int):
        # A corrupt file is replaced by the next readable one, so a worker never dies mid-epoch.
        for j in range(i, i + min(len(self), 100)):
            path, label = self.samples[j % len(self)]
            try:
                return self.load(path), torch.tensor(label)
            except (OSError, ValueError, SyntaxError):
                continue
        raise UserError(f"100 consecutive unreadable images from {self.samples[i][0]}; check data.root={self.root}")
