"""Datasets commonly used to measure transfer, read through torchvision's own layouts under ``data.root`` (and
downloaded there by torchvision where there is internet): EuroSAT (satellite), PCam (histology), Flowers-102,
DTD (textures) and Oxford-IIIT Pet.

Each returns ``(pretrain, eval_train, eval_val, split names)`` of lazily decoded images: files are decoded in
the loader, resized (shorter side) and centre-cropped to ``data.image_size`` (the folder datasets' rules,
:class:`src.data.datasets.FolderImages`), so batches stack and the random crops happen on the device.

Splits: the official ones where the dataset has them (DTD partition 1: train+val / test; Flowers-102:
train+val / test; Pets: trainval / test; PCam: train / test, its valid split unused); EuroSAT has none, so a
fixed stratified 80/20 split (seed 0) is used. Pre-training reads the evaluation's train split (the labels are
not used by the methods).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from src.data.datasets import FolderImages
from src.utils.errors import UserError

# name -> (torchvision class, its folder under data.root, what it expects there)
LAYOUTS = {
    "eurosat": ("EuroSAT", "eurosat/2750", "eurosat/2750/<class>/*.jpg"),
    "pcam": ("PCAM", "pcam", "pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5"),
    "flowers102": ("Flowers102", "flowers-102", "flowers-102/jpg/*.jpg, imagelabels.mat and setid.mat"),
    "dtd": ("DTD", "dtd/dtd", "dtd/dtd/images/<class>/*.jpg and dtd/dtd/labels/*.txt"),
    "pets": ("OxfordIIITPet", "oxford-iiit-pet", "oxford-iiit-pet/images/*.jpg and oxford-iiit-pet/annotations/*.txt"),
}
TRANSFER = set(LAYOUTS)


def torchvision_dataset(name: str, root: str, download: bool, **kwargs):
    """torchvision's dataset object for ``name`` (files only; nothing is decoded), or one clear error line."""
    import torchvision.datasets as tvd

    cls_name, _, layout = LAYOUTS[name]
    if name == "pcam":
        try:
            import h5py  # noqa: F401 - torchvision's PCAM reads its h5 files with it
        except ImportError:
            raise UserError("data=pcam reads HDF5 files and needs h5py: pip install -e '.[transfer]' "
                            "(or pip install h5py)") from None
    try:
        return getattr(tvd, cls_name)(root, download=download, **kwargs)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError offline, network errors online
        how = "and could not be downloaded" if download else "(data.download=false)"
        raise UserError(f"{cls_name} is not under data.root={root} {how} ({type(e).__name__}); torchvision expects "
                        f"{layout} there: download it where there is internet (torchvision.datasets.{cls_name}"
                        f"(root, download=True)) and copy it, or set data.root to the folder holding it") from None


class PCamImages(Dataset):
    """PCam patches (96x96 RGB from lymph-node sections, label 1 = metastatic tissue in the centre) as uint8
    tensors, read from torchvision's h5 files one at a time, resized to ``image_size`` when it differs."""

    def __init__(self, dataset, image_size: int, channels: int):
        self.dataset, self.image_size, self.mode = dataset, image_size, "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        from PIL import Image

        image, label = self.dataset[i]
        image = image.convert(self.mode)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        arr = np.asarray(image, dtype=np.uint8)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), torch.tensor(int(label))


def stratified_split(labels: list[int], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a fixed stratified train/test split (every class split in the same proportion)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return sorted(train.tolist()), sorted(test.tolist())


def build(name: str, root: str, download: bool, image_size: int, channels: int,
          skip_bad: bool) -> tuple[Dataset, Dataset, Dataset, tuple[str, str], list[FolderImages]]:
    """(pretrain, eval_train, eval_val, split names, the file-backed datasets whose bad files are reported)."""
    def files(tv) -> FolderImages:  # torchvision's file list of one split (its private _image_files / _labels)
        return FolderImages(root, image_size, channels, skip_bad=skip_bad, classes=list(getattr(tv, "classes", [])),
                            samples=list(zip(tv._image_files, tv._labels, strict=True)))

    if name == "eurosat":
        tv = torchvision_dataset(name, root, download)
        images = FolderImages(root, image_size, channels, skip_bad=skip_bad, samples=tv.samples, classes=tv.classes)
        train, test = stratified_split([label for _, label in images.samples])
        return Subset(images, train), Subset(images, train), Subset(images, test), ("train (80%)", "test (20%)"), [images]
    if name == "pcam":
        train = PCamImages(torchvision_dataset(name, root, download, split="train"), image_size, channels)
        test = PCamImages(torchvision_dataset(name, root, download, split="test"), image_size, channels)
        return train, train, test, ("train", "test"), []
    if name == "dtd":
        parts = [files(torchvision_dataset(name, root, download, split=s, partition=1)) for s in ("train", "val")]
        test = files(torchvision_dataset(name, root, download, split="test", partition=1))
        train = ConcatDataset(parts)
        return train, train, test, ("train+val (partition 1)", "test"), [*parts, test]
    if name == "flowers102":
        parts = [files(torchvision_dataset(name, root, download, split=s)) for s in ("train", "val")]
        test = files(torchvision_dataset(name, root, download, split="test"))
        train = ConcatDataset(parts)
        return train, train, test, ("train+val", "test"), [*parts, test]
    if name == "pets":
        train = files(torchvision_dataset(name, root, download, split="trainval"))
        test = files(torchvision_dataset(name, root, download, split="test"))
        return train, train, test, ("trainval", "test"), [train, test]
    raise UserError(f"data.name={name!r} is not a transfer dataset; allowed: {', '.join(sorted(TRANSFER))}")


def missing(name: str, root: str) -> str | None:
    """Why ``name`` cannot be read from ``root`` without downloading (checked before a run starts), or None."""
    cls_name, folder, layout = LAYOUTS[name]
    if (Path(root) / folder).is_dir():
        return None
    return (f"{cls_name} is not under data.root={root} and data.download=false: torchvision expects {layout} there; "
            f"download it where there is internet (torchvision.datasets.{cls_name}(root, download=True)) and copy it, "
            "or set data.root to the folder holding it")


def pets_trimap(image: str) -> str:
    """Oxford-IIIT Pet's trimap of an image: ``.../images/<id>.jpg`` -> ``.../annotations/trimaps/<id>.png``."""
    p = Path(image)
    return str(p.parent.parent / "annotations" / "trimaps" / (p.stem + ".png"))


def pets_foreground(arr: np.ndarray) -> np.ndarray:
    """Pets' trimap values as mask values: 1 (the pet) -> 1, 2 (background) -> 0, 3 (the uncertain border around the
    pet) -> 255 (ignored by the Jaccard index)."""
    arr = arr[..., 0] if arr.ndim == 3 else arr
    return np.where(arr == 1, 1, np.where(arr == 3, 255, 0)).astype(np.uint8)
