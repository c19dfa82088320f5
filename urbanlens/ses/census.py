"""The INSEE Filosofi 200 m census grid (2015 shapefile, 2019 GeoPackage)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from rasterio.crs import CRS
from rasterio.warp import transform_bounds

from ..core.errors import DataError
from ..core.schema import IMPUTED_POLICIES
from .columns import column_key, pick_columns, opening
from .grid import LAEA, cell_boxes, valid_ids

CENSUS_COLUMNS = {
    "cell_id": ("idcar_200m", "IdINSPIRE"),   # 2019 GPKG / 2015 shapefile
    "ind": ("ind", "Ind"),
    "ind_snv": ("ind_snv", "Ind_snv"),
}
# INSEE's flag of cells whose values it imputed (2019 ``i_est_200``, 2015 ``I_est_cr``); optional
IMPUTED_COLUMN = ("i_est_200", "I_est_cr")


CENSUS_KEY = "ses.census_file"
_GRID_SUFFIXES = (".gpkg", ".shp")


def edition(path: str | Path) -> str | None:
    """``'2019 GeoPackage'`` (``idcar_200m``) or ``'2015 shapefile'`` (``IdINSPIRE``) for a file holding an
    INSEE 200 m grid layer, named by its id column; None for anything else (another table, not readable)."""
    try:
        infos = [pyogrio.read_info(path, layer=name) for name, _ in pyogrio.list_layers(path)]
    except Exception:  # not a vector file GDAL opens: not a census candidate
        return None
    fields = {column_key(f) for info in infos for f in info["fields"]}
    if column_key("idcar_200m") in fields:
        return f"2019 {'GeoPackage' if Path(path).suffix.lower() == '.gpkg' else 'grid'} (idcar_200m)"
    if column_key("IdINSPIRE") in fields:
        return f"2015 {'shapefile' if Path(path).suffix.lower() == '.shp' else 'grid'} (IdINSPIRE)"
    return None


DEFAULT_NAME = "carreaux_200m_met.gpkg"  # ses.census_file's default: INSEE's 2019 GeoPackage, unpacked


def find_census(path: str | Path) -> tuple[Path, str]:
    """The census grid to read for ``ses.census_file`` and one line saying which and why.

    A file that exists is used; other census grids beside it (the 2015 shapefile beside the 2019
    GeoPackage) are named in the line. A folder, or the default file name (INSEE's 2019 GeoPackage) when
    absent, is replaced by the one census grid in that folder (any depth), so a 2015 delivery reads
    without setting the key; two or more there are a DataError naming them and the key that picks one.
    Any other name that does not exist is a DataError naming the grids that are there (a mistyped
    name never silently reads another file). Files are chosen by their columns (role), never by
    their names' order."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    others = []
    if folder.is_dir():
        others = [(p, edition(p)) for p in sorted(folder.rglob("*")) if p.suffix.lower() in _GRID_SUFFIXES
                  and p.is_file() and p != path]
        others = [(p, e) for p, e in others if e]
    if path.is_file():
        note = f"census grid {path} ({edition(path) or 'unknown edition'})"
        if others:
            note += (f"; also present, not used: {', '.join(f'{p.name} ({e})' for p, e in others)} "
                     f"(set {CENSUS_KEY} to use another)")
        return path, note
    if not path.is_dir() and path.name != DEFAULT_NAME:
        there = ", ".join(f"{p.name} ({e})" for p, e in others[:3])
        raise DataError(path, "not found" + (f"; {folder} holds {there}" if there else ""),
                        f"set {CENSUS_KEY} to the census grid to read")
    if len(others) == 1:
        (found, ed), = others
        return found, f"census grid {found} ({ed}), the only one in {folder} ({CENSUS_KEY}={path.name} not found)"
    if len(others) > 1:
        shown = " and ".join(f"{p.name} ({e})" for p, e in others[:2]) + (
            f" and {len(others) - 2} more" if len(others) > 2 else "")
        raise DataError(path, f"not found, and {folder} holds {len(others)} census grids: {shown}",
                        f"set {CENSUS_KEY} to the one to use")
    return path, f"census grid {path}"


def _check_census_crs(path: Path, layer: str, id_col: str, sample: int = 20) -> None:
    """Stop when the first cells' geometries do not lie where their INSPIRE ids (EPSG:3035) put them:
    with a missing or wrong CRS the ``bbox`` read would silently pick other cells. A file without
    geometry, or without CRS but with EPSG:3035 coordinates, passes."""
    df = pyogrio.read_dataframe(path, layer=layer, columns=[id_col], max_features=sample)
    if not isinstance(df, gpd.GeoDataFrame):
        return
    df = df[df.geometry.notna() & ~df.geometry.is_empty]
    df = df[valid_ids(df[id_col])]  # malformed ids are dropped (and counted) by the full read
    boxes = cell_boxes(df[id_col])
    if len(df) == 0:
        return
    points = df.geometry.representative_point()
    if df.crs is not None and not df.crs.equals(LAEA):
        points = points.to_crs(LAEA)
    with np.errstate(invalid="ignore"):  # coordinates a wrong CRS cannot transform become inf
        if np.mean(shapely.dwithin(boxes, points.values, 1.0)) >= 0.5:
            return
    if df.crs is None:
        raise DataError(path, "census grid has no CRS and its coordinates are not EPSG:3035, where its "
                        "INSPIRE ids put the cells", "restore its CRS (the .prj, or the GeoPackage's SRS), "
                        "e.g. ogr2ogr -a_srs EPSG:<code> fixed.gpkg <file>")
    raise DataError(path, f"census grid says its CRS is {df.crs.name} (EPSG:{df.crs.to_epsg()}) but its cells do "
                    "not lie where their INSPIRE ids put them", "its CRS tag is wrong: set the right one "
                    "(INSEE grids are EPSG:3035), e.g. ogr2ogr -a_srs EPSG:3035 fixed.gpkg <file>")


def _clean_ids(df: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, list[str], int]:
    """``df`` without rows whose id is not an INSPIRE id (returned, in file order) and without repeated
    rows (counted); DataError naming the ids that repeat with other values: which row holds the cell's
    income cannot be told, and a cell listed twice would sit in a fold's training and test part."""
    ok = valid_ids(df["cell_id"])
    malformed = df.loc[~ok, "cell_id"].tolist()
    if malformed and not ok.any():
        raise DataError(path, f"none of its {len(malformed)} cell ids is an INSPIRE id (first: {malformed[0]!r})",
                        "the id column (idcar_200m or IdINSPIRE) must hold ids CRS3035RES200mN<y>E<x>")
    df = df[ok]
    unique = df.drop_duplicates()
    clash = unique["cell_id"][unique["cell_id"].duplicated()].unique()
    if len(clash):
        shown = ", ".join(clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
        raise DataError(path, f"{len(clash)} cell id(s) listed more than once with different values ({shown})",
                        "keep one row per cell (e.g. the file of one year and one delivery) and re-run")
    return unique.reset_index(drop=True), malformed, len(df) - len(unique)


def read_census(path: str | Path, bbox: Sequence[float] | None = None) -> gpd.GeoDataFrame:
    """INSEE Filosofi 200 m grid -> GeoDataFrame[cell_id, ind, ind_snv, income, imputed, geometry], EPSG:3035.

    Accepts the 2019 GeoPackage (``idcar_200m, ind, ind_snv``) and the 2015 shapefile (``IdINSPIRE, Ind,
    Ind_snv``), any case. Geometry is rebuilt from the ids as exact EPSG:3035 squares. ``income`` is
    ``ind_snv / ind``; cells without a positive finite income are dropped and counted in
    ``attrs['dropped']``. ``imputed`` is INSEE's flag of imputed cells (``i_est_200 = 1``; 2015:
    ``I_est_cr``); a file without the flag gives False everywhere and ``attrs['imputed_flag'] = False``.
    ``path`` may be a folder holding one grid (``find_census``); ``attrs['source']`` is the file read and
    ``attrs['note']`` the line saying which and why. Rows whose id is not an INSPIRE id are dropped (listed in ``attrs['malformed']``); repeated identical
    rows are dropped and counted (``attrs['duplicates']``); an id repeated with other values is a DataError.
    ``bbox`` (EPSG:3035 xmin, ymin, xmax, ymax) reads only the cells there. The geometry may be in any
    CRS (INSEE ships EPSG:2154); the other columns are not read.
    """
    path, note = find_census(path)
    if not path.exists():
        raise DataError(path, "census grid not found",
                        "run data_setup.sh (or data_setup.sh --synthetic ses) or set ses.census_file")
    with opening(path, "census grid", "use INSEE's carreaux_200m_met.gpkg (or the 2015 shapefile) as downloaded, "
                 "or set ses.census_file"):
        infos = [pyogrio.read_info(path, layer=name) for name, _ in pyogrio.list_layers(path)]
    ids = {column_key(s) for s in CENSUS_COLUMNS["cell_id"]}
    info = next((i for i in infos if ids & {column_key(f) for f in i["fields"]}), infos[0])
    layer, fields, file_crs = info["layer_name"], list(info["fields"]), info["crs"]
    cols = pick_columns(fields, CENSUS_COLUMNS, path, "census grid", "INSEE's")
    if info.get("features") == 0:
        raise DataError(path, f"census layer '{layer}' holds no cell", "download the grid again (INSEE's "
                        "carreaux_200m_met.gpkg) or set ses.census_file to the file with the cells")
    flag = next((f for f in fields if column_key(f) in {column_key(c) for c in IMPUTED_COLUMN}), None)
    _check_census_crs(path, layer, cols["cell_id"])
    read_bbox = None
    if bbox is not None:
        read_bbox = tuple(bbox)
        if file_crs and CRS.from_user_input(file_crs) != CRS.from_user_input(LAEA):
            read_bbox = transform_bounds(LAEA, file_crs, *bbox, densify_pts=21)
    df = pyogrio.read_dataframe(path, layer=layer, columns=list(cols.values()) + ([flag] if flag else []),
                                read_geometry=False, bbox=read_bbox)
    imputed = (pd.to_numeric(df[flag], errors="coerce").fillna(0).to_numpy() == 1) if flag else np.zeros(len(df), bool)
    df = df.rename(columns={v: k for k, v in cols.items()})[list(cols)]
    df["cell_id"] = df["cell_id"].astype(str).str.strip()
    for c in ("ind", "ind_snv"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["income"] = df["ind_snv"] / df["ind"]
    df["imputed"] = imputed
    df, malformed, duplicates = _clean_ids(df, path)
    keep = np.isfinite(df["income"]) & (df["income"] > 0) & (df["ind"] > 0)
    df = df[keep].reset_index(drop=True)
    try:
        geometry = cell_boxes(df["cell_id"])
    except ValueError as e:
        raise DataError(path, str(e), "the id column must hold INSPIRE ids CRS3035RES200mN<y>E<x>") from None
    out = gpd.GeoDataFrame(df, geometry=geometry, crs=LAEA)
    out.attrs["dropped"] = int((~keep).sum())
    out.attrs["malformed"], out.attrs["duplicates"] = malformed, duplicates
    out.attrs["imputed_flag"] = flag is not None
    out.attrs["source"], out.attrs["note"] = str(path), note
    return out


def apply_imputed(cells: gpd.GeoDataFrame, policy: str) -> tuple[gpd.GeoDataFrame, int]:
    """``ses.imputed``: ``keep`` the cells INSEE imputed (flagged in ``imputed``) or ``drop`` them.
    Returns (cells, number of imputed cells kept or dropped)."""
    if policy not in IMPUTED_POLICIES:
        raise DataError("config", f"ses.imputed is {policy!r}", f"use one of {', '.join(IMPUTED_POLICIES)}")
    flagged = cells["imputed"].astype(bool).to_numpy()
    return (cells if policy == "keep" else cells[~flagged]), int(flagged.sum())
