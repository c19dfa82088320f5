"""What SES training writes: per-fold outputs, the city summary, the run's settings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core import files, outputs, runs, runtime
from .figures import confusion_figure
from .fitting import FitResult
from .metrics import intervals, scalar_metrics, ses_metrics, summarize_folds
from .model import CLASS_NAMES, N_CLASSES

RUN_KEYS = ("seed", "ses.cell_px", "ses.max_nodata", "ses_model", "ses_train")  # what decides a city's models


STAMP = "efficientnet_training.stamp.json"  # the run stamp (urbanlens.core.runs) in each city's folder


def run_inputs(ses_dir, city: str, cells: pd.DataFrame) -> dict:
    """Fingerprint of what a city's models learn from: its cells (id, income, image) and the stamp of
    the extraction that made the images."""
    from .extraction import STAMP as EXTRACT_STAMP

    return {**runs.table_fingerprint(f"cells.gpkg:{city}", cells[["cell_id", "income", "path"]]),
            **runs.fingerprint(ses_dir, [Path(ses_dir) / EXTRACT_STAMP], hash_up_to=1 << 40)}


def write_fold_outputs(fold_dir, cfg, model, fit: FitResult, m: dict, predictions: pd.DataFrame,
                       **info) -> None:
    """Everything one fold leaves: best.pt (weights, config, ``info``), train_log.csv, predictions.csv,
    classification_report.txt, confusion_matrix.csv/.png and, written last to mark the fold as done,
    metrics.json (the scalar metrics, best validation loss and ``info``)."""
    fold_dir = Path(fold_dir)
    runtime.save_checkpoint(fold_dir / "best.pt", model, cfg, epoch=fit.best_epoch, classes=list(CLASS_NAMES),
                            val_loss=fit.best_val_loss, **info)
    files.write_csv(pd.DataFrame(fit.log), fold_dir / "train_log.csv")
    files.write_csv(predictions, fold_dir / "predictions.csv")
    files.write_text(fold_dir / "classification_report.txt", m["classification_report"])
    files.write_csv(pd.DataFrame(m["confusion_matrix"], index=CLASS_NAMES, columns=CLASS_NAMES),
                 fold_dir / "confusion_matrix.csv", index=True, index_label="true \\ predicted")
    title = ", ".join(str(v) if k == "city" else f"{k} {v}" for k, v in info.items() if k in ("city", "fold"))
    files.save_figure(confusion_figure(m["confusion_matrix"], title), fold_dir / "confusion_matrix.png")
    files.write_json(fold_dir / "metrics.json", {
        **{k: v for k, v in info.items() if k != "quintile_edges"}, **scalar_metrics(m),
        "val_loss": fit.best_val_loss, "best_epoch": fit.best_epoch, "epochs_run": len(fit.log),
        "seconds": round(sum(r["seconds"] for r in fit.log), 1)})


def city_summary(city_dir, folds: int, seed: int = 0, **info) -> tuple[dict, pd.DataFrame]:
    """Cross-fold summary of a city from its fold folders: ``info``, mean/std per metric, ``best_fold``,
    the metrics of all held-out predictions pooled, ``intervals`` of AUC, kappa and Spearman (over
    folds and by a cell bootstrap seeded by ``seed``) and each fold's metrics; plus those predictions."""
    city_dir = Path(city_dir)
    fix = "delete that fold's folder and re-run efficientnet_training.py (it trains that fold again)"
    per_fold = [outputs.read_json(city_dir / f"fold_{k}" / "metrics.json", "efficientnet_training.py", ["val_loss"], fix)
                for k in range(folds)]
    preds = pd.concat([outputs.read_csv(city_dir / f"fold_{k}" / "predictions.csv", "efficientnet_training.py",
                                        ["cell_id", "true_class"], fix) for k in range(folds)])
    preds = preds.sort_values("cell_id").reset_index(drop=True)
    p = preds[[f"p_{k}" for k in range(N_CLASSES)]].to_numpy()
    log_p = np.log(np.clip(p, 1e-300, None))
    pooled = scalar_metrics(ses_metrics(preds["true_class"], log_p))
    summary = {**info, "folds": folds, **summarize_folds(per_fold, [f["val_loss"] for f in per_fold]),
               "pooled": pooled, "intervals": intervals(per_fold, preds["true_class"], log_p, seed),
               "per_fold": per_fold}
    return summary, preds
