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
that interval holds 0.5 or a class map is zero everywhere (urbanlens.ses.findings). Figures: observed vs
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
import pyogrio
import torch
from PIL import Image
from tqdm import tqdm

from urbanlens.core import backbones, cam, config, entry, files, loops, runtime, shards
from urbanlens.core.errors import DataError
from urbanlens.ses import data, extraction, findings, skips, urban_atlas, zonal
from urbanlens.ses import figures as ses_figures
from urbanlens.ses import maps as ses_maps
from urbanlens.ses import model as ses_model


def main() -> None:
    cfg, args = config.cli(__doc__.splitlines()[0], "configs/ses_demo.yaml", extra=shards.add_shard_args)
    runtime.seed_everything(cfg.seed)
    device = runtime.select_device(cfg.device)
    cc = cfg.cams
    ses_dir = config.results_dir(cfg, "ses")
    cells = data.read_cells(ses_dir / "cells.gpkg").to_crs(ses_maps.CAM_CRS)
    rng = np.random.default_rng(cfg.seed)

    pooled, pooled_preds, city_findings = [], [], {}
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
        ckpt_path = city_dir / f"fold_{files.read_json(city_dir / 'metrics.json')['best_fold']}" / "best.pt"
        model, ckpt = ses_model.load_ses_model(ckpt_path, map_location=device)
        model = loops.to_device(model, device, True, cc.amp)  # NHWC on CUDA and under CPU bf16
        layer = backbones.last_conv_layer(model)
        size = ckpt["config"]["ses_model"]["input_size"]
        ids, missing = data.city_cells(cells, city, ses_dir)
        if missing:
            print(f"[cams] warning: {missing[0]}: {len(missing)} cell image(s) of {city} missing or unreadable (this "
                  "one first), skipped; delete broken images and re-run generate_fr_ua_aerial_data.py to extract "
                  "them again", file=sys.stderr)
        city_cells = cells[cells["city"] == city].set_index("cell_id").loc[ids["cell_id"]].reset_index()
        landuse, _ = urban_atlas.read_urban_atlas(config.data_dir(cfg, cfg.ses.ua_dir), city)
        landuse = landuse.to_crs(ses_maps.CAM_CRS)
        files.save_run_config(cfg, city_dir, "cams_config.yaml")
        fresh_after = ses_maps.maps_fresh_after(city_dir, cfg, ckpt_path)  # maps of another model or settings are redone

        def compute(rows):  # [B, 2, H, W]: guided Grad-CAM of the poorest and the richest class
            x = torch.stack([data.load_cell_image(ses_dir / p, size) for p in rows["path"]])
            x = loops.batch_to_device(x, device, True, cc.amp)
            return np.stack([cam.guided_gradcam(model, layer, x, k, cc.clip_percentile, cc.amp)
                             for k in (cc.poor_class, cc.rich_class)], axis=1)

        def nodata(rows):  # [B, H, W]: map pixels whose centre lies on a nodata (all-zero) pixel of the cell image
            return np.stack([ses_maps.resample_mask(extraction.nodata_mask(extraction.read_png(ses_dir / p)),
                                                    (size, size)) for p in rows["path"]])

        # 2. maps per cell (GeoTIFF, reused on a re-run) -> statistics per land-use piece, written per batch
        stats_path, todo = city_dir / "polygon_stats.gpkg", city_cells
        if args.shard:  # this job's share: a contiguous run of whole batches, its statistics in a partial file
            i, n = args.shard
            first, stop = shards.shard_range(len(city_cells), i, n, align=cc.batch_size)
            stats_path, todo = shards.shard_path(stats_path, i, n), city_cells.iloc[first:stop]
        n_new = n_pieces = 0
        if args.merge:  # 2'. the N shards' statistics, checked and copied in order
            parts = shards.shard_paths(stats_path, args.merge, newer_than=fresh_after)
            with files.atomic_path(stats_path) as tmp:
                n_pieces = shards.append_layers(parts, tmp, "polygon_stats", ses_maps.empty_polygon_stats(landuse.crs))
        else:
            with files.atomic_path(stats_path) as tmp, tqdm(total=len(todo), desc=f"{city} cams", unit="cell") as bar:
                for batch in ses_maps.cell_map_batches(todo, compute, city_dir / "cams", cc.batch_size,
                                                    newer_than=fresh_after, nodata=nodata):
                    rows = [ses_maps.cell_polygon_stats(m, t, zonal.cell_pieces(landuse, row.geometry), row.cell_id, city)
                            for row, m, t, _ in batch]
                    rows = pd.concat(rows, ignore_index=True)
                    if len(rows):
                        rows.to_file(tmp, layer="polygon_stats", driver="GPKG", mode="a" if tmp.exists() else "w",
                                     promote_to_multi=True)
                    n_new += sum(new for *_, new in batch)
                    n_pieces += len(rows)
                    bar.update(len(batch))
                if not tmp.exists():  # no piece at all: an empty layer with the columns
                    ses_maps.empty_polygon_stats(landuse.crs).to_file(tmp, layer="polygon_stats", driver="GPKG")

        if args.shard:
            print(f"[cams {i}/{n}] {city}: cells {first}..{stop - 1} of {len(city_cells)} ({n_new} new maps), "
                  f"{n_pieces} land-use pieces -> {stats_path}")
            continue

        # 3. scores per land-use class
        stats = pyogrio.read_dataframe(stats_path, layer="polygon_stats", read_geometry=False)
        pooled.append(stats)
        # the ranking carries the model's held-out skill, and says when it means nothing
        preds = findings.read_predictions(city_dir)
        finding = city_findings[city] = findings.city_finding(preds, stats, seed=cfg.seed)
        pooled_preds.append(preds)
        summary = findings.annotate(zonal.landuse_summary(stats), finding)
        files.write_csv(summary, city_dir / "landuse_summary.csv")

        # 4. figures: income maps, sampled cell panels, scores per class
        fig_dir = city_dir / "figures"
        if preds is not None:
            files.save_figure(ses_figures.income_map_figure(cells[cells["city"] == city], preds, city),
                           fig_dir / "income_map.png")
        sample = city_cells.iloc[np.sort(rng.choice(len(city_cells), min(cc.panels, len(city_cells)), replace=False))]
        panels = [{"cell_id": r.cell_id, "bounds": r.geometry.bounds,
                   "image": np.asarray(Image.open(ses_dir / r.path).convert("RGB")),
                   **dict(zip(("poor", "rich"), ses_maps.read_maps_tif(city_dir / "cams" / f"{r.cell_id}.tif")[0])),
                   "pieces": zonal.cell_pieces(landuse, r.geometry)} for r in sample.itertuples()]
        if panels:
            names = dict(zip(landuse["ua_code"].astype(str), landuse["ua_class"]))
            files.save_figure(ses_figures.cam_panels_figure(panels, names), fig_dir / "cam_panels.png")
        if len(summary):
            files.save_figure(ses_figures.landuse_scores_figure(summary, f"{city}: activation per land-use class"),
                           fig_dir / "landuse_scores.png")
        top = summary.iloc[0] if len(summary) else None
        print(f"[cams] {city}: {len(city_cells)} cells ({n_new} new maps), {n_pieces} land-use pieces"
              + (f"; richest-reading class {top.ua_code} {top.ua_class}, poorest-reading "
                 f"{summary.iloc[-1].ua_code} {summary.iloc[-1].ua_class}" if top is not None else "")
              + f"; {findings.describe(finding)} -> {city_dir}")

    if pooled:
        stats = pd.concat(pooled, ignore_index=True)
        finding = findings.pooled_finding(pooled_preds, stats, city_findings, seed=cfg.seed)
        summary = findings.annotate(zonal.landuse_summary(stats), finding)
        files.write_csv(summary, ses_dir / "landuse_summary.csv")
        files.save_figure(ses_figures.landuse_scores_figure(summary, "all cities: activation per land-use class"),
                       ses_dir / "landuse_scores.png")
        print(f"[cams] {len(pooled)} cities, {int(summary['pieces'].sum())} pieces; rich_minus_poor largest for "
              f"{summary.iloc[0].ua_code}, smallest for {summary.iloc[-1].ua_code}; {findings.describe(finding)}"
              f" -> {ses_dir / 'landuse_summary.csv'}")


if __name__ == "__main__":
    entry.run(main)
