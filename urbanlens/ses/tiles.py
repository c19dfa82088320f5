"""IGN orthophoto tiles: their index (dalles shapefile), their CRS, which tiles a cell needs."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Mapping

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
from pyproj import Transformer
from rasterio.crs import CRS

from ..core.errors import DataError
from .columns import _pick_columns
from .grid import L93

_L93_PARAMS = {"lat_0": 46.5, "lon_0": 3.0, "x_0": 700000.0, "y_0": 6600000.0}

def is_lambert93(crs) -> bool:
    """True for EPSG:2154 and for an untagged CRS with the Lambert-93 projection parameters."""
    if crs is None:
        return False
    return _is_lambert93_wkt(CRS.from_user_input(crs).to_wkt())


@lru_cache(maxsize=64)
def _is_lambert93_wkt(wkt: str) -> bool:
    crs = CRS.from_wkt(wkt)
    if crs.to_epsg() == 2154:
        return True
    p = crs.to_dict()
    if p.get("proj") != "lcc":
        return False
    try:
        close = all(abs(float(p[k]) - v) < 1e-6 for k, v in _L93_PARAMS.items())
        return close and sorted((float(p["lat_1"]), float(p["lat_2"]))) == [44.0, 49.0]
    except (KeyError, TypeError, ValueError):
        return False


@lru_cache(maxsize=64)
def _crs(value) -> CRS:
    return CRS.from_user_input(value)


@lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def tile_crs(ds, fallback=L93) -> CRS:
    """The CRS to use for an orthophoto tile: EPSG:2154 when it is Lambert-93 in all but the tag,
    ``fallback`` when the file has no CRS, otherwise the file's own."""
    crs = ds.crs
    if crs is None or not crs.to_wkt():
        return _crs(fallback)
    return _crs(L93) if is_lambert93(crs) else crs


RASTER_SUFFIXES = (".jp2", ".tif", ".tiff")


def _tile_name(nom) -> str:
    return str(nom).replace("\\", "/").rsplit("/", 1)[-1].lower()


def _check_tile_crs(index: gpd.GeoDataFrame, files: Mapping[str, str]) -> None:
    """Stop, naming the first tile (header only read) whose CRS is not its index's (tiles without CRS
    take the index's)."""
    for nom in index["NOM"]:
        path = files.get(_tile_name(nom))
        if path is None:
            continue
        try:
            with rasterio.open(path) as ds:
                crs = tile_crs(ds, fallback=index.crs)
        except rasterio.errors.RasterioIOError:
            continue  # unreadable: reported when its cells are read
        if crs != _crs(index.crs.to_wkt()) and not (is_lambert93(crs) and is_lambert93(index.crs)):
            raise DataError(path, f"tile CRS {crs.to_string()} differs from that of its index "
                            f"{index.attrs['index'].name} ({index.crs.to_string()})",
                            f"reproject the tile (gdalwarp -t_srs {index.crs.to_string()}) or fix the index")


def read_tile_index(aerial_dir: str | Path) -> gpd.GeoDataFrame:
    """Every ``*dalles.shp`` under ``aerial_dir`` -> GeoDataFrame[NOM, path, geometry], EPSG:2154.

    ``NOM`` (the tile's file name, any case, folders ignored) is resolved to a file found under
    ``aerial_dir``; tiles whose file is absent are dropped and counted in ``attrs['missing']``.
    """
    aerial_dir = Path(aerial_dir)
    indexes = sorted(p for p in aerial_dir.rglob("*") if p.name.lower().endswith("dalles.shp"))
    if not indexes:
        raise DataError(aerial_dir, "no orthophoto tile index (*dalles.shp) found",
                        "unpack the IGN BD ORTHO deliveries (7z x) there, or build the synthetic world")
    files = {p.name.lower(): str(p) for p in sorted(aerial_dir.rglob("*")) if p.suffix.lower() in RASTER_SUFFIXES}
    frames = []
    for shp in indexes:
        gdf = gpd.read_file(shp, engine="pyogrio")
        nom = _pick_columns(list(gdf.columns), {"NOM": ("NOM",)}, shp, "tile index", "IGN's")["NOM"]
        gdf = gdf.rename(columns={nom: "NOM"})[["NOM", "geometry"]]
        if gdf.crs is None or is_lambert93(gdf.crs):
            gdf = gdf.set_crs(L93, allow_override=True)
        gdf.attrs["index"] = shp
        frames.append(gdf)
    for gdf in frames:  # a tile in another CRS than its index would be cut at the wrong place
        _check_tile_crs(gdf, files)
    frames = [gdf if gdf.crs.equals(L93) else gdf.to_crs(L93) for gdf in frames]
    tiles = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=L93)
    names = tiles["NOM"].map(_tile_name)
    tiles["path"] = names.map(files)
    missing = tiles["path"].isna()
    tiles = tiles[~missing].drop_duplicates("path").reset_index(drop=True)[["NOM", "path", "geometry"]]
    if tiles.empty:
        raise DataError(aerial_dir, "no tile named in the *dalles.shp index exists on disk",
                        "unpack the .jp2 tiles next to their index")
    tiles.attrs["missing"] = int(missing.sum())
    return tiles


def tiles_for_cells(cells: gpd.GeoDataFrame, tiles: gpd.GeoDataFrame) -> pd.Series:
    """For each cell (index of ``cells``), the sorted tuple of tile paths its square overlaps."""
    footprints = tiles[["path", "geometry"]].copy()
    footprints["geometry"] = footprints.geometry.segmentize(max(1.0, _tile_side(tiles) / 20))
    footprints = footprints.to_crs(cells.crs)
    joined = gpd.sjoin(cells[["geometry"]], footprints, how="left", predicate="intersects")
    by_cell = joined.groupby(level=0)["path"].agg(lambda s: tuple(sorted(p for p in s if isinstance(p, str))))
    return by_cell.reindex(cells.index).apply(lambda v: v if isinstance(v, tuple) else ())


def _tile_side(tiles: gpd.GeoDataFrame) -> float:
    b = tiles.geometry.bounds
    return float(np.median(b["maxx"] - b["minx"])) if len(tiles) else 1000.0
