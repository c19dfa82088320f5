"""The map stage's per-city work around the maps themselves (gradcaming_urban_areas.py): the city's best
fold model, its cells and land use, its share of the cells under --shard, the scores per land-use class
with the model's held-out skill and the maps' sanity check, and the same pooled over the cities. The maps
and their projection onto land use are urbanlens.ses.projection's."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..core import backbones, cam, files, outputs, sanity, schema, shards
from ..core.config import data_dir
from ..core.errors import DataError
from . import data, findings, map_sanity, skips, urban_atlas, zonal
from . import figures as ses_figures
from . import maps as ses_maps
from . import model as ses_model


def has_model(city: str, city_dir: Path, any_trained: bool) -> bool:
    """Whether training left a model for ``city``; a city without one is named by its cause (training
    skipped it: a warning, unless no city has a model; training never ran for it: an error)."""
    if (city_dir / "metrics.json").is_file():
        return True
    reason = skips.skip_reason(city_dir)
    if reason is None:
        raise DataError(f"{city_dir / 'metrics.json'}: not found; run efficientnet_training.py for {city} first")
    if not any_trained:
        raise DataError(city_dir, f"no model for {city}: training skipped it because {reason}",
                        "fix its data and re-run generate_fr_ua_aerial_data.py and efficientnet_training.py")
    print(f"[cams] warning: no model for {city}: training skipped it because {reason}; left out", file=sys.stderr)
    return False


def best_model(city: str, city_dir: Path, place, cfg=None):
    """The best cross-validation fold's model (placed), its last convolutional layer, its input size and
    its checkpoint's path; a warning when that size is coarser than the maps need."""
    best = outputs.read_json(city_dir / "metrics.json", "efficientnet_training.py", ["best_fold"])["best_fold"]
    ckpt_path = city_dir / f"fold_{best}" / "best.pt"
    model, ckpt = ses_model.load_ses_model(ckpt_path, map_location=place.device)
    if cfg is not None:
        ses_model.check_backbone(ckpt, cfg, ckpt_path)
    model = place.model(model)  # NHWC on CUDA and under CPU bf16
    size = ckpt["config"]["ses"]["model"]["input_size"]
    layer = backbones.last_conv_layer(model)
    coarse = schema.cam_map_problem("ses.model.input_size", size, "ses.cell_px", cam.feature_grid(model, layer, size))
    if coarse:
        print(f"[cams] warning: {city}: {coarse} (and retrain)", file=sys.stderr)
    return model, layer, size, ckpt_path


def mapped_cells(cells, city: str, ses_dir: Path):
    """The city's cells whose image is there (missing or unreadable ones skipped with a warning); none is
    an error."""
    ids, missing = data.city_cells(cells, city, ses_dir)
    if missing:
        print(f"[cams] warning: {missing[0]}: {len(missing)} cell image(s) of {city} missing or unreadable (this "
              "one first), skipped; delete broken images and re-run generate_fr_ua_aerial_data.py to extract "
              "them again", file=sys.stderr)
    city_cells = cells[cells["city"] == city].set_index("cell_id").loc[ids["cell_id"]].reset_index()
    if city_cells.empty:  # nothing to map is a stop, not an empty success
        raise DataError(ses_dir / "cells.gpkg", f"no cell image of {city} to map", "re-run generate_fr_ua_aerial_data.py")
    return city_cells


def land_use(cfg, city: str):
    """The city's Urban Atlas polygons in the maps' CRS."""
    landuse, boundary = urban_atlas.read_urban_atlas(data_dir(cfg, cfg.ses.ua_dir), city, cfg.ses.ua_boundary)
    print(f"[cams] {urban_atlas.describe(city, boundary)}")
    return landuse.to_crs(ses_maps.CAM_CRS)


def share(city_cells, shard, batch_size: int, stats_path: Path):
    """The cells to map and where their statistics go: all of them, or under ``shard`` (i, n) a contiguous
    run of whole batches and a partial file; with the run's first and stop positions."""
    if not shard:
        return city_cells, stats_path, 0, len(city_cells)
    i, n = shard
    first, stop = shards.shard_range(len(city_cells), i, n, align=batch_size)
    return city_cells.iloc[first:stop], shards.shard_path(stats_path, i, n), first, stop


@dataclass
class CityScores:
    """A city's statistics per land-use piece, held-out predictions, sanity checks (None when off) and
    their verdict, finding and the scores per land-use class (landuse_summary.csv)."""
    stats: pd.DataFrame
    preds: pd.DataFrame
    checks: tuple | None
    verdict: object
    finding: findings.Finding
    summary: pd.DataFrame


def score_city(cfg, city_dir: Path, stats_path: Path, model, layer, city_cells, ses_dir: Path, size: int, place,
               units: dict) -> CityScores:
    """Scores per land-use class with the model's held-out skill, and whether its maps depend on what the
    model learned and point at what drives its score; writes landuse_summary.csv."""
    cc = cfg.ses.cams
    stats = outputs.read_gpkg(stats_path, "polygon_stats", "gradcaming_urban_areas.py", ignore_geometry=True)
    preds = findings.read_predictions(city_dir)
    checks, verdict = None, None
    if cc.sanity_cells:
        checks = map_sanity.check_city(model, layer, city_cells, ses_dir, size, cc, place, cfg.seed)
        verdict = sanity.summarise(*checks)
    finding = map_sanity.flag(findings.city_finding(preds, stats, seed=cfg.seed, **units), verdict)
    summary = sanity.annotate(findings.annotate(zonal.landuse_summary(stats, seed=cfg.seed, **units), finding), verdict)
    files.write_csv(summary, city_dir / "landuse_summary.csv")
    return CityScores(stats, preds, checks, verdict, finding, summary)


def describe_city(scores: CityScores) -> str:
    """The city line's account of the classes read richest and poorest, the sanity check and the finding."""
    summary, verdict = scores.summary, scores.verdict
    top = summary.iloc[0] if len(summary) else None
    return ((f"; richest-reading class {top.ua_code} {top.ua_class}, poorest-reading "
             f"{summary.iloc[-1].ua_code} {summary.iloc[-1].ua_class}" if top is not None else "")
            + (f"; maps vs a random model: median rho {verdict.rho:.2f}, deletion gain {verdict.deletion_gain:+.3f}"
               if verdict is not None else "")
            + f"; {findings.describe(scores.finding)}")


def pooled_scores(cfg, ses_dir: Path, cities: dict[str, CityScores], units: dict) -> None:
    """The scores per land-use class pooled over the mapped cities: landuse_summary.csv and
    landuse_scores.png in ``ses_dir``, and the closing line."""
    stats = pd.concat([s.stats for s in cities.values()], ignore_index=True)
    if stats.empty:
        raise DataError(ses_dir, "no Urban Atlas polygon overlaps a mapped cell",
                        f"check ses.ua_dir ({cfg.ses.ua_dir}) and ses.cities")
    checks = [s.checks for s in cities.values() if s.checks is not None]
    verdict = sanity.summarise(*map(np.concatenate, zip(*checks))) if checks else None
    finding = map_sanity.flag(findings.pooled_finding([s.preds for s in cities.values()], stats,
                                                      {c: s.finding for c, s in cities.items()}, seed=cfg.seed,
                                                      **units), verdict)
    summary = sanity.annotate(findings.annotate(zonal.landuse_summary(stats, seed=cfg.seed, **units), finding), verdict)
    files.write_csv(summary, ses_dir / "landuse_summary.csv")
    files.save_figure(ses_figures.landuse_scores_figure(summary, "all cities: activation per land-use class"),
                      ses_dir / "landuse_scores.png")
    print(f"[cams] {len(cities)} cities, {int(summary['pieces'].sum())} pieces; rich_minus_poor largest for "
          f"{summary.iloc[0].ua_code}, smallest for {summary.iloc[-1].ua_code}; {findings.describe(finding)}"
          f" -> {ses_dir / 'landuse_summary.csv'}")
