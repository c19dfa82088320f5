"""Cross-validation folds of a city's cells."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from ..core.errors import DataError
from .model import N_CLASSES


def fold_seed(seed: int, city: str, fold: int) -> int:
    """A seed for one (city, fold), stable across runs and independent of the city list's order."""
    return (seed * 1_000_003 + zlib.crc32(city.encode()) + 7919 * fold) % 2**31


def stratified_folds(labels, folds: int, val_share: float, seed: int, where: str = "cells") -> list[dict]:
    """Stratified k-fold indices; inside each training part a stratified validation share.

    Returns one dict per fold with ``train``, ``val`` and ``test`` index arrays (disjoint, covering all).
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=N_CLASSES)
    if counts.min() < folds:
        raise DataError(where, f"{len(labels)} cells give a class with {counts.min()} cells, fewer than "
                        f"{folds} folds", "lower ses_train.folds or add cells")
    out = []
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (train, test) in enumerate(skf.split(np.zeros(len(labels)), labels)):
        val = np.array([], dtype=int)
        if val_share > 0:  # at least one validation cell per class, so stratification is possible
            n_val = max(math.ceil(val_share * len(train)), len(np.unique(labels[train])))
            train, val = train_test_split(train, test_size=n_val, stratify=labels[train],
                                          random_state=seed + k + 1)
        out.append({"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)})
    return out


def folds_frame(cell_ids, splits: list[dict], scheme: str = "stratified", blocks=None) -> pd.DataFrame:
    """The split manifest of a city: one row per (fold, cell) with ``part`` train, val or test (or
    ``buffer``: left out of that fold, too close to its test cells), the ``scheme`` and each cell's
    ``block`` (its spatial block, its city under leave-one-city-out, empty for stratified folds),
    sorted by fold then cell id."""
    cell_ids = np.asarray(list(cell_ids), dtype=object)
    blocks = np.full(len(cell_ids), "", dtype=object) if blocks is None else np.asarray(blocks, dtype=object)
    rows = []
    for k, split in enumerate(splits):
        part = np.full(len(cell_ids), "buffer", dtype=object)
        for name in ("train", "val", "test"):
            part[split[name]] = name
        rows.append(pd.DataFrame({"fold": k, "cell_id": cell_ids, "part": part, "scheme": scheme, "block": blocks}))
    columns = ["fold", "cell_id", "part", "scheme", "block"]
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    return df.sort_values(["fold", "cell_id"], kind="stable").reset_index(drop=True)[columns]
