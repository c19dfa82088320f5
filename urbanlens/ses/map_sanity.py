"""The sanity check of a city's guided Grad-CAM maps (urbanlens.core.sanity) and what it does to the
land-use finding: on ``ses.cams.sanity_cells`` seeded cells, the poorest- and richest-class maps of the trained
model against a randomly initialised one, and their deletion/insertion gains over random pixel orders. A
ranking whose maps fail is flagged not meaningful, with the reason in its caveat."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch

from ..core import backbones, sanity
from . import data, projection
from .findings import Finding


def check_city(model, layer, cells: pd.DataFrame, image_root, size: int, cams_cfg, place, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rho, deletion gain, insertion gain), one per map: ``cams_cfg.sanity_cells`` cells of ``cells``
    (rows with a ``path`` under ``image_root``) drawn with ``seed``, two maps each (poor, rich class)."""
    chosen = cells.iloc[sanity.sample(len(cells), cams_cfg.sanity_cells, seed)]
    rand = place.model(sanity.randomised(model, seed))
    trained_maps, _ = projection.map_functions(model, layer, image_root, size, cams_cfg, place)
    random_maps, _ = projection.map_functions(rand, backbones.last_conv_layer(rand), image_root, size, cams_cfg, place)
    targets = np.array([cams_cfg.poor_class, cams_cfg.rich_class])
    out = []
    for start in range(0, len(chosen), cams_cfg.batch_size):
        rows = chosen.iloc[start:start + cams_cfg.batch_size]
        maps = trained_maps(rows)                      # [B, 2, H, W]
        flat = maps.reshape(-1, *maps.shape[2:])
        rho = sanity.rank_correlations(flat, random_maps(rows).reshape(flat.shape))
        x = torch.stack([data.load_cell_image(image_root / p, size) for p in rows["path"]])
        x = place.batch(x)
        gains = sanity.faithfulness(model, x, flat, np.tile(targets, len(rows)), seed + start, amp=place.amp)
        out.append((rho, *gains))
    return tuple(np.concatenate(v) for v in zip(*out)) if out else (np.array([]),) * 3


def flag(finding: Finding, verdict: sanity.Sanity | None) -> Finding:
    """``finding``, not meaningful and saying why when its maps fail the check (unchanged otherwise, or
    when the maps were not checked)."""
    if verdict is None or verdict.passes:
        return finding
    caveat = f"{finding.caveat}; {verdict.reason}" if finding.caveat else f"ranking not meaningful: {verdict.reason}"
    return dataclasses.replace(finding, meaningful=False, caveat=caveat)

