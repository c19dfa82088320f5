"""Statistics of activation maps over Urban Atlas polygon pieces (zonal statistics, vectorised).

A census cell is cut into *pieces*: the Urban Atlas polygons clipped to the cell. A pixel belongs to a
piece when its centre falls inside it, the rule ``rasterio.features.rasterize(all_touched=False)`` and
rasterstats use by default, with ties (a centre exactly on a piece's boundary) decided as rasterstats
decides them; see urbanlens.ses.zonal_pixels for how the pixels are found (one pass over the cell for most
pieces) and for rasters running in other axis directions. Each piece's pixels are reduced as one
contiguous array per map (sum in float64, min, max, an in-place partition for the median, the poor/rich
distances), so a cell costs a few passes over its pixels.

Nodata, as in rasterstats: NaN pixels, and pixels equal to the ``nodata`` value when one is given, count
for nothing. A piece without a valid pixel gets count 0 and NaN for every other statistic.
"""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy import stats as sstats

from .zonal_pixels import (  # noqa: F401 (public)
    BURN,
    ZonalError,
    centre_ties,
    north_up,
    piece_values,
    piece_window_pixels,
    piece_windows,
    rasterstats_window,
    valid_pixels,
)

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
    or running in any axis direction (see urbanlens.ses.zonal_pixels); ``geoms``: shapely polygons in the
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


CELL_RESAMPLES = 1000


def cell_bootstrap_mean(scores, cells, level: float = 0.95, resamples: int = CELL_RESAMPLES,
                        seed: int = 0) -> tuple[float, float, float]:
    """Mean over pieces and a percentile interval from resampling whole units: ``cells`` names each
    piece's unit, its cell or the spatial block of its cell (the pieces of one cell share its activation
    map, and neighbouring cells look and earn alike, so neither is an independent observation). Each
    draw takes as many units as there are, with replacement, and averages all their pieces (seeded;
    NaN bounds with fewer than two units). Pieces without a finite score are left out."""
    scores, cells = np.asarray(scores, float), np.asarray(cells, dtype=object)
    ok = np.isfinite(scores)
    scores, cells = scores[ok], cells[ok]
    if scores.size == 0:
        return np.nan, np.nan, np.nan
    mean = float(scores.mean())
    _, inverse = np.unique(cells.astype(str), return_inverse=True)
    sums, counts = np.bincount(inverse, weights=scores), np.bincount(inverse).astype(float)
    if len(sums) < 2:
        return mean, np.nan, np.nan
    draws = np.random.default_rng(seed).integers(0, len(sums), (resamples, len(sums)))
    boot = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return mean, float(min(lo, mean)), float(max(hi, mean))


def landuse_summary(stats: pd.DataFrame, level: float = 0.95, seed: int = 0, unit: str = "cells",
                    block_m: float | None = None) -> pd.DataFrame:
    """Per Urban Atlas class: pieces, total area, mean and interval of poor_score and rich_score.

    ``stats`` holds one row per piece with ua_code, ua_class, area, poor_score, rich_score and cell_id
    (the columns of polygon_stats.gpkg). The mean is over pieces; its interval is a percentile
    bootstrap (``cell_bootstrap_mean``, seeded by ``seed``) over ``unit``: the spatial ``block_m``
    blocks of the EPSG:3035 grid holding the pieces' cells (``blocks``) or the cells themselves
    (``cells``; without a cell_id column every piece counts as its own cell). ``rich_minus_poor`` = rich_score_mean - poor_score_mean. Sorted by rich_minus_poor,
    largest first.
    """
    if "cell_id" not in stats.columns:
        stats, unit = stats.assign(cell_id=np.arange(len(stats)).astype(str)), "cells"
    if unit == "blocks":
        from .spatial_folds import block_ids

        stats = stats.assign(unit=block_ids(stats["cell_id"], block_m))
    else:
        stats = stats.assign(unit=stats["cell_id"])
    rows = []
    for code, g in stats.groupby("ua_code", sort=True):
        row = {"ua_code": code, "ua_class": g["ua_class"].iloc[0], "pieces": len(g),
               "area": float(g["area"].sum())}
        for name in ("poor", "rich"):
            row[f"{name}_score_mean"], row[f"{name}_score_lo"], row[f"{name}_score_hi"] = \
                cell_bootstrap_mean(g[f"{name}_score"], g["unit"], level, seed=seed)
        row["rich_minus_poor"] = row["rich_score_mean"] - row["poor_score_mean"]
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return out.sort_values("rich_minus_poor", ascending=False, kind="stable").reset_index(drop=True)
