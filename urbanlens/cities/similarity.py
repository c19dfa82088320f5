"""City similarity from a trained classifier, two ways, and the tables and clustering built on it.

- ``confusion``: the confusion matrix (rows true, columns predicted) is row-normalised, so entry (a, b) is
  the share of city a's patches predicted as b, then symmetrised: S = (P + P^T) / 2. Off the diagonal,
  S(a, b) is how often the model mixes a and b up, in either direction.
- ``embedding``: the cosine similarity of the cities' mean penultimate-layer embeddings.
In both matrices the diagonal is 1 (a city is identical to itself), so ``1 - S`` is a distance.

Files written by ``test_classification.py``:
- ``similarity.csv``: both matrices, wide, stacked: columns ``method, city, <IATA_1>, ..., <IATA_n>``; the
  rows with ``method == m`` form the n x n matrix of method m (row city, column city).
- ``similar_pairs.csv``: ``city_a, city_b, score, method``; each unordered pair once per method
  (``city_a < city_b``), most similar first within each method.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

METHODS = ("confusion", "embedding")


def confusion_similarity(cm: np.ndarray) -> np.ndarray:
    """Symmetrised row-normalised confusions; diagonal set to 1. Rows without samples count as zeros."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    p = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    s = (p + p.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def class_means(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean embedding of each class (n_classes x D); a class without samples gets NaNs."""
    embeddings, labels = np.asarray(embeddings, dtype=float), np.asarray(labels)
    means = np.full((n_classes, embeddings.shape[1]), np.nan)
    for c in range(n_classes):
        if (labels == c).any():
            means[c] = embeddings[labels == c].mean(axis=0)
    return means


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows; diagonal set to 1."""
    v = np.asarray(vectors, dtype=float)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    u = np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)
    s = u @ u.T
    np.fill_diagonal(s, 1.0)
    return np.clip(s, -1.0, 1.0)


def embedding_similarity(embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Cosine similarity of the per-class mean embeddings."""
    return cosine_similarity(class_means(embeddings, labels, n_classes))


def similar_pairs(sim: np.ndarray, names: Sequence[str], method: str) -> pd.DataFrame:
    """Every unordered pair once (``city_a < city_b``), most similar first (ties: by names)."""
    order = np.argsort(names)
    names = [names[i] for i in order]
    sim = np.asarray(sim)[np.ix_(order, order)]
    i, j = np.triu_indices(len(names), k=1)
    pairs = pd.DataFrame({"city_a": [names[k] for k in i], "city_b": [names[k] for k in j],
                          "score": sim[i, j], "method": method})
    return pairs.sort_values(["score", "city_a", "city_b"], ascending=[False, True, True],
                             kind="stable").reset_index(drop=True)


def similarity_table(matrices: Mapping[str, np.ndarray], names: Sequence[str]) -> pd.DataFrame:
    """The wide stacked table of ``similarity.csv`` (see the module docstring)."""
    frames = []
    for method, sim in matrices.items():
        df = pd.DataFrame(np.asarray(sim), columns=list(names))
        df.insert(0, "city", list(names))
        df.insert(0, "method", method)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def read_similarity_table(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """One method's square matrix from a ``similarity.csv`` frame, indexed and labelled by city."""
    m = table[table["method"] == method].drop(columns="method").set_index("city")
    return m[list(m.index)]


def cluster(sim: np.ndarray, method: str = "average") -> np.ndarray:
    """scipy hierarchical clustering (linkage matrix) on the distance 1 - similarity."""
    d = 1.0 - np.asarray(sim, dtype=float)
    d = np.clip((d + d.T) / 2, 0.0, None)
    np.fill_diagonal(d, 0.0)
    return linkage(squareform(d, checks=False), method=method)
