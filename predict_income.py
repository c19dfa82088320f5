"""Income map of any orthophoto-covered area from a city's trained models, census or no census.

    python predict_income.py --config configs/ses_demo.yaml --city Paris [--area FILE]

The area is the city's Urban Atlas boundary, or the polygons of ``--area`` (any vector file with a CRS).
Every cell of the INSPIRE 200 m grid whose centre lies inside it and that an orthophoto tile of
``ses.ortho_product`` overlaps is cut from the tiles as the extraction stage cuts cells (reusing that
stage's images when it ran with this config), whether or not the census has it. A cell with more than
``ses.max_nodata`` nodata pixels is void and not scored. A cell some fold of the city trained on (the
training or validation part of a fold in ``<results>/ses/<City>/folds.csv``) is scored out-of-fold: by
the fold models (``fold_<k>/best.pt``) that did not train on it, under k-fold the one of the fold that
tested it. Every other cell (not in the census, withheld, or left out of training) gets P(k) averaged
over all fold models. Each model scores only the cells it is needed for. A model trained on images made
otherwise (another orthophoto product, cell size or pixels per cell) is refused, naming the difference.

Writes under ``<paths.results>/ses/<City>/predicted/``: ``cells.gpkg`` (layer ``cells``: cell_id,
expected_class, p_0..p_4, fold_spread (spread of the expected class over the models that scored the
cell; 0 with one), scored_by ('out-of-fold (fold k)', 'all folds (not trained on)', 'void (not
scored)', or 'in-sample (every fold trained on it)', never counted as skill), census_income and observed_class where the census has the cell, non_void, nodata, path,
geometry), ``expected_class.tif`` (EPSG:3035, one pixel per cell, pixel centres on the cell centres;
band 1 expected class, band 2 fold spread, NaN elsewhere), ``income_class.tif`` (the expected class
rounded, uint8, 255 elsewhere, with a colour table and class names), ``agreement.json`` (Spearman between the
expected class and the income, one-sided p and a bootstrap interval over ``ses_train.block_m`` blocks,
separately for the withheld cells against their planted income in ``<data>/ses_truth_cells.csv`` when
there is one, and for the census cells scored out-of-fold against their census income) and
``figures/`` (the map; observed vs predicted over the census cells scored out-of-fold). Re-runs skip
the images already cut.

Many machines: ``--shard I/N`` cuts and scores only the I-th of N contiguous chunks of the cells (in
cell-id order) and writes ``cells.shard-I-of-N.gpkg``; ``--merge N`` then writes the outputs above.
"""
import time

import geopandas as gpd
import numpy as np
import pandas as pd

from urbanlens.core import entry, files, gis_style, locks, runs, runtime, shards
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.errors import ConfigError
from urbanlens.ses import agreement, extraction, prediction, urban_atlas
from urbanlens.ses import figures as ses_figures
from urbanlens.ses import grid as ses_grid
from urbanlens.ses import tiles as ses_tiles
from urbanlens.ses.world import TRUTH_CELLS


def arguments(parser):
    parser.add_argument("--city", required=True, help="the trained city whose models score the cells")
    parser.add_argument("--area", default=None, metavar="FILE",
                        help="polygons to map (any vector file with a CRS); default: the city's Urban Atlas boundary")
    return shards.add_shard_args(parser)


def main() -> None:
    cfg, args = cli(__doc__.splitlines()[0], "configs/ses_demo.yaml", extra=arguments)
    start = time.time()
    device = runtime.select_device(cfg.device)
    ses_dir = results_dir(cfg, "ses")
    city, out = args.city, ses_dir / args.city / "predicted"
    entry.keep(locks.hold(out, "predict_income.py", cfg))
    table_path = out / "cells.gpkg"
    if cfg.ses.cell_size_m != 200:
        raise ConfigError("config", f"ses.cell_size_m={cfg.ses.cell_size_m}", "the INSPIRE grid cells are 200 m")

    # 1. the city's fold models, refused when trained on images made otherwise than these
    checkpoints = prediction.fold_checkpoints(ses_dir / city)
    models, ckpts = prediction.load_fold_models(checkpoints, cfg, device)
    size, edges = ckpts[0]["config"]["ses_model"]["input_size"], ckpts[0].get("quintile_edges")

    # 2. images of another area, other data or another cell size are not mixed with this run's
    stamp, inputs = out / prediction.STAMP, prediction.run_inputs(cfg, args.area)
    extra = {"area": str(args.area) if args.area else f"Urban Atlas boundary of {city}"}
    changed = runs.compare(stamp, cfg, prediction.RUN_KEYS, inputs, extra) if runs.has_outputs(out, [stamp.name]) else []
    if changed and (not cfg.overwrite or args.shard):
        runs.refuse(out, "holds a prediction of another area or from other images", changed,
                    f"delete {out} before sharded runs" if cfg.overwrite else
                    "use another paths.results or --set overwrite=true")
    if changed:
        prediction.clear(out)
    runs.write_stamp(stamp, "predict_income.py", cfg, prediction.RUN_KEYS, inputs, extra)
    parts = shards.shard_paths(table_path, args.merge, newer_than=max(p.stat().st_mtime for p in checkpoints)) \
        if args.merge else []

    # 3. the area's grid cells that orthophotos cover, census or not
    area = prediction.read_area(args.area) if args.area else \
        urban_atlas.read_ua_boundary(data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary).geometry.union_all()
    tiles = ses_tiles.read_tile_index(data_dir(cfg, cfg.ses.aerial_dir), product=cfg.ses.ortho_product)
    grid = prediction.grid_cells(area, cfg.ses.cell_size_m)
    cells = prediction.covered(grid, tiles)
    cells["city"] = city
    cells["census_income"] = prediction.census_income(cells, data_dir(cfg, cfg.ses.census_file))
    cells["path"] = prediction.image_paths(cells["cell_id"], cfg, ses_dir, city)
    print(f"[predict] {city}: {len(cells)} cells of the area covered by {cfg.ses.ortho_product} orthophotos "
          f"({len(grid) - len(cells)} uncovered left out), {int(np.isfinite(cells['census_income']).sum())} of them "
          f"in the census; {len(models)} fold models")
    tag = "predict"
    if args.shard:  # this job's share: a contiguous chunk of the cells in cell-id order
        i, n = args.shard
        cells = cells.iloc[shards.shard_positions(cells["cell_id"], cells["city"], i, n)].reset_index(drop=True)
        table_path, tag = shards.shard_path(table_path, i, n), f"predict {i}/{n}"

    if args.merge:  # 4'. the N shards' tables, checked and put in cell-id order
        table = shards.merge_in_order([gpd.read_file(p, layer="cells") for p in parts], cells["cell_id"],
                                      names=[p.name for p in parts])
        table = gpd.GeoDataFrame(table, geometry="geometry", crs=ses_grid.LAEA)
        cut = 0
    else:  # 4. cut each cell (resumable), score the non-void ones out-of-fold where a fold trained on them
        status = extraction.extract_cells(cells, ses_dir, px=cfg.ses.cell_px, workers=cfg.workers)
        cut = int(status["extracted"].sum())
        cells["nodata"] = status["nodata"].round(6)
        cells["non_void"] = cells["nodata"] <= cfg.ses.max_nodata
        scored = cells[cells["non_void"]]
        trained = prediction.trained_on(ses_dir / city / prediction.FOLDS_CSV, scored["cell_id"], len(models))
        needs, scored_by = prediction.scoring_plan(trained)
        probs = prediction.score(models, [ses_dir / p for p in scored["path"]], size, device,
                                 cfg.predict.batch_size, cfg.ses_train.amp, needs=needs)
        scores = prediction.summarise(probs).assign(scored_by=scored_by).set_index(scored.index).reindex(cells.index)
        scores["scored_by"] = scores["scored_by"].fillna(prediction.VOID)
        table = pd.concat([cells[["cell_id", "city"]], scores, cells[["census_income"]]], axis=1)
        table["observed_class"] = prediction.observed_class(table["census_income"], edges) if edges else np.nan
        table = gpd.GeoDataFrame(table.join(cells[["non_void", "nodata", "path"]]), geometry=cells.geometry,
                                 crs=ses_grid.LAEA)
    with files.atomic_path(table_path) as tmp:
        table.to_file(tmp, layer="cells", driver="GPKG", engine="pyogrio")
        gis_style.style_gpkg(tmp, "cells", "expected_class", breaks=np.arange(prediction.N_CLASSES + 1) - 0.5)
    files.save_run_config(cfg, out, "predict_config.yaml")
    if args.shard:
        print(f"[{tag}] {city}: {len(table)} cells ({cut} cut now) in {time.time() - start:.1f} s -> {table_path}")
        return

    # 5. the map on the 200 m grid and the figures
    tif = out / "expected_class.tif"
    prediction.write_grid_tif(tif, table["cell_id"], {"expected_class": table["expected_class"],
                                                      "fold_spread": table["fold_spread"]},
                              labels=prediction.class_names(edges))
    prediction.write_class_tif(out / "income_class.tif", table["cell_id"], table["expected_class"],
                               prediction.class_names(edges))  # the expected class rounded, with names and colours
    files.save_figure(ses_figures.predicted_map_figure(table, city), out / "figures" / "predicted_map.png")
    groups = agreement_groups(table, data_dir(cfg, TRUTH_CELLS), city, cfg.ses_train.block_m, cfg.seed)
    files.write_json(out / "agreement.json", {"city": city, **groups,
                                              "cells_by_scoring": table["scored_by"].value_counts().to_dict()})
    oof = groups["census_out_of_fold"]
    if oof["n"] >= 3:
        known = table[prediction.is_out_of_fold(table["scored_by"]) & np.isfinite(table["census_income"])]
        files.save_figure(ses_figures.observed_vs_predicted_figure(known, city, oof["rho"], oof["p_one_sided"],
                                                                   "census cells scored out-of-fold"),
                          out / "figures" / "observed_vs_predicted.png")
    scored = table["non_void"].astype(bool)
    print(f"[{tag}] {city}: {int(scored.sum())} of {len(table)} cells scored ({int((~scored).sum())} void), "
          f"{len(table) - int(np.isfinite(table['census_income']).sum())} not in the census; mean expected class "
          f"{np.nanmean(table['expected_class']):.2f}; "
          + "; ".join(agreement.describe(g) for g in groups.values() if g["n"])
          + f" in {time.time() - start:.1f} s -> {table_path}, {tif}, {out / 'agreement.json'}")


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


if __name__ == "__main__":
    entry.run(main)
