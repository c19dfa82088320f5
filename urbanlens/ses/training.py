"""The income models' training stage, city by city: usable cells and quintiles, the fold scheme's
training sets, the folds trained and scored, the simple baseline on the same folds and the summary.

``efficientnet_training.py`` calls these in order; each fold's fit itself is ``fitting.fit``."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..core import files, loops, model_card, runs, runtime
from ..core.errors import ConfigError, DataError, TrainingDiverged
from ..core.placement import Placement
from . import baselines, fitting, metrics, results, skips, spatial_folds
from . import data as ses_data
from . import folds as ses_folds
from . import frozen as ses_frozen
from . import model as ses_model


@dataclass
class CityFit:
    """One city's training: its own cells ``df`` (``labels``: their quintiles, ``edges`` the quintiles'
    income edges), the cells its folds split (``fit_df``, ``fit_labels``: the city's own, or every city's
    pool when the fold scheme pools cities), the store ``name`` of those cells, ``splits`` and ``blocks``."""

    city: str
    df: pd.DataFrame
    labels: np.ndarray
    edges: list
    fit_df: pd.DataFrame
    fit_labels: np.ndarray
    name: str
    splits: list
    blocks: object


def check_scheme(cfg, place: Placement) -> None:
    """A fold scheme that pools cities needs two or more of them; the global batch must split evenly
    over the processes (refused now, not after a city)."""
    loops.rank_batch(cfg.ses.train.batch_size, place.world_size, "ses.train.batch_size")
    if spatial_folds.pools_cities(cfg.ses.train.cv) and len(cfg.ses.cities) < 2:
        raise ConfigError("config", f"ses.train.cv=city leaves one city out, but ses.cities lists "
                          f"{list(cfg.ses.cities)}", "list at least 2 cities or use ses.train.cv=spatial")


def bad_input(cfg, problem: str, then: str) -> None:
    """Stop under ``strict``, else warn and go on."""
    if cfg.strict:
        raise DataError(f"{problem}; check ses.cities, delete broken images and re-run "
                        "generate_fr_ua_aerial_data.py (it extracts the missing ones again)")
    print(f"[ses-train] warning: {problem}; {then}", file=sys.stderr)


def usable_cities(cfg, cells, ses_dir: Path, place: Placement) -> tuple[dict, list[str]]:
    """{city: (its non-void cells, their income quintiles, the quintiles' edges)} and the cities skipped
    (named, and recorded so the map stage names the cause); a DataError when no city has usable cells."""
    empty = {c: r for c in cfg.ses.cities if (r := ses_data.no_cells_reason(cells, c, cfg.ses.max_nodata))}
    if len(empty) == len(cfg.ses.cities):
        if place.main:
            for city, reason in empty.items():
                skips.record_skip(ses_dir / city, city, reason)
        raise DataError(ses_dir / "cells.gpkg", "no city has usable cells: " + "; ".join(
            f"{c}: {r}" for c, r in empty.items()), "check ses.cities, ses.max_nodata and the orthophotos, "
            "then re-run generate_fr_ua_aerial_data.py")
    prepared, skipped = {}, []
    for city in cfg.ses.cities:
        city_dir = ses_dir / city
        df, missing = ses_data.city_cells(cells, city, ses_dir)
        if missing:
            bad_input(cfg, f"{missing[0]}: {len(missing)} cell image(s) of {city} missing or unreadable (this one "
                      "first)", "training without them")
        if len(df) == 0:  # recorded, so that the map stage names the cause; a stop when no city trains
            reason = empty.get(city) or "every one of its cell images is missing or unreadable"
            bad_input(cfg, f"{ses_dir / 'cells.gpkg'}: no usable cells of '{city}' ({reason})", "city skipped")
            if place.main:
                skips.record_skip(city_dir, city, reason)
            skipped.append(f"{city} ({reason})")
            continue
        if place.main:
            skips.clear_skip(city_dir)
        labels = ses_data.income_quintiles(df["income"])
        prepared[city] = (df.assign(city=city), labels, ses_data.quintile_edges(df["income"], labels))
    return prepared, skipped


def city_fits(cfg, prepared: dict, ses_dir: Path) -> list[CityFit]:
    """Each city's training sets and folds, all made before any training (a city too small for its
    folds stops the run here, not midway). Under a scheme that pools cities, every city's folds split
    one pool of every city's cells, each labelled by its own city's quintiles."""
    tc = cfg.ses.train
    pooled = spatial_folds.pools_cities(tc.cv)
    if pooled:
        if len(prepared) < 2:
            raise DataError(ses_dir / "cells.gpkg", f"ses.train.cv=city needs at least 2 cities with cells, got "
                            f"{sorted(prepared)}", "list more cities in ses.cities or use ses.train.cv=spatial")
        pool = pd.concat([d for d, _, _ in prepared.values()], ignore_index=True)
        pool_labels = np.concatenate([lab for _, lab, _ in prepared.values()])
    fits = []
    for city, (df, labels, edges) in prepared.items():
        fit_df, fit_labels = (pool, pool_labels) if pooled else (df, labels)
        splits, blocks = spatial_folds.make_splits(tc, cfg.seed, fit_df["cell_id"], fit_labels, fit_df["city"], city,
                                                   where=f"{ses_dir / 'cells.gpkg'}: {city}")
        fits.append(CityFit(city, df, labels, edges, fit_df, fit_labels, "all_cities" if pooled else city,
                            splits, blocks))
    return fits


def cell_data(cfg, fit: CityFit, ses_dir: Path, place: Placement):
    """The images of the cells ``fit`` splits: a uint8 store under <ses>/store/<name> (``store``: built
    again when the cells change, in ``workers`` processes, under torchrun every rank its share), else
    decoded per epoch (or once when they fit in ``ses.train.cache_mb``)."""
    paths, size = [ses_dir / p for p in fit.fit_df["path"]], cfg.ses.model.input_size
    if not cfg.store:
        return ses_data.CellDataset(paths, fit.fit_labels, size,
                                    cache=ses_data.fits_in_memory(len(fit.fit_df), size, cfg.ses.train.cache_mb))
    where = ses_dir / "store" / fit.name
    return ses_data.cell_store(paths, fit.fit_labels, size, where, f"{fit.name} store" if place.main else None,
                               cfg.workers, place.world_size > 1)


def sync(place: Placement) -> None:
    """Every rank waits for the main one (a no-op in one process)."""
    if place.world_size > 1:
        torch.distributed.barrier()


def start_city(cfg, fit: CityFit, ses_dir: Path, place: Placement) -> list[str]:
    """What changed since the city's finished folds were trained (refused unless ``overwrite``; then
    they are unmarked, so an interrupted retraining never reuses them); the run's config, stamp and
    folds.csv are written. Returns the changes (empty: finished folds are reused)."""
    city_dir, tc = ses_dir / fit.city, cfg.ses.train
    stamp, inputs = city_dir / results.STAMP, results.run_inputs(ses_dir, fit.city, fit.fit_df)
    retrain = runs.compare(stamp, cfg, results.RUN_KEYS, inputs) if runs.has_outputs(city_dir, [stamp.name]) else []
    if retrain and not cfg.overwrite:
        runs.refuse(city_dir, "holds models trained with another config or other cells", retrain,
                    "use --set overwrite=true to retrain them, or another paths.results")
    sync(place)
    if place.main:
        if retrain:
            for done in (*city_dir.glob("fold_*/metrics.json"), *city_dir.glob("fold_*/last.pt")):
                done.unlink()
        files.save_run_config(cfg, city_dir, "train_config.yaml")
        runs.write_stamp(stamp, "efficientnet_training.py", cfg, results.RUN_KEYS, inputs)
        files.write_csv(ses_folds.folds_frame(fit.fit_df["cell_id"], fit.splits, tc.cv, fit.blocks),
                        city_dir / "folds.csv")
    return retrain


def train_folds(cfg, fit: CityFit, data, retrain: list[str], ses_dir: Path, place: Placement) -> None:
    """Each fold not finished yet: trained with early stopping and restarts (resumed from its last.pt),
    the best weights kept, the held-out cells scored; its outputs written by the main process."""
    tc, city_dir = cfg.ses.train, ses_dir / fit.city
    for k, split in enumerate(fit.splits):
        fold_dir, last_pt = city_dir / f"fold_{k}", city_dir / f"fold_{k}" / "last.pt"
        if (fold_dir / "metrics.json").is_file() and not retrain:
            if place.main:
                last_pt.unlink(missing_ok=True)  # left by a run stopped right after finishing the fold
            continue
        seed = ses_folds.fold_seed(cfg.seed, fit.city, k)
        runtime.seed_everything(seed)
        model = ses_model.build_ses_model(cfg)
        resume = fitting.load_fit_state(last_pt, tc, seed)
        if resume is not None and place.main:
            print(f"[ses-train] {fit.city} fold {k}: resuming after epoch {resume['epoch_total']} from {last_pt}")
        with tqdm(total=tc.epochs * (tc.restarts + 1), desc=f"{fit.city} fold {k}", unit="ep", leave=False,
                  initial=len(resume["log"]) if resume else 0, **({} if place.main else {"disable": True})) as bar:
            try:
                net, train_set, val_set, fit_place = ses_frozen.fit_inputs(cfg, model, data, split, fit, ses_dir,
                                                                           place)  # freeze=backbone: head, embeddings
                result = fitting.fit(net, train_set, val_set, tc, fit_place, seed=seed, workers=cfg.workers,
                                     progress=lambda row: fitting.show_epoch(bar, row), checkpoint=last_pt,
                                     resume=resume)
            except TrainingDiverged as e:  # nothing of this fold is scored; say which fold it was
                raise TrainingDiverged(f"{fit.city} fold {k}, {e}") from None
        test = split["test"]
        log_probs = fitting.predict(model, data.subset(test), place, batch_size=tc.batch_size)
        m = metrics.ses_metrics(fit.fit_labels[test], log_probs)
        if place.main:
            results.write_fold_outputs(fold_dir, cfg, model, result, m,
                                       metrics.predictions_frame(fit.fit_df["cell_id"].iloc[test], k,
                                                                 fit.fit_labels[test], log_probs),
                                       city=fit.city, fold=k, cv=tc.cv, quintile_edges=fit.edges,
                                       n_train=len(split["train"]), n_val=len(split["val"]), n_test=len(test))
            last_pt.unlink(missing_ok=True)  # the fold is done (metrics.json written): its state is not needed
        sync(place)


def summarise_city(cfg, fit: CityFit, ses_dir: Path) -> dict:
    """The simple baseline on the same folds (``ses.baseline``), then the cross-fold summary beside it
    (intervals over spatial blocks or cells, the gain over the baseline, the permutation null) in
    metrics.json and predictions.csv; returns the city's row of training_summary.csv."""
    tc, city_dir, city = cfg.ses.train, ses_dir / fit.city, fit.city
    base = None
    if cfg.ses.baseline:
        seeds = [ses_folds.fold_seed(cfg.seed, city, k) for k in range(len(fit.splits))]
        base, secs, cpu = baselines.city_baseline([ses_dir / p for p in fit.fit_df["path"]], fit.fit_df["cell_id"],
                                                  fit.fit_labels, fit.splits, seeds)
        files.write_csv(base, city_dir / "baseline_predictions.csv")
        print(f"[ses-train] {city}: baseline fitted on {len(fit.splits)} fold(s) in {secs:.1f} s ({cpu:.1f} s of CPU)")
    else:
        (city_dir / "baseline_predictions.csv").unlink(missing_ok=True)
    summary, preds = results.city_summary(city_dir, len(fit.splits), seed=cfg.seed, unit=tc.bootstrap,
                                          block_m=tc.block_m, baseline=base, city=city, n_cells=len(fit.df),
                                          cv=tc.cv, quintile_edges=fit.edges)
    if base is not None:  # its cost next to training (wall clock, as the folds' "seconds")
        summary["baseline"]["seconds"] = round(secs, 1)
    files.write_csv(preds, city_dir / "predictions.csv")
    files.write_json(city_dir / "metrics.json", summary)
    model_card.write_ses_card(city_dir, cfg, results.STAMP, summary)
    mean, std = summary["mean"], summary["std"]
    print(f"[ses-train] {city}: {len(fit.df)} cells, {len(fit.splits)} folds; accuracy {mean['accuracy']:.3f}"
          f"±{std['accuracy']:.3f}; best fold {summary['best_fold']}; {results.closing_line(summary)} -> {city_dir}")
    return {"city": city, "n_cells": len(fit.df), "best_fold": summary["best_fold"],
            **{f"{k}_mean": mean[k] for k in metrics.METRICS}, **{f"{k}_std": std[k] for k in metrics.METRICS},
            "baseline_auc_poor_rich": summary["baseline"].get("pooled", {}).get("auc_poor_rich", np.nan),
            "auc_p_value": summary["permutation"]["auc_poor_rich"]["p_value"]}


def write_summary(rows: list[dict], skipped: list[str], ses_dir: Path) -> None:
    """training_summary.csv, one row a trained city."""
    table = pd.DataFrame(rows)
    files.write_csv(table, ses_dir / "training_summary.csv")
    print(f"[ses-train] {len(table)} cities; mean AUC poorest-vs-richest {table['auc_poor_rich_mean'].mean():.3f}"
          + (f"; skipped {', '.join(skipped)}" if skipped else "") + f" -> {ses_dir / 'training_summary.csv'}")
