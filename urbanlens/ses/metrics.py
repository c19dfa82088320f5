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


def fold_interval(values, level: float = LEVEL) -> dict:
    """Mean of per-fold values and its Student-t interval (scipy.stats.t, n - 1 degrees of freedom,
    standard error sd / sqrt(n)); NaN bounds with fewer than two finite values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "folds": int(v.size)}
    lo, hi = stats.t.interval(level, v.size - 1, loc=mean, scale=stats.sem(v))
    return {"mean": mean, "lo": float(lo), "hi": float(hi), "folds": int(v.size)}


def _interval_scores(y, lp) -> tuple[float, float, float]:
    m = ses_metrics(y, lp)
    return tuple(m[k] for k in INTERVAL_METRICS)


def cell_bootstrap(y_true, log_probs, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict:
    """Percentile intervals of ``INTERVAL_METRICS`` over the pooled held-out cells: ``resamples`` draws
    of as many cells with replacement (seeded); a draw where a score is undefined (say, no richest cell)
    is left out of that score's percentiles, and ``resamples_used`` says how many counted."""
    y = np.asarray(y_true).astype(int)
    lp = np.asarray(log_probs, dtype=np.float64)
    point = _interval_scores(y, lp)
    rng = np.random.default_rng(seed)
    draws = np.array([_interval_scores(y[i], lp[i]) for i in rng.integers(0, len(y), (resamples, len(y)))]) \
        if len(y) else np.full((0, len(INTERVAL_METRICS)), np.nan)
    out = {}
    for j, k in enumerate(INTERVAL_METRICS):
        d = draws[np.isfinite(draws[:, j]), j] if len(draws) else np.array([])
        lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)]) if d.size else (np.nan, np.nan)
        out[k] = {"value": point[j], "lo": float(lo), "hi": float(hi), "resamples_used": int(d.size)}
    return out


def intervals(per_fold: list[dict], y_true, log_probs, seed: int = 0) -> dict:
    """Both intervals of AUC, kappa and Spearman: over folds (mean +- t) and over pooled held-out cells
    (percentile bootstrap)."""
    return {"level": LEVEL,
            "over_folds": {k: fold_interval([f[k] for f in per_fold]) for k in INTERVAL_METRICS},
            "cell_bootstrap": {"resamples": RESAMPLES,
                               **cell_bootstrap(y_true, log_probs, seed=seed)}}


def predictions_frame(cell_ids, fold: int, y_true, log_probs) -> pd.DataFrame:
    """One row per held-out cell: cell_id, fold, true_class, pred_class, expected_class, p_0..p_4."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    df = pd.DataFrame({"cell_id": list(cell_ids), "fold": fold, "true_class": np.asarray(y_true, int),
                       "pred_class": lp.argmax(1), "expected_class": p @ np.arange(N_CLASSES)})
    for k in range(N_CLASSES):
        df[f"p_{k}"] = p[:, k]
    return df
