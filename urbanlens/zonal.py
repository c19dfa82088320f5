"""Statistics of activation maps over Urban Atlas polygon pieces (zonal statistics, vectorised).

A census cell is cut into *pieces*: the Urban Atlas polygons clipped to the cell. A pixel belongs to a
piece when its centre falls inside it, the rule ``rasterio.features.rasterize(all_touched=False)`` and
rasterstats use by default, with ties (a centre exactly on a piece's boundary) decided as rasterstats
decides them; see urbanlens.zonal_pixels for how the pixels are found (one pass over the cell for most
pieces) and for rasters running in other axis directions. Each piece's pixels are reduced as one
contiguous array per map (sum in float64, min, max, an in-place partition for the median, the poor/rich
distances), so a cell costs a few passes over its pixels.

Nodata, as in rasterstats: NaN pixels, and pixels equal to the ``nodata`` value when one is given, count
for nothing. A piece without a valid pixel gets count 0 and NaN for every other statistic.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import geopandas as gpd
import shapely
from scipy import stats as sstats

from .zonal_pixels import (BURN, ZonalError, centre_ties, north_up, piece_values,  # noqa: F401 (public)
                           piece_window_pixels, piece_windows, rasterstats_window, valid_pixels)

STATS = ("sum", "mean", "min", "max", "median", "count")
# Added to every pixel before the poor and rich maps are normalised to distributions within a piece:
# it keeps the symmetric KL finite where one map is zero and the other is not, and makes a piece where a
# map is zero everywhere a uniform distribution. Small next to map values, which are scaled to [0, 1].
EPS = 1e-6
PIECE_COLUMNS = ["ua_code", "ua_class", "area", "geometry"]


# --------------------------------------------------------------------------------------------- pieces
def polygonal_part(geom):
    """The areal part of a geometry (polygons of a collection); None when it has no area."""
    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom if geom.area > 0 else None
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon") and p.area > 0]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def cell_pieces(landuse: gpd.GeoDataFrame, cell_geom) -> gpd.GeoDataFrame:
    """Urban Atlas polygons clipped to ``cell_geom``: columns ua_code, ua_class, area (m^2), geometry.

    ``landuse`` must be in a metric CRS (Urban Atlas: EPSG:3035) and carry ua_code and ua_class; the
    cell geometry is in the same CRS. Empty and non-areal pieces (lines or points left where a polygon
    only touches the cell) are dropped.
    """
    if landuse.crs is None or not landuse.crs.is_projected:
        raise ValueError(f"land-use polygons need a projected CRS in metres, got {landuse.crs}")
    idx = landuse.sindex.query(cell_geom, predicate="intersects")
    near = landuse.iloc[np.sort(idx)]
    clipped = shapely.intersection(near.geometry.values, cell_geom)
    geoms = [polygonal_part(g) for g in clipped]
    keep = np.array([g is not None for g in geoms], dtype=bool)
    out = gpd.GeoDataFrame(
        {"ua_code": near["ua_code"].to_numpy()[keep], "ua_class": near["ua_class"].to_numpy()[keep]},
        geometry=[g for g in geoms if g is not None], crs=landuse.crs)
    out["area"] = out.geometry.area.to_numpy(dtype=float)
    return out[PIECE_COLUMNS].reset_index(drop=True)


# ---------------------------------------------------------------------------------------- reductions
def median_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row of a [M, c] array (c > 0), partitioning it in place; float64.

    The median of an even count is the mean of the two middle values.
    """
    c = values.shape[1]
    values.partition(c // 2, axis=1)  # upper middle in place, smaller values before it
    upper = values[:, c // 2].astype(np.float64)
    return upper if c % 2 else (values[:, :c // 2].max(axis=1).astype(np.float64) + upper) / 2


def pair_distances(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> tuple[float, float]:
    """Total-variation distance and symmetric KL between maps ``a`` and ``b`` over one set of pixels.

    Both maps are turned into distributions over the pixels, p = (a + eps) / sum(a + eps) and likewise
    q; TV = 1/2 sum |p - q| (in [0, 1]) and symmetric KL = KL(p||q) + KL(q||p) = sum (p - q) log(p / q)
    (nats). Both are 0 for identical maps and NaN for no pixel.
    """
    if len(a) == 0:
        return np.nan, np.nan
    a = np.asarray(a, np.float64) + eps
    b = np.asarray(b, np.float64) + eps
    sa, sb = a.sum(), b.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        log_ratio = np.log(a / b)  # log(p / q) = log(a / b) + log(sb / sa): one logarithm per pixel
        log_ratio += np.log(sb / sa)
        a *= 1.0 / sa  # a, b now hold p, q
        b *= 1.0 / sb
        a -= b
        return 0.5 * float(np.abs(a).sum()), float(a @ log_ratio)


def group_order(groups: np.ndarray, n: int) -> np.ndarray:
    """A stable permutation that makes each group contiguous (radix sort on a small integer type)."""
    small = groups.astype(np.int16 if n < 2**15 else np.int32)
    return np.argsort(small, kind="stable")


def distribution_distances(a: np.ndarray, b: np.ndarray, groups: np.ndarray, n: int,
                           eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """pair_distances of maps ``a`` and ``b`` within each group 0..n-1 (NaN for an empty group)."""
    groups = np.asarray(groups)
    order = group_order(groups, n)
    a, b = np.asarray(a)[order], np.asarray(b)[order]
    ends = np.cumsum(np.bincount(groups, minlength=n))
    tv, kl = np.full(n, np.nan), np.full(n, np.nan)
    for g in range(n):
        s0 = ends[g - 1] if g else 0
        tv[g], kl[g] = pair_distances(a[s0:ends[g]], b[s0:ends[g]], eps)
    return tv, kl


def reduce_rows(res: dict, i: int, v: np.ndarray, rows, lo=None) -> None:
    """Write the statistics of values ``v`` [k, c] (c > 0, all valid) into column ``i`` of the rows
    ``rows`` of each array of ``res`` (``lo``: v.min(axis=1) when known); partitions ``v`` in place."""
    c = v.shape[1]
    res["count"][rows, i] = c
    res["sum"][rows, i] = total = v.sum(axis=1, dtype=np.float64)
    res["mean"][rows, i] = total / c
    res["min"][rows, i], res["max"][rows, i] = v.min(axis=1) if lo is None else lo, v.max(axis=1)
    res["median"][rows, i] = median_rows(v)


def reduce_masked(res: dict, i: int, v: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """Statistics of each map's valid values of ``v`` [M, c] into column ``i``; the distances of the
    first two maps over the pixels valid in both (NaN for none)."""
    for j in range(v.shape[0]):
        vj = v[j][valid[j]]
        if vj.size:
            reduce_rows(res, i, vj[None], slice(j, j + 1))
    if v.shape[0] != 2:
        return np.nan, np.nan
    both = valid[0] & valid[1]
    return pair_distances(v[0][both], v[1][both])


def piece_stats(maps: np.ndarray, transform, geoms, names=("poor", "rich"), areas=None,
                nodata=None) -> dict[str, np.ndarray]:
    """Zonal statistics of one or two maps over polygon pieces, by the pixel-centre rule.

    ``maps``: [H, W] or [M, H, W] (M = len(names)); ``transform``: the maps' affine transform, north-up
    or running in any axis direction (see urbanlens.zonal_pixels); ``geoms``: shapely polygons in the
    maps' CRS; ``nodata``: a value that marks pixels without data (NaN pixels are nodata whatever it
    is). Returns arrays of length len(geoms): for a single map ``sum, mean, min, max, median, count``;
    for several ``<name>_<stat>`` for each map; with exactly two maps also ``totvar`` and ``sym_kl``
    (see pair_distances, over the pixels valid in both maps) and ``<name>_score = <name>_sum / area``
    (area of each piece in CRS units, computed from ``geoms`` unless given). Nodata pixels count for
    nothing; a piece without a valid pixel gets count 0 and NaN for every other statistic, as
    rasterstats gives None. Sums are accumulated in float64.
    """
    maps = np.ascontiguousarray(maps)
    single = maps.ndim == 2
    if single:
        maps = maps[None]
    if maps.ndim != 3 or (not single and maps.shape[0] != len(names)):
        raise ZonalError(f"maps of shape {maps.shape}: expected [H, W] or [{len(names)}, H, W] "
                         f"(one map per name of {tuple(names)}); pass maps and names that match")
    geoms = list(geoms)
    n, m = len(geoms), maps.shape[0]
    res = {stat: np.full((m, n), np.nan) for stat in STATS}
    res["count"] = np.zeros((m, n), np.int64)
    tv, kl = np.full(n, np.nan), np.full(n, np.nan)
    floating = np.issubdtype(maps.dtype, np.floating)
    for i, where in enumerate(piece_windows(geoms, maps.shape[1:], transform)):
        v = piece_values(maps, where)  # a private [M, c] copy
        if v.shape[1] == 0:
            continue
        lo = v.min(axis=1)
        maybe_nan = floating and bool(np.isnan(lo).any())  # NaN propagates through min
        valid = valid_pixels(v, nodata, maybe_nan) if maybe_nan or nodata is not None else None
        if valid is None:
            if m == 2:
                tv[i], kl[i] = pair_distances(v[0], v[1])
            reduce_rows(res, i, v, slice(None), lo)
        else:
            tv[i], kl[i] = reduce_masked(res, i, v, valid)
    if single:
        return {k: res[k][0] for k in STATS}
    out = {f"{name}_{stat}": res[stat][j] for j, name in enumerate(names) for stat in STATS}
    if len(names) == 2:
        area = np.asarray(areas, float) if areas is not None else shapely.area(np.asarray(geoms, dtype=object))
        for name in names:
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{name}_score"] = out[f"{name}_sum"] / area
        out["totvar"], out["sym_kl"] = tv, kl
    return out


# ------------------------------------------------------------------------------------------ summaries
def mean_interval(x, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval of the mean (NaN bounds with fewer than 2 values).

    Deterministic (no resampling): mean +- t_{(1+level)/2, n-1} * sd / sqrt(n).
    """
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan, np.nan
    m = float(x.mean())
    if x.size < 2:
        return m, np.nan, np.nan
    half = float(sstats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return m, m - half, m + half


SUMMARY_COLUMNS = ["ua_code", "ua_class", "pieces", "area", "poor_score_mean", "poor_score_lo",
                   "poor_score_hi", "rich_score_mean", "rich_score_lo", "rich_score_hi", "rich_minus_poor"]


def landuse_summary(stats: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per Urban Atlas class: pieces, total area, mean and t-interval of poor_score and rich_score.

    ``stats`` holds one row per piece with ua_code, ua_class, area, poor_score, rich_score (the columns
    of polygon_stats.gpkg). The mean is over pieces (each piece one observation); pieces without a
    finite score are left out of that score's mean. ``rich_minus_poor`` = rich_score_mean -
    poor_score_mean. Sorted by rich_minus_poor, largest first.
    """
    rows = []
    for code, g in stats.groupby("ua_code", sort=True):
        row = {"ua_code": code, "ua_class": g["ua_class"].iloc[0], "pieces": len(g),
               "area": float(g["area"].sum())}
        for name in ("poor", "rich"):
            row[f"{name}_score_mean"], row[f"{name}_score_lo"], row[f"{name}_score_hi"] = \
                mean_interval(g[f"{name}_score"], level)
        row["rich_minus_poor"] = row["rich_score_mean"] - row["poor_score_mean"]
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return out.sort_values("rich_minus_poor", ascending=False, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------- per-cell map files
CAM_CRS = "EPSG:3035"
POLYGON_STATS_COLUMNS = ["cell_id", "city", "ua_code", "ua_class", "area",
                         *[f"{m}_{s}" for m in ("poor", "rich") for s in STATS],
                         "poor_score", "rich_score", "totvar", "sym_kl", "geometry"]


def map_transform(bounds, shape: tuple[int, int]):
    """Affine transform of a [H, W] map covering ``bounds`` = (west, south, east, north), north up."""
    from rasterio.transform import from_bounds

    return from_bounds(*bounds, shape[1], shape[0])


def write_maps_tif(path, maps: np.ndarray, bounds, crs: str = CAM_CRS, names=("poor", "rich")) -> None:
    """Write [M, H, W] maps as an M-band float32 GeoTIFF covering ``bounds`` in ``crs`` (atomically).

    Band b+1 holds maps[b] and is described by names[b]. NaN pixels are nodata: when there is one, the
    file's nodata value is NaN; a file without a NaN pixel has no nodata value (every pixel is data).
    """
    import rasterio

    from .io import atomic_path

    maps = np.asarray(maps, dtype=np.float32)
    profile = dict(driver="GTiff", width=maps.shape[2], height=maps.shape[1], count=maps.shape[0],
                   dtype="float32", crs=crs, transform=map_transform(bounds, maps.shape[1:]),
                   compress="deflate", predictor=3)
    if np.isnan(maps).any():
        profile["nodata"] = float("nan")
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(maps)
            for b, name in enumerate(names[:maps.shape[0]]):
                dst.set_band_description(b + 1, name)


def read_maps_tif(path):
    """(maps [M, H, W] float32, transform, crs) of a GeoTIFF written by write_maps_tif; pixels equal
    to the file's nodata value (or masked by its mask band) are NaN."""
    import rasterio

    with rasterio.open(path) as src:
        maps = src.read(masked=True).astype(np.float32, copy=False)
        return np.ma.filled(maps, np.nan), src.transform, src.crs


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
