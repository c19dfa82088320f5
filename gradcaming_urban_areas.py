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
their sanity check (urbanlens.ses.map_sanity; cams.sanity_cells seeded cells, 0 = off): model
randomisation and deletion against random pixel orders, in the columns of urbanlens.core.sanity.COLUMNS
(sanity_randomisation_rho, sanity_deletion_gain, ..., maps_pass_sanity). Figures: observed vs
predicted income map, a panel per sampled cell, rich vs poor score per land-use class.

    python gradcaming_urban_areas.py --config configs/ses_demo.yaml [--set cams.batch_size=4]

Many machines: ``--shard I/N`` (numbered from 1) maps only the I-th of N contiguous runs of whole
batches of each city's cells (cell-id order, so every cell has the batch companions of an unsharded run)
and writes ``<city>/polygon_stats.shard-I-of-N.gpkg`` (GeoTIFFs go to their usual place); once all N are
done, ``--merge N`` checks them and writes every table and figure an unsharded run writes.

    python gradcaming_urban_areas.py --config F --shard $SLURM_ARRAY_TASK_ID/8   (8 jobs)
    python gradcaming_urban_areas.py --config F --merge 8                         (then once)
"""
import sys

import numpy as np
import pandas as pd

from urbanlens.core import backbones, config, entry, files, outputs, sanity, schema, shards
from urbanlens.core.errors import DataError
from urbanlens.core.stage import open_stage
from urbanlens.ses import data, findings, map_sanity, projection, report_html, skips, urban_atlas, zonal
from urbanlens.ses import figures as ses_figures
from urbanlens.ses import maps as ses_maps
from urbanlens.ses import model as ses_model


def main() -> None:
    stage = open_stage(__doc__, "gradcaming_urban_areas.py", "configs/ses_demo.yaml", ("ses",), shards.add_shard_args,
                       amp="cams.amp", channels_last=True, report=report_html.render)  # lock: shared by --shard jobs
    cfg, args, place, ses_dir, cc = stage.cfg, stage.args, stage.place, stage.out, stage.cfg.cams
    cells = data.read_cells(ses_dir / "cells.gpkg").to_crs(ses_maps.CAM_CRS)
    rng = np.random.default_rng(cfg.seed)

    pooled, pooled_preds, city_findings, pooled_checks = [], [], {}, []
    units = {"unit": cfg.ses_train.bootstrap, "block_m": cfg.ses_train.block_m}  # what the intervals resample
    trained = [c for c in cfg.ses.cities if (ses_dir / c / "metrics.json").is_file()]
    for city in cfg.ses.cities:
        city_dir = ses_dir / city
        # 1. the best fold's model and the city's cells and land use
        if city not in trained:  # named by its cause: training skipped the city, or never ran for it
            reason = skips.skip_reason(city_dir)
            if reason is None:
                raise DataError(f"{city_dir / 'metrics.json'}: not found; run efficientnet_training.py for {city} first")
            if not trained:
                raise DataError(city_dir, f"no model for {city}: training skipped it because {reason}",
                                "fix its data and re-run generate_fr_ua_aerial_data.py and efficientnet_training.py")
            print(f"[cams] warning: no model for {city}: training skipped it because {reason}; left out",
                  file=sys.stderr)
            continue
        best = outputs.read_json(city_dir / "metrics.json", "efficientnet_training.py", ["best_fold"])["best_fold"]
        ckpt_path = city_dir / f"fold_{best}" / "best.pt"
        model, ckpt = ses_model.load_ses_model(ckpt_path, map_location=place.device)
        model = place.model(model)  # NHWC on CUDA and under CPU bf16
        layer = backbones.last_conv_layer(model)
        size = ckpt["config"]["ses_model"]["input_size"]
        coarse = schema.cam_map_problem("ses_model.input_size", size, "ses.cell_px")
        if coarse:
            print(f"[cams] warning: {city}: {coarse} (and retrain)", file=sys.stderr)
        ids, missing = data.city_cells(cells, city, ses_dir)
        if missing:
            print(f"[cams] warning: {missing[0]}: {len(missing)} cell image(s) of {city} missing or unreadable (this "
                  "one first), skipped; delete broken images and re-run generate_fr_ua_aerial_data.py to extract "
                  "them again", file=sys.stderr)
        city_cells = cells[cells["city"] == city].set_index("cell_id").loc[ids["cell_id"]].reset_index()
        if city_cells.empty:  # nothing to map is a stop, not an empty success
            raise DataError(ses_dir / "cells.gpkg", f"no cell image of {city} to map",
                            "re-run generate_fr_ua_aerial_data.py")
        landuse, boundary = urban_atlas.read_urban_atlas(config.data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary)
        print(f"[cams] {urban_atlas.describe(city, boundary)}")
        landuse = landuse.to_crs(ses_maps.CAM_CRS)
        files.save_run_config(cfg, city_dir, "cams_config.yaml")
        fresh_after = ses_maps.maps_fresh_after(city_dir, cfg, ckpt_path)  # maps of another model or settings are redone

        compute, nodata = projection.map_functions(model, layer, ses_dir, size, cc, place)

        # 2. maps per cell (GeoTIFF, reused on a re-run) -> statistics per land-use piece, written per batch
        stats_path, todo = city_dir / "polygon_stats.gpkg", city_cells
        if args.shard:  # this job's share: a contiguous run of whole batches, its statistics in a partial file
            i, n = args.shard
            first, stop = shards.shard_range(len(city_cells), i, n, align=cc.batch_size)
            stats_path, todo = shards.shard_path(stats_path, i, n), city_cells.iloc[first:stop]
        if args.merge:  # 2'. the N shards' statistics, checked and copied in order
            n_new, n_pieces = 0, projection.merge_shards(stats_path, args.merge, landuse, fresh_after)
        else:
            n_new, n_pieces = projection.project_cells(todo, compute, nodata, landuse, city, city_dir, stats_path,
                                                       cc.batch_size, fresh_after)

        if args.shard:
            print(f"[cams {i}/{n}] {city}: cells {first}..{stop - 1} of {len(city_cells)} ({n_new} new maps), "
                  f"{n_pieces} land-use pieces -> {stats_path}")
            continue

        # 3. scores per land-use class
        stats = outputs.read_gpkg(stats_path, "polygon_stats", "gradcaming_urban_areas.py", ignore_geometry=True)
        pooled.append(stats)
        # the ranking carries the model's held-out skill, and says when it means nothing
        preds = findings.read_predictions(city_dir)
        # and whether its maps depend on what the model learned and point at what drives its score
        verdict = None
        if cc.sanity_cells:
            pooled_checks.append(map_sanity.check_city(model, layer, city_cells, ses_dir, size, cc, place, cfg.seed))
            verdict = sanity.summarise(*pooled_checks[-1])
        finding = city_findings[city] = map_sanity.flag(findings.city_finding(preds, stats, seed=cfg.seed, **units), verdict)
        pooled_preds.append(preds)
        summary = sanity.annotate(findings.annotate(zonal.landuse_summary(stats, seed=cfg.seed, **units), finding), verdict)
        files.write_csv(summary, city_dir / "landuse_summary.csv")

        # 4. figures: income maps, sampled cell panels, scores per class
        projection.city_figures(city, city_dir, ses_dir, city_cells, cells[cells["city"] == city], preds, landuse,
                                summary, cc.panels, rng)
        top = summary.iloc[0] if len(summary) else None
        print(f"[cams] {city}: {len(city_cells)} cells ({n_new} new maps), {n_pieces} land-use pieces"
              + (f"; richest-reading class {top.ua_code} {top.ua_class}, poorest-reading "
                 f"{summary.iloc[-1].ua_code} {summary.iloc[-1].ua_class}" if top is not None else "")
              + (f"; maps vs a random model: median rho {verdict.rho:.2f}, deletion gain {verdict.deletion_gain:+.3f}"
                 if verdict is not None else "")
              + f"; {findings.describe(finding)} -> {city_dir}")

    if pooled:
        stats = pd.concat(pooled, ignore_index=True)
        if stats.empty:
            raise DataError(ses_dir, "no Urban Atlas polygon overlaps a mapped cell",
                            f"check ses.ua_dir ({cfg.ses.ua_dir}) and ses.cities")
        verdict = sanity.summarise(*map(np.concatenate, zip(*pooled_checks))) if pooled_checks else None
        finding = map_sanity.flag(findings.pooled_finding(pooled_preds, stats, city_findings, seed=cfg.seed, **units), verdict)
        summary = sanity.annotate(findings.annotate(zonal.landuse_summary(stats, seed=cfg.seed, **units), finding), verdict)
        files.write_csv(summary, ses_dir / "landuse_summary.csv")
        files.save_figure(ses_figures.landuse_scores_figure(summary, "all cities: activation per land-use class"),
                       ses_dir / "landuse_scores.png")
        print(f"[cams] {len(pooled)} cities, {int(summary['pieces'].sum())} pieces; rich_minus_poor largest for "
              f"{summary.iloc[0].ua_code}, smallest for {summary.iloc[-1].ua_code}; {findings.describe(finding)}"
              f" -> {ses_dir / 'landuse_summary.csv'}")


if __name__ == "__main__":
    entry.run(main)
