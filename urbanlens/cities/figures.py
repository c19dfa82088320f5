"""Figures of the city pipeline: confusion matrix with counts and row percentages, similarity dendrogram,
saliency panels. Functions return a matplotlib Figure; save it with ``urbanlens.core.files.save_figure``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.cluster.hierarchy import dendrogram

from ..core.plotting import plt
from .saliency import fit_map, masked_image


def row_percentages(cm: np.ndarray) -> np.ndarray:
    """Each row of a count matrix as percentages of its sum (a row of zeros stays zero)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return 100 * np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def confusion_matrix_figure(cm: np.ndarray, labels: Sequence[str], title: str = "",
                            xlabel: str = "predicted", ylabel: str = "true"):
    """Cells coloured by row percentage and annotated with the count and the row percentage; each row
    label carries its support (patches of that true class)."""
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
    ax.set_yticks(range(n), [f"{c} (n={int(cm[i].sum())})" for i, c in enumerate(labels)], fontsize=fontsize + 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (patches)")
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


HEATMAP = "jet"


def saliency_figure(image: np.ndarray, cam: np.ndarray, threshold: float = 0.5, title: str | None = None,
                    alpha: float = 0.5):
    """Three panels: the patch, the map over it as a heat map, the patch masked where the map (min-max
    normalised) exceeds ``threshold``. ``cam`` may be at any resolution; it is resized to the image."""
    import matplotlib.pyplot as plt

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    heat = fit_map(cam, image.shape[:2])
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4), layout="constrained")
    axes[0].imshow(image)
    axes[0].set_title("original")
    axes[1].imshow(image)
    shown = axes[1].imshow(heat, cmap=HEATMAP, alpha=alpha, vmin=0.0, vmax=1.0)
    axes[1].set_title("activation map")
    axes[2].imshow(masked_image(image, heat, threshold))
    axes[2].set_title(f"map > {threshold:g}")
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title)
    return fig


def similar_cities_figure(table, title: str = ""):
    """Two panels over the known cities of a ``newplace.rank_cities`` table, most similar at the top:
    cosine similarity of the mean embeddings and the share of the new city's patches predicted as each,
    both with their 95 % intervals over the new city's source images."""
    n = len(table)
    y = np.arange(n)[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(9, max(2.5, 0.32 * n + 1.2)), sharey=True, layout="constrained")
    for ax, col, lo, hi, label in ((axes[0], "similarity", "similarity_lo", "similarity_hi", "cosine similarity of mean embeddings"),
                                   (axes[1], "share_predicted", "share_lo", "share_hi", "share of patches predicted as")):
        v = table[col].to_numpy()
        err = np.vstack([v - table[lo].to_numpy(), table[hi].to_numpy() - v]).clip(0)
        ax.barh(y, v, xerr=err, color=["tab:orange"] + ["tab:blue"] * (n - 1), capsize=2)
        ax.set_xlabel(label)
    axes[0].set_yticks(y, table["iata"].tolist())
    if title:
        fig.suptitle(title)
    return fig


def nearest_patches_figure(new_images: Sequence[np.ndarray], nearest: Sequence[Sequence[np.ndarray]],
                           cities: Sequence[str], title: str = ""):
    """One row per new patch: the patch, then its nearest test patch (by embedding) of each of ``cities``."""
    rows, cols = len(new_images), 1 + len(cities)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows + 0.4), squeeze=False, layout="constrained")
    for i, (img, near) in enumerate(zip(new_images, nearest)):
        for j, shown in enumerate([img, *near]):
            axes[i, j].imshow(shown)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title("new" if j == 0 else f"nearest {cities[j - 1]}", fontsize=9)
    if title:
        fig.suptitle(title)
    return fig
