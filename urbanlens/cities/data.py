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

from ..core.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def transforms(input_size: int, train: bool) -> v2.Compose:
    """Resize to ``input_size`` (square), random horizontal and vertical flips when training, ImageNet
    normalisation. Input: a uint8 CxHxW tensor; output: float32."""
    steps = [v2.Resize((input_size, input_size), antialias=True)]
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


def split_dataset(manifest: pd.DataFrame, split: str, patches_dir: str | Path, classes: Sequence[str],
                  transform=None, decode_size: int | None = None) -> PatchDataset:
    """The patches of one split of the manifest, labelled by their index in ``classes`` (IATA codes)."""
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
    files = [Path(patches_dir) / p for p in rows["path"]]
    return PatchDataset(files, rows["iata"].map(index).to_numpy(), transform, decode_size)
