"""Saliency stage helpers: the patches to explain, and figures (original | heat-map overlay | masked image)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

HEATMAP = "jet"


def fit_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``cam`` [h, w] resized (bilinear) to ``shape`` and min-max normalised to [0, 1] (constant -> zeros)."""
    cam = torch.as_tensor(np.asarray(cam, dtype=np.float32))
    if tuple(cam.shape) != tuple(shape):
        cam = F.interpolate(cam[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = cam.min(), cam.max()
    return ((cam - lo) / (hi - lo)).numpy() if hi > lo else np.zeros(shape, np.float32)


def masked_image(image: np.ndarray, cam: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``image`` (uint8 HxWx3) with the pixels whose normalised map is at or below ``threshold`` set to black."""
    keep = fit_map(cam, image.shape[:2]) > threshold
    return np.where(keep[..., None], image, 0).astype(np.uint8)


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


def sample_patches(manifest, split: str, per_city: int, seed: int):
    """``per_city`` random patches (fewer when a city has fewer) of ``split`` for every city (``iata``),
    drawn with ``seed``; independent of the manifest's row order. Sorted by city, then path."""
    rows = manifest[manifest["split"] == split].sort_values(["iata", "path"])
    picked = [g.sample(n=min(per_city, len(g)), random_state=seed) for _, g in rows.groupby("iata", sort=True)]
    if not picked:
        return rows.reset_index(drop=True)
    return pd.concat(picked).sort_values(["iata", "path"]).reset_index(drop=True)
