"""Statistics of activation maps over Urban Atlas polygon pieces (zonal statistics, vectorised).

A census cell is cut into *pieces*: the Urban Atlas polygons clipped to the cell. A pixel belongs to a
piece when its centre falls inside it, the rule ``rasterio.features.rasterize(all_touched=False)`` and
rasterstats use by default. All pieces of a cell are burnt at once into one raster; each piece's pixels
are then picked from the window of its bounds and reduced as one contiguous array per map (sum in
float64, min, max, an in-place partition for the median, the poor/rich distances), so a cell costs a
few passes over its pixels. When a pixel is claimed by two pieces (overlapping polygons, or a pixel
centre lying exactly on an edge two pieces share) the pieces are rasterised one by one on rasterstats'
windows instead, so that such a pixel counts for each piece and the results equal rasterstats'.
"""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from rasterio.enums import MergeAlg
from rasterio.features import rasterize
from scipy import stats as sstats

STATS = ("sum", "mean", "min", "max", "median", "count")


# Added to every pixel before the poor and rich maps are normalised to distributions within a piece:
# it keeps the symmetric KL finite where one map is zero and the other is not, and makes a piece where a
# map is zero everywhere a uniform distribution. Small next to map values, which are scaled to [0, 1].
EPS = 1e-6


PIECE_COLUMNS = ["ua_code", "ua_class", "area", "geometry"]


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


BURN = 1 << 16  # added to each piece's label when burning, so a pixel's value // BURN = pieces claiming it


def piece_windows(geoms, shape: tuple[int, int], transform):
    """For each piece, where its pixels are: ``(rows, cols, mask)`` with ``mask`` the pixels of the
    window ``[rows, cols]`` whose centres lie inside the piece, or a flat index array.

    Fast path: all pieces are burnt into one raster (each adds ``BURN + its label``), so a pixel
    claimed by two pieces (overlapping pieces, or a centre lying exactly on an edge two pieces share,
    which the centre rule gives to both) shows as a value of 2 * BURN or more. Without such a pixel,
    each piece's pixels are read on the window of its bounds; otherwise every piece is rasterised on
    its own (piece_window_pixels), so that a shared pixel counts for each piece that holds it.
    """
    n = len(geoms)
    shapes = [(g, BURN + i + 1) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    if not shapes:
        return [np.zeros(0, np.int64)] * n
    if n < BURN // 2:
        burnt = rasterize(shapes, out_shape=shape, transform=transform, fill=0, all_touched=False,
                          merge_alg=MergeAlg.add, dtype="int32")
        if burnt.max(initial=0) < 2 * BURN:
            t = transform
            out = [np.zeros(0, np.int64)] * n
            for g, v in shapes:
                if t.b == 0 and t.d == 0:
                    w, s, e, nn = g.bounds  # the window of the bounds, one pixel wider on each side
                    r0, r1 = sorted(((nn - t.f) / t.e, (s - t.f) / t.e))
                    c0, c1 = sorted(((w - t.c) / t.a, (e - t.c) / t.a))
                    rows = slice(max(0, int(np.floor(r0)) - 1), max(0, min(shape[0], int(np.ceil(r1)) + 1)))
                    cols = slice(max(0, int(np.floor(c0)) - 1), max(0, min(shape[1], int(np.ceil(c1)) + 1)))
                else:
                    rows, cols = slice(0, shape[0]), slice(0, shape[1])
                out[v - BURN - 1] = (rows, cols, burnt[rows, cols] == v)
            return out
    out = [np.zeros(0, np.int64)] * n
    for g, v in shapes:
        out[v - BURN - 1] = piece_window_pixels(g, shape, transform)
    return out


def piece_values(maps: np.ndarray, where) -> np.ndarray:
    """[M, count] values of maps [M, H, W] at one piece's pixels (an entry of piece_windows), a new
    C-ordered array (each map's values contiguous)."""
    if isinstance(where, tuple):
        rows, cols, mask = where
        return np.stack([m[rows, cols][mask] for m in maps])
    return np.stack([m.ravel()[where] for m in maps])


def piece_window_pixels(geom, shape: tuple[int, int], transform) -> np.ndarray:
    """Flat indices of the pixels whose centres lie inside ``geom``, rasterised on its bounding window.

    The window (rows and columns from floor/ceil of the geometry's bounds, origin from ``transform *
    (col, row)``) is the one rasterstats reads, so that a centre lying exactly on an edge is decided by
    the same arithmetic; pixels of the window outside the raster are dropped.
    """
    from affine import Affine

    w, s, e, n = geom.bounds
    t = transform
    r0, c0 = int(np.floor((n - t.f) / t.e)), int(np.floor((w - t.c) / t.a))
    r1, c1 = int(np.ceil((s - t.f) / t.e)), int(np.ceil((e - t.c) / t.a))
    if r1 <= r0 or c1 <= c0:
        return np.zeros(0, np.int64)
    west, _ = t * (c0, r1)
    _, north = t * (c1, r0)
    local = Affine(t.a, t.b, west, t.d, t.e, north)
    mask = rasterize([(geom, 1)], out_shape=(r1 - r0, c1 - c0), transform=local, fill=0, all_touched=False,
                     dtype="uint8")
    rows, cols = np.nonzero(mask)
    rows, cols = rows + r0, cols + c0
    inside = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
    return rows[inside].astype(np.int64) * shape[1] + cols[inside]


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


def piece_stats(maps: np.ndarray, transform, geoms, names=("poor", "rich"), areas=None) -> dict[str, np.ndarray]:
    """Zonal statistics of one or two maps over polygon pieces, by the pixel-centre rule.

    ``maps``: [H, W] or [M, H, W] (M = len(names)); ``transform``: the maps' affine transform;
    ``geoms``: shapely polygons in the maps' CRS. Returns arrays of length len(geoms): for a single map
    ``sum, mean, min, max, median, count``; for several ``<name>_<stat>`` for each map; with exactly two
    maps also ``totvar`` and ``sym_kl`` (see pair_distances) and ``<name>_score = <name>_sum /
    area`` (area of each piece in CRS units, computed from ``geoms`` unless given). A piece with no
    pixel centre gets count 0, sum 0 and NaN for the other statistics. Sums are accumulated in float64.
    """
    maps = np.ascontiguousarray(maps)
    single = maps.ndim == 2
    if single:
        maps = maps[None]
    if maps.ndim != 3 or (not single and maps.shape[0] != len(names)):
        raise ValueError(f"maps must be [H, W] or [{len(names)}, H, W], got shape {maps.shape}")
    geoms = list(geoms)
    n, m = len(geoms), maps.shape[0]
    res = {stat: np.full((m, n), np.nan) for stat in STATS}
    res["sum"][:], res["count"] = 0.0, np.zeros((m, n), np.int64)
    tv, kl = np.full(n, np.nan), np.full(n, np.nan)
    for i, where in enumerate(piece_windows(geoms, maps.shape[1:], transform)):
        v = piece_values(maps, where)  # a private [M, c] copy
        c = v.shape[1]
        if c == 0:
            continue
        res["count"][:, i] = c
        res["sum"][:, i] = v.sum(axis=1, dtype=np.float64)
        res["mean"][:, i] = res["sum"][:, i] / c
        res["min"][:, i], res["max"][:, i] = v.min(axis=1), v.max(axis=1)
        if m == 2 and not single:
            tv[i], kl[i] = pair_distances(v[0], v[1])
        res["median"][:, i] = median_rows(v)
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
