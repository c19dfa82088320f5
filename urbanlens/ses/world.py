"""Synthetic French world for the SES pipeline, in the layouts and schemas of the real products.

    python -m urbanlens.ses.world --config configs/ses_demo.yaml [--set ses.world.resolution_m=0.2]

Under ``<paths.data>/`` it writes, for every city of ``ses.world.cities``:
- ``UA_data/<FUA>_<CITY>_UA2018_v013/Data/<same>.gpkg``: Urban Atlas 2018 land use (``code_2018``,
  ``class_2018``, EPSG:3035) and its ``..._UA2018_Boundary`` layer;
- ``census_data/<ses.census_file>``: the INSEE 200 m grid (``idcar_200m, ind, men, ind_snv``);
- ``aerial_data/<delivery>/``: 1 km orthophoto tiles in EPSG:2154 rendered from the land use, named
  like IGN's, with a ``dalles.shp`` tile index (column ``NOM``);
- ``ses_truth.json``: the planted income model (``rich_codes``, ``poor_codes``, class effects) and all
  generator parameters;
- ``ses.world.withhold`` > 0: about that share of the populated cells is left out of the census (not of the
  imagery), drawn as single cells (``ses.world.withhold_mode: random``) or as whole ``ses.world.withhold_block_m``
  squares of the EPSG:3035 grid (``blocks``), and ``ses_truth_cells.csv`` has every cell's planted income (``cell_id, city, income, withheld``).

A city is a square of ``ses.world.city_size_m`` in EPSG:3035: a street grid of irregular blocks, a dense
centre, residential rings, an industrial sector crossed by a motorway, a railway, a river, parks and
sports grounds, fields and forest at the edge. The income of a cell is
``base * exp(sum_c effect_c * share_c + noise * field)``, where ``share_c`` is the cell's area share of
land-use class ``c`` and ``field`` a smooth Gaussian field of unit variance. Textures are functions of
ground coordinates, so tiles join without seams and any resolution (2 m demo, 0.20 m IGN) can be
rendered tile by tile in bounded memory. Same config and seed give byte-identical files.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import rasterio
import rasterio.shutil
import shapely
from affine import Affine
from pyproj import Transformer
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from tqdm import tqdm

from ..core import runs
from ..core.config import cli, data_dir
from ..core.errors import ConfigError
from ..core.files import atomic_path, read_json, save_run_config, write_csv, write_json
from . import world_leakage, world_structure
from .grid import L93, LAEA
from .world_plan import (
    BASE_INCOME,
    CELL_M,
    CLASS_EFFECTS,
    DENSITY,
    HOUSEHOLD_SIZE,
    NOISE_SIGMA_CELLS,
    POOR_CODES,
    RICH_CODES,
    UA_CLASSES,
    City,
    census_for_city,
    city_rng,
    plan_city,
    withheld_cells,
)
from .world_textures import LABELS, OUTSIDE, TEXTURES, render_pixels

GENERATOR_VERSION = 1


FIXED_DATE = "2021-01-01"   # written where formats store a date, so that files are byte-identical


def tile_affine_3035(bounds, width: int, height: int) -> Affine:
    """Affine map from a tile's (col, row) to EPSG:3035; exact to well under a millimetre over 1 km."""
    left, bottom, right, top = bounds
    t = Transformer.from_crs(L93, LAEA, always_xy=True)
    (x0, x1, x2), (y0, y1, y2) = t.transform([left, right, left], [top, top, bottom])
    return Affine((x1 - x0) / width, (x2 - x0) / height, x0, (y1 - y0) / width, (y2 - y0) / height, y0)


@dataclass
class TileJob:
    path: str
    bounds: tuple          # EPSG:2154
    res: float
    shapes: list           # (geometry EPSG:3035, label) of the land use near the tile
    nodata: list           # geometries (EPSG:2154) left as nodata
    driver: str
    leakage: float = 0.0   # ses.world.leakage: strength of the planted district cast (world_leakage)
    seed: int = 0
    structure: float = 0.0  # ses.world.structure: houses on a lot lattice, arranged or scattered (world_structure)


def render_tile(job: TileJob, max_pixels: int = 1_000_000) -> str:
    """Render one orthophoto tile strip by strip (memory bounded), then write it atomically."""
    left, bottom, right, top = job.bounds
    width, height = round((right - left) / job.res), round((top - bottom) / job.res)
    a3035 = tile_affine_3035(job.bounds, width, height)
    native = from_origin(left, top, job.res, job.res)
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=L93,
                   transform=native, nodata=0, tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", photometric="RGB")
    out = Path(job.path)
    with atomic_path(out) as final_tmp:
        work = final_tmp if job.driver == "GTiff" else final_tmp.with_name(final_tmp.stem + ".work.tif")
        try:
            with rasterio.open(work, "w", **profile) as dst:
                rows = max(1, min(height, max_pixels // width))
                for r0 in range(0, height, rows):
                    h = min(rows, height - r0)
                    strip_3035 = a3035 @ Affine.translation(0, r0)
                    labels = rasterize(job.shapes, out_shape=(h, width), transform=strip_3035,
                                       fill=LABELS.index(OUTSIDE), dtype="uint8") if job.shapes else \
                        np.full((h, width), LABELS.index(OUTSIDE), np.uint8)
                    cols, rr = np.meshgrid(np.arange(width) + 0.5, np.arange(h) + 0.5)
                    x, y = strip_3035 @ (cols.ravel(), rr.ravel())
                    x, y = np.asarray(x), np.asarray(y)
                    rgb = render_pixels(labels.ravel(), x, y)
                    if job.structure > 0:
                        codes = np.asarray(LABELS)[labels.ravel()]
                        rgb = world_structure.redraw_houses(rgb, codes, x, y, job.structure, job.seed)
                    rgb = world_leakage.tint(rgb, x, y, job.leakage, job.seed).reshape(h, width, 3)
                    if job.nodata:
                        hole = rasterize([(g, 1) for g in job.nodata], out_shape=(h, width),
                                         transform=native @ Affine.translation(0, r0), fill=0, dtype="uint8")
                        rgb[hole.astype(bool)] = 0
                    dst.write(rgb.transpose(2, 0, 1), window=Window(0, r0, width, h))
            if job.driver != "GTiff":
                with rasterio.Env(GDAL_PAM_ENABLED="NO"):   # no .aux.xml beside the temporary name
                    levels = max(1, min(5, int(math.log2(max(1, min(width, height) // 32))) + 1))
                    rasterio.shutil.copy(work, final_tmp, driver=job.driver, REVERSIBLE="YES", QUALITY="100",
                                         RESOLUTIONS=str(levels), BLOCKXSIZE="512", BLOCKYSIZE="512")
        finally:
            if work != final_tmp and work.exists():
                work.unlink()
    return job.path


def res_token(res: float) -> str:
    """IGN resolution token: 0.2 -> '0M20', 2.0 -> '2M00'."""
    cm = int(round(res * 100))
    return f"{cm // 100}M{cm % 100:02d}"


def tile_name(dept: str, left: float, top: float, res: float, ext: str) -> str:
    return f"{dept}-2021-{int(round(left / 1000)):04d}-{int(round(top / 1000)):04d}-LA93-{res_token(res)}-E080.{ext}"


def tile_bounds(city: City, tile_m: float) -> list[tuple]:
    """The km-aligned Lambert-93 tiles covering a city's square."""
    x0, y0 = city.origin
    left, bottom, right, top = transform_bounds(LAEA, L93, x0, y0, x0 + city.size, y0 + city.size, densify_pts=21)
    xs = np.arange(math.floor(left / tile_m) * tile_m, right, tile_m)
    ys = np.arange(math.floor(bottom / tile_m) * tile_m, top, tile_m)
    return [(float(x), float(y), float(x + tile_m), float(y + tile_m)) for y in ys[::-1] for x in xs]


def nodata_zones(city: City, tiles: list[tuple], fraction: float, seed: int) -> list:
    """Rectangles (EPSG:2154) totalling ``fraction`` of the tiles' area: one over the city, one anywhere."""
    if fraction <= 0:
        return []
    rng = city_rng(seed, city.name, "nodata")
    area = fraction * sum((b[2] - b[0]) * (b[3] - b[1]) for b in tiles)
    x0, y0 = city.origin
    cx, cy = Transformer.from_crs(LAEA, L93, always_xy=True).transform(x0 + city.size / 2, y0 + city.size / 2)
    span = [(cx, cy, 0.3 * city.size)]
    left, bottom = min(b[0] for b in tiles), min(b[1] for b in tiles)
    right, top = max(b[2] for b in tiles), max(b[3] for b in tiles)
    span.append(((left + right) / 2, (bottom + top) / 2, (right - left) / 2))
    zones = []
    for mx, my, r in span:
        w = math.sqrt(2 * area / len(span))     # 2:1 rectangles sharing the area
        h = area / len(span) / w
        if rng.random() < 0.5:
            w, h = h, w
        x, y = mx + rng.uniform(-r, r), my + rng.uniform(-r, r)
        zones.append(shapely.box(x - w / 2, y - h / 2, x + w / 2, y + h / 2))
    return zones


@contextlib.contextmanager
def fixed_gpkg_date():
    """GDAL stamps GeoPackages with the current time unless told which date to write."""
    before = pyogrio.get_gdal_config_option("OGR_CURRENT_DATE")
    pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": f"{FIXED_DATE}T00:00:00.000Z"})
    try:
        yield
    finally:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": before})


def write_gpkg_layers(path: Path, layers: list[tuple[str, gpd.GeoDataFrame]]) -> None:
    with fixed_gpkg_date(), atomic_path(path) as tmp:
        for name, gdf in layers:
            gdf.to_file(tmp, layer=name, driver="GPKG", engine="pyogrio")


def write_shapefile(path: Path, gdf: gpd.GeoDataFrame) -> None:
    """A shapefile written in a temporary folder, moved in place part by part (.shp last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp:
        gdf.to_file(Path(tmp) / path.name, driver="ESRI Shapefile", engine="pyogrio",
                    DBF_DATE_LAST_UPDATE=FIXED_DATE, ENCODING="UTF-8")
        parts = sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == ".shp")
        for part in parts:
            os.replace(part, path.with_suffix(part.suffix))


def aerial_driver() -> tuple[str, str]:
    with rasterio.Env() as env:
        return ("JP2OpenJPEG", "jp2") if "JP2OpenJPEG" in env.drivers() else ("GTiff", "tif")


RUN_KEYS = ("seed", "ses.world", "ses.census_file", "ses.ua_dir", "ses.aerial_dir")  # what the world is made from


STAMP = "synth_france.stamp.json"  # the run stamp (urbanlens.core.runs) in <paths.data>


def run_extra() -> dict:
    """What the world depends on besides the config: the generator's version, the tile format."""
    return {"generator_version": GENERATOR_VERSION, "aerial_format": aerial_driver()[0]}


TRUTH_CELLS = "ses_truth_cells.csv"  # planted income of every populated cell, written when cells are withheld


def world_params(cfg) -> dict:
    """The parameters of the world, as recorded in ses_truth.json."""
    france = cfg.ses.world.to_dict()
    return {"generator_version": GENERATOR_VERSION, "seed": cfg.seed, "france": france,
            "census_file": cfg.ses.census_file, "ua_dir": cfg.ses.ua_dir, "aerial_dir": cfg.ses.aerial_dir,
            "aerial_format": aerial_driver()[0]}


def ua_layers(city: City) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """The land-use and boundary layers with the columns of the Urban Atlas 2018 GeoPackage."""
    lu = city.landuse.copy()
    lu.insert(0, "country", "FR")
    lu.insert(1, "fua_name", city.name)
    lu.insert(2, "fua_code", city.fua)
    lu["identifier"] = [f"{i}-{city.fua}" for i in range(1, len(lu) + 1)]
    lu["area"], lu["perimeter"] = lu.area.round(2), lu.length.round(2)
    lu["geometry"] = [shapely.MultiPolygon([g]) for g in lu.geometry]
    boundary = gpd.GeoDataFrame({"country": ["FR"], "fua_name": [city.name], "fua_code": [city.fua]},
                                geometry=[shapely.MultiPolygon([city.boundary])], crs=LAEA)
    return lu, boundary


def tile_jobs(city: City, delivery: Path, fr, seed: int, driver: str, ext: str) -> tuple[list, gpd.GeoDataFrame]:
    """The rendering job of each of a city's tiles and the tile index (NOM, EPSG:2154)."""
    tiles = tile_bounds(city, float(fr.tile_size_m))
    holes = nodata_zones(city, tiles, float(fr.nodata_fraction), seed)
    labelled = [(g, LABELS.index(c if c in TEXTURES else "21000"))
                for g, c in zip(city.landuse.geometry.values, city.landuse["code_2018"])]
    tree = shapely.STRtree([g for g, _ in labelled])
    to_3035 = Transformer.from_crs(L93, LAEA, always_xy=True)
    jobs, names = [], []
    for b in tiles:
        nom = tile_name(city.dept, b[0], b[3], float(fr.resolution_m), ext)
        footprint = shapely.Polygon(np.c_[to_3035.transform(*shapely.box(*b).segmentize(50).exterior.coords.xy)])
        near = [labelled[i] for i in sorted(tree.query(footprint.buffer(10)))]
        hole = [h for h in holes if h.intersects(shapely.box(*b))]
        jobs.append(TileJob(str(delivery / "1_DONNEES_LIVRAISON" / nom), b, float(fr.resolution_m), near, hole, driver,
                            float(fr.leakage), seed, float(fr.structure)))
        names.append(nom)
    index = gpd.GeoDataFrame({"NOM": names}, geometry=[shapely.box(*b) for b in tiles], crs=L93)
    index.attrs["nodata_zones"] = [list(h.bounds) for h in holes]
    return jobs, index


def build_world(cfg, progress: bool = True) -> dict:
    """Write the synthetic world under ``paths.data``; return the truth record (also ses_truth.json)."""
    fr, seed = cfg.ses.world, cfg.seed
    root = data_dir(cfg)
    if len(fr.cities) < 1:
        raise ConfigError("config: ses.world.cities is empty; list the city names, e.g. [Paris, Lyon]")
    driver, ext = aerial_driver()
    files, cities_info, census_parts, truth_parts, jobs = [], {}, [], [], []
    for index, name in enumerate(fr.cities):
        city = plan_city(name, index, float(fr.city_size_m), seed, float(fr.house_share))
        # Urban Atlas: <FUA>_<CITY>_UA2018_v013/Data/<same>.gpkg with a land-use and a boundary layer
        ua_path = root / cfg.ses.ua_dir / city.stem / "Data" / f"{city.stem}.gpkg"
        landuse, boundary = ua_layers(city)
        write_gpkg_layers(ua_path, [(city.stem[:-5], landuse), (f"{city.stem[:-5]}_Boundary", boundary)])
        files.append(ua_path)
        # census cells and planted income
        census, truth = census_for_city(city, float(fr.noise), seed, float(fr.leakage), float(fr.structure))
        truth.insert(1, "city", name)
        truth["withheld"] = withheld_cells(city, truth["cell_id"], float(fr.withhold), seed, fr.withhold_mode,
                                           float(fr.withhold_block_m))
        census_parts.append(census[~census["idcar_200m"].isin(truth.loc[truth["withheld"], "cell_id"])])
        truth_parts.append(truth)
        # orthophotos: one delivery per department, tiles rendered below, tile index now
        delivery = (root / cfg.ses.aerial_dir /
                    f"BDORTHO_RVB-{res_token(fr.resolution_m)}_{ext.upper()}-E080_LAMB93_D0{city.dept}_2021")
        city_jobs, tile_index = tile_jobs(city, delivery, fr, seed, driver, ext)
        jobs += city_jobs
        index_path = delivery / "3_SUPPLEMENTS_LIVRAISON" / "dalles.shp"
        write_shapefile(index_path, tile_index)
        files += [index_path.with_suffix(s) for s in (".shp", ".shx", ".dbf", ".prj", ".cpg")]
        cities_info[name] = {"fua_code": city.fua, "department": city.dept, "origin_3035": list(city.origin),
                             "size_m": city.size, "poor_sector_angle_rad": round(city.poor_angle, 6),
                             "ua_polygons": len(landuse), "census_cells": len(census_parts[-1]),
                             "tiles": len(tile_index), "nodata_zones_2154": tile_index.attrs["nodata_zones"],
                             **({"withheld_cells": int(truth["withheld"].sum())} if fr.withhold > 0 else {}),
                             **({"arranged_cells": int(truth["arranged"].sum())} if fr.structure > 0 else {})}
    census_path = root / cfg.ses.census_file
    census = gpd.GeoDataFrame(pd.concat(census_parts, ignore_index=True), crs=LAEA)
    census = census.drop_duplicates("idcar_200m").sort_values("idcar_200m").reset_index(drop=True)
    write_gpkg_layers(census_path, [("carreaux_200m_met", census)])
    files.append(census_path)
    if fr.withhold > 0:  # where the census is missing, the planted income is known here only
        cells_truth = pd.concat(truth_parts, ignore_index=True)[["cell_id", "city", "income", "withheld"]]
        write_csv(cells_truth.assign(income=cells_truth["income"].round(2)), root / TRUTH_CELLS)
        files.append(root / TRUTH_CELLS)
    render_all(jobs, int(cfg.workers), progress)
    files += [Path(j.path) for j in jobs]
    truth = {
        "rich_codes": RICH_CODES, "poor_codes": POOR_CODES,
        "class_effects": CLASS_EFFECTS,
        "class_names": {c: UA_CLASSES[c] for c in sorted(CLASS_EFFECTS)},
        "income_model": "income = base_income * exp(sum_c class_effects[c] * area_share_c + noise * field); "
                        "field: Gaussian white noise on the 200 m grid smoothed with sigma noise_sigma_cells, "
                        "scaled to unit variance; ind_snv = income * ind",
        "base_income": BASE_INCOME, "noise": float(fr.noise), "noise_sigma_cells": NOISE_SIGMA_CELLS,
        "leakage": {"strength": float(fr.leakage), "district_m": world_leakage.DISTRICT_M,
                    "model": "log income += strength * shift; colour += strength * tint_levels * cast; "
                             "(cast, shift) random per district, flat inside it, smoothstep across a seam of seam_m "
                             "either side of each border", "seam_m": world_leakage.SEAM_M,
                    "tint_levels": world_leakage.TINT_LEVELS},
        **({"structure": {"strength": float(fr.structure), "classes": list(world_structure.HOUSE_CODES),
                          "lots_m_and_house_share": {c: list(v) for c, v in world_structure.LOTS.items()},
                          "margin_m": world_structure.MARGIN_M, "effect": world_structure.STRUCTURE_EFFECT,
                          "model": "log income = (1 - strength) * sum_c class_effects[c] * area_share_c + strength "
                                   "* effect * a * (area share of classes) + noise * field; a = +1 where the cell is "
                                   "arranged (every house at the same place in its lot), -1 where it is scattered "
                                   "(each house at a random place in its lot); same houses, colours and built-up "
                                   "share either way"}}
           if fr.structure > 0 else {}),
        "population_density_per_ha": DENSITY, "household_size": HOUSEHOLD_SIZE,
        "cell_size_m": CELL_M, "params": world_params(cfg), "seed": seed, "cities": cities_info,
        "composition_r2": _composition_r2(pd.concat(truth_parts, ignore_index=True)),
        "files": sorted(str(p.relative_to(root)) for p in files),
    }
    runs.write_stamp(root / STAMP, "python -m urbanlens.ses.world", cfg, RUN_KEYS, extra=run_extra())
    write_json(root / "ses_truth.json", truth)  # last: a world without it is incomplete
    return truth


def render_all(jobs: list[TileJob], workers: int, progress: bool = True) -> None:
    """Render the tiles, in ``workers`` processes."""
    bar = tqdm(total=len(jobs), desc="orthophoto tiles", unit="tile", disable=not progress)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            render_tile(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(render_tile, jobs):
                bar.update()
    bar.close()


def _composition_r2(truth: pd.DataFrame) -> float:
    """Share of log-income variance explained by land-use composition (the learnable part)."""
    comp = sum(truth.get(f"share_{c}", 0.0) * e for c, e in CLASS_EFFECTS.items())
    li = np.log(truth["income"])
    return round(float(np.corrcoef(comp, li)[0, 1] ** 2), 4) if len(truth) > 2 else float("nan")


def existing_world(cfg) -> dict | None:
    """The truth record of a complete world already under paths.data, or None."""
    path = data_dir(cfg, "ses_truth.json")
    return read_json(path) if path.is_file() else None


def remove_world(cfg, truth: dict) -> None:
    """Delete the files a previous synthetic world listed (nothing else)."""
    root = data_dir(cfg)
    for rel in truth.get("files", []):
        (root / rel).unlink(missing_ok=True)
    for name in ("ses_truth.json", TRUTH_CELLS, STAMP, "world_config.yaml"):
        (root / name).unlink(missing_ok=True)


def main() -> None:
    cfg, _ = cli("Build the synthetic French world (Urban Atlas, INSEE grid, IGN-like orthophotos).",
                 "configs/ses_demo.yaml")
    root = data_dir(cfg)
    old = existing_world(cfg)
    if old is not None:
        changed = runs.compare(root / STAMP, cfg, RUN_KEYS, extra=run_extra())
        if not changed:
            print(f"[synth_france] world already built in {root} for this config and seed "
                  f"({root / 'ses_truth.json'}); nothing to do")
            return
        if not cfg.overwrite:
            runs.refuse(root / "ses_truth.json", "a synthetic world with other parameters is there", changed,
                        "use --set overwrite=true to replace it, or another paths.data")
        remove_world(cfg, old)
    start = time.time()
    truth = build_world(cfg)
    save_run_config(cfg, root, "world_config.yaml")  # the full config (seed included) beside the world
    cells = sum(c["census_cells"] for c in truth["cities"].values())
    tiles = sum(c["tiles"] for c in truth["cities"].values())
    print(f"[synth_france] {len(truth['cities'])} cities, {cells} census cells, {tiles} tiles "
          f"({truth['params']['aerial_format']}, {cfg.ses.world.resolution_m} m) in {time.time() - start:.1f} s "
          f"-> {root} (truth: {root / 'ses_truth.json'})")


if __name__ == "__main__":
    from ..core.entry import run

    run(main)
