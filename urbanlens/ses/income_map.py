"""The steps of predict_income.py for one city's models: the area's grid cells that orthophotos cover,
cut and scored out-of-fold where a fold trained on them (or the shards' tables merged), and the outputs
read from the table: the map on the 200 m grid, its figures and its agreement with known incomes."""
from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from ..core import files, shards
from ..core.config import data_dir
from . import agreement, extraction, prediction, urban_atlas
from . import figures as ses_figures
from . import tiles as ses_tiles
from .grid import LAEA
from .world import TRUTH_CELLS


def area_cells(cfg, area_file, city: str, ses_dir: Path, n_models: int) -> gpd.GeoDataFrame:
    """The grid cells of the area (``area_file``'s polygons, or the city's Urban Atlas boundary) that an
    orthophoto tile of ``ses.ortho_product`` covers, census or not, with their census income and image path."""
    area = prediction.read_area(area_file) if area_file else \
        urban_atlas.read_ua_boundary(data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary).geometry.union_all()
    tiles = ses_tiles.read_tile_index(data_dir(cfg, cfg.ses.aerial_dir), product=cfg.ses.ortho_product)
    grid = prediction.grid_cells(area, cfg.ses.cell_size_m)
    cells = prediction.covered(grid, tiles)
    cells["city"] = city
    cells["census_income"] = prediction.census_income(cells, data_dir(cfg, cfg.ses.census_file))
    cells["path"] = prediction.image_paths(cells["cell_id"], cfg, ses_dir, city)
    print(f"[predict] {city}: {len(cells)} cells of the area covered by {cfg.ses.ortho_product} orthophotos "
          f"({len(grid) - len(cells)} uncovered left out), {int(np.isfinite(cells['census_income']).sum())} of them "
          f"in the census; {n_models} fold models")
    return cells


def merged(parts: list[Path], cells: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The shards' tables, checked and put in the cell-id order of an unsharded run's ``cells``."""
    table = shards.merge_in_order([gpd.read_file(p, layer="cells") for p in parts], cells["cell_id"],
                                  names=[p.name for p in parts])
    return gpd.GeoDataFrame(table, geometry="geometry", crs=LAEA)


def scored(cells: gpd.GeoDataFrame, cfg, ses_dir: Path, city: str, models, size: int, edges, place):
    """Each cell cut (resumable); the non-void ones scored, out-of-fold where a fold trained on them.
    Returns the table (the columns of predicted/cells.gpkg) and how many cells were cut now."""
    status = extraction.extract_cells(cells, ses_dir, px=cfg.ses.cell_px, workers=cfg.workers)
    cells["nodata"] = status["nodata"].round(6)
    cells["non_void"] = cells["nodata"] <= cfg.ses.max_nodata
    scored = cells[cells["non_void"]]
    trained = prediction.trained_on(ses_dir / city / prediction.FOLDS_CSV, scored["cell_id"], len(models))
    needs, scored_by = prediction.scoring_plan(trained)
    probs = prediction.score(models, [ses_dir / p for p in scored["path"]], size, place,
                             cfg.ses.predict.batch_size, needs=needs)
    scores = prediction.summarise(probs).assign(scored_by=scored_by).set_index(scored.index).reindex(cells.index)
    scores["scored_by"] = scores["scored_by"].fillna(prediction.VOID)
    table = pd.concat([cells[["cell_id", "city"]], scores, cells[["census_income"]]], axis=1)
    table["observed_class"] = prediction.observed_class(table["census_income"], edges) if edges else np.nan
    table = gpd.GeoDataFrame(table.join(cells[["non_void", "nodata", "path"]]), geometry=cells.geometry, crs=LAEA)
    return table, int(status["extracted"].sum())


def write_map(out: Path, table: gpd.GeoDataFrame, cfg, city: str, edges) -> dict:
    """expected_class.tif (its stops named by the classes of the quintile ``edges``), income_class.tif (the
    expected class rounded, with colours and class names), figures/predicted_map.png, agreement.json and,
    with 3 or more census cells scored out-of-fold, figures/observed_vs_predicted.png; returns the
    agreement groups."""
    names = prediction.class_names(edges)
    prediction.write_grid_tif(out / "expected_class.tif", table["cell_id"],
                              {"expected_class": table["expected_class"], "fold_spread": table["fold_spread"]},
                              labels=names)
    prediction.write_class_tif(out / "income_class.tif", table["cell_id"], table["expected_class"], names)
    files.save_figure(ses_figures.predicted_map_figure(table, city), out / "figures" / "predicted_map.png")
    groups = agreement_groups(table, data_dir(cfg, TRUTH_CELLS), city, cfg.ses.train.block_m, cfg.seed)
    files.write_json(out / "agreement.json", {"city": city, **groups,
                                              "cells_by_scoring": table["scored_by"].value_counts().to_dict()})
    oof = groups["census_out_of_fold"]
    if oof["n"] >= 3:
        known = table[prediction.is_out_of_fold(table["scored_by"]) & np.isfinite(table["census_income"])]
        files.save_figure(ses_figures.observed_vs_predicted_figure(known, city, oof["rho"], oof["p_one_sided"],
                                                                   "census cells scored out-of-fold"),
                          out / "figures" / "observed_vs_predicted.png")
    return groups


def agreement_groups(table, truth_path, city: str, block_m: float, seed: int) -> dict:
    """The agreement (agreement.agreement) of the withheld cells with their planted income and of the
    census cells scored out-of-fold with their census income; nothing else is mixed in."""
    scored = table["non_void"].astype(bool).to_numpy() & np.isfinite(table["expected_class"].to_numpy(float))
    planted = table["cell_id"].map(agreement.withheld_truth(truth_path, city)).to_numpy(float)
    withheld = scored & np.isfinite(planted) & (table["scored_by"] == prediction.NOT_TRAINED).to_numpy()
    oof = scored & prediction.is_out_of_fold(table["scored_by"]) & np.isfinite(table["census_income"].to_numpy(float))
    return {
        "withheld": agreement.agreement(table["expected_class"][withheld], planted[withheld],
                                        table["cell_id"][withheld], block_m, "withheld cells (no fold trained on "
                                        "them), scored by the mean of all folds", "planted income", seed),
        "census_out_of_fold": agreement.agreement(table["expected_class"][oof], table["census_income"][oof],
                                                  table["cell_id"][oof], block_m, "census cells scored out-of-fold",
                                                  "census income", seed),
    }


def describe(table: gpd.GeoDataFrame, groups: dict) -> str:
    """The closing line's account: cells scored and void, not in the census, mean expected class, agreement."""
    scored = table["non_void"].astype(bool)
    return (f"{int(scored.sum())} of {len(table)} cells scored ({int((~scored).sum())} void), "
            f"{len(table) - int(np.isfinite(table['census_income']).sum())} not in the census; mean expected class "
            f"{np.nanmean(table['expected_class']):.2f}; "
            + "; ".join(agreement.describe(g) for g in groups.values() if g["n"]))
