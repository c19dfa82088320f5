"""Which pixels of a raster a polygon piece holds, by the rule of rasterstats' zonal statistics.

A pixel belongs to a piece when its centre lies inside it (``rasterio.features.rasterize`` with
``all_touched=False``). Where a centre lies exactly on a piece's boundary, the decision depends on the
arithmetic of the rasteriser, so it is made as rasterstats makes it: the piece alone is rasterised on the
window of its bounds (rows and columns from floor and ceil of its bounds, window origin from the
raster's transform). A piece whose boundary passes through no pixel centre holds the same pixels under
any arithmetic, so all such pieces of a raster are burnt at once into one label image (the fast path).

Rasters may run in any axis direction (a positive y scale: rows going north; a negative x scale: columns
going west). They are read as the same raster flipped to north-up, west-to-east, and the rule above is
applied to that raster; rotated or sheared transforms are refused.
"""
from __future__ import annotations

import numpy as np
import shapely
from affine import Affine
from rasterio.enums import MergeAlg
from rasterio.features import rasterize

from ..core.errors import DataError

BURN = 1 << 16  # added to each piece's label when burning, so a pixel's value // BURN = pieces claiming it
TIE_TOL = 1e-6  # a pixel centre nearer than this (in pixels) to a piece's boundary is a tie


class ZonalError(DataError, ValueError):
    """Input the zonal statistics cannot use; the message names the input, the problem and the fix."""


# ----------------------------------------------------------------------------------------- orientation
def north_up(transform, shape: tuple[int, int]) -> tuple[Affine, bool, bool]:
    """``(t, flip_rows, flip_cols)``: the transform of the raster of ``shape`` (rows, cols) flipped to
    north-up (negative y scale) and west-to-east (positive x scale), and which axes were flipped."""
    t = Affine(*tuple(transform)[:6])
    if t.b != 0 or t.d != 0:
        raise ZonalError(f"transform {tuple(t)[:6]}: rotated or sheared grids are not supported; "
                         "warp the maps onto a north-up grid first (rasterio.warp.reproject)")
    if t.a == 0 or t.e == 0 or not np.isfinite([t.a, t.c, t.e, t.f]).all():
        raise ZonalError(f"transform {tuple(t)[:6]}: pixel size must be finite and non-zero")
    flip_rows, flip_cols = t.e > 0, t.a < 0
    if flip_rows:
        t = Affine(t.a, 0.0, t.c, 0.0, -t.e, t.f + t.e * shape[0])
    if flip_cols:
        t = Affine(-t.a, 0.0, t.c + t.a * shape[1], 0.0, t.e, t.f)
    return t, flip_rows, flip_cols


def unflip(where, shape: tuple[int, int], flip_rows: bool, flip_cols: bool):
    """A ``(rows, cols, mask)`` window of the flipped raster as the same pixels of the original one."""
    rows, cols, mask = where
    if flip_rows:
        rows, mask = slice(shape[0] - rows.stop, shape[0] - rows.start), mask[::-1]
    if flip_cols:
        cols, mask = slice(shape[1] - cols.stop, shape[1] - cols.start), mask[:, ::-1]
    return rows, cols, mask


# ------------------------------------------------------------------------------------------- ties
def boundary_segments(geoms) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every edge of the polygon rings of ``geoms``: start [K, 2], end [K, 2], index of the geometry."""
    parts, part_of = shapely.get_parts(np.asarray(geoms, dtype=object), return_index=True)
    polys = np.array([p.geom_type == "Polygon" for p in parts], dtype=bool)
    parts, part_of = parts[polys], part_of[polys]
    if not len(parts):
        return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, np.int64)
    rings, ring_of = shapely.get_rings(parts, return_index=True)
    xy, idx = shapely.get_coordinates(rings, return_index=True)
    same = idx[1:] == idx[:-1]
    return xy[:-1][same], xy[1:][same], part_of[ring_of[idx[:-1][same]]]


def lattice_hits(a0, a1, b0, b1, tol: float) -> np.ndarray:
    """For segments whose coordinate ``a`` changes at least as fast as ``b``: index of the segment for
    each integer ``a`` in its range where ``b`` lies within ``tol`` of an integer."""
    lo, hi = np.minimum(a0, a1), np.maximum(a0, a1)
    first, last = np.ceil(lo - tol), np.floor(hi + tol)
    n = np.maximum(last - first + 1, 0).astype(np.int64)
    seg = np.repeat(np.arange(len(a0)), n)
    if not len(seg):
        return seg
    a = first[seg] + (np.arange(len(seg)) - np.repeat(np.cumsum(n) - n, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        b = b0[seg] + (a - a0[seg]) * ((b1 - b0) / (a1 - a0))[seg]
    b = np.where(a1[seg] == a0[seg], b0[seg], b)  # a point-like segment
    return seg[np.abs(b - np.rint(b)) <= tol]


def centre_ties(geoms, transform, shape: tuple[int, int], tol: float = TIE_TOL) -> np.ndarray:
    """True for each geometry whose boundary passes within ``tol`` pixels of a pixel centre of the
    raster (``transform`` north-up, ``shape`` rows and cols): where the rasteriser's arithmetic decides."""
    start, end, owner = boundary_segments(geoms)
    t = transform
    u0, u1 = (start[:, 0] - t.c) / t.a - 0.5, (end[:, 0] - t.c) / t.a - 0.5  # centres on integers
    v0, v1 = (start[:, 1] - t.f) / t.e - 0.5, (end[:, 1] - t.f) / t.e - 0.5
    inside = ((np.maximum(u0, u1) > -1) & (np.minimum(u0, u1) < shape[1])
              & (np.maximum(v0, v1) > -1) & (np.minimum(v0, v1) < shape[0]))
    steep = np.abs(v1 - v0) >= np.abs(u1 - u0)
    tied = np.zeros(len(geoms), dtype=bool)
    for sel, (a0, a1, b0, b1) in ((steep & inside, (v0, v1, u0, u1)), (~steep & inside, (u0, u1, v0, v1))):
        hits = lattice_hits(a0[sel], a1[sel], b0[sel], b1[sel], tol)
        tied[owner[sel][hits]] = True
    return tied


# ---------------------------------------------------------------------------------------- windows
def rasterstats_window(geom, shape: tuple[int, int], transform):
    """``(rows, cols, mask)``: the pixels whose centres lie inside ``geom``, rasterised alone on the
    window of its bounds as rasterstats does (north-up ``transform``), cropped to the raster."""
    w, s, e, n = geom.bounds
    t = transform
    r0, c0 = int(np.floor((n - t.f) / t.e)), int(np.floor((w - t.c) / t.a))
    r1, c1 = int(np.ceil((s - t.f) / t.e)), int(np.ceil((e - t.c) / t.a))
    if r1 <= r0 or c1 <= c0:
        return empty_window()
    west = c0 * t.a + r1 * t.b + t.c  # t * (c0, r1) and t * (c1, r0), in affine's order of operations
    north = c1 * t.d + r0 * t.e + t.f
    local = Affine(t.a, t.b, west, t.d, t.e, north)
    mask = rasterize([(geom, 1)], out_shape=(r1 - r0, c1 - c0), transform=local, fill=0, all_touched=False,
                     dtype="uint8").view(bool)
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = max(rr0, min(r1, shape[0])), max(cc0, min(c1, shape[1]))
    return slice(rr0, rr1), slice(cc0, cc1), mask[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0]


def piece_window_pixels(geom, shape: tuple[int, int], transform) -> np.ndarray:
    """Flat indices of the pixels rasterstats gives ``geom`` (rasterstats_window; any axis direction)."""
    t, flip_rows, flip_cols = north_up(transform, shape)
    rows, cols, mask = unflip(rasterstats_window(geom, shape, t), shape, flip_rows, flip_cols)
    r, c = np.nonzero(mask)
    return (r + rows.start).astype(np.int64) * shape[1] + (c + cols.start)


def empty_window():
    return slice(0, 0), slice(0, 0), np.zeros((0, 0), dtype=bool)


def burnt_windows(shapes, shape: tuple[int, int], transform):
    """Windows of the pieces ``shapes`` = [(index, geom)] burnt at once (north-up ``transform``), or
    None when a pixel is claimed by two of them (overlapping pieces)."""
    burnt = rasterize([(g, BURN + i + 1) for i, g in shapes], out_shape=shape, transform=transform, fill=0,
                      all_touched=False, merge_alg=MergeAlg.add, dtype="int32")
    if burnt.max(initial=0) >= 2 * BURN:
        return None
    t, out = transform, {}
    for i, g in shapes:
        w, s, e, n = g.bounds  # the window of the bounds, one pixel wider on each side
        r0, r1 = (n - t.f) / t.e, (s - t.f) / t.e
        c0, c1 = (w - t.c) / t.a, (e - t.c) / t.a
        rows = slice(max(0, int(np.floor(r0)) - 1), max(0, min(shape[0], int(np.ceil(r1)) + 1)))
        cols = slice(max(0, int(np.floor(c0)) - 1), max(0, min(shape[1], int(np.ceil(c1)) + 1)))
        out[i] = (rows, cols, burnt[rows, cols] == BURN + i + 1)
    return out


def piece_windows(geoms, shape: tuple[int, int], transform) -> list:
    """For each piece, its pixels as ``(rows, cols, mask)``: ``mask`` marks the pixels of the window
    ``[rows, cols]`` of the raster (``shape`` rows and cols, any axis direction) that the piece holds.

    Pieces whose boundary passes through a pixel centre, and all pieces when two of them claim a pixel
    (overlapping pieces), are rasterised alone on rasterstats' window (rasterstats_window), so that a
    shared pixel counts for each piece that holds it; the others are burnt at once.
    """
    geoms = list(geoms)
    t, flip_rows, flip_cols = north_up(transform, shape)
    shapes = [(i, g) for i, g in enumerate(geoms) if g is not None and not g.is_empty]
    out = [empty_window() for _ in geoms]
    if not shapes or len(geoms) >= BURN // 2:
        alone = shapes
    else:
        tied = centre_ties([g for _, g in shapes], t, shape)
        fast = [s for s, tie in zip(shapes, tied) if not tie]
        alone = [s for s, tie in zip(shapes, tied) if tie]
        burnt = burnt_windows(fast, shape, t) if fast else {}
        if burnt is None:
            alone = shapes
        else:
            for i, where in burnt.items():
                out[i] = where
    for i, g in alone:
        out[i] = rasterstats_window(g, shape, t)
    return [unflip(w, shape, flip_rows, flip_cols) for w in out]


def piece_values(maps: np.ndarray, where) -> np.ndarray:
    """[M, count] values of maps [M, H, W] at one piece's pixels (an entry of piece_windows), a new
    C-ordered array (each map's values contiguous)."""
    rows, cols, mask = where
    return np.stack([m[rows, cols][mask] for m in maps])


def valid_pixels(values: np.ndarray, nodata=None, maybe_nan: bool = True) -> np.ndarray | None:
    """Mask [M, c] of the values [M, c] that are data (not NaN, not ``nodata``), or None when all are.

    ``maybe_nan=False`` (the caller knows there is no NaN, e.g. from a finite minimum) skips that test.
    """
    bad = None
    if maybe_nan and np.issubdtype(values.dtype, np.floating):
        bad = np.isnan(values)
    if nodata is not None and not (isinstance(nodata, float) and np.isnan(nodata)):
        eq = values == nodata
        bad = eq if bad is None else bad | eq
    if bad is None or not bad.any():
        return None
    return ~bad
