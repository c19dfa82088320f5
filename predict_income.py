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
band 1 expected class, band 2 fold spread, NaN elsewhere), ``agreement.json`` (Spearman between the
expected class and the income, one-sided p and a bootstrap interval over ``ses.train.block_m`` blocks,
separately for the withheld cells against their planted income in ``<data>/ses_truth_cells.csv`` when
there is one, and for the census cells scored out-of-fold against their census income) and
``figures/`` (the map; observed vs predicted over the census cells scored out-of-fold). Re-runs skip
the images already cut.

Many machines: ``--shard I/N`` cuts and scores only the I-th of N contiguous chunks of the cells (in
cell-id order) and writes ``cells.shard-I-of-N.gpkg``; ``--merge N`` then writes the outputs above.
"""
import time

import numpy as np

from urbanlens.core import entry, files, gis_style, shards
from urbanlens.core.config import results_dir
from urbanlens.core.errors import ConfigError
from urbanlens.core.stage import open_stage
from urbanlens.ses import income_map, prediction, report_html, rerun


def arguments(parser):
    parser.add_argument("--city", required=True, help="the trained city whose models score the cells")
    parser.add_argument("--area", default=None, metavar="FILE",
                        help="polygons to map (any vector file with a CRS); default: the city's Urban Atlas boundary")
    return shards.add_shard_args(parser)


def main() -> None:
    stage = open_stage(__doc__, "predict_income.py", "configs/ses_demo.yaml", lambda cfg, args: ("ses", args.city, "predicted"),
                       arguments, amp="ses.train.amp", channels_last=True, report=report_html.render)
    cfg, args, place, out = stage.cfg, stage.args, stage.place, stage.out
    start = time.time()
    ses_dir, city = results_dir(cfg, "ses"), args.city
    table_path = out / "cells.gpkg"
    if cfg.ses.cell_size_m != 200:
        raise ConfigError("config", f"ses.cell_size_m={cfg.ses.cell_size_m}", "the INSPIRE grid cells are 200 m")

    # 1. the city's fold models, refused when trained on images made otherwise than these
    checkpoints = prediction.fold_checkpoints(ses_dir / city)
    models, ckpts = prediction.load_fold_models(checkpoints, cfg, place.device)
    size, edges = ckpts[0]["config"]["ses"]["model"]["input_size"], ckpts[0].get("quintile_edges")

    # 2. images of another area, other data or another cell size are not mixed with this run's
    rerun.claim(out, out / prediction.STAMP, "predict_income.py", cfg, prediction.RUN_KEYS,
                prediction.run_inputs(cfg, args.area), "holds a prediction of another area or from other images",
                prediction.clear, bool(args.shard),
                {"area": str(args.area) if args.area else f"Urban Atlas boundary of {city}"})
    parts = shards.shard_paths(table_path, args.merge, newer_than=max(p.stat().st_mtime for p in checkpoints)) \
        if args.merge else []

    # 3. the area's grid cells that orthophotos cover, census or not
    cells = income_map.area_cells(cfg, args.area, city, ses_dir, len(models))
    tag = "predict"
    if args.shard:  # this job's share: a contiguous chunk of the cells in cell-id order
        i, n = args.shard
        cells = cells.iloc[shards.shard_positions(cells["cell_id"], cells["city"], i, n)].reset_index(drop=True)
        table_path, tag = shards.shard_path(table_path, i, n), f"predict {i}/{n}"

    if args.merge:  # 4'. the N shards' tables, checked and put in cell-id order
        table, cut = income_map.merged(parts, cells), 0
    else:  # 4. cut each cell (resumable), score the non-void ones out-of-fold where a fold trained on them
        table, cut = income_map.scored(cells, cfg, ses_dir, city, models, size, edges, place)
    with files.atomic_path(table_path) as tmp:
        table.to_file(tmp, layer="cells", driver="GPKG", engine="pyogrio")
        gis_style.style_gpkg(tmp, "cells", "expected_class", breaks=np.arange(prediction.N_CLASSES + 1) - 0.5)
    files.save_run_config(cfg, out, "predict_config.yaml")
    if args.shard:
        print(f"[{tag}] {city}: {len(table)} cells ({cut} cut now) in {time.time() - start:.1f} s -> {table_path}")
        return

    # 5. the map on the 200 m grid, the figures and the agreement with known incomes
    groups = income_map.write_map(out, table, cfg, city, edges)
    print(f"[{tag}] {city}: {income_map.describe(table, groups)} in {time.time() - start:.1f} s -> {table_path}, "
          f"{out / 'expected_class.tif'}, {out / 'agreement.json'}")


if __name__ == "__main__":
    entry.run(main)
