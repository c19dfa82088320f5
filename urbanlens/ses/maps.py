"""Activation maps as GeoTIFFs and the resumable driver that computes and projects them per cell.

Nodata pixels of a cell image are NaN in its maps (and the GeoTIFF's nodata value), so the land-use
statistics leave them out.
"""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd

from ..core import gis_style, outputs, runs
from .zonal import STATS, ZonalError, piece_stats

CAM_CRS = "EPSG:3035"


RUN_KEYS = ("ses.cams.clip_percentile", "ses.cams.poor_class", "ses.cams.rich_class", "ses.cams.amp")  # what makes a map, with the model


STAMP = "gradcaming_urban_areas.stamp.json"  # the run stamp (urbanlens.core.runs) in each city's folder


def maps_fresh_after(city_dir, cfg, checkpoint) -> float:
    """The POSIX time after which a city's map files are this run's: the time of its stamp, renewed
    (so every earlier map is computed again) when the model (``checkpoint``: size and time) or the
    ``RUN_KEYS`` differ from those the stamp records."""
    from pathlib import Path

    stamp, inputs = Path(city_dir) / STAMP, runs.fingerprint(Path(city_dir), [checkpoint], hash_up_to=0)
    if runs.compare(stamp, cfg, RUN_KEYS, inputs):
        runs.write_stamp(stamp, "gradcaming_urban_areas.py", cfg, RUN_KEYS, inputs)
    return stamp.stat().st_mtime


POLYGON_STATS_COLUMNS = ["cell_id", "city", "ua_code", "ua_class", "area",
                         *[f"{m}_{s}" for m in ("poor", "rich") for s in STATS],
                         "poor_score", "rich_score", "totvar", "sym_kl", "geometry"]


def map_transform(bounds, shape: tuple[int, int]):
    """Affine transform of a [H, W] map covering ``bounds`` = (west, south, east, north), north up."""
    from rasterio.transform import from_bounds

    return from_bounds(*bounds, shape[1], shape[0])


def write_maps_tif(path, maps: np.ndarray, bounds, crs: str = CAM_CRS, names=("poor", "rich")) -> None:
    """Write [M, H, W] maps as an M-band float32 Cloud-Optimized GeoTIFF covering ``bounds`` in ``crs``
    (atomically), with its QGIS style beside it (band 1 on a 0-1 colour ramp: the maps are in [0, 1]).

    Band b+1 holds maps[b] and is described by names[b]. NaN pixels are nodata: when there is one, the
    file's nodata value is NaN; a file without a NaN pixel has no nodata value (every pixel is data).
    """
    maps = np.asarray(maps, dtype=np.float32)
    gis_style.write_cog(path, maps, crs, map_transform(bounds, maps.shape[1:]),
                        nodata=float("nan") if np.isnan(maps).any() else None, names=names,
                        qml=gis_style.qml_pseudocolor(0.0, 1.0, ramp=gis_style.CAM_RAMP))


def read_maps_tif(path):
    """(maps [M, H, W] float32, transform, crs) of a GeoTIFF written by write_maps_tif; pixels equal
    to the file's nodata value (or masked by its mask band) are NaN."""
    maps, transform, crs = outputs.read_geotiff(path, "gradcaming_urban_areas.py",
                                                fix="delete it and re-run gradcaming_urban_areas.py (its map is made again)")
    if maps.ndim != 3 or maps.shape[0] < 2:
        raise outputs.damaged(path, "gradcaming_urban_areas.py", f"{maps.shape[0]} band(s), not the poor and rich maps",
                              "delete it and re-run gradcaming_urban_areas.py (its map is made again)")
    return np.ma.filled(maps.astype(np.float32, copy=False), np.nan), transform, crs


def resample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A [h, w] boolean mask on a [H, W] grid over the same extent: each pixel takes the value of the
    mask pixel under its centre (identity when the shapes are equal)."""
    mask = np.asarray(mask, dtype=bool)
    rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64)
    return mask[np.minimum(rows, mask.shape[0] - 1)[:, None], np.minimum(cols, mask.shape[1] - 1)]


def mask_maps(maps: np.ndarray, nodata: np.ndarray | None) -> np.ndarray:
    """Maps [..., H, W] float32 with NaN where ``nodata`` [H, W] is True (the maps when it is None or
    marks nothing)."""
    maps = np.asarray(maps, dtype=np.float32)
    if nodata is None or not nodata.any():
        return maps
    return np.where(nodata, np.float32(np.nan), maps)


def cell_polygon_stats(maps: np.ndarray, transform, pieces: gpd.GeoDataFrame, cell_id: str,
                       city: str) -> gpd.GeoDataFrame:
    """One row per piece of a cell with POLYGON_STATS_COLUMNS (the layout of polygon_stats.gpkg).

    ``maps``: [2, H, W] poor and rich maps, NaN on nodata pixels; ``pieces``: the output of cell_pieces.
    Pieces without a valid pixel in either map (slivers smaller than a pixel, or pieces wholly over
    nodata) have no statistics and are left out, so every row has counts above 0 and finite statistics.
    """
    maps = np.asarray(maps, dtype=np.float32)
    s = piece_stats(maps, transform, pieces.geometry.values, names=("poor", "rich"),
                    areas=pieces["area"].to_numpy(float))
    df = pd.DataFrame({"cell_id": cell_id, "city": city, "ua_code": pieces["ua_code"].to_numpy(),
                       "ua_class": pieces["ua_class"].to_numpy(), "area": pieces["area"].to_numpy(float),
                       **s})
    df["poor_count"] = df["poor_count"].astype(np.int64)
    df["rich_count"] = df["rich_count"].astype(np.int64)
    out = gpd.GeoDataFrame(df, geometry=pieces.geometry.values, crs=pieces.crs)
    keep = (out["poor_count"] > 0) & (out["rich_count"] > 0)
    return out.loc[keep, POLYGON_STATS_COLUMNS].reset_index(drop=True)


def cell_map_batches(cells: gpd.GeoDataFrame, compute, cam_dir, batch_size: int, newer_than: float = 0.0,
                     crs: str = CAM_CRS, nodata=None):
    """Maps of every cell, batch by batch, computed once and kept as GeoTIFFs (a re-run resumes).

    ``cells``: rows with cell_id and geometry (the cell square in ``crs``); ``compute(rows)`` returns
    [B, 2, H, W] poor and rich maps for a frame of cells. A cell whose ``<cam_dir>/<cell_id>.tif`` exists
    and is newer than ``newer_than`` (a POSIX time, e.g. the checkpoint's) is read back and left untouched;
    a batch holding any other cell is computed whole (same batches as an uninterrupted run). Yields lists
    of (cell row, maps [2, H, W] float32, affine transform, computed: bool); only one batch of maps is
    held at a time. ``nodata(rows)``, when given, returns [B, H, W] masks of the pixels without data
    (e.g. resample_mask of the cell images' nodata): they are NaN in the maps written, and in maps read
    back (so a file written without the mask gives the same statistics).
    """
    from pathlib import Path

    cam_dir = Path(cam_dir)
    for start in range(0, len(cells), batch_size):
        batch = cells.iloc[start:start + batch_size]
        paths = [cam_dir / f"{cid}.tif" for cid in batch["cell_id"]]
        fresh = np.array([p.is_file() and p.stat().st_mtime >= newer_than for p in paths], dtype=bool)
        computed, masks = {}, None
        if not fresh.all():
            # the whole batch, not only its missing cells: a network's output depends (in the last bits)
            # on its batch-mates, so a resumed run computes each map in the batch an uninterrupted run does
            maps = np.asarray(compute(batch), dtype=np.float32)
            if maps.ndim != 4 or maps.shape[:2] != (len(batch), 2):
                raise ZonalError(f"compute returned maps of shape {maps.shape}, expected [{len(batch)}, 2, H, W]: "
                                 "return the poor and rich maps of every cell of the batch")
            masks = batch_masks(nodata, batch, maps.shape[2:])
            for (_, row), m, done, mask in zip(batch.iterrows(), maps, fresh, masks):
                m = mask_maps(m, mask)
                if not done:
                    write_maps_tif(cam_dir / f"{row['cell_id']}.tif", m, row.geometry.bounds, crs)
                    computed[row["cell_id"]] = m
        out = []
        for k, ((_, row), path) in enumerate(zip(batch.iterrows(), paths)):
            cid = row["cell_id"]
            if cid in computed:
                m = computed[cid]
                out.append((row, m, map_transform(row.geometry.bounds, m.shape[1:]), True))
            else:
                m, transform, _ = read_maps_tif(path)
                if masks is None:
                    masks = batch_masks(nodata, batch, m.shape[1:])
                out.append((row, mask_maps(m, masks[k]), transform, False))
        yield out


def batch_masks(nodata, batch, shape: tuple[int, int]) -> list:
    """``nodata(batch)`` as one [H, W] mask per cell (None for each when there is no ``nodata``)."""
    if nodata is None:
        return [None] * len(batch)
    masks = np.asarray(nodata(batch), dtype=bool)
    if masks.shape != (len(batch), *shape):
        raise ZonalError(f"nodata returned masks of shape {masks.shape}, expected {(len(batch), *shape)}: "
                         "return one mask per cell on the maps' grid (see resample_mask)")
    return list(masks)


def empty_polygon_stats(crs) -> gpd.GeoDataFrame:
    """A polygon_stats frame with no rows but the right columns and CRS."""
    cols = {c: pd.Series(dtype=object if c in ("cell_id", "city", "ua_code", "ua_class") else
                         ("int64" if c.endswith("_count") else "float64"))
            for c in POLYGON_STATS_COLUMNS if c != "geometry"}
    return gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs)[POLYGON_STATS_COLUMNS]
