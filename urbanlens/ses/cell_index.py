"""The extraction stage's cell index (generate_fr_ua_aerial_data.py): the orthophoto tile index, each
city's census cells inside its Urban Atlas boundary with the tiles they overlap, the cells' images read
(or the shards' partial indexes merged) and the index written as ``cells.gpkg``."""
from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pandas as pd

from ..core import gis_style, outputs, shards
from ..core.config import data_dir
from ..core.files import atomic_path
from . import census as ses_census
from . import extraction, urban_atlas
from . import tiles as ses_tiles
from .grid import LAEA

COLUMNS = ["cell_id", "city", "income", "imputed", "imputed_policy", "ortho_product", "path", "non_void", "nodata",
           "geometry"]  # the index's columns, in order


def read_tiles(cfg) -> tuple[gpd.GeoDataFrame, str]:
    """The tile index of ``ses.ortho_product`` (EPSG:2154), described in two lines, and the images' folder
    (``imagery``, or ``imagery-<product>`` for other than RVB)."""
    product = cfg.ses.ortho_product  # RVB, or IRC on purpose: a cell is never read from both
    tiles = ses_tiles.read_tile_index(data_dir(cfg, cfg.ses.aerial_dir), product=product)
    print(f"[extract] {len(tiles)} {product} orthophoto tiles indexed"
          + (f" ({tiles.attrs['missing']} listed but absent on disk, e.g. {tiles.attrs['missing_names'][0]})"
             if tiles.attrs["missing"] else "")
          + (f"; {tiles.attrs['other_product']} tiles of the other product ignored (ses.ortho_product={product})"
             if tiles.attrs["other_product"] else ""))
    print(f"[extract] tile index(es): {', '.join(tiles.attrs['indexes'])}" + (
        f"; {len(tiles.attrs['unlisted'])} raster file(s) named in no index, not used (e.g. "
        f"{tiles.attrs['unlisted'][0]})" if tiles.attrs["unlisted"] else ""))
    return tiles, "imagery" if product == "RVB" else f"imagery-{product}"


def cities_cells(cfg, tiles: gpd.GeoDataFrame, imagery: str) -> tuple[gpd.GeoDataFrame, dict, dict, dict]:
    """Per city of ``ses.cities``: the census cells inside its Urban Atlas boundary, with income and the
    tiles they overlap (a cell inside two boundaries: the first city's only). Returns the cells (EPSG:3035),
    the INSEE-imputed cells kept and dropped, the census rows dropped per city and why, and the files used."""
    product = cfg.ses.ortho_product
    frames, imputed_count, taken, counts = [], {"keep": 0, "drop": 0}, set(), {}
    census_path, census_note = ses_census.find_census(data_dir(cfg, cfg.ses.census_file))
    print(f"[extract] {census_note}")
    used = {"census": str(census_path), "tile_indexes": tiles.attrs.get("indexes", []), "urban_atlas": {}}
    for city in cfg.ses.cities:
        boundary = urban_atlas.read_ua_boundary(data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary)
        print(f"[extract] {urban_atlas.describe(city, boundary)}")
        used["urban_atlas"][city] = urban_atlas.sources(boundary)
        census = ses_census.read_census(census_path, bbox=boundary.total_bounds)
        cells, n_taken = extraction.drop_taken(extraction.cells_in_boundary(census, boundary), taken)
        taken.update(cells["cell_id"])  # a cell inside two overlapping boundaries: the first city's only
        cells, n_imputed = ses_census.apply_imputed(cells, cfg.ses.imputed)  # INSEE's i_est_200 = 1
        cells = extraction.sample_cells(cells, cfg.ses.max_cells, cfg.seed).copy()
        cells["city"], cells["ortho_product"], cells["imputed_policy"] = city, product, cfg.ses.imputed
        cells["path"] = [f"{imagery}/{city}/{extraction.cell_filename(c)}" for c in cells["cell_id"]]
        cells["tiles"] = ses_tiles.tiles_for_cells(cells, tiles)
        imputed_count[cfg.ses.imputed] += n_imputed
        counts[city] = {"without_income": census.attrs["dropped"], "malformed_ids": len(census.attrs["malformed"]),
                        "duplicate_rows": census.attrs["duplicates"], "in_an_earlier_city": n_taken}
        print(f"[extract] {city}: {len(cells)} cells inside the Urban Atlas boundary "
              f"({census.attrs['dropped']} census cells without income dropped, {n_imputed} imputed by INSEE "
              f"{'kept' if cfg.ses.imputed == 'keep' else 'dropped'}, "
              f"{int((cells['tiles'].str.len() == 0).sum())} cells outside every tile"
              + extraction.census_drops(census.attrs, n_taken) + ")")
        frames.append(cells)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=LAEA), imputed_count, counts, used


def merged(parts: list[Path], cells: gpd.GeoDataFrame) -> tuple[gpd.GeoDataFrame, pd.DataFrame]:
    """The shards' partial indexes, checked and put in the order of an unsharded run's ``cells``, and an
    extraction status of nothing extracted now."""
    partial = [outputs.read_gpkg(p, "cells", "generate_fr_ua_aerial_data.py --shard") for p in parts]
    index = shards.merge_in_order(partial, cells["cell_id"], names=[p.name for p in parts])
    cells = gpd.GeoDataFrame(index, geometry="geometry", crs=LAEA)
    return cells, pd.DataFrame({"extracted": [False] * len(cells)})


def extract(cells: gpd.GeoDataFrame, out: Path, index_path: Path, cfg) -> pd.DataFrame:
    """Every cell read from its tile(s), reprojected to EPSG:3035, and saved (those an earlier run of
    ``index_path`` wrote are kept); sets the cells' ``nodata`` and ``non_void``; returns the status."""
    known = {}
    if index_path.is_file():
        old = outputs.read_gpkg(index_path, "cells", "generate_fr_ua_aerial_data.py", ["path", "nodata"],
                                extraction.INDEX_FIX, columns=["path", "nodata"], ignore_geometry=True)
        known = dict(zip(old["path"], old["nodata"]))
    status = extraction.extract_cells(cells, out, px=cfg.ses.cell_px, workers=cfg.workers, known=known)
    cells["nodata"] = status["nodata"].round(6)
    extraction.report_failed(status["failed"].dropna().tolist(), cfg.strict)  # unreadable tiles
    cells["non_void"] = cells["nodata"] <= cfg.ses.max_nodata
    return status


def write_index(cells: gpd.GeoDataFrame, index_path: Path) -> None:
    """The cell index, layer ``cells`` of a GeoPackage, columns ``COLUMNS``."""
    with atomic_path(index_path) as tmp:
        cells[COLUMNS].to_file(tmp, layer="cells", driver="GPKG", engine="pyogrio")
        gis_style.style_gpkg(tmp, "cells", "income")


def describe(cells: gpd.GeoDataFrame, status: pd.DataFrame, merged_from: int | None, cfg, imputed_count: dict) -> str:
    """The closing line's account of the cells: extracted, already there, unreadable, void, imputed."""
    done = int(status["extracted"].sum())
    failed = int(status["failed"].notna().sum()) if "failed" in status else 0
    how = f"merged from {merged_from} shards" if merged_from else \
        f"{done} extracted, {len(cells) - done - failed} already there" + (f", {failed} unreadable" if failed else "")
    return (f"{len(cells)} cells ({how}), {int((~cells['non_void']).sum())} void "
            f"(> {cfg.ses.max_nodata:.0%} nodata), {cfg.ses.ortho_product} orthophotos, INSEE-imputed cells: "
            f"{imputed_count['keep']} kept, {imputed_count['drop']} dropped (ses.imputed={cfg.ses.imputed})")
