"""Folds that respect space: square blocks of the EPSG:3035 grid, and leave-one-city-out.

Random folds of 200 m cells put near-twins of every test cell (its neighbours, with similar images and
incomes) into training, and so overstate skill (Ploton et al. 2020). Here whole blocks go to folds, and
training cells within ``buffer_m`` of a test cell can be dropped as well.
"""
from __future__ import annotations

import math

import numpy as np

from ..core.errors import ConfigError, DataError
from ..core.schema import CV_SCHEMES as SCHEMES
from .folds import per_quintile
from .grid import block_ids, cell_origins, parse_inspire_id
from .model import N_CLASSES


def assign_blocks(blocks, labels, folds: int, seed: int) -> np.ndarray:
    """Fold of each cell, whole blocks per fold, balanced over classes as far as blocks allow.

    Greedy: blocks in decreasing size (seeded random order among equal sizes), each to the fold whose
    class counts are furthest below their target (count of the class / folds), weighted by the block's
    own class mix; ties go to the fold with fewest cells, then the lowest index.
    """
    blocks, labels = np.asarray(blocks, dtype=object), np.asarray(labels, dtype=int)
    names, inverse = np.unique(blocks, return_inverse=True)
    if len(names) < folds:
        raise DataError("spatial folds", f"{len(names)} blocks for {folds} folds",
                        "lower ses.train.block_m or ses.train.folds")
    mix = np.zeros((len(names), N_CLASSES))
    np.add.at(mix, (inverse, labels), 1)
    target = mix.sum(0) / folds
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(len(names)), -mix.sum(1)))
    have = np.zeros((folds, N_CLASSES))
    block_fold = np.empty(len(names), dtype=int)
    for b in order:
        deficit = ((target - have) * mix[b]).sum(1)  # how far below target, in the block's classes
        best = np.lexsort((np.arange(folds), have.sum(1), -deficit))[0]
        block_fold[b] = best
        have[best] += mix[b]
    return block_fold[inverse]


def within(cell_ids, of_ids, distance_m: float) -> np.ndarray:
    """Whether each cell of ``cell_ids`` lies within ``distance_m`` of any cell of ``of_ids``, measured
    edge to edge along the grid's axes (the larger of the east and north gaps; touching cells are at 0);
    all False for distance 0. All cells have the grid's one size."""
    a, b = cell_origins(cell_ids), cell_origins(of_ids)
    if distance_m <= 0 or len(a) == 0 or len(b) == 0:
        return np.zeros(len(a), bool)
    from scipy.spatial import cKDTree

    # two equal squares of side s at origins p, q are within d edge to edge iff |p - q|_inf <= s + d
    side = parse_inspire_id(next(iter(cell_ids)))[2]
    hits = cKDTree(b).query(a, k=1, p=np.inf, distance_upper_bound=side + distance_m + 1e-6)[0]
    return np.isfinite(hits)


def spatial_folds(cell_ids, labels, folds: int, val_share: float, block_m: float, buffer_m: float,
                  seed: int, where: str = "cells") -> tuple[list[dict], np.ndarray]:
    """Block k-fold: each fold's test cells are whole blocks; a stratified ``val_share`` of the cells
    of the training blocks validates (it only chooses the epoch, so it may neighbour training cells);
    training and validation cells within ``buffer_m`` of a test cell are dropped. Returns (splits,
    block of each cell). A city too small for the validation share is a DataError naming its cells
    per quintile and the folds that would fit, never a scikit-learn traceback.
    """
    try:
        return _spatial_folds(cell_ids, labels, folds, val_share, block_m, buffer_m, seed, where)
    except ValueError:  # scikit-learn's refusal of a validation share it cannot draw
        from .folds import fitting_share, too_small

        make = lambda k: _spatial_folds(cell_ids, labels, k, val_share, block_m, buffer_m, seed, where)  # noqa: E731
        raise too_small(where, np.asarray(labels, dtype=int), folds, val_share, fitting_share(make, folds),
                        f" in blocks of {block_m:g} m") from None


def _spatial_folds(cell_ids, labels, folds: int, val_share: float, block_m: float, buffer_m: float,
                   seed: int, where: str) -> tuple[list[dict], np.ndarray]:
    from sklearn.model_selection import train_test_split

    cell_ids = np.asarray(list(cell_ids), dtype=object)
    labels = np.asarray(labels, dtype=int)
    blocks = block_ids(cell_ids, block_m)
    try:
        fold = assign_blocks(blocks, labels, folds, seed)
    except DataError as e:
        raise DataError(where, f"{len(np.unique(blocks))} blocks of {block_m:g} m for {folds} folds",
                        "lower ses.train.block_m or ses.train.folds") from e
    out = []
    for k in range(folds):
        test = np.flatnonzero(fold == k)
        rest = np.flatnonzero(fold != k)
        val = np.array([], dtype=int)
        if val_share > 0:  # stratified cells of the training blocks (validation only picks the epoch)
            n_val = max(math.ceil(val_share * len(rest)), len(np.unique(labels[rest])))
            counts = np.bincount(labels[rest], minlength=N_CLASSES)
            strat = labels[rest] if counts[counts > 0].min() >= 2 else None
            rest, val = train_test_split(rest, test_size=n_val, stratify=strat, random_state=seed + k + 1)
        near = within(cell_ids, cell_ids[test], buffer_m)
        train, val = rest[~near[rest]], val[~near[val]]
        if len(train) == 0:
            raise DataError(where, f"fold {k} keeps no training cell with ses.train.buffer_m={buffer_m:g}",
                            "lower ses.train.buffer_m or ses.train.folds")
        out.append({"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)})
    return out, blocks


def leave_city_out(cities, labels, held_out: str, val_share: float, seed: int, where: str = "cells") -> dict:
    """One split over the cells of all cities: test = the cells of ``held_out``, a stratified
    ``val_share`` of the other cities' cells validates, the rest trains."""
    from sklearn.model_selection import train_test_split

    cities, labels = np.asarray(cities, dtype=object), np.asarray(labels, dtype=int)
    if len(set(cities)) < 2:
        raise DataError(where, f"ses.train.cv=city needs at least 2 cities with cells, got {sorted(set(cities))}",
                        "list more cities in ses.cities or use ses.train.cv=spatial")
    test, train = np.flatnonzero(cities == held_out), np.flatnonzero(cities != held_out)
    val = np.array([], dtype=int)
    if val_share > 0:
        n_val = max(math.ceil(val_share * len(train)), len(np.unique(labels[train])))
        try:
            train, val = train_test_split(train, test_size=n_val, stratify=labels[train], random_state=seed)
        except ValueError:  # too few cells of a quintile outside the held-out city to stratify
            raise DataError(where, f"the cities other than {held_out} hold {len(train)} cells, "
                            f"{per_quintile(labels[train])}: too few for a stratified validation share of "
                            f"{val_share:g}", "add cells or cities (ses.cities)") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def pools_cities(cv: str) -> bool:
    """Whether fold scheme ``cv`` trains on one pool of every city's cells (``city``: leave one city out),
    rather than on each city's own cells."""
    return cv == "city"


def make_splits(tc, seed: int, cell_ids, labels, cities, city: str, where: str) -> tuple[list[dict], np.ndarray]:
    """The folds of ``city`` under ``tc.cv`` (the ``ses_train`` section), and each cell's block.

    ``cell_ids``, ``labels`` and ``cities``: the city's own cells, or under ``cv: city`` the cells of
    every city (each labelled by its own city's quintiles)."""
    from .folds import stratified_folds

    if tc.cv == "stratified":
        return stratified_folds(labels, tc.folds, tc.val_share, seed, where=where), None
    if tc.cv == "spatial":
        return spatial_folds(cell_ids, labels, tc.folds, tc.val_share, tc.block_m, tc.buffer_m, seed, where)
    if tc.cv != "city":  # a section built without load_config: never fall through to another scheme
        raise ConfigError("config", f"ses.train.cv is {tc.cv!r}", f"use one of {', '.join(SCHEMES)}")
    return [leave_city_out(cities, labels, city, tc.val_share, seed, where)], np.asarray(cities, dtype=object)
