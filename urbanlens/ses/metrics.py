"""Scores of predicted quintile distributions, per fold and across folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

from .model import CLASS_NAMES, N_CLASSES, expected_class

METRICS = ("accuracy", "macro_f1", "kappa_quadratic", "auc_poor_rich", "spearman")


INTERVAL_METRICS = ("auc_poor_rich", "kappa_quadratic", "spearman")   # given with intervals in metrics.json


LEVEL = 0.95


RESAMPLES = 1000


def ses_metrics(y_true, log_probs) -> dict:
    """Scores of predicted quintile distributions against true quintiles.

    Returns accuracy, macro F1, quadratic-weighted Cohen's kappa, ``auc_poor_rich`` (ROC AUC on cells
    whose true class is 0 or 4, scored by P(4) / (P(0) + P(4)), computed as the log-odds log P(4) -
    log P(0), which orders cells identically without saturating), ``spearman`` (between the expected
    class and the true class), ``n``, plus ``classification_report`` (text) and ``confusion_matrix``
    (5 x 5 array, rows true, columns predicted). Undefined scores are NaN.
    """
    y = np.asarray(y_true).astype(int)
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape != (len(y), N_CLASSES):
        raise ValueError(f"log_probs must be [{len(y)}, {N_CLASSES}], got {list(lp.shape)}")
    labels = list(range(N_CLASSES))
    pred = lp.argmax(1)
    out = {"n": int(len(y)), "accuracy": float(np.mean(pred == y)) if len(y) else float("nan")}
    out["macro_f1"] = float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0))
    out["kappa_quadratic"] = _safe(lambda: skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
    ends = (y == 0) | (y == N_CLASSES - 1)
    out["auc_poor_rich"] = _safe(lambda: skm.roc_auc_score(y[ends] == N_CLASSES - 1,
                                                           lp[ends, -1] - lp[ends, 0]))
    out["spearman"] = _safe(lambda: stats.spearmanr(expected_class(lp), y).statistic)
    out["classification_report"] = skm.classification_report(
        y, pred, labels=labels, target_names=list(CLASS_NAMES), digits=3, zero_division=0)
    out["confusion_matrix"] = skm.confusion_matrix(y, pred, labels=labels)
    return out


def _safe(fn) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn())
        except ValueError:
            return float("nan")
    return v if np.isfinite(v) else float("nan")


def scalar_metrics(m: dict) -> dict:
    """The numeric entries of ``ses_metrics``' result (what goes into metrics.json)."""
    return {k: m[k] for k in ("n", *METRICS)}


def summarize_folds(fold_metrics: list[dict], val_losses: list[float]) -> dict:
    """Mean and standard deviation (ddof=1; 0 for one fold) of each metric over folds, NaNs ignored, and
    ``best_fold``: the fold whose best checkpoint has the lowest validation loss."""
    mean, std = {}, {}
    for k in METRICS:
        v = np.array([m[k] for m in fold_metrics], dtype=float)
        v = v[np.isfinite(v)]
        mean[k] = float(v.mean()) if v.size else float("nan")
        std[k] = float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else float("nan"))
    return {"best_fold": int(np.argmin(val_losses)), "mean": mean, "std": std}


MIN_UNITS = 5        # fewer folds than this get no interval over folds; fewer blocks, a note


PERMUTATIONS = 1000  # label permutations of the pooled AUC's null


CHANCE_P = 0.05      # a permutation p-value above this: not distinguishable from chance


RANGES = {"auc_poor_rich": (0.0, 1.0), "kappa_quadratic": (-1.0, 1.0), "spearman": (-1.0, 1.0)}


def fold_interval(values, level: float = LEVEL, metric: str | None = None) -> dict:
    """Mean of per-fold values and its Student-t interval (scipy.stats.t, n - 1 degrees of freedom,
    standard error sd / sqrt(n)), clipped to the metric's range (``RANGES``) when ``metric`` is given;
    NaN bounds with fewer than two finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "folds": int(v.size)}
    lo, hi = stats.t.interval(level, v.size - 1, loc=mean, scale=stats.sem(v))
    if metric in RANGES:
        lo, hi = np.clip([lo, hi], *RANGES[metric])
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "folds": int(v.size)}


def over_folds(per_fold: list[dict], level: float = LEVEL) -> dict:
    """The interval over folds of each of ``INTERVAL_METRICS``; with fewer than ``MIN_UNITS`` folds no
    interval (a t-interval over 2 values spans most of the range and says nothing), only the fold
    values and a note saying why."""
    values = {k: [float(f[k]) for f in per_fold] for k in INTERVAL_METRICS}
    if len(per_fold) < MIN_UNITS:
        return {"folds": len(per_fold), "values": values,
                "note": f"no interval over {len(per_fold)} fold(s): fewer than {MIN_UNITS} folds say nothing "
                        f"about the spread; see the bootstrap over held-out units"}
    return {k: fold_interval(v, level, k) for k, v in values.items()}


def rank_auc(score, positive) -> float:
    """ROC AUC of ``score`` for the ``positive`` items (Mann-Whitney U over scipy's average ranks,
    / n_pos n_neg); NaN without both kinds of item or with a non-finite score."""
    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0 or not np.all(np.isfinite(score)):
        return float("nan")
    return float((stats.rankdata(score)[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def interval_scores(y_true, log_probs) -> np.ndarray:
    """``INTERVAL_METRICS`` of predicted log-probabilities, as ``ses_metrics`` scores them (equal to
    scikit-learn's and scipy's values to rounding, tests/test_ses_honest.py) but cheap enough to run on
    every bootstrap resample: [auc_poor_rich (Mann-Whitney U from scipy ranks), kappa_quadratic (from
    the confusion counts), spearman (Pearson of scipy ranks)], NaN where undefined."""
    y = np.asarray(y_true).astype(int)
    lp = np.asarray(log_probs, dtype=np.float64)
    out = np.full(len(INTERVAL_METRICS), np.nan)
    ends = (y == 0) | (y == N_CLASSES - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[0] = rank_auc(lp[ends, -1] - lp[ends, 0], y[ends] == N_CLASSES - 1)
        if len(y):
            c = np.bincount(y * N_CLASSES + lp.argmax(1), minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)
            w = (np.arange(N_CLASSES)[:, None] - np.arange(N_CLASSES)[None, :]) ** 2.0
            expected = np.outer(c.sum(1), c.sum(0)) / c.sum()
            out[1] = 1 - (w * c).sum() / (w * expected).sum()
            ry, re = stats.rankdata(y), stats.rankdata(expected_class(lp))
            out[2] = np.corrcoef(ry, re)[0, 1] if ry.std() > 0 and re.std() > 0 else np.nan
    out[~np.isfinite(out)] = np.nan
    return out


def bootstrap_draws(units, resamples: int = RESAMPLES, seed: int = 0) -> list[np.ndarray]:
    """``resamples`` bootstrap samples of the items grouped by ``units`` (one unit id per item: a
    spatial block, or the item itself): each draws as many units as there are, with replacement, and
    takes every item of each drawn unit (seeded). Returns the item indices of each sample."""
    _, inverse = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    members = [np.flatnonzero(inverse == u) for u in range(inverse.max() + 1)] if len(inverse) else []
    rng = np.random.default_rng(seed)
    if not members:
        return []
    return [np.concatenate([members[u] for u in row]) for row in rng.integers(0, len(members), (resamples, len(members)))]


def _percentile(values, point: float, level: float) -> dict:
    d = np.asarray(values, float)
    d = d[np.isfinite(d)]
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)]) if d.size else (np.nan, np.nan)
    return {"value": float(point), "lo": float(lo), "hi": float(hi), "resamples_used": int(d.size)}


def paired_bootstrap(y_true, log_probs: dict, draws: list[np.ndarray], level: float = LEVEL) -> dict:
    """Percentile intervals of ``INTERVAL_METRICS`` for each model of ``log_probs`` (name -> [n, 5]
    log-probabilities of the same items) over the same ``draws``, and, when there are two models, of the
    first minus the second on each draw (key ``"gain"``). A draw where a score is undefined (say, no
    richest cell) is left out of that score; ``resamples_used`` says how many counted."""
    y = np.asarray(y_true).astype(int)
    lps = {k: np.asarray(v, dtype=np.float64) for k, v in log_probs.items()}
    point = {k: interval_scores(y, lp) for k, lp in lps.items()}
    scores = {k: np.array([interval_scores(y[i], lp[i]) for i in draws]).reshape(-1, len(INTERVAL_METRICS))
              for k, lp in lps.items()}
    out = {k: {m: _percentile(scores[k][:, j], point[k][j], level) for j, m in enumerate(INTERVAL_METRICS)}
           for k in lps}
    if len(lps) == 2:
        a, b = list(lps)
        out["gain"] = {m: _percentile(scores[a][:, j] - scores[b][:, j], point[a][j] - point[b][j], level)
                       for j, m in enumerate(INTERVAL_METRICS)}
    return out


def bootstrap_units(cell_ids, unit: str, block_m: float | None) -> np.ndarray:
    """What the bootstrap resamples for each cell: its ``block_m`` block of the EPSG:3035 grid (unit
    ``blocks``, the blocks of spatial cross-validation) or the cell itself (``cells``)."""
    from .spatial_folds import block_ids

    if unit == "cells":
        return np.asarray(list(cell_ids), dtype=object)
    return block_ids(cell_ids, block_m)


def interval_frame(unit: str, units: int, block_m: float | None, resamples: int = RESAMPLES,
                   level: float = LEVEL) -> dict:
    """The header of an ``intervals`` entry: level, unit, units, block_m, resamples, and a note when
    fewer than ``MIN_UNITS`` units carry it."""
    out = {"level": level, "unit": unit, "units": int(units), "block_m": float(block_m) if unit == "blocks" else None,
           "resamples": int(resamples)}
    if units < MIN_UNITS:
        out["note"] = (f"the interval rests on {units} {unit} (fewer than {MIN_UNITS}): too few units to "
                       f"tell the spread, read it as a rough range")
    return out


def describe_unit(iv: dict) -> str:
    """``'9 blocks of 1000 m'`` or ``'412 cells'``."""
    blocks = f" of {iv['block_m']:g} m" if iv.get("unit") == "blocks" and iv.get("block_m") else ""
    return f"{iv['units']} {iv['unit']}{blocks}"


def permutation_p(y_true, log_probs, permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """One-sided permutation p-value of the AUC poorest-vs-richest: the share of ``permutations`` label
    permutations among the poorest and richest cells (scores fixed, no retraining) whose AUC reaches
    the observed one, counting the observed labelling ((1 + hits) / (1 + permutations)); NaN when the
    AUC is undefined."""
    y = np.asarray(y_true).astype(int)
    lp = np.asarray(log_probs, dtype=np.float64)
    ends = (y == 0) | (y == N_CLASSES - 1)
    rich = y[ends] == N_CLASSES - 1
    n1, n0 = int(rich.sum()), int((~rich).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    with np.errstate(invalid="ignore"):
        ranks = stats.rankdata(lp[ends, -1] - lp[ends, 0])  # AUC = (rank sum of the richest - n1(n1+1)/2) / n1 n0
    if not np.all(np.isfinite(ranks)):
        return float("nan")
    observed = ranks[rich].sum()
    rng = np.random.default_rng(seed)
    perm = rng.permuted(np.tile(rich, (permutations, 1)), axis=1)
    hits = int(np.sum(perm @ ranks >= observed - 1e-9))
    return (1 + hits) / (1 + permutations)


def permutation_entry(p_value: float) -> dict:
    """``{"p_value", "chance"}``: chance when p > ``CHANCE_P`` (or unknown), then with a ``note`` saying
    so in words."""
    chance = bool(not (p_value <= CHANCE_P))
    out = {"p_value": float(p_value), "chance": chance}
    if chance:
        out["note"] = f"not distinguishable from chance (permutation p {p_value:.3g} > {CHANCE_P})"
    return out


def intervals(per_fold: list[dict], y_true, log_probs, units, unit: str = "blocks", block_m: float | None = None,
              seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """The ``intervals`` entry of metrics.json for one model: the bootstrap over the held-out ``units``
    (one id per cell) and the fold values (an interval over folds only from ``MIN_UNITS`` folds)."""
    draws = bootstrap_draws(units, resamples, seed)
    return {**interval_frame(unit, len(set(map(str, units))), block_m, resamples),
            "bootstrap": paired_bootstrap(y_true, {"model": log_probs}, draws)["model"],
            "over_folds": over_folds(per_fold)}


def predictions_frame(cell_ids, fold: int, y_true, log_probs) -> pd.DataFrame:
    """One row per held-out cell: cell_id, fold, true_class, pred_class, expected_class, p_0..p_4."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    df = pd.DataFrame({"cell_id": list(cell_ids), "fold": fold, "true_class": np.asarray(y_true, int),
                       "pred_class": lp.argmax(1), "expected_class": p @ np.arange(N_CLASSES)})
    for k in range(N_CLASSES):
        df[f"p_{k}"] = p[:, k]
    return df
