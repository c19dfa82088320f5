"""GIS outputs that open styled: Cloud-Optimized GeoTIFFs with overviews, class rasters with a colour
table and class names, QGIS styles beside every raster and inside every GeoPackage.

What QGIS reads, and so what is written:

- a raster's default style is the ``.qml`` file of the same base name beside it (``x.tif`` ->
  ``x.qml``), applied when the layer is added: a graduated (pseudocolor) ramp for continuous bands
  (incomes, scores, CAMs) and a paletted style whose entries carry the class names for class rasters;
- a class raster's colour table is in the GeoTIFF itself (QGIS and GDAL read it without the sidecar);
  its class names are GDAL category names and a thematic raster attribute table (value, class name,
  colour) in the GDAL ``.aux.xml`` beside it, which GDAL tools and QGIS 3.30+ read; rasterio has no
  setter for either, so that file is written here in GDAL's own PAM layout;
- a GeoPackage layer's default style is its row of the ``layer_styles`` table with
  ``useAsDefault`` true, in the schema QGIS creates when it saves a style into a GeoPackage.

Rasters are laid out by GDAL's own COG driver (shipped with rasterio), with overviews down to one tile
(at least one level). Every function except the writers is pure.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

import numpy as np

from . import files

QGIS_VERSION = "3.28.0-Firenze"  # the oldest long-term release whose style files these are
RAMP = "viridis"  # incomes, income classes and scores
CAM_RAMP = "magma"  # class activation maps
MIN_BLOCK = 16  # a TIFF tile's side is a multiple of 16
MAX_BLOCK = 512  # GDAL's COG default


# ---- colours -------------------------------------------------------------------------------------

def ramp_colors(n: int, ramp: str = RAMP) -> list[tuple[int, int, int, int]]:
    """``n`` RGBA colours (0-255) evenly spaced along the matplotlib colour map ``ramp``, low to high."""
    from matplotlib import colormaps

    cmap = colormaps[ramp]
    stops = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])
    return [tuple(int(round(c * 255)) for c in cmap(float(s))) for s in stops]


def class_colormap(n: int, ramp: str = RAMP) -> dict[int, tuple[int, int, int, int]]:
    """The colour table of a raster of classes 0..n-1 (``dst.write_colormap``): class k, colour k."""
    return dict(enumerate(ramp_colors(n, ramp)))


def _hex(rgba: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgba[:3])


# ---- QML (QGIS style files) ----------------------------------------------------------------------

def _qml(body: str, categories: str) -> str:
    return (f"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
            f'<qgis version="{QGIS_VERSION}" styleCategories="{categories}">\n{body}</qgis>\n')


def _raster_qml(renderer: str) -> str:
    return _qml(f"  <pipe>\n{renderer}  </pipe>\n  <blendMode>0</blendMode>\n", "AllStyleCategories")


def qml_pseudocolor(vmin: float, vmax: float, band: int = 1, ramp: str = RAMP, stops: int = 5,
                    labels: Sequence[str] = ()) -> str:
    """A QGIS raster style: band ``band`` drawn with the colour ``ramp`` interpolated from ``vmin`` to
    ``vmax`` (values outside take the end colours) through ``stops`` evenly spaced stops, labelled by
    their values or by ``labels`` (one per stop; then there are as many stops)."""
    vmin, vmax = float(vmin), float(vmax)
    if not vmax > vmin:
        vmax = vmin + 1.0
    stops = len(labels) or stops
    values = np.linspace(vmin, vmax, stops)
    names = list(labels) or [f"{v:.4g}" for v in values]
    items = "".join(f'          <item alpha="{c[3]}" value="{v:.6g}" label={quoteattr(n)} color="{_hex(c)}"/>\n'
                    for v, n, c in zip(values, names, ramp_colors(stops, ramp)))
    return _raster_qml(
        f'    <rasterrenderer type="singlebandpseudocolor" band="{band}" opacity="1" alphaBand="-1" '
        f'classificationMin="{vmin:.6g}" classificationMax="{vmax:.6g}" nodataColor="">\n'
        f"      <rasterTransparency/>\n"
        f'      <minMaxOrigin><limits>None</limits><extent>WholeRaster</extent></minMaxOrigin>\n'
        f"      <rastershader>\n"
        f'        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" '
        f'minimumValue="{vmin:.6g}" maximumValue="{vmax:.6g}" labelPrecision="4">\n'
        f"{items}"
        f"        </colorrampshader>\n"
        f"      </rastershader>\n"
        f"    </rasterrenderer>\n")


def qml_paletted(colors: Mapping[int, Sequence[int]], names: Mapping[int, str], band: int = 1) -> str:
    """A QGIS raster style: band ``band`` drawn class by class, value ``k`` in ``colors[k]`` (RGBA) with
    the legend label ``names[k]``."""
    entries = "".join(f'        <paletteEntry value="{k}" color="{_hex(c)}" alpha="{c[3]}" '
                      f"label={quoteattr(str(names.get(k, k)))}/>\n" for k, c in sorted(colors.items()))
    return _raster_qml(f'    <rasterrenderer type="paletted" band="{band}" opacity="1" alphaBand="-1" '
                       f'nodataColor="">\n      <rasterTransparency/>\n'
                       f"      <colorPalette>\n{entries}      </colorPalette>\n    </rasterrenderer>\n")


_SYMBOL = {"fill": "SimpleFill", "line": "SimpleLine", "marker": "SimpleMarker"}


def symbol_type(geometry_type: str) -> str:
    """The QGIS symbol type (fill, line, marker) of an OGC geometry type name (POLYGON, MULTILINESTRING...)."""
    g = geometry_type.upper()
    return "fill" if "POLYGON" in g else "line" if "LINE" in g else "marker"


def _symbol(name: str, kind: str, rgba: Sequence[int]) -> str:
    color = ",".join(str(int(c)) for c in rgba)
    options = {"fill": {"color": color, "style": "solid", "outline_style": "no"},
               "line": {"line_color": color, "line_width": "0.5"},
               "marker": {"color": color, "name": "circle", "size": "2", "outline_style": "no"}}[kind]
    opts = "".join(f'            <Option type="QString" name="{k}" value="{v}"/>\n' for k, v in options.items())
    return (f'      <symbol type="{kind}" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            f'        <layer class="{_SYMBOL[kind]}" enabled="1" locked="0" pass="0">\n'
            f'          <Option type="Map">\n{opts}          </Option>\n        </layer>\n      </symbol>\n')


def graduated_breaks(values, classes: int = 5) -> list[float]:
    """``classes + 1`` class limits of ``values`` at equal-count quantiles (NaNs left out; repeated
    limits merged); [0, 1] when no value is finite."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [0.0, 1.0]
    edges = np.unique(np.quantile(v, np.linspace(0, 1, classes + 1)))
    return [float(e) for e in edges] if len(edges) > 1 else [float(edges[0]), float(edges[0]) + 1.0]


def qml_graduated(column: str, breaks: Sequence[float], kind: str = "fill", ramp: str = RAMP) -> str:
    """A QGIS vector style: features coloured by ``column`` in the classes [breaks[i], breaks[i+1]],
    low to high along ``ramp``; ``kind`` is the symbol type (``symbol_type``)."""
    n = len(breaks) - 1
    colors = ramp_colors(n, ramp)
    ranges = "".join(f'      <range lower="{lo:.6g}" upper="{hi:.6g}" symbol="{i}" label="{lo:.4g} - {hi:.4g}" '
                     f'render="true"/>\n' for i, (lo, hi) in enumerate(zip(breaks[:-1], breaks[1:])))
    symbols = "".join(_symbol(str(i), kind, c) for i, c in enumerate(colors))
    body = (f"  <renderer-v2 type=\"graduatedSymbol\" attr={quoteattr(column)} graduatedMethod=\"GraduatedColor\" "
            f'symbollevels="0" enableorderby="0" forceraster="0">\n'
            f"    <ranges>\n{ranges}    </ranges>\n    <symbols>\n{symbols}    </symbols>\n"
            f'    <mode name="quantile"/>\n  </renderer-v2>\n')
    return _qml(body, "Symbology")


# ---- class names in GDAL's .aux.xml --------------------------------------------------------------

def pam_classes(names: Sequence[str], colors: Mapping[int, Sequence[int]], band: int = 1) -> str:
    """GDAL's ``.aux.xml`` (PAM) text giving band ``band`` the category names ``names`` (value k is
    ``names[k]``) and a thematic raster attribute table: Value, Class, Red, Green, Blue, Alpha."""
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8), ("Alpha", 0, 9)]
    defs = "".join(f'      <FieldDefn index="{i}"><Name>{n}</Name><Type>{t}</Type><Usage>{u}</Usage></FieldDefn>\n'
                   for i, (n, t, u) in enumerate(fields))
    rows = "".join(f'      <Row index="{k}"><F>{k}</F><F>{escape(name)}</F>'
                   + "".join(f"<F>{int(c)}</F>" for c in colors.get(k, (0, 0, 0, 0))) + "</Row>\n"
                   for k, name in enumerate(names))
    cats = "".join(f"      <Category>{escape(name)}</Category>\n" for name in names)
    return (f'<PAMDataset>\n  <PAMRasterBand band="{band}">\n    <CategoryNames>\n{cats}    </CategoryNames>\n'
            f'    <GDALRasterAttributeTable tableType="thematic">\n{defs}{rows}    </GDALRasterAttributeTable>\n'
            f"  </PAMRasterBand>\n</PAMDataset>\n")


def read_category_names(path) -> list[str]:
    """The category names of band 1 of the raster at ``path`` as GDAL reads them (from its ``.aux.xml``):
    GDAL writes them out in a VRT copy, since rasterio has no getter; [] when there are none."""
    import tempfile
    import xml.etree.ElementTree as ET

    import rasterio.shutil

    with tempfile.TemporaryDirectory() as tmp:
        vrt = Path(tmp) / "copy.vrt"
        rasterio.shutil.copy(str(path), str(vrt), driver="VRT")
        band = ET.parse(vrt).getroot().find("VRTRasterBand[@band='1']")
    return [] if band is None else [c.text or "" for c in band.findall("CategoryNames/Category")]


# ---- writers -------------------------------------------------------------------------------------

def qml_path(path) -> Path:
    """Where QGIS looks for a layer's default style: the file's name with ``.qml`` for its suffix."""
    return Path(path).with_suffix(".qml")


def cog_layout(width: int, height: int) -> tuple[int, list[int]]:
    """(tile side, overview factors) of a ``width`` x ``height`` COG: tiles no larger than needed (16 to
    512 pixels), overviews halving down to one tile and at least one level (GDAL's default makes none
    for a raster within one tile); none for a single pixel."""
    side = max(width, height, 1)
    block = int(min(MAX_BLOCK, max(MIN_BLOCK, 2 ** int(np.floor(np.log2(max(side // 2, 1)))))))
    if side < 2:
        return block, []
    levels = int(np.ceil(np.log2(side / block))) if side > block else 1
    return block, [2 ** k for k in range(1, levels + 1)]


def cog_options(width: int, height: int, categorical: bool = False) -> dict:
    """Creation options of GDAL's COG driver copying a tiled GeoTIFF whose overviews are built already
    (``cog_layout``): deflate, with a floating-point predictor for continuous values."""
    block, factors = cog_layout(width, height)
    return dict(driver="COG", blocksize=block, overviews="FORCE_USE_EXISTING" if factors else "NONE",
                compress="deflate", predictor="no" if categorical else "yes")


def write_cog(path, data: np.ndarray, crs, transform, nodata=None, names: Sequence[str] = (),
              classes: Sequence[str] | None = None, colors: Mapping[int, Sequence[int]] | None = None,
              qml: str | None = None) -> Path:
    """Write ``data`` [bands, H, W] as a Cloud-Optimized GeoTIFF at ``path`` (atomically), band b+1
    described by ``names[b]``; then its ``.qml`` style (``qml``) beside it. ``classes`` (class names,
    value k is ``classes[k]``) makes it a class raster: band 1 carries the colour table ``colors``
    (``class_colormap`` when None), the category names go into its ``.aux.xml`` and the default style
    is the paletted one with those names.

    The pixels and overviews (averaged; nearest for classes) go into a tiled GeoTIFF in memory first,
    which GDAL's COG driver then lays out: its own overview building costs several times as much for
    the small per-cell maps."""
    import rasterio
    import rasterio.shutil
    from rasterio.enums import Resampling
    from rasterio.io import MemoryFile

    data = np.asarray(data)
    categorical = classes is not None
    if categorical:
        colors = colors or class_colormap(len(classes))
        qml = qml or qml_paletted(colors, dict(enumerate(classes)))
    height, width = data.shape[1:]
    block, factors = cog_layout(width, height)
    profile = dict(driver="GTiff", width=width, height=height, count=data.shape[0], dtype=str(data.dtype),
                   crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=block, blockysize=block)
    path = Path(path)
    with MemoryFile(ext=".tif") as memory:
        with memory.open(**profile) as dst:
            dst.write(data)
            for b, name in enumerate(names[:data.shape[0]], 1):
                dst.set_band_description(b, name)
            if categorical:
                dst.write_colormap(1, colors)
            if factors:
                dst.build_overviews(factors, Resampling.nearest if categorical else Resampling.average)
        with files.atomic_path(path) as tmp:
            rasterio.shutil.copy(memory.name, str(tmp), **cog_options(width, height, categorical))
    if categorical:
        files.write_text(f"{path}.aux.xml", pam_classes(classes, colors))
    if qml is not None:
        files.write_text(qml_path(path), qml)
    return path


def value_range(data, lower: float = 2.0, upper: float = 98.0) -> tuple[float, float]:
    """The ``lower`` and ``upper`` percentiles of the finite values of ``data`` (the stretch QGIS's
    default cumulative cut uses); (0, 1) when none is finite."""
    v = np.asarray(data, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lower, upper])
    return float(lo), float(hi)


LAYER_STYLES = """CREATE TABLE IF NOT EXISTS layer_styles (
  id INTEGER PRIMARY KEY AUTOINCREMENT, f_table_catalog TEXT(256), f_table_schema TEXT(256),
  f_table_name TEXT(256), f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,
  useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
  update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""


def style_gpkg(path, layer: str, column: str, ramp: str = RAMP, breaks: Sequence[float] | None = None,
               description: str = "") -> None:
    """Give ``layer`` of the GeoPackage at ``path`` a default QGIS style: graduated colours of the
    numeric ``column`` in the classes ``breaks`` (class limits), or else in quantile classes of the
    column's values in the layer. The ``layer_styles``
    table is created as QGIS creates it and registered in ``gpkg_contents`` (as QGIS does, so GDAL
    lists it as a table); an earlier default style of the layer is replaced. Call it on the file
    written (e.g. the temporary path of ``files.atomic_path``) before it is renamed."""
    with sqlite3.connect(path) as con:
        row = con.execute("SELECT column_name, geometry_type_name FROM gpkg_geometry_columns WHERE table_name = ?",
                          (layer,)).fetchone()
        if row is None:
            raise ValueError(f"{path}: no geometry layer '{layer}'")
        geom, gtype = row
        if breaks is None:
            values = [v for v, in con.execute(f'SELECT "{column}" FROM "{layer}"')]
            breaks = graduated_breaks(np.array(values, dtype=float))
        limits = [float(b) for b in breaks]
        qml = qml_graduated(column, limits, symbol_type(gtype), ramp)
        con.execute(LAYER_STYLES)
        con.execute("INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, last_change) "
                    "VALUES ('layer_styles', 'attributes', 'layer_styles', strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
        con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND useAsDefault", (layer,))
        con.execute("INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column, "
                    "styleName, styleQML, styleSLD, useAsDefault, description, owner, ui) "
                    "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL)",
                    (layer, geom, f"{layer} by {column}", qml, description or f"graduated colours of {column}"))
    con.close()
