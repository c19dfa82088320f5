"""Test metrics of the city classifier: accuracy, top-k, per-city scores, confusion."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def topk_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


TOP_K = (5,)


def classification_metrics(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> dict:
    """accuracy, top-k accuracy (``top5_accuracy``; only for k below the number of classes, where it is
    not 1 by construction), macro F1, per-class precision/recall/F1/support, number of samples."""
    labels = np.asarray(labels)
    pred = np.asarray(scores).argmax(axis=1)
    idx = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    return {
        "accuracy": float((pred == labels).mean()),
        **{f"top{k}_accuracy": topk_accuracy(labels, scores, k) for k in TOP_K if k < len(classes)},
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "n_patches": int(len(labels)),
        "per_city": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                     for i, c in enumerate(classes)},
    }


def confusion_frame(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Counts, rows = true class, columns = predicted class, both labelled by IATA code."""
    cm = confusion_matrix(labels, pred, labels=list(range(len(classes))))
    return pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))


def per_site_accuracy(labels: np.ndarray, pred: np.ndarray, cities: Sequence[str], sites: Sequence[str]) -> dict:
    """``{"<city>/<site>": {"accuracy", "support"}}`` over the patches of each site (sorted)."""
    frame = pd.DataFrame({"key": [f"{c}/{s}" for c, s in zip(cities, sites)],
                          "hit": np.asarray(pred) == np.asarray(labels)})
    return {k: {"accuracy": float(g["hit"].mean()), "support": int(len(g))} for k, g in frame.groupby("key")}
