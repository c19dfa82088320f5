"""Geography of the SES pipeline: INSEE 200 m cells, Urban Atlas land use, IGN orthophoto tiles.

Conventions: cells and land use are in EPSG:3035 (ETRS89-LAEA, the INSPIRE grid), orthophoto tiles in
EPSG:2154 (Lambert-93). A pixel whose bands are all zero is nodata. Readers accept the column spellings
of the real products (Filosofi 2015 and 2019, Urban Atlas 2012 and 2018) in any letter case.
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
import unicodedata
import zipfile
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import shapely
from PIL import Image
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.merge import merge
from rasterio.transform import from_bounds
from rasterio.warp import reproject, transform_bounds
from tqdm import tqdm

from .io import atomic_path

LAEA = "EPSG:3035"     # INSPIRE grid, Urban Atlas
L93 = "EPSG:2154"      # IGN orthophotos
CELL_PREFIX = "FR_URBANATLAS_200m_"
_log = logging.getLogger("urbanlens")  # without logging set up, warnings go to stderr as they are


class DataError(SystemExit):
    """Bad input data. The message is one line: ``error: <file>: <problem>; <fix>``.

    It derives from SystemExit so that a script stops with that line and a non-zero status when it is
    not caught; tests and callers can still catch it by name.
    """

    def __init__(self, path, problem: str | None = None, fix: str | None = None):
        # a single argument is the finished message (how the error is rebuilt after pickling)
        super().__init__(str(path) if problem is None else f"error: {path}: {problem}; {fix}")


# ----------------------------------------------------------------------------- INSPIRE cell ids

_INSPIRE = re.compile(r"^CRS(\d+)RES(\d+)mN(\d+)E(\d+)$", re.IGNORECASE)


def inspire_id(easting: float, northing: float, res: int = 200) -> str:
    """INSPIRE id of the grid cell whose lower-left corner is (easting, northing) in EPSG:3035 metres."""
    return f"CRS3035RES{int(res)}mN{int(round(northing))}E{int(round(easting))}"


def parse_inspire_id(cell_id: str) -> tuple[int, int, int]:
    """``'CRS3035RES200mN2862200E3759800'`` -> (3759800, 2862200, 200): (easting, northing, res)."""
    m = _INSPIRE.match(str(cell_id).strip())
    if not m or m.group(1) != "3035":
        raise ValueError(f"not an EPSG:3035 INSPIRE cell id: {cell_id!r} (expected CRS3035RES200mN<y>E<x>)")
    return int(m.group(4)), int(m.group(3)), int(m.group(2))


def cell_box(cell_id: str) -> shapely.Polygon:
    """The cell's square in EPSG:3035."""
    e, n, r = parse_inspire_id(cell_id)
    return shapely.box(e, n, e + r, n + r)


def cell_boxes(cell_ids: Iterable[str]) -> np.ndarray:
    """Vectorised ``cell_box``: an array of squares; ValueError naming the first id that does not parse."""
    ids = pd.Series(list(cell_ids), dtype=object).astype(str).str.strip()
    parts = ids.str.extract(_INSPIRE)
    bad = parts[3].isna() | (parts[0] != "3035")
    if bad.any():
        raise ValueError(f"not an EPSG:3035 INSPIRE cell id: {ids[bad].iloc[0]!r}")
    res, n, e = (parts[i].astype(np.int64).to_numpy() for i in (1, 2, 3))
    return shapely.box(e, n, e + res, n + res)


# ----------------------------------------------------------------------------- column aliasing

def _key(name: str) -> str:
    """Comparison key of a column name: lower case, no underscores."""
    return name.lower().replace("_", "")


def _pick_columns(fields: Sequence[str], wanted: Mapping[str, Sequence[str]], path, what: str,
                  source: str = "the provider's") -> dict[str, str]:
    """Map each wanted name to the file's column among its accepted spellings (any case)."""
    by_key = {_key(f): f for f in fields}
    found, missing = {}, []
    for out, spellings in wanted.items():
        hit = next((by_key[_key(s)] for s in spellings if _key(s) in by_key), None)
        if hit is None:
            missing.append(f"{out} (one of {', '.join(spellings)})")
        else:
            found[out] = hit
    if missing:
        raise DataError(path, f"{what} lacks columns: {'; '.join(missing)}",
                        f"columns present are {', '.join(fields)}; rename them or use {source} original file")
    return found


# ----------------------------------------------------------------------------- census

CENSUS_COLUMNS = {
    "cell_id": ("idcar_200m", "IdINSPIRE"),   # 2019 GPKG / 2015 shapefile
    "ind": ("ind", "Ind"),
    "ind_snv": ("ind_snv", "Ind_snv"),
}


def _check_census_crs(path: Path, layer: str, id_col: str, sample: int = 20) -> None:
    """Stop when the first cells' geometries do not lie where their INSPIRE ids (EPSG:3035) put them:
    with a missing or wrong CRS the ``bbox`` read would silently pick other cells. A file without
    geometry, or without CRS but with EPSG:3035 coordinates, passes."""
    df = pyogrio.read_dataframe(path, layer=layer, columns=[id_col], max_features=sample)
    if not isinstance(df, gpd.GeoDataFrame):
        return
    df = df[df.geometry.notna() & ~df.geometry.is_empty]
    try:
        boxes = cell_boxes(df[id_col])
    except ValueError:
        return  # the full read names the bad id
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


def read_census(path: str | Path, bbox: Sequence[float] | None = None) -> gpd.GeoDataFrame:
    """INSEE Filosofi 200 m grid -> GeoDataFrame[cell_id, ind, ind_snv, income, geometry], EPSG:3035.

    Accepts the 2019 GeoPackage (``idcar_200m, ind, ind_snv``) and the 2015 shapefile (``IdINSPIRE, Ind,
    Ind_snv``), any case. Geometry is rebuilt from the ids as exact EPSG:3035 squares. ``income`` is
    ``ind_snv / ind``; cells without a positive finite income are dropped and counted in
    ``attrs['dropped']``. ``bbox`` (EPSG:3035 xmin, ymin, xmax, ymax) reads only the cells there.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "census grid not found",
                        "run data_setup.sh (or data_setup.sh --synthetic ses) or set ses.census_file")
    infos = [pyogrio.read_info(path, layer=name) for name, _ in pyogrio.list_layers(path)]
    ids = {_key(s) for s in CENSUS_COLUMNS["cell_id"]}
    info = next((i for i in infos if ids & {_key(f) for f in i["fields"]}), infos[0])
    layer, fields, file_crs = info["layer_name"], list(info["fields"]), info["crs"]
    cols = _pick_columns(fields, CENSUS_COLUMNS, path, "census grid", "INSEE's")
    _check_census_crs(path, layer, cols["cell_id"])
    read_bbox = None
    if bbox is not None:
        read_bbox = tuple(bbox)
        if file_crs and CRS.from_user_input(file_crs) != CRS.from_user_input(LAEA):
            read_bbox = transform_bounds(LAEA, file_crs, *bbox, densify_pts=21)
    df = pyogrio.read_dataframe(path, layer=layer, columns=list(cols.values()), read_geometry=False,
                                bbox=read_bbox)
    df = df.rename(columns={v: k for k, v in cols.items()})[list(cols)]
    df["cell_id"] = df["cell_id"].astype(str).str.strip()
    for c in ("ind", "ind_snv"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["income"] = df["ind_snv"] / df["ind"]
    keep = np.isfinite(df["income"]) & (df["income"] > 0) & (df["ind"] > 0)
    df = df[keep].reset_index(drop=True)
    try:
        geometry = cell_boxes(df["cell_id"])
    except ValueError as e:
        raise DataError(path, str(e), "the id column must hold INSPIRE ids CRS3035RES200mN<y>E<x>") from None
    out = gpd.GeoDataFrame(df, geometry=geometry, crs=LAEA)
    out.attrs["dropped"] = int((~keep).sum())
    return out


# ----------------------------------------------------------------------------- Urban Atlas

# (code, class) spellings by product year, newest first; matched without case or underscores
UA_SCHEMAS = (("code_2018", ("class_2018", "item2018")),
              ("code_2012", ("class_2012", "item2012")),
              ("code_2006", ("class_2006", "item2006")))


_LETTERS = str.maketrans({"ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ß": "ss",
                          "ł": "l", "Ł": "L"})


def _name_key(text: str) -> str:
    """Upper case, accents stripped, every other character an underscore: 'Saint-Étienne' -> 'SAINT_ETIENNE'."""
    text = text.translate(_LETTERS)
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Z0-9]+", "_", plain.upper())


def find_ua_city(ua_dir: str | Path, city: str) -> Path:
    """The folder or file under ``ua_dir`` whose name contains the city name (case and accents ignored).

    Top-level entries are preferred; names where the city is a whole ``_``-separated word come first,
    then the newest product year in the name (UA2018 before UA2012), then folders (unpacked) before
    archives.
    """
    ua_dir = Path(ua_dir)
    if not ua_dir.is_dir():
        raise DataError(ua_dir, "Urban Atlas folder not found",
                        "unzip the Copernicus Urban Atlas city files there (see data_setup.sh)")
    key = _name_key(city)

    def rank(p: Path):
        words = _name_key(p.name).split("_")
        years = [int(y) for y in re.findall(r"(?:19|20)\d\d", p.name)]
        return (key.split("_")[0] not in words and key not in words, -max(years, default=0), not p.is_dir(), p.name)

    hits = sorted((p for p in ua_dir.iterdir() if key in _name_key(p.name)), key=rank)
    if not hits:
        hits = sorted((p for p in ua_dir.rglob("*") if key in _name_key(p.name)
                       and (p.suffix.lower() in {".gpkg", ".shp", ".zip", ".gdb"})), key=rank)
    if not hits:
        present = ", ".join(sorted(p.name for p in ua_dir.iterdir())[:8]) or "nothing"
        raise DataError(ua_dir, f"no Urban Atlas entry whose name contains '{city}' (found: {present})",
                        "unzip that city's Urban Atlas there or fix ses.cities")
    return hits[0]


def _vector_datasets(path: Path) -> list[str]:
    """Vector datasets (GDAL paths) inside a UA city folder, archive or file."""
    if path.is_dir() and path.suffix.lower() != ".gdb":
        found = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in {".gpkg", ".shp", ".gdb", ".zip"}]
        found = [p for p in found if not any(q.suffix.lower() == ".gdb" for q in p.parents)]
        return [d for p in found for d in _vector_datasets(p)]
    if path.suffix.lower() == ".zip":
        names = zipfile.ZipFile(path).namelist()
        inner = sorted({n.split(".gdb/")[0] + ".gdb" for n in names if ".gdb/" in n})
        inner += sorted(n for n in names if n.lower().endswith((".gpkg", ".shp")) and ".gdb/" not in n)
        return [f"/vsizip/{path.resolve()}/{n}" for n in inner]
    return [str(path)]


def _layers(datasets: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    out = []
    for ds in datasets:
        try:
            names = pyogrio.list_layers(ds)[:, 0]
        except Exception:  # not a vector dataset GDAL can open (e.g. a raster zip): skip it
            continue
        for name in names:
            out.append((ds, str(name), list(pyogrio.read_info(ds, layer=name)["fields"])))
    return out


def _ua_schema(fields: Sequence[str]) -> tuple[int, str, str] | None:
    """(age rank, code column, class column) of a land-use layer, or None."""
    keys = {_key(f): f for f in fields}
    for rank, (code, classes) in enumerate(UA_SCHEMAS):
        cls = next((keys[_key(c)] for c in classes if _key(c) in keys), None)
        if _key(code) in keys and cls:
            return rank, keys[_key(code)], cls
    return None


def _to_laea(gdf: gpd.GeoDataFrame, source: str) -> gpd.GeoDataFrame:
    if gdf.crs is None:
        raise DataError(source, "layer has no CRS", "Urban Atlas is EPSG:3035; restore the .prj or the GPKG's CRS")
    return gdf if gdf.crs.equals(LAEA) else gdf.to_crs(LAEA)


def repair(gdf: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, int]:
    """Invalid polygons made valid (polygonal parts kept); empty ones dropped. Returns (frame, repaired)."""
    invalid = ~gdf.geometry.is_valid
    if invalid.any():
        gdf = gdf.copy()
        gdf.loc[invalid, "geometry"] = gdf.geometry[invalid].make_valid(method="structure", keep_collapsed=False)
    gdf = gdf[~(gdf.geometry.is_empty | gdf.geometry.isna())]
    return gdf, int(invalid.sum())


def _report_repaired(source: str, repaired: int, total: int) -> None:
    if repaired:
        _log.warning(f"warning: {source}: {repaired} of {total} polygon(s) invalid (e.g. self-intersecting), "
                     "repaired with make_valid; check them in QGIS if the count is large")


def _landuse_layer(found: Path, layers) -> tuple[str, str, str, str]:
    """(dataset, layer, code column, class column) of the land-use layer to read."""
    candidates = []
    for ds, name, fields in layers:
        schema = _ua_schema(fields)
        if schema and "boundary" not in name.lower():
            n_codes = sum(_key(f).startswith("code") for f in fields)
            candidates.append(((schema[0], "change" in name.lower(), n_codes, name), ds, name, schema))
    if not candidates:
        seen = "; ".join(f"{name}: {', '.join(fields[:8])}" for _, name, fields in layers) or "no vector layer"
        raise DataError(found, f"no land-use layer with Urban Atlas class columns (found {seen})",
                        "expected code_2018/class_2018, code_2012/class_2012 or CODE2012/ITEM2012 (any case); "
                        "rename the columns or use the Copernicus files")
    _, ds, name, (_, code_col, class_col) = min(candidates, key=lambda c: c[0])
    return ds, name, code_col, class_col


def _read_landuse(found: Path, layers) -> gpd.GeoDataFrame:
    ds, name, code_col, class_col = _landuse_layer(found, layers)
    source = f"{ds}:{name}"
    gdf = gpd.read_file(ds, layer=name, columns=[code_col, class_col], engine="pyogrio")
    gdf = _to_laea(gdf, source).rename(columns={code_col: "ua_code", class_col: "ua_class"})
    codes = gdf["ua_code"]
    if pd.api.types.is_numeric_dtype(codes):
        codes = codes.astype("Int64")
    gdf["ua_code"] = codes.astype(str).str.strip().str.replace(r"\.0$", "", regex=True)
    gdf["ua_class"] = gdf["ua_class"].astype(str).str.strip()
    gdf, repaired = repair(gdf[["ua_code", "ua_class", "geometry"]].reset_index(drop=True))
    _report_repaired(source, repaired, len(gdf))
    gdf = gdf.reset_index(drop=True)
    gdf.attrs.update(source=source, repaired=repaired)
    return gdf


def _read_boundary(found: Path, layers, landuse: gpd.GeoDataFrame | None = None) -> gpd.GeoDataFrame:
    named = sorted((name, ds) for ds, name, _ in layers if "boundary" in name.lower())
    if named:
        name, ds = named[0]
        boundary = _to_laea(gpd.read_file(ds, layer=name, engine="pyogrio"), f"{ds}:{name}")
        boundary, repaired = repair(boundary[["geometry"]].reset_index(drop=True))
        _report_repaired(f"{ds}:{name}", repaired, len(boundary))
        boundary.attrs["source"] = f"{ds}:{name}"
    else:
        landuse = _read_landuse(found, layers) if landuse is None else landuse
        _log.warning(f"warning: {found}: no boundary layer (a layer named '*boundary*'); the union of the "
                     "land use is taken as the city's boundary")
        boundary = gpd.GeoDataFrame(geometry=[landuse.geometry.union_all()], crs=LAEA)
        boundary.attrs["source"] = f"union of {landuse.attrs['source']}"
    return boundary.reset_index(drop=True)


def read_urban_atlas(ua_dir: str | Path, city: str) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """A city's Urban Atlas -> (land use GeoDataFrame[ua_code, ua_class, geometry], boundary), EPSG:3035.

    Reads GeoPackages, shapefiles and FileGDBs (also zipped). The land-use layer is the newest one with a
    (code, class) pair: ``code_2018/class_2018``, ``code_2012/class_2012`` or ``CODE2012/ITEM2012``;
    change layers are used only when nothing else has the columns. Invalid polygons are repaired
    (``attrs['repaired']`` counts them). The boundary is the layer whose name contains 'boundary';
    without one, the union of the land use. Both carry ``attrs['source']``.
    """
    found = find_ua_city(ua_dir, city)
    layers = _layers(_vector_datasets(found))
    landuse = _read_landuse(found, layers)
    return landuse, _read_boundary(found, layers, landuse)


def read_ua_boundary(ua_dir: str | Path, city: str) -> gpd.GeoDataFrame:
    """Only the boundary of a city's Urban Atlas (EPSG:3035), without reading the land use when a
    boundary layer exists (its columns are checked, so a bad land-use layer stops the first stage)."""
    found = find_ua_city(ua_dir, city)
    layers = _layers(_vector_datasets(found))
    _landuse_layer(found, layers)  # the land use is read later (activation maps): check its columns now
    return _read_boundary(found, layers)


# ----------------------------------------------------------------------------- orthophoto tiles

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


def _snap_out(lo: float, hi: float, origin: float, step: float) -> tuple[float, float]:
    """Widen [lo, hi] to the pixel grid origin + k * step."""
    return (origin + math.floor((lo - origin) / step + 1e-9) * step,
            origin + math.ceil((hi - origin) / step - 1e-9) * step)


def read_cell(tile_paths: Sequence, bounds_3035: Sequence[float], px: int, crs=LAEA,
              resampling: str = "average") -> np.ndarray:
    """The square ``bounds_3035`` (xmin, ymin, xmax, ymax in ``crs``) as uint8 RGB [px, px, 3].

    The tiles (paths or open rasterio datasets, one CRS) are mosaicked in their own CRS over the cell's
    footprint only (a window of each, on the first tile's pixel grid, so a cell straddling tiles has no
    seam), then reprojected onto the cell's grid. Pixels no tile covers stay 0 (nodata). Untagged
    Lambert-93 tiles are read as EPSG:2154.
    """
    dst_crs = _crs(crs) if isinstance(crs, str) else CRS.from_user_input(crs)
    out = np.zeros((3, px, px), np.uint8)
    with contextlib.ExitStack() as stack:
        srcs = [t if hasattr(t, "read") else stack.enter_context(rasterio.open(t)) for t in tile_paths]
        if not srcs:
            return out.transpose(1, 2, 0).copy()
        src_crs = tile_crs(srcs[0])
        if any(tile_crs(s) != src_crs for s in srcs[1:]) or any(s.crs != srcs[0].crs for s in srcs[1:]):
            raise DataError(srcs[0].name, "the tiles of one cell carry different CRSs",
                            "reproject the tiles to one CRS (EPSG:2154) before extraction")
        if srcs[0].count < 3:
            raise DataError(srcs[0].name, f"{srcs[0].count} band(s), RGB expected", "use the RVB orthophotos")
        first = srcs[0].transform
        rx, ry = abs(first.a), abs(first.e)
        to_src = _transformer(dst_crs.to_wkt(), src_crs.to_wkt())
        left, bottom, right, top = to_src.transform_bounds(*bounds_3035, densify_pts=21)
        left, right = _snap_out(left - 2 * rx, right + 2 * rx, first.c, rx)
        bottom, top = _snap_out(bottom - 2 * ry, top + 2 * ry, first.f, ry)
        mosaic, transform = merge(srcs, bounds=(left, bottom, right, top), nodata=0, indexes=[1, 2, 3])
    # The mosaic's grid expressed in the cell's CRS by an affine map (off by under a millimetre over a
    # cell): the warp then needs no coordinate operation, whose set-up by PROJ for every new area costs
    # more than warping the cell itself.
    if src_crs != dst_crs:
        transform = local_affine(transform, mosaic.shape[2], mosaic.shape[1], src_crs, dst_crs)
    reproject(mosaic, out, src_transform=transform, src_crs=dst_crs, src_nodata=0,
              dst_transform=from_bounds(*bounds_3035, px, px), dst_crs=dst_crs, dst_nodata=0,
              resampling=Resampling[resampling], UNIFIED_SRC_NODATA="YES")
    return out.transpose(1, 2, 0).copy()


def local_affine(transform, width: int, height: int, src_crs, dst_crs):
    """The affine map from pixels of a ``width`` x ``height`` grid (``transform`` in ``src_crs``) to
    ``dst_crs``, least-squares fitted on a 5 x 5 lattice of the grid; exact for an affine change of CRS,
    within a millimetre for Lambert-93 -> ETRS89-LAEA over a few hundred metres."""
    from affine import Affine

    cols, rows = (g.ravel() for g in np.meshgrid(np.linspace(0, width, 5), np.linspace(0, height, 5)))
    t = transform
    xs, ys = t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows
    to_dst = _transformer(CRS.from_user_input(src_crs).to_wkt(), CRS.from_user_input(dst_crs).to_wkt())
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


# ----------------------------------------------------------------------------- cell selection and extraction

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


def sample_cells(cells: gpd.GeoDataFrame, max_cells: int, seed: int) -> gpd.GeoDataFrame:
    """At most ``max_cells`` cells (0 = all), a seeded random sample kept in cell-id order."""
    if max_cells <= 0 or len(cells) <= max_cells:
        return cells
    pick = np.random.default_rng(seed).choice(len(cells), size=max_cells, replace=False)
    return cells.iloc[np.sort(pick)]


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


def _extract_group(jobs: list[tuple], px: int, resampling: str) -> list[tuple]:
    """Read and save a group of cells that share tiles."""
    done = []
    for key, bounds, paths, out in jobs:
        img = read_cell([_open_tile(p) for p in paths], bounds, px, resampling=resampling)
        write_png(out, img)
        done.append((key, nodata_fraction(img)))
    return done


def extract_cells(cells: pd.DataFrame, root: str | Path, px: int, workers: int = 1,
                  resampling: str = "average", known: Mapping[str, float] | None = None,
                  group_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Write each cell's image ``root / cells.path`` and return DataFrame[nodata, extracted] by cell index.

    ``cells`` needs ``geometry`` (EPSG:3035 squares), ``tiles`` (tuple of tile paths) and ``path``
    (relative to ``root``). A PNG already there with the right size is kept (resume): its nodata share
    comes from ``known`` (path -> share, e.g. the previous index) or from the PNG itself. Cells sharing
    tiles are read together, groups in ``workers`` processes.
    """
    root = Path(root)
    known = dict(known or {})
    nodata, extracted, todo = {}, {}, []
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
    groups, current = [], []
    for job in todo:
        if current and (job[2] != current[-1][2] or len(current) >= group_size):
            groups.append(current)
            current = []
        current.append(job)
    if current:
        groups.append(current)
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress or not todo)
    if workers <= 1 or len(groups) <= 1:
        for group in groups:
            for key, frac in _extract_group(group, px, resampling):
                nodata[key], extracted[key] = frac, True
            bar.update(len(group))
        _close_tiles()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_extract_group, g, px, resampling): len(g) for g in groups}
            for fut in as_completed(futures):
                for key, frac in fut.result():
                    nodata[key], extracted[key] = frac, True
                bar.update(futures[fut])
    bar.close()
    return pd.DataFrame({"nodata": pd.Series(nodata), "extracted": pd.Series(extracted)}).reindex(cells.index)
