"""City patches as tensors: decoding, transforms, the dataset of one split."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..core import store
from ..core.batch_ops import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize, random_flips
from ..core.errors import DataError

STORE_SETTINGS = {"decoder": "PIL draft at input_size, torchvision Resize antialias on uint8", "version": 1}


def resize(input_size: int) -> v2.Resize:
    """The resize of every patch to the model input (square, antialiased, on the uint8 image)."""
    return v2.Resize((input_size, input_size), antialias=True)


def transforms(input_size: int, train: bool) -> v2.Compose:
    """Resize to ``input_size`` (square), random horizontal and vertical flips when training, ImageNet
    normalisation. Input: a uint8 CxHxW tensor; output: float32."""
    steps = [resize(input_size)]
    if train:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def read_image(path: str | Path, decode_size: int | None = None) -> torch.Tensor:
    """An image file as a uint8 RGB CxHxW tensor. With ``decode_size``, a JPEG is decoded at a reduced scale
    (PIL's DCT-domain ``draft``) that is still at least ``decode_size`` on each side: much faster when
    patches are larger than the model input. Training and testing read patches this way."""
    try:
        with Image.open(path) as im:
            if decode_size:
                im.draft("RGB", (decode_size, decode_size))
            arr = np.array(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e}); re-run preprocessing.py") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


class PatchDataset(Dataset):
    """Image files with integer labels, read by ``read_image`` and transformed."""

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int], transform=None,
                 decode_size: int | None = None):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = read_image(self.files[i], self.decode_size)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def split_rows(manifest: pd.DataFrame, split: str, patches_dir: str | Path,
               classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """The patch files of one split of the manifest and their labels (index in ``classes``)."""
    source = Path(patches_dir) / "manifest.csv"
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise DataError(f"{source}: no patches in split '{split}'; re-run preprocessing.py "
                 f"(splits present: {', '.join(sorted(manifest['split'].unique()))})")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["iata"]) - set(index))
    if unknown:
        raise DataError(f"{source}: cities {', '.join(unknown)} of split '{split}' are not among the model's "
                 f"classes ({', '.join(classes)}); train on the same patches or re-run train_classification.py")
    return [Path(patches_dir) / p for p in rows["path"]], rows["iata"].map(index).to_numpy()


def split_dataset(manifest: pd.DataFrame, split: str, patches_dir: str | Path, classes: Sequence[str],
                  transform=None, decode_size: int | None = None) -> PatchDataset:
    """The patches of one split of the manifest, labelled by their index in ``classes`` (IATA codes)."""
    files, labels = split_rows(manifest, split, patches_dir, classes)
    return PatchDataset(files, labels, transform, decode_size)


def decode_for_store(path: str | Path, input_size: int) -> torch.Tensor:
    """A patch as the training path reads it up to the augmentation: decoded (``read_image`` at
    ``input_size``) and resized to ``input_size``, uint8 3 x input_size x input_size."""
    return resize(input_size)(read_image(path, input_size))


def split_store(manifest: pd.DataFrame, split: str, patches_dir: str | Path, classes: Sequence[str],
                input_size: int, desc: str | None = None, name: str | None = None, workers: int = 0,
                distributed: bool = False) -> store.StoreDataset:
    """The patches of one split as a uint8 store ``<patches_dir>/store/<name>_<input_size>`` (``name``:
    the split's by default; built when missing or stale), items uint8 3 x input_size x input_size; finish
    each batch on the device with ``train_batches`` or ``eval_batches``. ``workers``, ``distributed``: how it is
    built (``store.ensure``; with ``distributed`` every rank calls this)."""
    files, labels = split_rows(manifest, split, patches_dir, classes)
    shape = (3, input_size, input_size)
    path = Path(patches_dir) / "store" / f"{name or split}_{input_size}"
    store.ensure(path, files, lambda f: decode_for_store(f, input_size), shape, STORE_SETTINGS, desc, workers,
                 distributed)
    return store.StoreDataset(path, len(files), shape, labels)


def train_batches(seed: int, epoch: int, rank: int = 0, world_size: int = 1):
    """A uint8 store batch on the device -> the training input: random horizontal and vertical flips
    (drawn from a generator of (seed, epoch), so a resumed epoch flips alike; under DDP each image of
    rank ``rank``'s share flips as it does in one process: ``random_flips``'s ``share``), ImageNet
    normalisation. Equals ``transforms(size, train=True)`` item by item, up to which flips are drawn."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009)
    return lambda x: imagenet_normalize(random_flips(x, gen, share=(rank, world_size)))


def eval_batches(x: torch.Tensor) -> torch.Tensor:
    """A uint8 store batch on the device -> the evaluation input (``transforms(size, train=False)``)."""
    return imagenet_normalize(x)
