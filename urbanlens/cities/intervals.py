"""How sure the city numbers are: a bootstrap over source images, stratified by city.

Patches of one source image overlap and share its light, season and sensor, so they are not
independent samples: a resample draws whole source images (with replacement, within each city, so
every city keeps test data) and takes all their patches. Intervals are percentile intervals over
the resamples; a pair's stability is the share of resamples in which it is among the top k pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, recall_score

from .similarity import confusion_similarity, embedding_similarity, similar_pairs


def resamples(labels: np.ndarray, groups: Sequence, n_boot: int, seed: int):
    """``n_boot`` index arrays, each the patches of source images drawn with replacement per city."""
    labels, groups = np.asarray(labels), np.asarray(groups, dtype=object)
    rng = np.random.default_rng(seed)
    per_city = []
    for c in np.unique(labels):
        images = pd.unique(groups[labels == c])
        per_city.append([np.flatnonzero((groups == g) & (labels == c)) for g in images])
    for _ in range(n_boot):
        yield np.concatenate([members[k] for members in per_city for k in rng.integers(0, len(members), len(members))])


def _interval(values, level: float) -> list[float]:
    v = np.asarray(values, dtype=float)
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def bootstrap_scores(labels, pred, groups, classes: Sequence[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """``{"accuracy": [n_boot], "macro_f1": [n_boot], "recall": [n_boot, classes]}`` over the source-image
    resamples of ``resamples(labels, groups, n_boot, seed)`` (the same seed gives the same resamples)."""
    labels, pred = np.asarray(labels), np.asarray(pred)
    idx = list(range(len(classes)))
    acc, f1, rec = [], [], []
    for r in resamples(labels, groups, n_boot, seed):
        y, p = labels[r], pred[r]
        acc.append(float((y == p).mean()))
        f1.append(f1_score(y, p, labels=idx, average="macro", zero_division=0))
        rec.append(recall_score(y, p, labels=idx, average=None, zero_division=0))
    return {"accuracy": np.asarray(acc), "macro_f1": np.asarray(f1), "recall": np.asarray(rec).reshape(n_boot, len(idx))}


def metric_intervals(labels, pred, groups, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95, scores: dict | None = None) -> dict:
    """Percentile intervals of accuracy, macro F1 and per-city recall over source-image resamples
    (``scores``: ``bootstrap_scores`` of the same arguments, when already computed)."""
    b = scores if scores is not None else bootstrap_scores(labels, pred, groups, classes, n_boot, seed)
    return {"level": level, "n_boot": n_boot, "resampled": "source images, within each city",
            "accuracy": _interval(b["accuracy"], level), "macro_f1": _interval(b["macro_f1"], level),
            "per_city_recall": {c: _interval(b["recall"][:, i], level) for i, c in enumerate(classes)},
            **units(labels, groups, classes)}


def pair_stability(labels, pred, embeddings, groups, classes: Sequence[str], k: int, n_boot: int = 200,
                   seed: int = 0) -> pd.DataFrame:
    """For each method and pair, the share of resamples in which the pair is among the ``k`` most similar."""
    labels, pred, embeddings = np.asarray(labels), np.asarray(pred), np.asarray(embeddings)
    n = len(classes)
    counts = {}
    for r in resamples(labels, groups, n_boot, seed):
        cm = confusion_matrix(labels[r], pred[r], labels=list(range(n)))
        sims = {"confusion": confusion_similarity(cm), "embedding": embedding_similarity(embeddings[r], labels[r], n)}
        for method, sim in sims.items():
            for a, b in similar_pairs(sim, classes, method).head(k)[["city_a", "city_b"]].itertuples(index=False):
                counts[(method, a, b)] = counts.get((method, a, b), 0) + 1
    return pd.DataFrame([(m, a, b, c / n_boot) for (m, a, b), c in counts.items()],
                        columns=["method", "city_a", "city_b", "stability"])


def with_stability(pairs: pd.DataFrame, stability: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` (similar_pairs rows) with a ``stability`` column (0 for pairs never in the top k)."""
    out = pairs.merge(stability, on=["method", "city_a", "city_b"], how="left")
    out["stability"] = out["stability"].fillna(0.0)
    return out


MIN_UNITS = 5  # an interval resting on fewer resampling units than this in a city says so
UNIT = "source images"


def units(labels, groups, classes: Sequence[str]) -> dict:
    """What the bootstrap resamples and how many there are: ``unit``, ``units_per_city``,
    ``units_total`` and, when a city has fewer than ``MIN_UNITS``, a ``note`` saying which."""
    labels, groups = np.asarray(labels), np.asarray(groups, dtype=object)
    per_city = {c: int(pd.unique(groups[labels == i]).size) for i, c in enumerate(classes)}
    out = {"unit": UNIT, "units_per_city": per_city, "units_total": int(sum(per_city.values()))}
    few = {c: n for c, n in per_city.items() if n < MIN_UNITS}
    if few:
        lo, hi = min(few.values()), max(few.values())
        each = f"{lo}" if lo == hi else f"{lo} to {hi}"
        out["note"] = (f"fewer than {MIN_UNITS} {UNIT} per city ({each} in {len(few)} of {len(per_city)} cities): "
                       "intervals too wide to trust")
    return out


def paired_gain(labels, pred, pred_ref, groups, classes: Sequence[str], n_boot: int = 1000, seed: int = 0,
                level: float = 0.95, scores: dict | None = None, scores_ref: dict | None = None) -> dict:
    """``{"accuracy": {"value", "lo", "hi"}, "macro_f1": {...}}``: how much ``pred`` beats ``pred_ref``
    on the same patches, with a percentile interval of the difference over the same resampled source
    images (each resample scores both; ``scores``/``scores_ref``: their ``bootstrap_scores``, when known)."""
    labels, pred, pred_ref = np.asarray(labels), np.asarray(pred), np.asarray(pred_ref)
    idx = list(range(len(classes)))
    a = scores if scores is not None else bootstrap_scores(labels, pred, groups, classes, n_boot, seed)
    b = scores_ref if scores_ref is not None else bootstrap_scores(labels, pred_ref, groups, classes, n_boot, seed)
    value = {"accuracy": float((labels == pred).mean() - (labels == pred_ref).mean()),
             "macro_f1": float(f1_score(labels, pred, labels=idx, average="macro", zero_division=0)
                               - f1_score(labels, pred_ref, labels=idx, average="macro", zero_division=0))}
    out = {}
    for name in ("accuracy", "macro_f1"):
        lo, hi = _interval(a[name] - b[name], level)
        out[name] = {"value": value[name], "lo": lo, "hi": hi}
    return out
