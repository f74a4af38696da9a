"""`python -m src.bench.fashion_mnist_folder OUT`: Fashion-MNIST written out as a folder dataset with exact foreground
masks, for ``protocol=segment`` offline.

Fashion-MNIST's garments lie on a black background, so the non-zero pixels of an image are its foreground. This
writes ``OUT/train/<class>/<index>.png`` (the first ``--train`` training images), ``OUT/val/<class>/<index>.png``
(the test split, or its first ``--val`` images) and ``OUT/masks/val/<class>/<index>.png`` (255 where the image is
non-zero), so that

    python -m src.eval CKPT protocol=segment data=imagefolder data.root=OUT data.masks=OUT/masks data.channels=1 \\
        data.mean=[0.286] data.std=[0.353]

scores a checkpoint trained on ``data=fashion_mnist`` (28 px, the same normalisation) against those masks. Class
folders are ``0_t-shirt`` ... ``9_ankle-boot``, so the sorted folder order is the label order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from src.data.datasets import fashion_mnist

CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def write(out: Path, train: int, val: int | None, root: str = "data") -> dict[str, int]:
    """Write the folder; returns how many images each part holds."""
    tr, te = fashion_mnist(root, download=False)
    counts = {}
    for split, data, n in (("train", tr, train), ("val", te, val)):
        n = len(data) if n is None else min(n, len(data))
        for i in range(n):
            image = data.images[i, 0].numpy()
            folder = f"{int(data.labels[i])}_{CLASSES[int(data.labels[i])]}"
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / split / folder / f"{i:05d}.png")
            if split == "val":
                (out / "masks" / split / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(((image > 0) * 255).astype(np.uint8)).save(out / "masks" / split / folder / f"{i:05d}.png")
        counts[split] = n
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.bench.fashion_mnist_folder", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=10000, help="training images written (the labelled train split)")
    p.add_argument("--val", type=int, default=None, help="test images written with masks (default: all 10,000)")
    p.add_argument("--root", default="data", help="data.root where Fashion-MNIST's IDX files may lie")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} is not empty; pass a new folder", file=sys.stderr)
        return 2
    counts = write(args.out, args.train, args.val, args.root)
    print(f"wrote {counts['train']} train and {counts['val']} val images (with masks) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
