"""How far an income map agrees with known incomes: Spearman's rho between the expected class and the
income over one kind of cells, its one-sided p-value and a percentile bootstrap interval over spatial
blocks (neighbouring cells look and earn alike, so cells are not independent units).

Only cells that no model scoring them trained on count as skill: the census cells scored out-of-fold
and the cells the census withholds (scored against their planted income in ses_truth_cells.csv).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..core import outputs
from .grid import block_ids

LEVEL = 0.95


RESAMPLES = 1000


MIN_UNITS = 5  # fewer blocks than this give no interval: a bootstrap over so few says nothing


UNIT = "200 m cells"


def spearman(x, y) -> tuple[float, float, int]:
    """(rho, one-sided p for rho > 0, n) over the pairs where both are finite (NaN below 3 pairs)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return float("nan"), float("nan"), int(ok.sum())
    rho, p = spearmanr(x[ok], y[ok], alternative="greater")
    return float(rho), float(p), int(ok.sum())


def block_interval(x, y, blocks: Sequence[str], level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho between ``x`` and ``y`` resampling whole
    ``blocks`` (the same block draws as the training metrics' intervals, metrics.bootstrap_draws; each
    resample pools its blocks' cells). NaN when no resample has spread (rho undefined)."""
    from scipy.stats import spearmanr

    from .metrics import bootstrap_draws

    x, y = np.asarray(x, float), np.asarray(y, float)
    rhos = np.array([spearmanr(x[d], y[d]).statistic for d in bootstrap_draws(blocks, resamples, seed)], float)
    rhos = rhos[np.isfinite(rhos)]
    if not rhos.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(rhos, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def agreement(expected, income, cell_ids: Sequence[str], block_m: float, cells: str, truth: str,
              seed: int = 0) -> dict:
    """The agreement record of one kind of cells: ``cells`` (which cells), ``truth`` (whose income), the
    count and unit, rho, one-sided p, and the block bootstrap interval (its unit, block size and
    number of blocks; null below MIN_UNITS blocks, saying so)."""
    expected, income = np.asarray(expected, float), np.asarray(income, float)
    ok = np.isfinite(expected) & np.isfinite(income)
    rho, p, n = spearman(expected[ok], income[ok])
    blocks = block_ids(np.asarray(list(cell_ids), dtype=object)[ok], block_m) if n else np.array([], object)
    units = len(set(blocks))
    record = {"cells": cells, "truth": truth, "n": n, "unit": UNIT, "statistic": "spearman_rho",
              "rho": rho if np.isfinite(rho) else None, "p_one_sided": p if np.isfinite(p) else None,
              "p_note": "spearmanr's test (alternative greater), which takes the cells as independent",
              "interval": None}
    if n >= 3 and units >= MIN_UNITS:
        lo, hi = block_interval(expected[ok], income[ok], blocks, seed=seed)
        if np.isfinite(lo) and np.isfinite(hi):
            record["interval"] = {"level": LEVEL, "lo": lo, "hi": hi, "method": "percentile bootstrap",
                                  "resampled": "blocks", "block_m": float(block_m), "units": units,
                                  "resamples": RESAMPLES}
    if record["interval"] is None:
        record["interval_note"] = (f"no interval: {units} blocks of {block_m:g} m, fewer than {MIN_UNITS}"
                                   if units < MIN_UNITS or n < 3 else "no interval: a resample had no spread")
    return record


def describe(record: dict) -> str:
    """One phrase for the closing line: what was computed, over which cells and how many."""
    if record["n"] < 3:
        return f"{record['cells']}: {record['n']} cells, too few for a Spearman"
    interval = record["interval"]
    ci = (f" [{interval['lo']:.2f}, {interval['hi']:.2f}] ({interval['level']:.0%} bootstrap over "
          f"{interval['units']} blocks of {interval['block_m']:g} m)") if interval else " (no interval: too few blocks)"
    return (f"{record['cells']}: Spearman(expected class, {record['truth']}) {record['rho']:.2f}{ci}, "
            f"one-sided p {record['p_one_sided']:.2g}, {record['n']} cells")


def withheld_truth(path, city: str) -> pd.Series:
    """The planted income of a city's withheld cells (index cell_id) from ses_truth_cells.csv; empty when
    there is no such file (real data, or a world that withholds nothing)."""
    path = Path(path)
    if not path.is_file():
        return pd.Series(dtype=float, name="income")
    truth = outputs.read_csv(path, "python -m urbanlens.ses.world", ["cell_id", "city", "income", "withheld"],
                             "rebuild the synthetic world (data_setup.sh --synthetic ses)", dtype={"cell_id": str})
    rows = truth[(truth["city"] == city) & truth["withheld"].astype(bool)]
    return rows.set_index("cell_id")["income"].astype(float)
