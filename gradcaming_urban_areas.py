"""Activation maps of the income model projected onto Urban Atlas land use, per city.

For each city of the config: the best cross-validation fold's model (lowest validation loss); for every
non-void census cell, guided Grad-CAM on the last convolutional layer for the poorest and the richest
quintile, saved as a two-band GeoTIFF (band 1 poor, band 2 rich, EPSG:3035, the cell's bounds; NaN, the
nodata value, where the cell image has no data). The maps are cut by the Urban Atlas polygons inside the
cell; each piece gets the sum, mean, min, max, median and count of both maps over the valid pixels whose
centres it holds, their total-variation distance and symmetric KL, and poor/rich scores (map sum per
m^2) -> polygon_stats.gpkg. Scores are averaged per
land-use class -> landuse_summary.csv (per city, and pooled over cities in ses/), with the model's
held-out skill (AUC poorest-vs-richest, bootstrap interval) and a ``meaningful`` flag that is False when
that interval holds 0.5 or a class map is zero everywhere (urbanlens.ses.findings), or when the maps fail
their sanity check (urbanlens.ses.map_sanity; ses.cams.sanity_cells seeded cells, 0 = off): model
randomisation and deletion against random pixel orders, in the columns of urbanlens.core.sanity.COLUMNS
(sanity_randomisation_rho, sanity_deletion_gain, ..., maps_pass_sanity). Figures: observed vs
predicted income map, a panel per sampled cell, rich vs poor score per land-use class.

    python gradcaming_urban_areas.py --config configs/ses_demo.yaml [--set ses.cams.batch_size=4]

Many machines: ``--shard I/N`` (numbered from 1) maps only the I-th of N contiguous runs of whole
batches of each city's cells (cell-id order, so every cell has the batch companions of an unsharded run)
and writes ``<city>/polygon_stats.shard-I-of-N.gpkg`` (GeoTIFFs go to their usual place); once all N are
done, ``--merge N`` checks them and writes every table and figure an unsharded run writes.

    python gradcaming_urban_areas.py --config F --shard $SLURM_ARRAY_TASK_ID/8   (8 jobs)
    python gradcaming_urban_areas.py --config F --merge 8                         (then once)
"""
import numpy as np

from urbanlens.core import entry, files, shards
from urbanlens.core.stage import open_stage
from urbanlens.ses import data, mapping, projection, report_html
from urbanlens.ses import maps as ses_maps


def main() -> None:
    stage = open_stage(__doc__, "gradcaming_urban_areas.py", "configs/ses_demo.yaml", ("ses",), shards.add_shard_args,
                       amp="ses.cams.amp", channels_last=True, report=report_html.render)  # lock: shared by --shard jobs
    cfg, args, place, ses_dir, cc = stage.cfg, stage.args, stage.place, stage.out, stage.cfg.ses.cams
    cells = data.read_cells(ses_dir / "cells.gpkg").to_crs(ses_maps.CAM_CRS)
    rng = np.random.default_rng(cfg.seed)

    scored = {}  # per city mapped in full: its scores, pooled at the end
    units = {"unit": cfg.ses.train.bootstrap, "block_m": cfg.ses.train.block_m}  # what the intervals resample
    any_trained = any((ses_dir / c / "metrics.json").is_file() for c in cfg.ses.cities)
    for city in cfg.ses.cities:
        city_dir = ses_dir / city
        # 1. the best fold's model and the city's cells and land use
        if not mapping.has_model(city, city_dir, any_trained):  # training skipped the city: left out
            continue
        model, layer, size, ckpt_path = mapping.best_model(city, city_dir, place, cfg)
        city_cells = mapping.mapped_cells(cells, city, ses_dir)
        landuse = mapping.land_use(cfg, city)
        files.save_run_config(cfg, city_dir, "cams_config.yaml")
        fresh_after = ses_maps.maps_fresh_after(city_dir, cfg, ckpt_path)  # maps of another model or settings are redone

        compute, nodata = projection.map_functions(model, layer, ses_dir, size, cc, place)

        # 2. maps per cell (GeoTIFF, reused on a re-run) -> statistics per land-use piece, written per batch
        todo, stats_path, first, stop = mapping.share(city_cells, args.shard, cc.batch_size,
                                                      city_dir / "polygon_stats.gpkg")
        if args.merge:  # 2'. the N shards' statistics, checked and copied in order
            n_new, n_pieces = 0, projection.merge_shards(stats_path, args.merge, landuse, fresh_after)
        else:
            n_new, n_pieces = projection.project_cells(todo, compute, nodata, landuse, city, city_dir, stats_path,
                                                       cc.batch_size, fresh_after)
        if args.shard:
            print(f"[cams {args.shard[0]}/{args.shard[1]}] {city}: cells {first}..{stop - 1} of {len(city_cells)} "
                  f"({n_new} new maps), {n_pieces} land-use pieces -> {stats_path}")
            continue

        # 3. scores per land-use class, with the model's held-out skill and the maps' sanity check
        scores = scored[city] = mapping.score_city(cfg, city_dir, stats_path, model, layer, city_cells, ses_dir,
                                                   size, place, units)

        # 4. figures: income maps, sampled cell panels, scores per class
        projection.city_figures(city, city_dir, ses_dir, city_cells, cells[cells["city"] == city], scores.preds,
                                landuse, scores.summary, cc.panels, rng)
        print(f"[cams] {city}: {len(city_cells)} cells ({n_new} new maps), {n_pieces} land-use pieces"
              f"{mapping.describe_city(scores)} -> {city_dir}")

    # 5. the scores per land-use class pooled over the cities
    if scored:
        mapping.pooled_scores(cfg, ses_dir, scored, units)


if __name__ == "__main__":
    entry.run(main)
