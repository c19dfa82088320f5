"""Saliency panels: a map fitted to its patch, the masked image, the patches drawn per city."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


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


def sample_patches(manifest, split: str, per_city: int, seed: int):
    """``per_city`` random patches (fewer when a city has fewer) of ``split`` for every city (``iata``),
    drawn with ``seed``; independent of the manifest's row order. Sorted by city, then path."""
    rows = manifest[manifest["split"] == split].sort_values(["iata", "path"])
    picked = [g.sample(n=min(per_city, len(g)), random_state=seed) for _, g in rows.groupby("iata", sort=True)]
    if not picked:
        return rows.reset_index(drop=True)
    return pd.concat(picked).sort_values(["iata", "path"]).reset_index(drop=True)


def sanity_check(model, layer, batches, method: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rho, deletion gain, insertion gain), one per patch (urbanlens.core.sanity): ``method``'s maps of
    the trained ``model`` against a randomly initialised copy, and their deletion/insertion gains over
    random pixel orders. ``batches``: (x [B, 3, H, W] as the model reads it, target class per patch)."""
    from ..core import sanity
    from ..core.backbones import last_conv_layer
    from ..core.cam import class_activation_maps

    rand = sanity.randomised(model, seed)
    rand_layer = last_conv_layer(rand)
    out = []
    for i, (x, targets) in enumerate(batches):
        maps = class_activation_maps(model, layer, x, targets, method)
        rho = sanity.rank_correlations(maps, class_activation_maps(rand, rand_layer, x, targets, method))
        out.append((rho, *sanity.faithfulness(model, x, maps, np.asarray(targets), seed + i)))
    return tuple(np.concatenate(v) for v in zip(*out)) if out else (np.array([]),) * 3
