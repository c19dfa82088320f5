"""Cell images from orthophoto tiles: which cells to extract, reading a cell across tiles by on-the-fly
reprojection to EPSG:3035, the nodata rule, and the parallel, resumable extraction.

A pixel whose bands are all zero is nodata. A tile's declared nodata value marks a hole only where every
band carries it: a white roof saturated in one or two bands of a tile declaring nodata 255 stays as it is.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
from PIL import Image
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.merge import merge
from rasterio.transform import from_bounds
from rasterio.warp import reproject
from tqdm import tqdm

from ..core import runs
from ..core.errors import DataError
from ..core.files import atomic_path
from .grid import CELL_PREFIX, LAEA
from .tiles import as_crs, crs_transformer, tile_crs

# What makes a cell image: the data read and the cell geometry. (Which cells and cities, and the void
# threshold, may change between runs: the index is written anew, and each cell image is its own.)
RUN_KEYS = ("paths.data", "ses.census_file", "ses.ua_dir", "ses.aerial_dir", "ses.cell_size_m", "ses.cell_px",
            "ses.imputed", "ses.ortho_product", "ses.ua_boundary")


STAMP = "generate_fr_ua_aerial_data.stamp.json"  # the run stamp (urbanlens.core.runs) in <results>/ses


INDEX_FIX = "delete it and re-run generate_fr_ua_aerial_data.py (the cell images it extracted are kept)"


def run_inputs(cfg) -> dict:
    """Fingerprint of every file extraction may read: census, Urban Atlas and orthophotos with their index."""
    root = Path(cfg.paths.data)
    return runs.fingerprint(root, runs.files_under(root, cfg.ses.census_file, cfg.ses.ua_dir, cfg.ses.aerial_dir))


def clear_cells(out: str | Path) -> None:
    """Remove the cell images and indexes of ``out`` (``<results>/ses``) so that none is reused."""
    import shutil

    out = Path(out)
    if (out / "imagery").is_dir():
        shutil.rmtree(out / "imagery")
    for index in out.glob("cells*.gpkg"):
        index.unlink()


def _snap_out(lo: float, hi: float, origin: float, step: float) -> tuple[float, float]:
    """Widen [lo, hi] to the pixel grid origin + k * step."""
    return (origin + math.floor((lo - origin) / step + 1e-9) * step,
            origin + math.ceil((hi - origin) / step - 1e-9) * step)


def read_cell(tile_paths: Sequence, bounds_3035: Sequence[float], px: int, crs=LAEA,
              resampling: str = "average") -> np.ndarray:
    """The square ``bounds_3035`` (xmin, ymin, xmax, ymax in ``crs``) as uint8 RGB [px, px, 3].

    The tiles (paths or open rasterio datasets, one CRS) are mosaicked in their own CRS over the cell's
    footprint only (a window of each, on the first tile's pixel grid, so a cell straddling tiles has no
    seam), then reprojected onto the cell's grid. Pixels no tile covers stay 0 (nodata), and so do
    pixels where every band holds the tile's declared nodata value (a value in some bands only is
    data). Untagged Lambert-93 tiles are read as EPSG:2154.
    """
    return read_cells(tile_paths, [bounds_3035], px, crs, resampling)[0]


def read_cells(tile_paths: Sequence, cells_3035: Sequence[Sequence[float]], px: int, crs=LAEA,
               resampling: str = "average") -> list[np.ndarray]:
    """``read_cell`` for several cells that need the same tiles, each tile region decoded once: the
    tiles are mosaicked once over the union of the cells' footprints (``cell_mosaic``), and each cell is
    reprojected from its window of that in-memory mosaic (``warp_cells``). On tiles sharing one pixel
    grid, each image equals the one ``read_cell`` gives for that cell alone."""
    if not len(cells_3035):
        return []
    with contextlib.ExitStack() as stack:
        srcs = [t if hasattr(t, "read") else stack.enter_context(rasterio.open(t)) for t in tile_paths]
        if not srcs:
            return [np.zeros((px, px, 3), np.uint8) for _ in cells_3035]
        mosaic = cell_mosaic(srcs, cells_3035, crs)
    return warp_cells(mosaic, px, resampling)


@dataclass
class CellMosaic:
    """Tiles mosaicked in their own CRS over the footprints of some cells, and where each cell lies in it."""
    pixels: np.ndarray    # bands x rows x cols, uint8, 0 = nodata
    cells: list           # each cell's bounds in ``dst_crs``
    windows: list         # each cell's footprint in ``pixels``: (row, col, height, width, transform in src_crs)
    src_crs: CRS
    dst_crs: CRS


def cell_mosaic(srcs: list, cells_3035: Sequence[Sequence[float]], crs=LAEA) -> CellMosaic:
    """The open tiles ``srcs`` (one CRS) mosaicked once over the union of the cells' footprints (each 2
    px wider than the cell, on the first tile's pixel grid): the only decoding ``read_cells`` does."""
    dst_crs = as_crs(crs) if isinstance(crs, str) else CRS.from_user_input(crs)
    with contextlib.ExitStack() as stack:
        srcs, src_crs = _checked_tiles(srcs, stack)
        first = srcs[0].transform
        rx, ry = abs(first.a), abs(first.e)
        to_src = crs_transformer(dst_crs.to_wkt(), src_crs.to_wkt())
        feet = []
        for bounds in cells_3035:
            left, bottom, right, top = to_src.transform_bounds(*bounds, densify_pts=21)
            left, right = _snap_out(left - 2 * rx, right + 2 * rx, first.c, rx)
            bottom, top = _snap_out(bottom - 2 * ry, top + 2 * ry, first.f, ry)
            feet.append((left, bottom, right, top))
        west, south = min(f[0] for f in feet), min(f[1] for f in feet)
        east, north = max(f[2] for f in feet), max(f[3] for f in feet)
        pixels, _ = merge(srcs, bounds=(west, south, east, north), nodata=0, indexes=[1, 2, 3],
                          method=_first_where_all_bands_valid)
    windows = []
    for left, bottom, right, top in feet:
        # the transform merge gives a mosaic of these bounds alone, so each warp sees what read_cell saw
        windows.append((int(round((north - top) / ry)), int(round((left - west) / rx)),
                        int(round((top - bottom) / ry)), int(round((right - left) / rx)),
                        Affine.translation(left, top) * Affine.scale(rx, -ry)))
    return CellMosaic(pixels, [tuple(b) for b in cells_3035], windows, src_crs, dst_crs)


def warp_cells(mosaic: CellMosaic, px: int, resampling: str = "average") -> list[np.ndarray]:
    """Each cell of ``mosaic`` reprojected from its window onto its own px x px grid: uint8 [px, px, 3]."""
    return [_warp(mosaic.pixels[:, row:row + h, col:col + w], transform, mosaic.src_crs, mosaic.dst_crs, bounds, px,
                  resampling) for bounds, (row, col, h, w, transform) in zip(mosaic.cells, mosaic.windows)]


def _checked_tiles(srcs: list, stack: contextlib.ExitStack) -> tuple[list, CRS]:
    """(the tiles, retagged to one CRS when only their tags differ, that CRS); DataError for tiles of
    different CRSs or with fewer than 3 bands."""
    src_crs = tile_crs(srcs[0])
    if any(tile_crs(s) != src_crs for s in srcs[1:]):
        raise DataError(srcs[0].name, "the tiles of one cell carry different CRSs",
                        "reproject the tiles to one CRS (EPSG:2154) before extraction")
    if any(s.crs != srcs[0].crs for s in srcs[1:]):  # one CRS, other tags (untagged, RGF93 v2b): retag
        srcs = [s if s.crs == src_crs else stack.enter_context(
            rasterio.open(f"vrt://{s.name}?a_srs={src_crs.to_string()}")) for s in srcs]
    for s in srcs:  # every tile of the cell: a neighbour with fewer bands would break the mosaic
        if s.count < 3:
            raise DataError(s.name, f"{s.count} band(s), RGB expected" + (
                f" (its neighbour {srcs[0].name} has {srcs[0].count})" if s is not srcs[0] else ""),
                "use the RVB orthophotos (3 bands) for every tile")
    return srcs, src_crs


def _warp(mosaic: np.ndarray, transform, src_crs, dst_crs, bounds, px: int, resampling: str) -> np.ndarray:
    """A mosaic window (bands x rows x cols, ``transform`` in ``src_crs``) reprojected onto the cell
    ``bounds`` (in ``dst_crs``) at ``px`` x ``px``; uint8 [px, px, 3]."""
    # The mosaic's grid expressed in the cell's CRS by an affine map (off by under a millimetre over a
    # cell): the warp then needs no coordinate operation, whose set-up by PROJ for every new area costs
    # more than warping the cell itself.
    if src_crs != dst_crs:
        transform = local_affine(transform, mosaic.shape[2], mosaic.shape[1], src_crs, dst_crs)
    out = np.zeros((3, px, px), np.uint8)
    reproject(np.ascontiguousarray(mosaic), out, src_transform=transform, src_crs=dst_crs, src_nodata=0,
              dst_transform=from_bounds(*bounds, px, px), dst_crs=dst_crs, dst_nodata=0,
              resampling=Resampling[resampling], UNIFIED_SRC_NODATA="YES")
    return out.transpose(1, 2, 0).copy()


def _first_where_all_bands_valid(merged, new, merged_mask, new_mask, **kwargs) -> None:
    """rasterio.merge method: fill the pixels still empty (0 in every band) with the new tile's pixels,
    except where every band of the new tile holds its nodata value. (rasterio masks each band on its own,
    which would zero the saturated band of a bright pixel and keep the others.)"""
    hole = np.ma.getmaskarray(new).all(axis=0) if np.ma.isMaskedArray(new) else np.asarray(new_mask).all(axis=0)
    take = np.asarray(merged_mask).all(axis=0) & ~hole
    np.copyto(merged, np.ma.getdata(new), where=take)  # broadcast over bands; no gather of the pixels


def local_affine(transform, width: int, height: int, src_crs, dst_crs):
    """The affine map from pixels of a ``width`` x ``height`` grid (``transform`` in ``src_crs``) to
    ``dst_crs``, least-squares fitted on a 5 x 5 lattice of the grid; exact for an affine change of CRS,
    within a millimetre for Lambert-93 -> ETRS89-LAEA over a few hundred metres."""
    from affine import Affine

    cols, rows = (g.ravel() for g in np.meshgrid(np.linspace(0, width, 5), np.linspace(0, height, 5)))
    t = transform
    xs, ys = t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows
    to_dst = crs_transformer(CRS.from_user_input(src_crs).to_wkt(), CRS.from_user_input(dst_crs).to_wkt())
    X, Y = to_dst.transform(xs, ys)
    design = np.c_[cols, rows, np.ones_like(cols)]
    (a, b, c), (d, e, f) = (np.linalg.lstsq(design, v, rcond=None)[0] for v in (X, Y))
    return Affine(a, b, c, d, e, f)


def nodata_mask(img: np.ndarray) -> np.ndarray:
    """[H, W] True where a pixel is nodata: zero in every band ([H, W, C] or [H, W])."""
    img = np.asarray(img)
    return (img == 0).all(axis=-1) if img.ndim == 3 else img == 0


def nodata_fraction(img: np.ndarray) -> float:
    """Share of nodata pixels (nodata_mask) of an image."""
    mask = nodata_mask(img)
    return float(mask.mean()) if mask.size else 1.0


def cell_filename(cell_id: str) -> str:
    return f"{CELL_PREFIX}{cell_id}.png"


def cells_in_boundary(cells: gpd.GeoDataFrame, boundary: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The cells whose centre lies inside the boundary (both EPSG:3035)."""
    if cells.empty:
        return cells
    area = boundary.to_crs(cells.crs).geometry.union_all()
    shapely.prepare(area)
    centres = shapely.centroid(cells.geometry.values)
    inside = shapely.contains_xy(area, shapely.get_x(centres), shapely.get_y(centres))
    return cells[inside]


def drop_taken(cells: gpd.GeoDataFrame, taken: set) -> tuple[gpd.GeoDataFrame, int]:
    """``cells`` without those already ``taken`` by a city before (Urban Atlas areas overlap, so a cell can
    lie inside two cities' boundaries: it belongs to the first of ``ses.cities``, never to two, or it
    would train one model and test another, or sit on both sides of a leave-one-city-out fold).
    Returns (cells, how many were dropped)."""
    mine = ~cells["cell_id"].isin(taken).to_numpy()
    return cells[mine], int((~mine).sum())


def census_drops(attrs: dict, n_taken: int) -> str:
    """The census rows left out beyond those without income, in words (``read_census``'s attrs), or ''."""
    bad = attrs.get("malformed", [])
    parts = [f"{len(bad)} rows with a malformed cell id dropped (e.g. {bad[0]!r})" if bad else "",
             f"{attrs['duplicates']} repeated rows dropped" if attrs.get("duplicates") else "",
             f"{n_taken} cells inside an earlier city's boundary left to it" if n_taken else ""]
    return "".join(f", {p}" for p in parts if p)


def sample_cells(cells: gpd.GeoDataFrame, max_cells: int, seed: int) -> gpd.GeoDataFrame:
    """At most ``max_cells`` cells (0 = all), a seeded random sample kept in cell-id order."""
    if max_cells <= 0 or len(cells) <= max_cells:
        return cells
    pick = np.random.default_rng(seed).choice(len(cells), size=max_cells, replace=False)
    return cells.iloc[np.sort(pick)]


def read_png(path: str | Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_png(path: str | Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(tmp, format="PNG")


_OPEN_TILES: "OrderedDict[str, rasterio.io.DatasetReader]" = OrderedDict()


def _open_tile(path: str, keep: int = 32):
    """Open tiles stay open (last ``keep`` per process), so GDAL's block cache spares re-decoding them."""
    ds = _OPEN_TILES.pop(path, None) or rasterio.open(path)
    _OPEN_TILES[path] = ds
    while len(_OPEN_TILES) > keep:
        _OPEN_TILES.popitem(last=False)[1].close()
    return ds


def _close_tiles() -> None:
    while _OPEN_TILES:
        _OPEN_TILES.popitem()[1].close()


_UNREADABLE = (rasterio.errors.RasterioError, OSError)  # what GDAL raises for truncated or garbage files


def _broken_tile(paths: Sequence[str], bounds, px: int) -> str:
    """The first of a cell's tiles that cannot be read over the cell on its own (GDAL's messages do not
    always name the file)."""
    for path in paths:
        try:
            read_cell([_open_tile(path)], bounds, px)
        except _UNREADABLE:
            return path
    return ", ".join(paths)


def _extract_group(jobs: list[tuple], px: int, resampling: str) -> list[tuple]:
    """Read and save a group of cells that share tiles (their tile regions decoded once, ``read_cells``):
    (key, nodata share, problem or None) per cell. A cell whose tile GDAL cannot open or decode
    (truncated, garbage) is not written: nodata share 1 (void) and the problem, naming the tile."""
    paths = jobs[0][2]
    try:
        imgs = read_cells([_open_tile(p) for p in paths], [bounds for _, bounds, _, _ in jobs], px,
                          resampling=resampling)
    except _UNREADABLE:  # a tile broken in part only: cell by cell, so that the readable cells are kept
        imgs = [None] * len(jobs)
    done = []
    for (key, bounds, paths, out), img in zip(jobs, imgs):
        if img is None:
            try:
                img = read_cell([_open_tile(p) for p in paths], bounds, px, resampling=resampling)
            except _UNREADABLE as e:
                done.append((key, 1.0, f"{_broken_tile(paths, bounds, px)}: unreadable orthophoto tile "
                             f"({str(e).splitlines()[0][:200]})"))
                continue
        write_png(out, img)
        done.append((key, nodata_fraction(img), None))
    return done


def group_jobs(jobs: list[tuple], group_size: int) -> list[list[tuple]]:
    """Runs of at most ``group_size`` consecutive jobs (key, bounds, tile paths, ...) with the same tiles."""
    groups, current = [], []
    for job in jobs:
        if current and (job[2] != current[-1][2] or len(current) >= group_size):
            groups.append(current)
            current = []
        current.append(job)
    if current:
        groups.append(current)
    return groups


def report_failed(problems: list[str], strict: bool) -> None:
    """Cells that could not be read (``extract_cells``' ``failed``): a DataError under ``strict``, else
    one warning on stderr counting them and naming the first problem (they are void in the index)."""
    if not problems:
        return
    if strict:
        raise DataError(f"{problems[0]}; replace the tile (strict=true; strict=false leaves its cells out as void)")
    tiles = sorted({p.split(": unreadable", 1)[0] for p in problems})
    named = ", ".join(tiles[:3]) + (f" and {len(tiles) - 3} more" if len(tiles) > 3 else "")
    print(f"[extract] warning: {len(problems)} cells left out as void, {len(tiles)} orthophoto tile(s) unreadable: "
          f"{named} (first problem: {problems[0]}); replace them and re-run to extract those cells", file=sys.stderr)


def extract_cells(cells: pd.DataFrame, root: str | Path, px: int, workers: int = 1,
                  resampling: str = "average", known: Mapping[str, float] | None = None,
                  group_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Write each cell's image ``root / cells.path`` and return DataFrame[nodata, extracted, failed] by cell
    index; ``failed``: why a cell could not be read (an unreadable tile: the cell is then void), else NaN.

    ``cells`` needs ``geometry`` (EPSG:3035 squares), ``tiles`` (tuple of tile paths) and ``path``
    (relative to ``root``). A PNG already there with the right size is kept (resume): its nodata share
    comes from ``known`` (path -> share, e.g. the previous index) or from the PNG itself. Cells sharing
    tiles are read together, groups in ``workers`` processes.
    """
    root = Path(root)
    known = dict(known or {})
    nodata, extracted, failed, todo = {}, {}, {}, []
    for key, row in cells.iterrows():
        out = root / row["path"]
        if out.is_file():
            with Image.open(out) as im:
                size_ok = im.size == (px, px)
            if size_ok:
                nodata[key] = known[row["path"]] if row["path"] in known else nodata_fraction(read_png(out))
                extracted[key] = False
                continue
        todo.append((key, tuple(row.geometry.bounds), tuple(row["tiles"]), out))
    todo.sort(key=lambda job: (job[2], str(job[3])))
    groups = group_jobs(todo, group_size)
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress or not todo)
    if workers <= 1 or len(groups) <= 1:
        for group in groups:
            for key, frac, problem in _extract_group(group, px, resampling):
                nodata[key], extracted[key], failed[key] = frac, problem is None, problem
            bar.update(len(group))
        _close_tiles()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_extract_group, g, px, resampling): len(g) for g in groups}
            for fut in as_completed(futures):
                for key, frac, problem in fut.result():
                    nodata[key], extracted[key], failed[key] = frac, problem is None, problem
                bar.update(futures[fut])
    bar.close()
    return pd.DataFrame({"nodata": pd.Series(nodata, dtype=float), "extracted": pd.Series(extracted, dtype=bool),
                         "failed": pd.Series(failed, dtype=object)}).reindex(cells.index)


def check_usable(cells: pd.DataFrame, max_nodata: float, index_path) -> None:
    """``DataError`` when the extraction leaves no cell to train on: no census cell inside any city's
    Urban Atlas boundary, or every cell void (more than ``max_nodata`` nodata), so that training is
    never started on an index that cannot give it anything."""
    cities = ", ".join(sorted(map(str, cells["city"].unique()))) if len(cells) else "the cities of ses.cities"
    if len(cells) == 0:
        raise DataError(index_path, f"no census cell lies inside the Urban Atlas boundary of {cities}",
                        "check ses.cities, ses.census_file and ses.ua_dir (same cities, same area)")
    if not cells["non_void"].astype(bool).any():
        raise DataError(index_path, f"all {len(cells)} cells of {cities} are void (more than {max_nodata:.0%} "
                        "nodata)", "check that the orthophoto tiles cover the cities (ses.aerial_dir, "
                        "ses.ortho_product) or raise ses.max_nodata")
