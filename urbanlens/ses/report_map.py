"""The interactive map of one city's SES outputs in ``report.html``: an inline SVG in the cells' own
coordinates (EPSG:3035 metres, y flipped), no basemap and nothing fetched, so it works offline.

Each 200 m cell is a ``<path>`` carrying its values as data attributes (predicted class, census income
and class, land-use score); a small inline script colours the cells by the chosen value, shows a cell's
values on hover or click, and toggles the CAM overlays (the rich and poor bands of ``cams/<cell>.tif``,
embedded PNGs placed by the rasters' bounds).
"""
from __future__ import annotations

import io
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from ..core import report_page as rp

# (data attribute, legend, colour map): the values a cell can be coloured by
LAYERS = (("pred", "predicted class (expected, 0 = poorest fifth, 4 = richest)", "viridis"),
          ("census", "census income (EUR)", "viridis"),
          ("landuse", "land-use score (area-weighted rich minus poor CAM score)", "coolwarm"))
LEGEND_DIGITS = {"pred": 2, "census": 0, "landuse": 3}
CAM_PX = 48  # CAM overlays are shown at this many pixels a side (the rasters are larger)
CAM_CELLS = 400  # at most this many cells of a city get CAM overlays (every k-th cell): the page stays small


def cell_values(ses_dir: Path, city: str) -> gpd.GeoDataFrame | None:
    """One row per cell: geometry, ``pred`` (expected class), ``census`` (income), ``census_class``,
    ``scored_by``; from predicted/cells.gpkg when predict_income.py ran, else from the out-of-fold
    predictions.csv joined to cells.gpkg. None when neither is there."""
    city_dir = ses_dir / city
    predicted = city_dir / "predicted" / "cells.gpkg"
    if predicted.is_file():
        g = gpd.read_file(predicted, layer="cells")
        out = g[["cell_id", "geometry"]].copy()
        out["pred"] = g["expected_class"]
        out["census"] = g.get("census_income", np.nan)
        out["census_class"] = g.get("observed_class", np.nan)
        out["scored_by"] = g.get("scored_by", "")
        return out
    cells, preds = ses_dir / "cells.gpkg", rp.read_csv(city_dir / "predictions.csv")
    if not cells.is_file() or preds is None:
        return None
    g = gpd.read_file(cells, layer="cells")
    g = g[g["city"] == city] if "city" in g.columns else g
    preds = preds.drop_duplicates("cell_id").set_index("cell_id")
    out = g[["cell_id", "geometry"]].copy()
    out["pred"] = out["cell_id"].map(preds["expected_class"])
    out["census"] = g["income"].to_numpy() if "income" in g.columns else np.nan
    out["census_class"] = out["cell_id"].map(preds["true_class"])
    fold = out["cell_id"].map(preds["fold"])
    out["scored_by"] = [f"out-of-fold (fold {int(f)})" if pd.notna(f) else "" for f in fold]
    return out[out["pred"].notna() | out["census"].notna()]


def landuse_per_cell(city_dir: Path) -> pd.DataFrame:
    """``landuse`` (area-weighted mean of rich_score - poor_score over the cell's Urban Atlas polygons)
    and ``landuse_class`` (the class covering most of the cell), by cell_id; empty when the CAM stage
    has not run."""
    path = city_dir / "polygon_stats.gpkg"
    if not path.is_file():
        return pd.DataFrame(columns=["landuse", "landuse_class"])
    s = pd.DataFrame(gpd.read_file(path, ignore_geometry=True))
    s["diff"] = (s["rich_score"] - s["poor_score"]) * s["area"]
    by = s.groupby("cell_id")
    major = s.loc[s.groupby("cell_id")["area"].idxmax(), ["cell_id", "ua_class"]].set_index("cell_id")["ua_class"]
    return pd.DataFrame({"landuse": by["diff"].sum() / by["area"].sum(), "landuse_class": major})


def cam_overlays(cam_dir: Path, cell_ids) -> dict[str, list[tuple[str, tuple]]]:
    """{band name: [(PNG data URI, (left, bottom, right, top)), ...]} of the cells' CAM rasters (bands
    named 'rich' and 'poor'), each band coloured with its own scale and transparent where low."""
    import rasterio
    from matplotlib import colormaps
    from PIL import Image

    out: dict[str, list] = {}
    for cid in cell_ids:
        path = cam_dir / f"{cid}.tif"
        if not path.is_file():
            continue
        with rasterio.open(path) as src:
            step = max(1, max(src.height, src.width) // CAM_PX)
            data = src.read(out_shape=(src.count, max(1, src.height // step), max(1, src.width // step)))
            names = [d or f"band{i + 1}" for i, d in enumerate(src.descriptions)]
            bounds = tuple(src.bounds)
        for name, band in zip(names, data):
            v = np.nan_to_num(band.astype(float), nan=0.0).clip(0, 1)
            rgba = colormaps["Reds" if name == "rich" else "Blues"](v)
            rgba[..., 3] = v * 0.85
            buf = io.BytesIO()
            Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").save(buf, format="PNG")
            out.setdefault(name, []).append((rp.data_uri(buf.getvalue()), bounds))
    return out


def _colours(values: pd.Series, cmap: str, centred: bool = False) -> tuple[list[str], float, float]:
    """Hex colours of ``values`` on ``cmap`` over their range (symmetric around 0 when ``centred``);
    grey for missing values."""
    from matplotlib import colormaps, colors

    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if centred:
        lo, hi = -max(abs(lo), abs(hi), 1e-12), max(abs(lo), abs(hi), 1e-12)
    scale = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
    cm = colormaps[cmap]
    return [colors.to_hex(cm(s)) if np.isfinite(s) else "#bbbbbb" for s in scale], lo, hi


def _path(geom, x0: float, y1: float) -> str:
    """SVG path data of a (multi)polygon, in metres from the map's top-left corner."""
    polys = getattr(geom, "geoms", [geom])
    parts = []
    for p in polys:
        for ring in [p.exterior, *p.interiors]:
            xy = np.asarray(ring.coords)
            parts.append("M" + "L".join(f"{x - x0:.1f} {y1 - y:.1f}" for x, y in xy[:, :2]) + "Z")
    return "".join(parts)


def _fmt(v, digits: int) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return f"{f:.{digits}f}" if np.isfinite(f) else ""


def city_map(ses_dir: Path, city: str, map_id: str) -> str:
    """The SVG and its controls for one city; a 'not run yet' note when no cell table is there."""
    cells = cell_values(ses_dir, city)
    if cells is None or cells.empty:
        return rp.not_run(f"{city}: map of predicted and census income", "efficientnet_training.py")
    lu = landuse_per_cell(ses_dir / city)
    cells = cells.join(lu, on="cell_id")
    x0, y0, x1, y1 = cells.total_bounds
    w, h = x1 - x0, y1 - y0
    fills = {key: _colours(cells[key], cmap, centred=key == "landuse") for key, _, cmap in LAYERS}
    shapes = []
    for i, row in enumerate(cells.itertuples(index=False)):
        attrs = " ".join(f'data-c-{key}="{fills[key][0][i]}"' for key, _, _ in LAYERS)
        shapes.append(f'<path d="{_path(row.geometry, x0, y1)}" fill="{fills["pred"][0][i]}" {attrs} '
                      f'data-cell="{rp.esc(row.cell_id)}" data-pred="{_fmt(row.pred, 2)}" '
                      f'data-census="{_fmt(row.census, 0)}" data-census-class="{_fmt(row.census_class, 0)}" '
                      f'data-landuse="{_fmt(row.landuse, 4)}" data-landuse-class="{rp.esc(_fmt(row.landuse_class, 0))}" '
                      f'data-scored="{rp.esc(row.scored_by)}"></path>')
    step = -(-len(cells) // CAM_CELLS)
    overlays = cam_overlays(ses_dir / city / "cams", cells["cell_id"].iloc[::step])
    cam_layers = "".join(
        f'<g class="cam" data-band="{rp.esc(band)}" style="display:none;pointer-events:none">'
        + "".join(f'<image href="{uri}" x="{b[0] - x0:.1f}" y="{y1 - b[3]:.1f}" width="{b[2] - b[0]:.1f}" '
                  f'height="{b[3] - b[1]:.1f}" preserveAspectRatio="none"></image>' for uri, b in items) + "</g>"
        for band, items in overlays.items())
    legend = "".join(f'<label><input type="radio" name="{map_id}-fill" value="{key}"{" checked" if key == "pred" else ""}> '
                     f'{rp.esc(text)} <small>({_fmt(fills[key][1], LEGEND_DIGITS[key])} to {_fmt(fills[key][2], LEGEND_DIGITS[key])})</small></label><br>'
                     for key, text, _ in LAYERS)
    cams = ("".join(f'<label><input type="checkbox" class="cam-toggle" value="{rp.esc(b)}"> CAM overlay: {rp.esc(b)}</label><br>'
                    for b in overlays) if overlays else rp.not_run("CAM overlays", "gradcaming_urban_areas.py"))
    if overlays and step > 1:
        cams += f"<small>CAM overlays on one cell in {step} ({len(next(iter(overlays.values())))} cells)</small><br>"
    return (f'<div class="map" id="{map_id}"><svg viewBox="0 0 {w:.1f} {h:.1f}" xmlns="http://www.w3.org/2000/svg">'
            f'<g class="cells">{"".join(shapes)}</g>{cam_layers}</svg>'
            f'<div class="info"><b>colour cells by</b><br>{legend}{cams}'
            f'<p class="cell-info">hover or click a cell</p>'
            f'<p>{len(cells)} cells of 200 m, EPSG:3035; grey: no value.</p></div></div>')


# One script for every map on the page: colour switch, CAM toggles, the hovered / clicked cell's values.
SCRIPT = """
document.querySelectorAll('.map').forEach(function(m){
 var info=m.querySelector('.cell-info'),pinned=null;
 function show(p){var d=p.dataset;info.innerHTML='<b>'+d.cell+'</b><br>predicted class: '+(d.pred||'-')+
  '<br>census income: '+(d.census||'-')+' (class '+(d.censusClass||'-')+')<br>land-use score: '+(d.landuse||'-')+
  '<br>main land use: '+(d.landuseClass||'-')+'<br>scored: '+(d.scored||'-');}
 m.querySelectorAll('path').forEach(function(p){
  p.addEventListener('mouseenter',function(){if(!pinned)show(p);});
  p.addEventListener('click',function(){if(pinned)pinned.classList.remove('sel');pinned=(pinned===p)?null:p;
   if(pinned){p.classList.add('sel');show(p);}});});
 m.querySelectorAll('input[type=radio]').forEach(function(r){r.addEventListener('change',function(){
  m.querySelectorAll('path').forEach(function(p){p.setAttribute('fill',p.getAttribute('data-c-'+r.value));});});});
 m.querySelectorAll('.cam-toggle').forEach(function(c){c.addEventListener('change',function(){
  m.querySelectorAll('g.cam').forEach(function(g){if(g.getAttribute('data-band')===c.value)g.style.display=c.checked?'':'none';});});});
});
"""
