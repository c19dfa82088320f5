"""Figures: confusion matrix with counts and row percentages, similarity dendrogram.

Functions return a matplotlib Figure; save it with ``urbanlens.io.save_figure`` (atomic, closes it).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.cluster.hierarchy import dendrogram  # noqa: E402


def row_percentages(cm: np.ndarray) -> np.ndarray:
    """Each row of a count matrix as percentages of its sum (a row of zeros stays zero)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return 100 * np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def confusion_matrix_figure(cm: np.ndarray, labels: Sequence[str], title: str = "",
                            xlabel: str = "predicted", ylabel: str = "true"):
    """Cells coloured by row percentage and annotated with the count and the row percentage."""
    cm = np.asarray(cm)
    pct = row_percentages(cm)
    n = len(labels)
    side = max(4.0, 0.55 * n + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the true class")
    fontsize = max(3.5, min(9.0, 130 / max(n, 1)))
    for i in range(n):
        for j in range(n):
            if cm[i, j] == 0 and i != j:
                continue
            ax.text(j, i, f"{int(cm[i, j])}\n{pct[i, j]:.0f}%", ha="center", va="center", fontsize=fontsize,
                    color="white" if pct[i, j] > 55 else "black")
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize + 1)
    ax.set_yticks(range(n), labels, fontsize=fontsize + 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def dendrogram_figure(linkage_matrix: np.ndarray, labels: Sequence[str], title: str = "",
                      xlabel: str = "1 - similarity"):
    """Horizontal dendrogram of a scipy linkage matrix, leaves labelled (e.g. by IATA code)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(6, max(3.0, 0.3 * n + 1)))
    dendrogram(linkage_matrix, labels=list(labels), orientation="left", ax=ax, color_threshold=None,
               leaf_font_size=max(6, min(11, 300 / max(n, 1))))
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
