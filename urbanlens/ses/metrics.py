"""Scores of predicted quintile distributions, per fold and across folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn import metrics as skm

from .model import CLASS_NAMES, N_CLASSES, expected_class

METRICS = ("accuracy", "macro_f1", "kappa_quadratic", "auc_poor_rich", "spearman")


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


def predictions_frame(cell_ids, fold: int, y_true, log_probs) -> pd.DataFrame:
    """One row per held-out cell: cell_id, fold, true_class, pred_class, expected_class, p_0..p_4."""
    lp = np.asarray(log_probs, dtype=np.float64)
    p = np.exp(lp)
    df = pd.DataFrame({"cell_id": list(cell_ids), "fold": fold, "true_class": np.asarray(y_true, int),
                       "pred_class": lp.argmax(1), "expected_class": p @ np.arange(N_CLASSES)})
    for k in range(N_CLASSES):
        df[f"p_{k}"] = p[:, k]
    return df
