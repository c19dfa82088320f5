"""Whether the land-use findings of the activation maps mean anything.

A ranking of land-use classes by the poorest- and richest-class maps is only worth reading when the
model tells the poorest from the richest cells it did not train on. Its skill is the ROC AUC poorest
(true quintile 0) vs richest (4) over the held-out predictions of cross-validation (scored by
log P(4) - log P(0), as in metrics.ses_metrics), with a 95 % percentile bootstrap interval that
resamples spatial blocks of cells (``ses.train.bootstrap: blocks``; neighbouring cells look and earn
alike) or cells, and a permutation p-value (labels permuted among the held-out poorest and richest
cells). The ranking is flagged as not meaningful when that interval holds 0.5 (or lies below it), when
the permutation p-value is above 0.05 (not distinguishable from chance), when the skill cannot be
measured, or when a class map is zero everywhere. The numbers are written anyway, with the flag
beside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..core import outputs
from . import metrics
from .model import N_CLASSES

SKILL_COLUMNS = ["model_auc", "model_auc_lo", "model_auc_hi", "model_auc_cells", "meaningful", "caveat",
                 "model_auc_p_value", "model_auc_unit", "model_auc_units"]
RESAMPLES = 2000


@dataclass
class Finding:
    auc: float
    lo: float
    hi: float
    cells: int           # held-out cells of the poorest and richest quintiles the AUC is measured on
    meaningful: bool
    caveat: str          # empty when meaningful, else why not
    p_value: float = float("nan")   # permutation p-value of the AUC
    unit: str = "cells"  # what the interval's bootstrap resampled
    units: int = 0       # how many of them


@dataclass
class Skill:
    auc: float
    lo: float
    hi: float
    cells: int
    p_value: float = float("nan")
    unit: str = "cells"
    units: int = 0


def _auc(rich, poor, axis=-1):
    """AUC of rich over poor scores (Mann-Whitney U / n_rich n_poor), vectorised over ``axis``."""
    u = stats.mannwhitneyu(rich, poor, axis=axis, alternative="two-sided").statistic
    return u / (np.shape(rich)[axis] * np.shape(poor)[axis])


def held_out_skill(predictions: pd.DataFrame, level: float = 0.95, seed: int = 0, unit: str = "cells",
                   block_m: float | None = None) -> Skill:
    """The AUC poorest-vs-richest of held-out predictions (columns cell_id, true_class, p_0 .. p_4, e.g.
    predictions.csv), its percentile interval from a bootstrap of ``unit`` (``blocks``: the ``block_m``
    blocks of the cells, or ``cells``) over the poorest and richest cells, and its permutation p-value.
    NaN when fewer than two poorest or two richest cells are there."""
    p = predictions[[f"p_{k}" for k in range(N_CLASSES)]].to_numpy(float)
    log_p = np.log(np.clip(p, 1e-300, None))
    score = log_p[:, -1] - log_p[:, 0]
    true = predictions["true_class"].to_numpy(int)
    ends = (true == 0) | (true == N_CLASSES - 1)
    rich, n = true[ends] == N_CLASSES - 1, int(ends.sum())
    ids = predictions["cell_id"].to_numpy(object)[ends] if "cell_id" in predictions else np.arange(n).astype(str)
    units = metrics.bootstrap_units(ids, unit, block_m) if unit == "blocks" else ids
    n_units = len(set(map(str, units)))
    if rich.sum() < 2 or (~rich).sum() < 2:
        return Skill(float("nan"), float("nan"), float("nan"), n, float("nan"), unit, n_units)
    s = score[ends]
    auc = float(_auc(s[rich], s[~rich]))
    boot = [metrics.rank_auc(s[i], rich[i]) for i in metrics.bootstrap_draws(units, RESAMPLES, seed)
            if 0 < rich[i].sum() < len(i)]
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)]) if boot else (np.nan, np.nan)
    p_value = metrics.permutation_p(true, log_p, metrics.PERMUTATIONS, seed)
    return Skill(auc, float(lo), float(hi), n, p_value, unit, n_units)


def _zero_maps(polygon_stats: pd.DataFrame) -> list[str]:
    """The class maps ('poorest', 'richest') that are zero (or undefined) on every piece."""
    out = []
    for name in ("poor", "rich"):
        v = polygon_stats[f"{name}_max"].to_numpy(float) if f"{name}_max" in polygon_stats else np.array([])
        if not np.any(np.isfinite(v) & (v > 0)):
            out.append(f"the {name}est-class map is zero everywhere")
    return out


def assess(skill: Skill, polygon_stats: pd.DataFrame, extra: list[str] = ()) -> Finding:
    """A Finding from the model's skill and the pieces' statistics (polygon_stats columns)."""
    why = []
    if not (np.isfinite(skill.lo) and np.isfinite(skill.hi)):
        why.append("the model's skill is unknown (too few held-out poorest and richest cells)")
    elif skill.hi < 0.5:
        why.append("the interval of the model's AUC poorest-vs-richest lies below 0.5 (classes read the wrong way)")
    elif skill.lo <= 0.5:
        why.append("the interval of the model's AUC poorest-vs-richest includes 0.5 (chance)")
    if np.isfinite(skill.auc) and not skill.p_value <= metrics.CHANCE_P:
        why.append(f"the model's AUC is not distinguishable from chance (permutation p {skill.p_value:.3g})")
    why += _zero_maps(polygon_stats) + list(extra)
    return Finding(skill.auc, skill.lo, skill.hi, skill.cells, not why,
                   "ranking not meaningful: " + "; ".join(why) if why else "", skill.p_value, skill.unit, skill.units)


_UNKNOWN = Skill(float("nan"), float("nan"), float("nan"), 0)


def read_predictions(city_dir) -> pd.DataFrame | None:
    path = Path(city_dir) / "predictions.csv"
    return outputs.read_csv(path, "efficientnet_training.py") if path.exists() else None


def city_finding(predictions: pd.DataFrame | None, polygon_stats: pd.DataFrame, seed: int = 0,
                 unit: str = "cells", block_m: float | None = None) -> Finding:
    """The finding of one city: held-out skill of its model (interval over ``unit``) and its maps."""
    if predictions is None or len(predictions) == 0:
        return assess(_UNKNOWN, polygon_stats)
    return assess(held_out_skill(predictions, seed=seed, unit=unit, block_m=block_m), polygon_stats)


def pooled_finding(predictions: list[pd.DataFrame], polygon_stats: pd.DataFrame,
                   cities: dict[str, Finding], seed: int = 0, unit: str = "cells",
                   block_m: float | None = None) -> Finding:
    """The finding pooled over cities: skill over all their held-out cells; not meaningful either when
    any city's own ranking is not (its maps are pooled with the others')."""
    frames = [p for p in predictions if p is not None and len(p)]
    weak = [c for c, f in cities.items() if not f.meaningful]
    extra = [f"not meaningful for {', '.join(weak)}"] if weak else []
    if not frames:
        return assess(_UNKNOWN, polygon_stats, extra)
    return assess(held_out_skill(pd.concat(frames, ignore_index=True), seed=seed, unit=unit, block_m=block_m),
                  polygon_stats, extra)


def annotate(summary: pd.DataFrame, finding: Finding) -> pd.DataFrame:
    """The land-use summary with the SKILL_COLUMNS (the same on every row) appended."""
    out = summary.copy()
    values = (finding.auc, finding.lo, finding.hi, finding.cells, finding.meaningful, finding.caveat,
              finding.p_value, finding.unit, finding.units)
    for col, value in zip(SKILL_COLUMNS, values):
        out[col] = pd.Series([value] * len(out), index=out.index, dtype=object if col in ("caveat", "model_auc_unit") else None)
    return out


def describe(finding: Finding) -> str:
    """One line: the skill with its interval (its bootstrap unit and count, and a warning below
    ``metrics.MIN_UNITS`` units), its permutation p-value, and the caveat when there is one."""
    if np.isfinite(finding.auc):
        few = f", fewer than {metrics.MIN_UNITS}: a rough range" if finding.units < metrics.MIN_UNITS else ""
        skill = (f"model AUC poorest-vs-richest {finding.auc:.2f} [{finding.lo:.2f}, {finding.hi:.2f}] "
                 f"(95 % bootstrap over {finding.units} {finding.unit}{few}; {finding.cells} cells; "
                 f"permutation p {finding.p_value:.3g})")
    else:
        skill = "model skill unknown"
    return skill + (f"; {finding.caveat}" if finding.caveat else "")


def from_summary(summary: pd.DataFrame) -> Finding | None:
    """The Finding an annotated summary carries (None for a summary without the SKILL_COLUMNS)."""
    if len(summary) == 0 or not set(SKILL_COLUMNS) <= set(summary.columns):
        return None
    row = summary.iloc[0]
    caveat = row["caveat"] if isinstance(row["caveat"], str) else ""
    return Finding(float(row["model_auc"]), float(row["model_auc_lo"]), float(row["model_auc_hi"]),
                   int(row["model_auc_cells"]), bool(row["meaningful"]), caveat, float(row["model_auc_p_value"]),
                   str(row["model_auc_unit"]), int(row["model_auc_units"]))
