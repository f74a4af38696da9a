"""One LightningDataModule for every dataset: raw uint8 images and labels out, views made on the device.

Training batches are ``(images uint8 (B, C, H, W), labels (B,))`` with label -1 where unknown; the
method turns them into views in ``on_after_batch_transfer``. ``eval_train_dataloader`` and
``eval_val_dataloader`` serve a labelled train split and a held-out split without augmentation for
the evaluation callbacks.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from src.data import captions as cap
from src.data import datasets as ds
from src.data import transfer
from src.data.sampler import DeviceLoader, epoch_loader
from src.utils.errors import UserError

IN_MEMORY = {"digits", "fashion_mnist", "cifar10", "cifar100", "stl10", "fake"}
FOLDERS = {"imagenet", "imagenet100", "imagefolder"}
CAPTIONS = "captions"  # pre-training on a caption file or shards only; data.root (optional) is a labelled folder tree


class SSLDataModule(L.LightningDataModule):
    def __init__(self, name: str, root: str | None = None, image_size: int | None = 32, crop_size: int | None = None,
                 channels: int = 3, num_classes: int | None = 10, mean: list[float] | None = None, std: list[float] | None = None,
                 batch_size: int = 256, eval_batch_size: int = 512, num_workers: int = 0,
                 download: bool = True, max_train_samples: int | None = None, train_dir: str = "train",
                 val_dir: str | None = "val", labelled: bool = True, seed: int = 0, skip_bad_images: bool = True,
                 captions: str | None = None, caption_keys: list[str] | None = None, image_root: str | None = None,
                 val_captions: str | None = None, held_out_pairs: int = 1000, num_samples: int | None = None,
                 shuffle_buffer: int = 1000, class_names: list[str] | None = None,
                 prompt_templates: list[str] | None = None, on_device: bool = False, masks: str | None = None):
        super().__init__()
        if name not in IN_MEMORY | FOLDERS | transfer.TRANSFER | {CAPTIONS}:
            allowed = ", ".join(sorted(IN_MEMORY | FOLDERS | transfer.TRANSFER | {CAPTIONS}))
            raise UserError(f"data.name={name!r} is unknown; allowed: {allowed}")
        if image_size is None and name not in FOLDERS:  # folders: taken from the images (conf/data/imagefolder.yaml)
            raise UserError(f"data.image_size is not set; {name} needs one: set data.image_size=<pixels>")
        if on_device and (name not in IN_MEMORY or captions):
            what = "captions are read from files" if captions else f"data={name} is read from files, not held in memory"
            raise UserError(f"data.on_device=true keeps an in-memory dataset (digits, fashion_mnist, cifar10, cifar100, "
                            f"stl10) on the training device, but {what}; set data.on_device=false")
        if on_device and num_workers > 0:
            raise UserError(f"data.on_device=true cuts batches on the device with no loader workers, but "
                            f"data.num_workers={num_workers}; set data.num_workers=0")
        if masks and name not in FOLDERS:
            raise UserError(f"data.masks={masks} names foreground masks beside a folder dataset (data=imagefolder, "
                            f"imagenet or imagenet100), but data={name}; data=pets brings its own trimaps, other "
                            "data: write the images out as a folder with their masks")
        self.masks = masks  # protocol=segment: <masks>/<image path under root (or its split)>.png, non-zero = foreground
        self.on_device = on_device  # the pre-training images live on the training device (DeviceLoader)
        self._device_tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.name, self.root, self.image_size, self.channels = name, root, image_size, channels
        self.crop_size = crop_size or image_size
        self.num_classes, self.mean, self.std = num_classes, mean, std
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.download, self.max_train_samples, self.seed = download, max_train_samples, seed
        self.train_dir, self.val_dir, self.labelled = train_dir, val_dir, labelled
        self.skip_bad_images = skip_bad_images  # folders: a file that fails to decode is skipped (False: an error)
        self.folders: list[ds.SkipLog] = []  # datasets whose skipped files DataHealth reports
        # image–text pairs (src/data/captions.py): pre-training samples gain a caption, which the method's
        # tokenizer (set by it in its setup hook) turns into tokens in the loader; held-out pairs for retrieval
        self.captions, self.caption_keys, self.image_root = captions, list(caption_keys or ["filepath", "title"]), image_root
        self.val_captions, self.held_out_pairs, self.num_samples = val_captions, held_out_pairs, num_samples
        self.shuffle_buffer, self.class_names = shuffle_buffer, list(class_names) if class_names else None
        self.prompt_templates = list(prompt_templates or cap.DEFAULT_TEMPLATES)
        self.tokenizer = None
        self.pairs: Dataset | None = None  # held-out image–caption pairs (all captions of each image)
        self._captioned = None  # the pre-training caption dataset (its epoch picks the captions)
        self._shards: list[str] = []  # WebDataset training shards
        self.pretrain: Dataset | None = None
        self.eval_train: Dataset | None = None
        self.eval_val: Dataset | None = None
        self.has_labels = True
        self.eval_split_names = ("train", "test")

    # ---- building the splits -------------------------------------------------------------------
    def check_root(self) -> None:
        """Fail early, in one line, when a dataset that needs a folder has none."""
        if self.name == CAPTIONS and not self.captions:
            raise UserError("data=captions needs data.captions=<.csv/.tsv/.jsonl/COCO .json file or .tar shards>")
        for source in (self.captions, self.val_captions):
            if source and source != "class_prompts":
                if cap.caption_format(source) == "webdataset":
                    cap.shard_list(source)
                elif not Path(source).is_file():
                    raise UserError(f"data.captions={source}: no such file; point it at a .csv/.tsv/.jsonl/COCO .json "
                                    "caption file or WebDataset shards such as 'shards/{000000..000009}.tar'")
        if self.name in FOLDERS or (self.name == CAPTIONS and self.root):
            if not self.root:
                raise UserError(f"data.root is not set: {self.name} reads a class-per-folder tree; "
                                f"pass data.root=/path/to/{self.name}")
            train = Path(self.root) / (self.train_dir or "")
            if not train.is_dir():
                raise UserError(f"data.root={self.root}: folder {train} does not exist; point data.root at "
                                f"the dataset (with {self.train_dir}/ and {self.val_dir}/ inside)")
            self._check_folders(train)
            if self.masks and not Path(self.masks).is_dir():
                raise UserError(f"data.masks={self.masks} is not a folder; point it at the masks: one PNG per image, "
                                "at the image's path under data.root (non-zero pixels = foreground)")
        elif self.name not in {"digits", "fake", CAPTIONS} and not self.root:
            raise UserError(f"data.root is not set for {self.name}; pass data.root=/path/to/data")
        elif self.name in transfer.TRANSFER and not self.download and (why := transfer.missing(self.name, self.root)):
            raise UserError(why)

    def _check_folders(self, train: Path) -> None:
        """No images, or one class where evaluation needs labels: cheap checks (the first image found is
        enough; class folders are only listed), so they run before any run folder is made."""
        kinds = "/".join(sorted(ds.IMAGE_EXTENSIONS))
        if not ds.has_image(train):
            raise UserError(f"data.root={self.root}: no images under {train} (looked for {kinds} files); put "
                            f"them in {train}/<class>/ or point data.root at the dataset")
        val = Path(self.root) / self.val_dir if self.val_dir else None
        if val is None or not val.is_dir():
            return
        if not ds.has_image(val):
            raise UserError(f"data.root={self.root}: no images under {val} (looked for {kinds} files); put the "
                            "held-out images there or set data.val_dir=null (evaluation is then skipped)")
        classes = sorted(d.name for d in train.iterdir() if d.is_dir()) if self.labelled else []
        if len(classes) == 1:
            raise UserError(f"data.root={self.root}: {train} has one class folder ({classes[0]}) but evaluation "
                            "needs labels of at least 2 classes; add class folders, or set data.labelled=false to "
                            "pre-train without labels (evaluation is then skipped)")

    def skipped_images(self) -> dict[str, str]:
        """Files of the folder datasets that failed to decode so far (path -> reason), in any worker."""
        out: dict[str, str] = {}
        for folder in self.folders:
            out.update(folder.skipped)
        return dict(sorted(out.items()))

    def prepare_data(self) -> None:
        """Runs on one process: downloads where allowed and needed."""
        self.check_root()
        if self.name in {"cifar10", "cifar100", "stl10", "fashion_mnist"} and self.download:
            self._load_in_memory(download=True)
        if self.name in transfer.TRANSFER and self.download:
            self._transfer(download=True)

    def _transfer(self, download: bool):
        return transfer.build(self.name, self.root, download, self.image_size, self.channels, self.skip_bad_images)

    def _load_in_memory(self, download: bool):
        if self.name == "digits":
            return ds.digits(self.image_size)
        if self.name == "fashion_mnist":
            return ds.fashion_mnist(self.root, download=download)
        if self.name in {"cifar10", "cifar100"}:
            return ds.cifar(self.root, num_classes=int(self.name[5:]), download=download)
        if self.name == "stl10":
            return ds.stl10(self.root, download=download)
        return ds.fake(image_size=self.image_size, channels=self.channels, num_classes=self.num_classes,
                       seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.pretrain is not None:
            return
        self.check_root()
        if self.name in IN_MEMORY:
            splits = self._load_in_memory(download=False)
            train, test = splits[-2], splits[-1]
            pretrain = splits[0]
            got = tuple(train.images.shape[1:])
            want = (self.channels, self.image_size, self.image_size)
            if got != want:
                raise UserError(f"data.image_size/channels say {want} but {self.name} images are {got}; "
                                f"fix data.image_size={got[1]} data.channels={got[0]}")
            self.pretrain = ds.TensorImages(pretrain)
            self.eval_train, self.eval_val = ds.TensorImages(train), ds.TensorImages(test)
            self.has_labels = bool((train.labels >= 0).any())
        elif self.name in transfer.TRANSFER:
            self.pretrain, self.eval_train, self.eval_val, self.eval_split_names, self.folders = self._transfer(False)
        elif self.name == CAPTIONS and not self.root:  # no labelled tree: retrieval is the only evaluation
            self.has_labels, self.eval_split_names = False, ("none", "none")
        else:
            root = Path(self.root)
            self.pretrain = ds.FolderImages(str(root / self.train_dir), self.image_size, self.channels, self.labelled,
                                            skip_bad=self.skip_bad_images)
            self.has_labels = self.labelled and bool(self.pretrain.classes)
            self.eval_train = self.pretrain
            val = root / self.val_dir if self.val_dir else None
            self.eval_val = (ds.FolderImages(str(val), self.image_size, self.channels, self.labelled,
                                             skip_bad=self.skip_bad_images)
                             if val is not None and val.is_dir() else None)
            self.folders = [d for d in (self.pretrain, self.eval_val) if d is not None]
            self.has_labels = self.has_labels and self.eval_val is not None
            self.eval_split_names = (self.train_dir, self.val_dir or "none")
            self.num_classes = len(self.pretrain.classes) or self.num_classes
            if self.has_labels and len(self.pretrain.classes) < 2:
                raise UserError(f"data.root={self.root}: found {len(self.pretrain.classes)} class folder; "
                                "evaluation needs at least 2 (or set data.labelled=false)")
        if self.captions:
            self._setup_captions()
        if self._shards:  # a stream: max_train_samples shortens its epochs
            self.num_samples = min(self.num_samples, self.max_train_samples or self.num_samples)
        elif self.max_train_samples is not None and self.max_train_samples < len(self.pretrain):
            idx = torch.randperm(len(self.pretrain), generator=torch.Generator().manual_seed(self.seed))
            self.pretrain = Subset(self.pretrain, idx[: self.max_train_samples].tolist())
        world = self.trainer.world_size if self.trainer is not None else 1
        count = self.num_samples if self._shards else len(self.pretrain)
        if count < self.batch_size * world:
            raise UserError(f"data.batch_size={self.batch_size} x {world} device(s) is larger than the "
                            f"{count} pretraining images; lower data.batch_size")

    # ---- image–text pairs -------------------------------------------------------------------------
    def _setup_captions(self) -> None:
        """Pre-training pairs and held-out pairs from ``data.captions`` (see src/data/captions.py)."""
        seed = self.seed
        if self.captions == "class_prompts":
            if not self.has_labels:
                raise UserError(f"data.captions=class_prompts needs a labelled dataset; data={self.name} has no labels")
            labels = getattr(getattr(self.pretrain, "split", None), "labels", None)
            if labels is not None and bool((labels < 0).any()):
                raise UserError(f"data.captions=class_prompts: {int((labels < 0).sum())} pre-training images of "
                                f"{self.name} have no label; use a dataset whose pre-training images are all labelled")
            names = self.zeroshot_class_names()
            self._captioned = cap.ClassPrompts(self.pretrain, names, self.prompt_templates, seed)
            self.pretrain = self._captioned
            self.pairs = cap.ClassPrompts(self.eval_val, names, self.prompt_templates, seed, all_captions=True)
            return
        if cap.caption_format(self.captions) == "webdataset":
            self._shards = cap.shard_list(self.captions)
            held = [] if self.val_captions or len(self._shards) < 2 else self._shards[-1:]
            self._shards = self._shards[: len(self._shards) - len(held)]  # the last shard holds out pairs
            self.num_samples = self.num_samples or cap.count_web_samples(self._shards)
            self._web_log = ds.SkipLog()
            self.folders.append(self._web_log)
            self.pretrain = None
            if held:
                self.pairs = self._read_web_pairs(held)
        else:
            pairs, empty = cap.read_caption_file(self.captions, self.image_root, *self.caption_keys)
            held: list = []
            if not self.val_captions and self.held_out_pairs > 0:
                order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
                n = min(self.held_out_pairs, len(pairs) // 5)
                held, pairs = [pairs[i] for i in sorted(order[:n])], [pairs[i] for i in sorted(order[n:])]
            self._captioned = cap.CaptionedImages(pairs, self.image_size, self.channels, self.skip_bad_images, seed)
            self.pretrain = self._captioned
            self.folders.append(self._captioned)
            for where in empty:  # reported with the unreadable images (DataHealth)
                self._captioned._record(where, "empty caption")
            if held:
                self.pairs = self._held_out_files(held)
        if self.val_captions:
            if cap.caption_format(self.val_captions) == "webdataset":
                self.pairs = self._read_web_pairs(cap.shard_list(self.val_captions))
            else:
                self.pairs = self._held_out_files(cap.read_caption_file(self.val_captions, self.image_root,
                                                                        *self.caption_keys)[0])

    def _held_out_files(self, pairs: list) -> Dataset:
        """Held-out image files with all their captions (retrieval), their bad files reported like the others."""
        held = cap.CaptionedImages(pairs, self.image_size, self.channels, self.skip_bad_images, self.seed,
                                   all_captions=True)
        self.folders.append(held)
        return held

    def _read_web_pairs(self, shards: list[str]) -> list:
        """Up to ``held_out_pairs`` held-out pairs of ``shards``, decoded once into memory (a list is a dataset)."""
        log = ds.SkipLog()
        self.folders.append(log)
        return list(itertools.islice(cap.web_pairs(shards, self.image_size, self.channels, log._record, True),
                                     self.held_out_pairs))

    def zeroshot_class_names(self) -> list[str]:
        """The class names zero-shot classification and class prompts use: ``data.class_names``, else the
        dataset's own (known lists, the splits' or folders' names)."""
        names = self.class_names or cap.CLASS_NAMES.get(self.name)
        if names is None:
            found = self.eval_train
            while found is not None and not getattr(found, "classes", None) and not getattr(getattr(found, "split", None), "classes", None):
                found = getattr(found, "dataset", None)  # through Subset
            raw = getattr(found, "classes", None) or getattr(getattr(found, "split", None), "classes", None)
            names = [cap.readable_name(str(c)) for c in raw] if raw else None
        if not names:
            raise UserError(f"data={self.name} has no class names for zero-shot prompts; set "
                            "data.class_names=[name0,name1,...] in label order")
        if self.num_classes and len(names) != self.num_classes:
            raise UserError(f"data.class_names has {len(names)} names but {self.name} has {self.num_classes} classes; "
                            "give one name per class, in label order")
        return list(names)

    def segmentation_pairs(self) -> Dataset:
        """The evaluation split's images with their foreground masks (:class:`src.data.datasets.SegmentationPairs`):
        Oxford-IIIT Pet's trimaps, or a folder dataset's ``data.masks``; one line when there are none."""
        if self.name == "pets":
            return ds.SegmentationPairs(self.eval_val, transfer.pets_trimap, transfer.pets_foreground)
        if self.masks and isinstance(self.eval_val, ds.FolderImages):
            roots = [self.root, self.eval_val.root]
            return ds.SegmentationPairs(self.eval_val, lambda path: ds.folder_mask_path(self.masks, path, roots))
        if self.masks:
            raise UserError(f"data.masks={self.masks}: data.root={self.root} has no evaluation folder "
                            f"({self.val_dir}); the masks are read for its images")
        raise UserError(f"data={self.name} has no foreground masks: use data=pets (its trimaps) or a folder dataset "
                        "with data.masks=<folder of PNG masks, at each image's path under data.root>")

    # ---- loaders -------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self):
        """Shuffled from (run seed, epoch), one slice per rank, resumable mid-epoch (src/data/sampler.py).
        The run seed is the one ``seed_everything`` set (``torch.initial_seed()``). Caption data: batches
        gain the captions' tokens (workers are re-made each epoch, so they see which captions it draws);
        WebDataset shards are streamed instead (see :func:`src.data.captions.web_stream`)."""
        collate = cap.TokenizingCollate(self.tokenizer) if self.captions else None
        if self._shards:
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return cap.web_stream(self._shards, self.image_size, self.channels, self._web_log._record,
                                  torch.initial_seed() * 1000 + rank, self.shuffle_buffer, self.batch_size,
                                  self.num_samples // (self.batch_size * world), collate, self.num_workers)
        if self.on_device:
            return DeviceLoader(self._pretrain_on_device(), self.batch_size, torch.initial_seed())
        on_epoch = self._captioned.set_epoch if self._captioned is not None else None
        return epoch_loader(self.pretrain, self.batch_size, torch.initial_seed(), on_epoch, drop_last=True,
                            num_workers=self.num_workers, collate_fn=collate,
                            persistent_workers=self.num_workers > 0 and on_epoch is None,
                            pin_memory=torch.cuda.is_available())

    def _pretrain_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-training images (uint8) and labels, copied once to the trainer's device."""
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self._device_tensors is None or self._device_tensors[0].device != device:
            data, idx = self.pretrain, None
            if isinstance(data, Subset):  # max_train_samples
                data, idx = data.dataset, torch.as_tensor(data.indices)
            images, labels = data.split.images, data.split.labels
            if idx is not None:
                images, labels = images[idx], labels[idx]
            self._device_tensors = (images.to(device), labels.to(device))
        return self._device_tensors

    def pairs_dataloader(self) -> DataLoader | None:
        """Held-out image–caption pairs as ``(images, labels, [captions of each image])`` (None without any)."""
        if self.pairs is None:
            return None
        return DataLoader(self.pairs, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=cap.collate_pairs)

    def eval_train_dataloader(self) -> DataLoader:
        return self._loader(self.eval_train, self.eval_batch_size, shuffle=False, drop_last=False)

    def eval_val_dataloader(self) -> DataLoader:
        if self.eval_val is None:
            raise UserError(f"{self.name} has no held-out split to evaluate on")
        return self._loader(self.eval_val, self.eval_batch_size, shuffle=False, drop_last=False)
