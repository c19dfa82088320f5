"""Whether the land-use findings of the activation maps mean anything.

A ranking of land-use classes by the poorest- and richest-class maps is only worth reading when the
model tells the poorest from the richest cells it did not train on. Its skill is the ROC AUC poorest
(true quintile 0) vs richest (4) over the held-out predictions of cross-validation (scored by
log P(4) - log P(0), as in metrics.ses_metrics), with a 95 % percentile bootstrap interval over those
cells (poorest and richest resampled separately, scipy.stats.bootstrap; fold AUCs are too few, 2 in
the paper's setting, for a useful t-interval). The ranking is flagged as not meaningful when that
interval holds 0.5 (or lies below it), when the skill cannot be measured, or when a class map is zero
everywhere. The numbers are written anyway, with the flag beside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..core import outputs
from .model import N_CLASSES

SKILL_COLUMNS = ["model_auc", "model_auc_lo", "model_auc_hi", "model_auc_cells", "meaningful", "caveat"]
METHOD = "95 % bootstrap over held-out cells"
RESAMPLES = 2000


@dataclass
class Finding:
    auc: float
    lo: float
    hi: float
    cells: int           # held-out cells of the poorest and richest quintiles the AUC is measured on
    meaningful: bool
    caveat: str          # empty when meaningful, else why not


def _auc(rich, poor, axis=-1):
    """AUC of rich over poor scores (Mann-Whitney U / n_rich n_poor), vectorised over ``axis``."""
    u = stats.mannwhitneyu(rich, poor, axis=axis, alternative="two-sided").statistic
    return u / (np.shape(rich)[axis] * np.shape(poor)[axis])


def held_out_skill(predictions: pd.DataFrame, level: float = 0.95, seed: int = 0) -> tuple[float, float, float, int]:
    """(AUC, lo, hi, cells) of held-out predictions (columns true_class, p_0 .. p_4, e.g. predictions.csv).
    NaN when fewer than two poorest or two richest cells are there."""
    p = predictions[[f"p_{k}" for k in range(N_CLASSES)]].to_numpy(float)
    score = np.log(np.clip(p[:, -1], 1e-300, None)) - np.log(np.clip(p[:, 0], 1e-300, None))
    true = predictions["true_class"].to_numpy(int)
    rich, poor = score[true == N_CLASSES - 1], score[true == 0]
    n = len(rich) + len(poor)
    if len(rich) < 2 or len(poor) < 2:
        return float("nan"), float("nan"), float("nan"), n
    auc = float(_auc(rich, poor))
    res = stats.bootstrap((rich, poor), _auc, n_resamples=RESAMPLES, vectorized=True, paired=False,
                          confidence_level=level, method="percentile", random_state=seed)
    lo, hi = res.confidence_interval
    return auc, float(lo), float(hi), n


def _zero_maps(polygon_stats: pd.DataFrame) -> list[str]:
    """The class maps ('poorest', 'richest') that are zero (or undefined) on every piece."""
    out = []
    for name in ("poor", "rich"):
        v = polygon_stats[f"{name}_max"].to_numpy(float) if f"{name}_max" in polygon_stats else np.array([])
        if not np.any(np.isfinite(v) & (v > 0)):
            out.append(f"the {name}est-class map is zero everywhere")
    return out


def assess(auc: float, lo: float, hi: float, cells: int, polygon_stats: pd.DataFrame,
           extra: list[str] = ()) -> Finding:
    """A Finding from the model's skill and the pieces' statistics (polygon_stats columns)."""
    why = []
    if not (np.isfinite(lo) and np.isfinite(hi)):
        why.append("the model's skill is unknown (too few held-out poorest and richest cells)")
    elif hi < 0.5:
        why.append("the interval of the model's AUC poorest-vs-richest lies below 0.5 (classes read the wrong way)")
    elif lo <= 0.5:
        why.append("the interval of the model's AUC poorest-vs-richest includes 0.5 (chance)")
    why += _zero_maps(polygon_stats) + list(extra)
    return Finding(auc, lo, hi, cells, not why, "ranking not meaningful: " + "; ".join(why) if why else "")


def read_predictions(city_dir) -> pd.DataFrame | None:
    path = Path(city_dir) / "predictions.csv"
    return outputs.read_csv(path, "efficientnet_training.py") if path.exists() else None


def city_finding(predictions: pd.DataFrame | None, polygon_stats: pd.DataFrame, seed: int = 0) -> Finding:
    """The finding of one city: held-out skill of its model and its maps."""
    if predictions is None or len(predictions) == 0:
        return assess(float("nan"), float("nan"), float("nan"), 0, polygon_stats)
    return assess(*held_out_skill(predictions, seed=seed), polygon_stats)


def pooled_finding(predictions: list[pd.DataFrame], polygon_stats: pd.DataFrame,
                   cities: dict[str, Finding], seed: int = 0) -> Finding:
    """The finding pooled over cities: skill over all their held-out cells; not meaningful either when
    any city's own ranking is not (its maps are pooled with the others')."""
    frames = [p for p in predictions if p is not None and len(p)]
    weak = [c for c, f in cities.items() if not f.meaningful]
    extra = [f"not meaningful for {', '.join(weak)}"] if weak else []
    if not frames:
        return assess(float("nan"), float("nan"), float("nan"), 0, polygon_stats, extra)
    return assess(*held_out_skill(pd.concat(frames, ignore_index=True), seed=seed), polygon_stats, extra)


def annotate(summary: pd.DataFrame, finding: Finding) -> pd.DataFrame:
    """The land-use summary with the SKILL_COLUMNS (the same on every row) appended."""
    out = summary.copy()
    values = (finding.auc, finding.lo, finding.hi, finding.cells, finding.meaningful, finding.caveat)
    for col, value in zip(SKILL_COLUMNS, values):
        out[col] = pd.Series([value] * len(out), index=out.index, dtype=object if col == "caveat" else None)
    return out


def describe(finding: Finding) -> str:
    """One line: the skill with its interval, and the caveat when there is one."""
    if np.isfinite(finding.auc):
        skill = (f"model AUC poorest-vs-richest {finding.auc:.2f} [{finding.lo:.2f}, {finding.hi:.2f}] "
                 f"({METHOD}, {finding.cells} cells)")
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
                   int(row["model_auc_cells"]), bool(row["meaningful"]), caveat)
