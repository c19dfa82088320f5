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


def per_quintile(labels) -> str:
    """``'12/9/3/1/0 cells per income quintile (poorest first)'`` of class labels 0..4."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=N_CLASSES)
    return f"{'/'.join(map(str, counts))} cells per income quintile (poorest first)"


def too_small(where: str, labels, folds: int, val_share: float, fits: str | None, scheme: str = "") -> DataError:
    """The one line refusing a city too small for its folds: the city, its cells per quintile, the
    setting that would fit (or that more cells are needed)."""
    fix = f"set {fits}, or add cells" if fits else "add cells (or leave the city out of ses.cities)"
    return DataError(where, f"too small for ses.train.folds={folds} with ses.train.val_share={val_share:g}"
                     f"{scheme}: {len(labels)} cells, {per_quintile(labels)}", fix)


def fitting_share(make, folds: int) -> str | None:
    """The largest ``ses.train.folds`` below ``folds`` for which ``make(k)`` splits, as ``key=value``."""
    for k in range(folds - 1, 1, -1):
        try:
            make(k)
        except (ValueError, DataError):
            continue
        return f"ses.train.folds={k}"
    return None


def stratified_folds(labels, folds: int, val_share: float, seed: int, where: str = "cells") -> list[dict]:
    """Stratified k-fold indices; inside each training part a stratified validation share.

    Returns one dict per fold with ``train``, ``val`` and ``test`` index arrays (disjoint, covering all).
    A city too small for ``folds`` (a quintile with fewer cells than folds) or for the stratified
    validation share (a quintile with one training cell) is a DataError naming its cells per quintile
    and the number of folds that would fit, never a scikit-learn traceback.
    """
    labels = np.asarray(labels)
    try:
        return _stratified(labels, folds, val_share, seed)
    except ValueError:  # scikit-learn's refusal of too few members of a class
        fits = fitting_share(lambda k: _stratified(labels, k, val_share, seed), folds)
        raise too_small(where, labels, folds, val_share, fits) from None


def _stratified(labels: np.ndarray, folds: int, val_share: float, seed: int) -> list[dict]:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    counts = np.bincount(labels, minlength=N_CLASSES)
    if counts.min() < folds:
        raise ValueError(f"a class with {counts.min()} cells, fewer than {folds} folds")
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
