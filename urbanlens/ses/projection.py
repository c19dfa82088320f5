"""The map stage's steps for one city: the cell-map functions, maps projected onto land-use pieces
(written batch by batch, resumable), and the city's figures. gradcaming_urban_areas.py chains them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ..core import cam, files, gis_style, shards
from . import data, extraction, maps, zonal
from . import figures as ses_figures


def map_functions(model, layer, image_root, size: int, cams_cfg, place):
    """``compute(rows)`` -> [B, 2, H, W] guided Grad-CAM maps of the poorest and richest class, and
    ``nodata(rows)`` -> [B, H, W] map pixels whose centre lies on a nodata pixel of the cell image.
    ``place``: where and in which precision (the stage's, ``ses.cams.amp``) the maps are computed."""
    image_root = Path(image_root)

    def compute(rows):
        x = torch.stack([data.load_cell_image(image_root / p, size) for p in rows["path"]])
        x = place.batch(x)  # NHWC on CUDA and under CPU bf16
        return np.stack([cam.guided_gradcam(model, layer, x, k, cams_cfg.clip_percentile, place.amp)
                         for k in (cams_cfg.poor_class, cams_cfg.rich_class)], axis=1)

    def nodata(rows):
        return np.stack([maps.resample_mask(extraction.nodata_mask(extraction.read_png(image_root / p)), (size, size))
                         for p in rows["path"]])

    return compute, nodata


def project_cells(todo, compute, nodata, landuse, city: str, city_dir, stats_path, batch_size: int,
                  fresh_after: float) -> tuple[int, int]:
    """Maps of every cell of ``todo`` (GeoTIFFs under ``<city_dir>/cams``, reused when fresh) cut by the
    land-use pieces; their statistics appended batch by batch to ``stats_path`` (atomic: the file
    appears complete or not at all). Returns (maps computed now, pieces written)."""
    n_new = n_pieces = 0
    with files.atomic_path(stats_path) as tmp, tqdm(total=len(todo), desc=f"{city} cams", unit="cell") as bar:
        for batch in maps.cell_map_batches(todo, compute, Path(city_dir) / "cams", batch_size,
                                           newer_than=fresh_after, nodata=nodata):
            rows = pd.concat([maps.cell_polygon_stats(m, t, zonal.cell_pieces(landuse, row.geometry), row.cell_id, city)
                              for row, m, t, _ in batch], ignore_index=True)
            if len(rows):
                rows.to_file(tmp, layer="polygon_stats", driver="GPKG", mode="a" if tmp.exists() else "w",
                             promote_to_multi=True)
            n_new += sum(new for *_, new in batch)
            n_pieces += len(rows)
            bar.update(len(batch))
        if not tmp.exists():  # no piece at all: an empty layer with the columns
            maps.empty_polygon_stats(landuse.crs).to_file(tmp, layer="polygon_stats", driver="GPKG")
        gis_style.style_gpkg(tmp, "polygon_stats", "rich_score", ramp=gis_style.CAM_RAMP)
    return n_new, n_pieces


def merge_shards(stats_path, n: int, landuse, fresh_after: float) -> int:
    """The N shards' statistics of a city, checked and copied in order into ``stats_path``; pieces written."""
    parts = shards.shard_paths(stats_path, n, newer_than=fresh_after)
    with files.atomic_path(stats_path) as tmp:
        rows = shards.append_layers(parts, tmp, "polygon_stats", maps.empty_polygon_stats(landuse.crs))
        gis_style.style_gpkg(tmp, "polygon_stats", "rich_score", ramp=gis_style.CAM_RAMP)
    return rows


def city_figures(city: str, city_dir, image_root, city_cells, all_cells, preds, landuse, summary, n_panels: int,
                 rng: np.random.Generator) -> None:
    """Income map (when predictions exist), panels of sampled cells with their maps and pieces, and the
    scores per land-use class, under ``<city_dir>/figures``."""
    fig_dir, image_root = Path(city_dir) / "figures", Path(image_root)
    if preds is not None:
        files.save_figure(ses_figures.income_map_figure(all_cells, preds, city), fig_dir / "income_map.png")
    sample = city_cells.iloc[np.sort(rng.choice(len(city_cells), min(n_panels, len(city_cells)), replace=False))]
    panels = [{"cell_id": r.cell_id, "bounds": r.geometry.bounds,
               "image": np.asarray(Image.open(image_root / r.path).convert("RGB")),
               **dict(zip(("poor", "rich"), maps.read_maps_tif(Path(city_dir) / "cams" / f"{r.cell_id}.tif")[0])),
               "pieces": zonal.cell_pieces(landuse, r.geometry)} for r in sample.itertuples()]
    if panels:
        names = dict(zip(landuse["ua_code"].astype(str), landuse["ua_class"]))
        files.save_figure(ses_figures.cam_panels_figure(panels, names), fig_dir / "cam_panels.png")
    if len(summary):
        files.save_figure(ses_figures.landuse_scores_figure(summary, f"{city}: activation per land-use class"),
                          fig_dir / "landuse_scores.png")
