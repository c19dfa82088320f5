"""Copernicus Urban Atlas land use and city boundaries (2012 shapefiles, 2018 GeoPackages)."""
from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import geopandas as gpd
import pandas as pd
import pyogrio

from ..core.errors import DataError
from . import archives
from .columns import column_key
from .grid import LAEA

_log = logging.getLogger("urbanlens")  # without logging set up, warnings go to stderr as they are


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


def _matches(name: str, city: str) -> bool:
    """True when a file name names the city (case, accents and separators ignored) or starts with the
    city's FUA code when one is given (``FR001L2``, or ``FR001`` for any release)."""
    return _name_key(city) in _name_key(Path(name).name)


def _rank(name: str, city: str, is_dir: bool = False):
    """Order of candidates: the city a whole ``_``-separated word, then the newest product year in the
    name (UA2018 before UA2012), then folders (unpacked) before archives."""
    key = _name_key(city)
    words = _name_key(Path(name).name).split("_")
    years = [int(y) for y in re.findall(r"(?:19|20)\d\d", Path(name).name)]
    return (key.split("_")[0] not in words and key not in words, -max(years, default=0), not is_dir, name)


_UA_SUFFIXES = {".gpkg", ".shp", ".zip", ".gdb"}


def _in_cache(p: Path, root: Path) -> bool:
    return any(part.endswith(archives.UNPACKED_SUFFIX) for part in p.relative_to(root).parts[:-1])


def _archive_members(ua_dir: Path) -> list[tuple[Path, str]]:
    """(zip, member) for every Urban Atlas file (zip, GeoPackage, shapefile) listed inside the zips under
    ``ua_dir`` (the portal's download holds ``<id>/Results/<FUA>_<CITY>_UA2018_v013.zip``)."""
    out = []
    for z in sorted(p for p in ua_dir.rglob("*.zip") if not _in_cache(p, ua_dir)):
        try:
            names = archives.zip_members(z)
        except DataError:
            continue
        out += [(z, n) for n in names if Path(n).suffix.lower() in _UA_SUFFIXES and ".gdb/" not in n]
    return out


def find_ua_city(ua_dir: str | Path, city: str) -> Path:
    """The folder or file under ``ua_dir`` for the city, found by its name (case and accents ignored) or
    its FUA code: a top-level entry first, then a file at any depth, then a file inside a zip (the
    Copernicus portal's download: a zip of zips), which is unpacked once into a cache folder beside the
    zip (``<zip name>.unpacked/<member>/``) and returned. Whole-word matches first, then the newest
    product year, then unpacked folders before archives.
    """
    ua_dir = Path(ua_dir)
    if not ua_dir.is_dir():
        raise DataError(ua_dir, "Urban Atlas folder not found",
                        "unzip the Copernicus Urban Atlas city files there (see data_setup.sh)")
    hits = sorted((p for p in ua_dir.iterdir() if _matches(p.name, city) and not p.name.endswith(archives.UNPACKED_SUFFIX)),
                  key=lambda p: _rank(p.name, city, p.is_dir()))
    if not hits:
        hits = sorted((p for p in ua_dir.rglob("*") if _matches(p.name, city) and p.suffix.lower() in _UA_SUFFIXES
                       and not _in_cache(p, ua_dir)), key=lambda p: _rank(p.name, city, p.is_dir()))
    if hits:
        return hits[0]
    members = _archive_members(ua_dir)
    inside = sorted(((z, n) for z, n in members if _matches(n, city)), key=lambda m: _rank(m[1], city))
    if inside:
        z, member = inside[0]
        return archives.unpack_inner_zip(z, member) if member.lower().endswith(".zip") else z
    present = sorted(p.name for p in ua_dir.iterdir() if not p.name.endswith(archives.UNPACKED_SUFFIX))
    listed = sorted({Path(n).name for _, n in members})
    found = ", ".join(present[:8]) or "nothing"
    if listed:
        found += f"; inside its zips: {', '.join(listed[:12])}" + (" ..." if len(listed) > 12 else "")
    raise DataError(ua_dir, f"no Urban Atlas entry whose name contains '{city}' (found: {found})",
                    "put that city's Urban Atlas there, name the city as its file does, or fix ses.cities")


def _vector_datasets(path: Path, city: str | None = None) -> list[str]:
    """Vector datasets (GDAL paths) inside a UA city folder, archive or file. A zip holding zips is
    unpacked once (beside it) and the zip named after ``city`` (or its only zip) is read."""
    if path.is_dir() and path.suffix.lower() != ".gdb":
        found = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in _UA_SUFFIXES]
        found = [p for p in found if not any(q.suffix.lower() == ".gdb" for q in p.parents)]
        found = [p for p in found if not _in_cache(p, path)]
        return [d for p in found for d in _vector_datasets(p, city)]
    if path.suffix.lower() == ".zip":
        names = archives.zip_members(path)
        inner_zips = [n for n in names if n.lower().endswith(".zip")]
        if inner_zips:
            named = [n for n in inner_zips if city and _matches(n, city)]
            pick = sorted(named, key=lambda n: _rank(n, city))[:1] if named else inner_zips[:1] if len(inner_zips) == 1 else []
            if not pick:
                raise DataError(path, f"holds {len(inner_zips)} zips, none named after '{city}' (found: "
                                f"{', '.join(Path(n).name for n in inner_zips[:12])})",
                                "fix ses.cities, or download that city's Urban Atlas")
            return _vector_datasets(archives.unpack_inner_zip(path, pick[0]), city)
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
    keys = {column_key(f): f for f in fields}
    for rank, (code, classes) in enumerate(UA_SCHEMAS):
        cls = next((keys[column_key(c)] for c in classes if column_key(c) in keys), None)
        if column_key(code) in keys and cls:
            return rank, keys[column_key(code)], cls
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


_FUA_CODE = re.compile(r"(?:^|[/_])[A-Z]{2}\d{3}L\d(?:_|$)")


def _copernicus_named(found: Path, layers) -> bool:
    """True when the file or its layers carry Copernicus Urban Atlas names (``<FUA code>_<CITY>_...``)."""
    return bool(_FUA_CODE.search(found.name) or any(_FUA_CODE.search(name) for _, name, _ in layers))


def _landuse_layer(found: Path, layers) -> tuple[str, str, str, str]:
    """(dataset, layer, code column, class column) of the land-use layer to read."""
    candidates = []
    for ds, name, fields in layers:
        schema = _ua_schema(fields)
        if schema and "boundary" not in name.lower():
            n_codes = sum(column_key(f).startswith("code") for f in fields)
            candidates.append(((schema[0], "change" in name.lower(), n_codes, name), ds, name, schema))
    if not candidates:
        seen = "; ".join(f"{name}: {', '.join(fields[:8])}" for _, name, fields in layers) or "no vector layer"
        expected = "expected code_2018/class_2018, code_2012/class_2012 or CODE2012/ITEM2012 (any case)"
        if _copernicus_named(found, layers):
            fix = (f"{expected}: this is a Copernicus Urban Atlas delivery without a land-use layer (another "
                   "product, e.g. the Street Tree Layer or Building Height?); download the city's Urban Atlas "
                   "land use (2012 or 2018)")
        else:
            fix = f"{expected}; rename the columns, or download the city's Urban Atlas from land.copernicus.eu"
        raise DataError(found, f"no land-use layer with Urban Atlas class columns (found {seen})", fix)
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


CORE_CITY = ("cityboundary", "urbancore")  # the core city's layers (2012, 2018): never the study area
BOUNDARY_KEY = "ses.ua_boundary"


def layer_role(name: str) -> str | None:
    """``'boundary'`` for a functional urban area's boundary (``*_UA2012_Boundary``, ``*_UA2018_Boundary``,
    any other ``*boundary*``), ``'core city'`` for ``*_CityBoundary`` and ``*_UrbanCore``, else None."""
    key = column_key(name)
    if any(c in key for c in CORE_CITY):
        return "core city"
    return "boundary" if "boundary" in key else None


def _year(name: str) -> str | None:
    years = re.findall(r"(?:19|20)\d\d", name)
    return years[-1] if years else None


def _pick_boundary(layers, landuse_source: str | None, wanted: str = "") -> tuple[str, str] | None:
    """(dataset, layer) of the FUA boundary, chosen by role: core-city layers are never candidates; among
    several candidates the one in the land-use layer's dataset, then of its product year; ``wanted``
    (``ses.ua_boundary``) names the layer outright. DataError naming both when two still fit."""
    found = [(ds, name) for ds, name, _ in layers if layer_role(name) == "boundary"]
    if wanted:
        pick = [(ds, n) for ds, n in found + [(ds, n) for ds, n, _ in layers if layer_role(n) == "core city"]
                if column_key(n) == column_key(wanted) or column_key(Path(ds).name) == column_key(wanted)]
        if not pick:
            shown = ", ".join(n for _, n in found) or "none"
            raise DataError(BOUNDARY_KEY, f"is '{wanted}', which names no layer of the city's Urban Atlas "
                            f"(boundary layers: {shown})", "set it to one of those, or to '' to choose by role")
        return pick[0]
    if len(found) > 1 and landuse_source:
        ds_lu, _, name_lu = landuse_source.rpartition(":")
        for narrow in (lambda ds, n: ds == ds_lu, lambda ds, n: _year(n) == _year(name_lu)):
            kept = [f for f in found if narrow(*f)]
            found = kept if kept else found
            if len(found) == 1:
                break
    if len(found) > 1:
        shown = " and ".join(f"{ds}:{n}" for ds, n in found[:2]) + (f" (+{len(found) - 2})" if len(found) > 2 else "")
        raise DataError(found[0][0], f"two layers fit the city's boundary: {shown}",
                        f"set {BOUNDARY_KEY} to the layer name to use")
    return found[0] if found else None


def _read_boundary(found: Path, layers, landuse: gpd.GeoDataFrame | None = None, wanted: str = "",
                   landuse_source: str | None = None) -> gpd.GeoDataFrame:
    landuse_source = landuse.attrs["source"] if landuse is not None else landuse_source
    pick = _pick_boundary(layers, landuse_source, wanted)
    unused = [f"{name} ({layer_role(name)})" for ds, name, _ in layers
              if layer_role(name) and (pick is None or (ds, name) != pick)]
    unused += [f"{name} (land use of another year or a change layer)" for ds, name, fields in layers
               if _ua_schema(fields) and not layer_role(name) and f"{ds}:{name}" != landuse_source]
    if pick:
        ds, name = pick
        boundary = _to_laea(gpd.read_file(ds, layer=name, engine="pyogrio"), f"{ds}:{name}")
        boundary, repaired = repair(boundary[["geometry"]].reset_index(drop=True))
        _report_repaired(f"{ds}:{name}", repaired, len(boundary))
        boundary.attrs["source"] = f"{ds}:{name}"
    else:
        landuse = _read_landuse(found, layers) if landuse is None else landuse
        core = f"; {', '.join(unused)} not used: the core city is not the study area" if unused else ""
        _log.warning(f"warning: {found}: no boundary layer (a layer named '*_UA<year>_Boundary'); the union of the "
                     f"land use is taken as the city's boundary{core}")
        boundary = gpd.GeoDataFrame(geometry=[landuse.geometry.union_all()], crs=LAEA)
        boundary.attrs["source"] = f"union of {landuse.attrs['source']}"
    if boundary.empty or boundary.geometry.is_empty.all():  # no area: no cell, and NaN bounds to read by
        raise DataError(boundary.attrs["source"], "the city's boundary holds no polygon",
                        "unpack the city's Urban Atlas again (its Boundary layer, or a land-use layer with polygons)")
    boundary = boundary.reset_index(drop=True)
    boundary.attrs["landuse"] = landuse_source
    boundary.attrs["unused"] = unused
    return boundary


def describe(city: str, boundary: gpd.GeoDataFrame) -> str:
    """One line naming the layer used for each role of a city's Urban Atlas, and the layers left out."""
    line = f"{city}: Urban Atlas land use {boundary.attrs.get('landuse')}, boundary {boundary.attrs['source']}"
    unused = boundary.attrs.get("unused")
    return line + (f"; not used: {', '.join(unused)}" if unused else "")


def sources(boundary: gpd.GeoDataFrame) -> dict:
    """The layer used for each role, as a run stamp records it."""
    return {"landuse": boundary.attrs.get("landuse"), "boundary": boundary.attrs["source"]}


def read_urban_atlas(ua_dir: str | Path, city: str, boundary_layer: str = "") -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """A city's Urban Atlas -> (land use GeoDataFrame[ua_code, ua_class, geometry], boundary), EPSG:3035.

    Reads GeoPackages, shapefiles and FileGDBs, unpacked or zipped, and the portal's zip of zips (see
    ``find_ua_city``); in 2018 GeoPackages the ``_UrbanCore`` layer is not read. The land-use layer is the newest one with a
    (code, class) pair: ``code_2018/class_2018``, ``code_2012/class_2012`` or ``CODE2012/ITEM2012``;
    change layers are used only when nothing else has the columns. Invalid polygons are repaired
    (``attrs['repaired']`` counts them). The boundary is chosen by role (``_pick_boundary``): the
    functional urban area's ``*_UA<year>_Boundary``, never the core city's ``*_CityBoundary`` or
    ``*_UrbanCore``; ``boundary_layer`` (``ses.ua_boundary``) names it when two fit; without one, the
    union of the land use. Both carry ``attrs['source']``; the boundary also ``attrs['landuse']`` and
    ``attrs['unused']`` (layers of a role left out), for ``describe``.
    """
    found = find_ua_city(ua_dir, city)
    layers = _layers(_vector_datasets(found, city))
    landuse = _read_landuse(found, layers)
    return landuse, _read_boundary(found, layers, landuse, boundary_layer)


def read_ua_boundary(ua_dir: str | Path, city: str, boundary_layer: str = "") -> gpd.GeoDataFrame:
    """Only the boundary of a city's Urban Atlas (EPSG:3035), without reading the land use when a
    boundary layer exists (its columns are checked, so a bad land-use layer stops the first stage)."""
    found = find_ua_city(ua_dir, city)
    layers = _layers(_vector_datasets(found, city))
    ds, name, _, _ = _landuse_layer(found, layers)  # read later (activation maps): check its columns now
    return _read_boundary(found, layers, wanted=boundary_layer, landuse_source=f"{ds}:{name}")
