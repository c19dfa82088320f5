"""Cells as training data: the cell index, income quintiles, cell images and their dataset."""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms.v2 import functional as TF

from ..core import outputs, store
from ..core.batch_ops import minmax_scale, random_flips  # noqa: F401 (random_flips: fitting's flips)
from ..core.errors import DataError
from .extraction import INDEX_FIX
from .model import N_CLASSES


def income_quintiles(income) -> np.ndarray:
    """Income quintile of each cell within its city: 0 = poorest fifth ... 4 = richest fifth.

    Classes come from the rank of each income, so they hold equal counts (to within one) and equal
    incomes always share a class (ties get their average rank instead of breaking quantile edges).
    """
    income = np.asarray(income, dtype=float).ravel()
    if income.size == 0:
        raise ValueError("income_quintiles: no incomes given")
    if not np.all(np.isfinite(income)):
        raise ValueError("income_quintiles: incomes must be finite (drop cells without income first)")
    ranks = stats.rankdata(income, method="average")  # 1..n
    return np.clip(np.floor((ranks - 0.5) * N_CLASSES / income.size), 0, N_CLASSES - 1).astype(np.int64)


def quintile_edges(income, labels) -> list[float]:
    """The highest income of each class but the last: a cell above ``edges[k]`` is richer than class k."""
    income, labels = np.asarray(income, float), np.asarray(labels)
    return [float(income[labels == k].max()) if np.any(labels == k) else float("nan")
            for k in range(N_CLASSES - 1)]


def read_cell_pixels(path) -> np.ndarray:
    """A cell image file as uint8 RGB H x W x 3; DataError naming the file when it does not read (also
    when it is damaged after the stage checked it, and met while training)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for damaged files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(path, f"cannot read as an image ({reason})",
                        "delete it and re-run generate_fr_ua_aerial_data.py, which extracts it again") from None


def load_cell_image(path, size: int) -> torch.Tensor:
    """A cell PNG as float [3, size, size], resized (antialiased) and min-max scaled to [0, 1] over the
    whole image (the paper's per-image scaling). A constant image becomes all zeros."""
    arr = read_cell_pixels(path)
    img = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))  # one copy
    if img.shape[-2:] != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
        lo, hi = img.min(), img.max()
    else:  # the extremes of the 8-bit pixels, cheaper than on floats
        lo, hi = torch.tensor(float(arr.min())), torch.tensor(float(arr.max()))
    return img.sub_(lo).div_(hi - lo) if hi > lo else torch.zeros_like(img)


class CellDataset(torch.utils.data.Dataset):
    """(image, label) pairs of cell PNGs; ``cache=True`` decodes every image once, up front."""

    def __init__(self, files, labels, size: int, cache: bool = False):
        self.files = [Path(f) for f in files]
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.size = size
        self.images = None
        if cache and self.files:
            self.images = torch.stack([load_cell_image(f, size) for f in self.files])

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "CellDataset":
        """The items at ``indices``, sharing the decoded images when cached."""
        idx = np.asarray(indices, dtype=int)
        sub = copy.copy(self)
        sub.files = [self.files[i] for i in idx]
        sub.labels = self.labels[torch.as_tensor(idx, dtype=torch.long)]
        sub.images = self.images[torch.as_tensor(idx, dtype=torch.long)] if self.images is not None else None
        return sub

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else load_cell_image(self.files[i], self.size)
        return img, self.labels[i]


STORE_SETTINGS = {"decoder": "PIL RGB, uint8 at the cell's pixels", "version": 1}


def cell_store(files, labels, size: int, path, desc: str | None = None, workers: int = 0,
               distributed: bool = False) -> store.StoreDataset:
    """The cells' images as a uint8 store at ``path`` (built when missing or stale), items uint8
    3 x px x px as extracted (px: the first image's size; every cell must have it); on the device each
    batch is resized to ``size`` when that differs and min-max scaled (``prepare``), giving
    ``load_cell_image``'s values (the same float operations; resized batches agree within float rounding).
    ``workers``, ``distributed``: how it is built (``store.ensure``; with ``distributed`` every rank calls this)."""
    px = 0
    if len(files):
        with Image.open(files[0]) as im:
            px = im.size[0]
    shape = (3, px, px)
    store.ensure(path, files, lambda f: np.ascontiguousarray(read_cell_pixels(f).transpose(2, 0, 1)), shape,
                 STORE_SETTINGS, desc, workers, distributed)
    return store.StoreDataset(path, len(files), shape, labels,
                              prepare=functools.partial(minmax_scale, size=size))


CELL_COLUMNS = ("cell_id", "city", "income", "path", "non_void")


def read_cells(path) -> "pd.DataFrame":
    """The cell index (layer ``cells``) written by the extraction stage; DataError naming the fix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: cell index not found; run generate_fr_ua_aerial_data.py first")
    cells = outputs.read_gpkg(path, "cells", "generate_fr_ua_aerial_data.py", CELL_COLUMNS, INDEX_FIX,
                              what="cell index (layer 'cells')")
    twice = cells["cell_id"][cells["cell_id"].duplicated()].unique()
    if len(twice):  # the same cell on both sides of a fold: scores of memory, not of reading income
        raise DataError(path, f"{len(twice)} cell id(s) listed more than once ({', '.join(map(str, twice[:3]))})",
                        "rebuild the index: generate_fr_ua_aerial_data.py --set overwrite=true")
    return cells


def readable_image(path) -> str | None:
    """None when ``path`` is an image file whose chunks check out (PIL's verify: cheap, no decoding),
    else what is wrong with it ("missing", "unreadable: <reason>")."""
    if not Path(path).is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        return f"unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def city_cells(cells, city: str, image_root) -> tuple[pd.DataFrame, list[str]]:
    """The city's non-void cells with a finite income whose image exists and reads (sorted by cell id),
    and a line ``<image path> (<problem>)`` for each cell left out because its image is missing or broken."""
    df = cells[(cells["city"] == city) & cells["non_void"].astype(bool)]
    df = df[np.isfinite(df["income"].astype(float))]
    problems = [readable_image(Path(image_root) / p) for p in df["path"]]
    ok = np.array([p is None for p in problems], dtype=bool)
    left_out = [f"{Path(image_root) / p} ({why})" for p, why in zip(df["path"], problems) if why is not None]
    df = df[ok].sort_values("cell_id").reset_index(drop=True)
    return pd.DataFrame(df.drop(columns="geometry", errors="ignore")), left_out


def no_cells_reason(cells, city: str, max_nodata: float) -> str | None:
    """Why the cell index gives a city no cell to train on, in words; None when it has some (non-void,
    with a finite income; whether their images read is checked by city_cells)."""
    own = cells[cells["city"] == city]
    if len(own) == 0:
        return "the cell index holds no census cell inside its Urban Atlas boundary"
    non_void = own[own["non_void"].astype(bool)]
    if len(non_void) == 0:
        return f"all {len(own)} of its cells are void (more than {max_nodata:.0%} nodata: no orthophoto over them?)"
    if not np.isfinite(non_void["income"].astype(float)).any():
        return f"none of its {len(non_void)} non-void cells has a finite income"
    return None


def fits_in_memory(n_images: int, size: int, budget_mb: float) -> bool:
    return n_images * 3 * size * size * 4 <= budget_mb * 2**20
