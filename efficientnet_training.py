"""Per-city income-quintile model from aerial cell images, with random, spatial or leave-one-city-out folds.

For each city of the config, its non-void census cells are labelled with the city's income quintiles
(0 = poorest fifth, 4 = richest). EfficientNet-B0 reads a min-max-scaled cell image and outputs one
sigmoid unit p, read as a binomial over the five ordered classes, trained with categorical cross-entropy.
Folds by ses_train.cv: stratified (random cells, the paper's), spatial (whole blocks of block_m metres,
training cells within buffer_m of a test cell dropped) or city (each city tested by a model trained on
the others). In each fold a share of the training cells validates: Adam, reduce-on-plateau
and early stopping on the validation loss, restarted from the best weights at lr / 2^restart. The
held-out fold is predicted and scored; a cross-fold summary names the best fold (lowest val loss).
A simple baseline (colour/texture statistics and random convolutional features, ses.baseline) is fitted
and scored on the same folds; metrics.json gives both with intervals from a bootstrap of spatial blocks
(ses_train.bootstrap), the CNN's gain over the baseline and a permutation p-value of each AUC;
MODEL_CARD.md beside them says what the models were trained on, those numbers and where not to use them.
Each city's split is saved as folds.csv. Every epoch saves the fold's training state to fold_<k>/last.pt
(removed when the fold is done): a re-run of the same command skips finished folds and continues an
interrupted one from its last epoch, ending where an uninterrupted run ends.

    python efficientnet_training.py --config configs/ses_demo.yaml [--set ses_train.epochs=5]
    torchrun --nproc_per_node=N efficientnet_training.py ...   (data-parallel over N GPUs)
"""
import sys

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from urbanlens.core import config, entry, files, locks, model_card, runs, runtime
from urbanlens.core.errors import ConfigError, DataError, TrainingDiverged
from urbanlens.ses import data as ses_data
from urbanlens.ses import baselines, fitting, metrics, results, skips, spatial_folds
from urbanlens.ses import folds as ses_folds
from urbanlens.ses import model as ses_model


def main() -> None:
    cfg, _ = config.cli(__doc__.splitlines()[0], "configs/ses_demo.yaml")
    rank, world = runtime.setup_distributed()
    main = runtime.is_main_process()
    device = runtime.select_device(cfg.device)
    tc = cfg.ses_train
    if tc.cv == "city" and len(cfg.ses.cities) < 2:
        raise ConfigError("config", f"ses_train.cv=city leaves one city out, but ses.cities lists "
                          f"{list(cfg.ses.cities)}", "list at least 2 cities or use ses_train.cv=spatial")
    ses_dir = config.results_dir(cfg, "ses")
    entry.keep(locks.hold(ses_dir, "efficientnet_training.py", cfg))  # shared by the ranks of one torchrun
    cells = ses_data.read_cells(ses_dir / "cells.gpkg")
    ses_model.build_ses_model(cfg)  # fail now, not after a city, when ImageNet weights are asked for but absent


    def sync():  # every rank waits for the main one to finish writing
        if world > 1:
            torch.distributed.barrier()


    def cell_data(df, labels, name):  # the cells' images: a uint8 store (store=true), else decoded per epoch
        paths, size = [ses_dir / p for p in df["path"]], cfg.ses_model.input_size  # or once when they fit in cache_mb
        if not cfg.store:
            return ses_data.CellDataset(paths, labels, size, cache=ses_data.fits_in_memory(len(df), size, tc.cache_mb))
        where = ses_dir / "store" / name  # built again when the cells change
        built = ses_data.cell_store(paths, labels, size, where, f"{name} store") if main else None
        sync()
        return built if built is not None else ses_data.cell_store(paths, labels, size, where)


    def bad_input(problem: str, then: str):  # stop under strict=true, else warn and go on
        if cfg.strict:
            raise DataError(f"{problem}; check ses.cities, delete broken images and re-run "
                     "generate_fr_ua_aerial_data.py (it extracts the missing ones again)")
        print(f"[ses-train] warning: {problem}; {then}", file=sys.stderr)


    # a city without usable cells is skipped (and named) when others train; without any, nothing trains
    empty = {c: r for c in cfg.ses.cities if (r := ses_data.no_cells_reason(cells, c, cfg.ses.max_nodata))}
    if len(empty) == len(cfg.ses.cities):
        if main:
            for city, reason in empty.items():
                skips.record_skip(ses_dir / city, city, reason)
        raise DataError(ses_dir / "cells.gpkg", "no city has usable cells: " + "; ".join(
            f"{c}: {r}" for c, r in empty.items()), "check ses.cities, ses.max_nodata and the orthophotos, "
            "then re-run generate_fr_ua_aerial_data.py")
    # 1. each city's non-void cells and its own income quintiles
    prepared, rows, skipped = {}, [], []
    for city in cfg.ses.cities:
        city_dir = ses_dir / city
        df, missing = ses_data.city_cells(cells, city, ses_dir)
        if missing:
            bad_input(f"{missing[0]}: {len(missing)} cell image(s) of {city} missing or unreadable (this one first)",
                      "training without them")
        if len(df) == 0:  # recorded, so that the map stage names the cause; a stop when no city trains
            reason = empty.get(city) or "every one of its cell images is missing or unreadable"
            bad_input(f"{ses_dir / 'cells.gpkg'}: no usable cells of '{city}' ({reason})", "city skipped")
            if main:
                skips.record_skip(city_dir, city, reason)
            skipped.append(f"{city} ({reason})")
            continue
        if main:
            skips.clear_skip(city_dir)
        labels = ses_data.income_quintiles(df["income"])
        prepared[city] = (df.assign(city=city), labels, ses_data.quintile_edges(df["income"], labels))
    if tc.cv == "city":  # leave one city out: one pool of every city's cells, each with its own quintiles
        if len(prepared) < 2:
            raise DataError(ses_dir / "cells.gpkg", f"ses_train.cv=city needs at least 2 cities with cells, got "
                            f"{sorted(prepared)}", "list more cities in ses.cities or use ses_train.cv=spatial")
        pool = pd.concat([d for d, _, _ in prepared.values()], ignore_index=True)
        pool_labels = np.concatenate([lab for _, lab, _ in prepared.values()])
        pool_data = cell_data(pool, pool_labels, "all_cities")

    # every city's folds before any training: a city too small for them stops the run here, not midway
    folds_of = {city: spatial_folds.make_splits(tc, cfg.seed, *(
        (pool["cell_id"], pool_labels, pool["city"]) if tc.cv == "city" else (df["cell_id"], labels, df["city"])),
        city, where=f"{ses_dir / 'cells.gpkg'}: {city}") for city, (df, labels, _) in prepared.items()}
    for city, (df, labels, edges) in prepared.items():
        city_dir = ses_dir / city
        fit_df, fit_labels = (pool, pool_labels) if tc.cv == "city" else (df, labels)
        splits, blocks = folds_of[city]

        # 2. finished folds are reused only when they were trained with this config (or overwrite=true)
        stamp, inputs = city_dir / results.STAMP, results.run_inputs(ses_dir, city, fit_df)
        retrain = runs.compare(stamp, cfg, results.RUN_KEYS, inputs) if runs.has_outputs(city_dir, [stamp.name]) else []
        if retrain and not cfg.overwrite:
            runs.refuse(city_dir, "holds models trained with another config or other cells", retrain,
                        "use --set overwrite=true to retrain them, or another paths.results")
        sync()
        if main:
            if retrain:  # unmark the old folds first, so an interrupted retraining never reuses them
                for done in (*city_dir.glob("fold_*/metrics.json"), *city_dir.glob("fold_*/last.pt")):
                    done.unlink()
            files.save_run_config(cfg, city_dir, "train_config.yaml")
            runs.write_stamp(stamp, "efficientnet_training.py", cfg, results.RUN_KEYS, inputs)
            files.write_csv(ses_folds.folds_frame(fit_df["cell_id"], splits, tc.cv, blocks), city_dir / "folds.csv")
        data = pool_data if tc.cv == "city" else cell_data(df, labels, city)

        # 3. each fold: train with early stopping and restarts, keep the best weights, score held-out cells
        for k, split in enumerate(splits):
            fold_dir, last_pt = city_dir / f"fold_{k}", city_dir / f"fold_{k}" / "last.pt"
            if (fold_dir / "metrics.json").is_file() and not retrain:
                if main:
                    last_pt.unlink(missing_ok=True)  # left by a run stopped right after finishing the fold
                continue
            seed = ses_folds.fold_seed(cfg.seed, city, k)
            runtime.seed_everything(seed)
            model = ses_model.build_ses_model(cfg)
            resume = fitting.load_fit_state(last_pt, tc, seed)
            if resume is not None and main:
                print(f"[ses-train] {city} fold {k}: resuming after epoch {resume['epoch_total']} from {last_pt}")
            with tqdm(total=tc.epochs * (tc.restarts + 1), desc=f"{city} fold {k}", unit="ep", leave=False,
                      initial=len(resume["log"]) if resume else 0, **({} if main else {"disable": True})) as bar:
                try:
                    fit = fitting.fit(model, data.subset(split["train"]), data.subset(split["val"]), tc, device,
                                  seed=seed, workers=cfg.workers, progress=lambda row: fitting.show_epoch(bar, row),
                                  checkpoint=last_pt, resume=resume)
                except TrainingDiverged as e:  # nothing of this fold is scored; say which fold it was
                    raise TrainingDiverged(f"{city} fold {k}, {e}") from None
            test = split["test"]
            log_probs = fitting.predict(model, data.subset(test), device, batch_size=tc.batch_size, amp=tc.amp)
            m = metrics.ses_metrics(fit_labels[test], log_probs)
            if main:
                results.write_fold_outputs(fold_dir, cfg, model, fit, m,
                                       metrics.predictions_frame(fit_df["cell_id"].iloc[test], k, fit_labels[test], log_probs),
                                       city=city, fold=k, cv=tc.cv, quintile_edges=edges, n_train=len(split["train"]),
                                       n_val=len(split["val"]), n_test=len(test))
                last_pt.unlink(missing_ok=True)  # the fold is done (metrics.json written): its state is not needed
            sync()

        # 4. the simple baseline on the same folds, then the cross-fold summary beside it (intervals over
        # spatial blocks or cells, the gain over the baseline, the permutation null)
        if main:
            base = None
            if cfg.ses.baseline:
                seeds = [ses_folds.fold_seed(cfg.seed, city, k) for k in range(len(splits))]
                base, secs, cpu = baselines.city_baseline([ses_dir / p for p in fit_df["path"]], fit_df["cell_id"],
                                                          fit_labels, splits, seeds)
                files.write_csv(base, city_dir / "baseline_predictions.csv")
                print(f"[ses-train] {city}: baseline fitted on {len(splits)} fold(s) in {secs:.1f} s "
                      f"({cpu:.1f} s of CPU)")
            else:
                (city_dir / "baseline_predictions.csv").unlink(missing_ok=True)
            summary, preds = results.city_summary(city_dir, len(splits), seed=cfg.seed, unit=tc.bootstrap,
                                                  block_m=tc.block_m, baseline=base, city=city, n_cells=len(df),
                                                  cv=tc.cv, quintile_edges=edges)
            if base is not None:  # its cost next to training (wall clock, as the folds' "seconds")
                summary["baseline"]["seconds"] = round(secs, 1)
            files.write_csv(preds, city_dir / "predictions.csv")
            files.write_json(city_dir / "metrics.json", summary)
            model_card.write_ses_card(city_dir, cfg, results.STAMP, summary)
            mean, std = summary["mean"], summary["std"]
            rows.append({"city": city, "n_cells": len(df), "best_fold": summary["best_fold"],
                         **{f"{k}_mean": mean[k] for k in metrics.METRICS},
                         **{f"{k}_std": std[k] for k in metrics.METRICS},
                         "baseline_auc_poor_rich": summary["baseline"].get("pooled", {}).get("auc_poor_rich", np.nan),
                         "auc_p_value": summary["permutation"]["auc_poor_rich"]["p_value"]})
            print(f"[ses-train] {city}: {len(df)} cells, {len(splits)} folds; accuracy {mean['accuracy']:.3f}"
                  f"±{std['accuracy']:.3f}; best fold {summary['best_fold']}; {results.closing_line(summary)}"
                  f" -> {city_dir}")

    if skipped and len(skipped) == len(cfg.ses.cities):
        raise DataError(ses_dir / "cells.gpkg", f"no city has usable cells: {'; '.join(skipped)}",
                        "check ses.cities, ses.max_nodata and the orthophotos, and re-run generate_fr_ua_aerial_data.py")
    if main and rows:
        table = pd.DataFrame(rows)
        files.write_csv(table, ses_dir / "training_summary.csv")
        print(f"[ses-train] {len(table)} cities; mean AUC poorest-vs-richest {table['auc_poor_rich_mean'].mean():.3f}"
              + (f"; skipped {', '.join(skipped)}" if skipped else "") + f" -> {ses_dir / 'training_summary.csv'}")
    runtime.cleanup_distributed()


if __name__ == "__main__":
    entry.run(main)
