"""IGN orthophoto tiles: their index (dalles shapefiles of any number of deliveries), their product (RVB
or IRC), their CRS, which tiles a cell needs."""
from __future__ import annotations

import re
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
from .columns import pick_columns, opening
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
def as_crs(value) -> CRS:
    return CRS.from_user_input(value)


@lru_cache(maxsize=64)
def crs_transformer(src_wkt: str, dst_wkt: str) -> Transformer:
    return Transformer.from_crs(CRS.from_wkt(src_wkt), CRS.from_wkt(dst_wkt), always_xy=True)


def tile_crs(ds, fallback=L93) -> CRS:
    """The CRS to use for an orthophoto tile: EPSG:2154 when it is Lambert-93 in all but the tag,
    ``fallback`` when the file has no CRS, otherwise the file's own."""
    crs = ds.crs
    if crs is None or not crs.to_wkt():
        return as_crs(fallback)
    return as_crs(L93) if is_lambert93(crs) else crs


RASTER_SUFFIXES = (".jp2", ".tif", ".tiff")


def _tile_name(nom) -> str:
    return str(nom).replace("\\", "/").rsplit("/", 1)[-1].lower()


def _check_tile_crs(index: gpd.GeoDataFrame, paths) -> None:
    """Stop, naming the first tile (header only read) whose CRS is not its index's (tiles without CRS
    take the index's)."""
    for path in paths:
        if not isinstance(path, str):
            continue
        try:
            with rasterio.open(path) as ds:
                crs = tile_crs(ds, fallback=index.crs)
        except rasterio.errors.RasterioIOError:
            continue  # unreadable: reported when its cells are read
        if crs != as_crs(index.crs.to_wkt()) and not (is_lambert93(crs) and is_lambert93(index.crs)):
            raise DataError(path, f"tile CRS {crs.to_string()} differs from that of its index "
                            f"{index.attrs['index'].name} ({index.crs.to_string()})",
                            f"reproject the tile (gdalwarp -t_srs {index.crs.to_string()}) or fix the index")


# IGN's product names: BD ORTHO in natural colour (RVB) or infrared colour (IRC), both three bands
ORTHO_PRODUCTS = {"RVB": ("RVB", "RGB"), "IRC": ("IRC",)}


def ortho_product(path, root=None) -> str | None:
    """'RVB', 'IRC' or None: the product named by the nearest part of ``path`` (file name first, then
    its folders up to ``root``) holding one of IGN's product words (``..._RVB-0M20_...``,
    ``...-IRC-E080.jp2``)."""
    path = Path(path)
    parts = path.relative_to(root).parts if root is not None and path.is_relative_to(root) else path.parts
    for part in reversed(parts):
        words = set(re.split(r"[^A-Z0-9]+", part.upper()))
        hits = [name for name, spellings in ORTHO_PRODUCTS.items() if words & set(spellings)]
        if len(hits) == 1:
            return hits[0]
    return None


def _delivery_root(shp: Path, aerial_dir: Path) -> Path:
    """The folder of one delivery: the parent of the ``3_SUPPLEMENTS_LIVRAISON*`` folder above the index
    (IGN's layout), else the index's own folder's parent, never above ``aerial_dir``."""
    for folder in shp.parents:
        if folder == aerial_dir or aerial_dir not in folder.parents:
            break
        if folder.name.upper().startswith("3_SUPPLEMENTS"):
            return folder.parent
    return shp.parent.parent if aerial_dir in shp.parent.parents else aerial_dir


def _resolve(name: str, files: Mapping[str, list], scope: Path, product: str, aerial_dir: Path) -> str | None:
    """The file a NOM names: among the files of that name, those in the index's delivery first, then
    those of the wanted product."""
    found = files.get(name)
    if not found:
        return None
    return str(min(found, key=lambda p: (scope not in p.parents, ortho_product(p, aerial_dir) not in (product, None),
                                         str(p))))


def read_tile_index(aerial_dir: str | Path, product: str = "RVB") -> gpd.GeoDataFrame:
    """Every ``*dalles.shp`` under ``aerial_dir`` (any depth, any number of deliveries) ->
    GeoDataFrame[NOM, path, product, geometry], EPSG:2154, holding the tiles of ``product`` only.

    ``NOM`` (the tile's file name, any case, folders and a ``./`` prefix ignored) is resolved to a file
    under ``aerial_dir``, preferring the index's own delivery. Tiles whose file is absent are dropped and
    counted in ``attrs['missing']``. A tile's product (RVB or IRC) is read from IGN's names (file, then
    folders); tiles of the other product are left out and counted in ``attrs['other_product']``, so a
    cell is never read from two products. Tiles whose names name no product are taken as RVB.
    ``attrs['indexes']`` lists the indexes read, ``attrs['unlisted']`` the raster files under
    ``aerial_dir`` that no index names (never read), both relative to ``aerial_dir``.
    """
    aerial_dir = Path(aerial_dir)
    if product not in ORTHO_PRODUCTS:
        raise DataError("config", f"ses.ortho_product is {product!r}", f"use one of {', '.join(ORTHO_PRODUCTS)}")
    indexes = sorted(p for p in aerial_dir.rglob("*") if p.name.lower().endswith("dalles.shp"))
    if not indexes:
        raise DataError(aerial_dir, "no orthophoto tile index (*dalles.shp) found",
                        "unpack the IGN BD ORTHO deliveries (7z x) there, or build the synthetic world")
    files: dict[str, list] = {}
    for p in sorted(aerial_dir.rglob("*")):
        if p.suffix.lower() in RASTER_SUFFIXES:
            files.setdefault(p.name.lower(), []).append(p)
    frames = []
    for shp in indexes:
        with opening(shp, "tile index", "unpack IGN's delivery again (dalles.shp with its .shx, .dbf and .prj)"):
            gdf = gpd.read_file(shp, engine="pyogrio")
        nom = pick_columns(list(gdf.columns), {"NOM": ("NOM",)}, shp, "tile index", "IGN's")["NOM"]
        gdf = gdf.rename(columns={nom: "NOM"})[["NOM", "geometry"]]
        if gdf.crs is None or is_lambert93(gdf.crs):
            gdf = gdf.set_crs(L93, allow_override=True)
        gdf.attrs["index"] = shp
        scope = _delivery_root(shp, aerial_dir)
        gdf["path"] = [_resolve(_tile_name(n), files, scope, product, aerial_dir) for n in gdf["NOM"]]
        frames.append(gdf)
    for gdf in frames:  # a tile in another CRS than its index would be cut at the wrong place
        _check_tile_crs(gdf, gdf["path"])
    frames = [gdf if gdf.crs.equals(L93) else gdf.to_crs(L93) for gdf in frames]
    tiles = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=L93)
    missing = tiles["path"].isna()
    tiles_all_nom = tiles["NOM"].to_numpy()
    tiles = tiles[~missing].drop_duplicates("path").reset_index(drop=True)
    tiles["product"] = [ortho_product(p, aerial_dir) or "RVB" for p in tiles["path"]]
    other = tiles["product"] != product
    n_other = int(other.sum())
    tiles = tiles[~other].reset_index(drop=True)[["NOM", "path", "product", "geometry"]]
    if tiles.empty:
        found = f" ({n_other} tiles of the other product found)" if n_other else ""
        raise DataError(aerial_dir, f"no {product} tile named in the *dalles.shp indexes exists on disk{found}",
                        "unpack the .jp2 tiles next to their index" + (
                            "; set ses.ortho_product to the product you have" if n_other else ""))
    tiles.attrs["missing"] = int(missing.sum())
    tiles.attrs["missing_names"] = sorted(set(map(str, tiles_all_nom[missing.to_numpy()])))  # listed, not on disk
    tiles.attrs["other_product"] = n_other
    tiles.attrs["indexes"] = [p.relative_to(aerial_dir).as_posix() for p in indexes]
    listed = {str(p) for p in pd.concat(frames)["path"].dropna()}
    unlisted = sorted(p.relative_to(aerial_dir).as_posix() for found in files.values() for p in found
                      if str(p) not in listed)
    tiles.attrs["unlisted"] = unlisted  # raster files no index names: never read
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
