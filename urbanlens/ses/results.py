"""What SES training writes: per-fold outputs, the city summary, the run's settings."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core import files, outputs, runs, runtime, tensorboard_log
from ..core.errors import DataError
from .figures import confusion_figure
from .fitting import FitResult
from . import metrics
from .baselines import NAME
from .metrics import scalar_metrics, ses_metrics, summarize_folds
from .model import CLASS_NAMES, N_CLASSES

RUN_KEYS = ("seed", "ses.cell_px", "ses.max_nodata", "ses.baseline", "ses.model", "ses.train")  # what decides a city's outputs


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
    tensorboard_log.write_events(fold_dir, fit.log)  # when tensorboard is installed
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


def read_log_probs(preds: pd.DataFrame) -> np.ndarray:
    """Log-probabilities [n, 5] from the p_0 .. p_4 columns of a predictions table."""
    p = preds[[f"p_{k}" for k in range(N_CLASSES)]].to_numpy(float)
    return np.log(np.clip(p, 1e-300, None))


def _per_fold(preds: pd.DataFrame) -> list[dict]:
    return [scalar_metrics(ses_metrics(g["true_class"], read_log_probs(g))) for _, g in preds.groupby("fold")]


def _aligned(baseline: pd.DataFrame, preds: pd.DataFrame, where) -> pd.DataFrame:
    """The baseline's predictions in the order of the CNN's (the same held-out cells, or an error)."""
    base = baseline.set_index("cell_id")
    if set(base.index) != set(preds["cell_id"]) or len(base) != len(preds):
        raise DataError(where, "the baseline's held-out cells differ from the CNN's",
                        "delete baseline_predictions.csv and re-run efficientnet_training.py")
    return base.loc[preds["cell_id"]].reset_index()


def comparison(preds: pd.DataFrame, per_fold: list[dict], baseline: pd.DataFrame | None, unit: str,
               block_m: float | None, seed: int = 0, where="predictions", resamples: int = metrics.RESAMPLES) -> dict:
    """The honest-number entries of a city's metrics.json from its pooled held-out predictions:
    ``intervals`` (``resamples`` bootstrap draws of ``unit`` of the held-out cells, seeded), ``baseline`` (its pooled
    metrics and intervals over the same resamples; or why there is none), ``gain_over_baseline`` (CNN
    minus baseline on each resample) and ``permutation`` (p-values of the pooled AUCs)."""
    y = preds["true_class"].to_numpy(int)
    models = {"cnn": read_log_probs(preds)}
    if baseline is not None:
        baseline = _aligned(baseline, preds, where)
        models["baseline"] = read_log_probs(baseline)
    units = metrics.bootstrap_units(preds["cell_id"], unit, block_m)
    boot = metrics.paired_bootstrap(y, models, metrics.bootstrap_draws(units, resamples, seed))
    frame = metrics.interval_frame(unit, len(set(map(str, units))), block_m, resamples)
    p_cnn = metrics.permutation_p(y, models["cnn"], metrics.PERMUTATIONS, seed)
    out = {"intervals": {**frame, "bootstrap": boot["cnn"], "over_folds": metrics.over_folds(per_fold)},
           "permutation": {"permutations": metrics.PERMUTATIONS, "auc_poor_rich": metrics.permutation_entry(p_cnn)}}
    if baseline is None:
        out["baseline"] = {"name": None, "reason": "ses.baseline=false"}
        return out
    out["baseline"] = {"name": NAME, "pooled": scalar_metrics(ses_metrics(y, models["baseline"])),
                       "intervals": {**frame, "bootstrap": boot["baseline"],
                                     "over_folds": metrics.over_folds(_per_fold(baseline))}}
    out["gain_over_baseline"] = {k: {n: v[n] for n in ("value", "lo", "hi")} for k, v in boot["gain"].items()}
    out["permutation"]["baseline_auc_poor_rich"] = metrics.permutation_entry(
        metrics.permutation_p(y, models["baseline"], metrics.PERMUTATIONS, seed))
    return out


def city_summary(city_dir, folds: int, seed: int = 0, unit: str = "blocks", block_m: float | None = None,
                 baseline: pd.DataFrame | None = None, **info) -> tuple[dict, pd.DataFrame]:
    """Cross-fold summary of a city from its fold folders: ``info``, mean/std per metric, ``best_fold``,
    the metrics of all held-out predictions pooled, the ``comparison`` entries (intervals by a bootstrap
    of ``unit`` seeded by ``seed``, the ``baseline``'s held-out predictions beside the CNN's, the gain
    and the permutation null) and each fold's metrics; plus the CNN's pooled predictions."""
    city_dir = Path(city_dir)
    fix = "delete that fold's folder and re-run efficientnet_training.py (it trains that fold again)"
    per_fold = [outputs.read_json(city_dir / f"fold_{k}" / "metrics.json", "efficientnet_training.py", ["val_loss"], fix)
                for k in range(folds)]
    preds = pd.concat([outputs.read_csv(city_dir / f"fold_{k}" / "predictions.csv", "efficientnet_training.py",
                                        ["cell_id", "true_class"], fix) for k in range(folds)])
    preds = preds.sort_values("cell_id").reset_index(drop=True)
    pooled = scalar_metrics(ses_metrics(preds["true_class"], read_log_probs(preds)))
    summary = {**info, "folds": folds, **summarize_folds(per_fold, [f["val_loss"] for f in per_fold]),
               "pooled": pooled, **comparison(preds, per_fold, baseline, unit, block_m, seed, city_dir),
               "per_fold": per_fold}
    return summary, preds


def _with_interval(name: str, b: dict) -> str:
    return f"{name} {b['value']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}]"


def closing_line(summary: dict) -> str:
    """The per-city summary in words: the CNN's pooled AUC poorest-vs-richest with its interval, the
    baseline's and the gain with theirs, the permutation p-value (and "not distinguishable from chance"
    above 0.05) and the bootstrap unit with its count."""
    iv, perm = summary["intervals"], summary["permutation"]["auc_poor_rich"]
    parts = [_with_interval("AUC poorest-vs-richest", iv["bootstrap"]["auc_poor_rich"])]
    if summary["baseline"].get("name"):
        parts.append(_with_interval("baseline", summary["baseline"]["intervals"]["bootstrap"]["auc_poor_rich"]))
        g = summary["gain_over_baseline"]["auc_poor_rich"]
        parts.append(f"gain {g['value']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]")
    else:
        parts.append("no baseline (ses.baseline=false)")
    line = ", ".join(parts) + f" ({iv['level']:.0%} bootstrap over {metrics.describe_unit(iv)}"
    line += "; too few to tell the spread)" if "note" in iv else ")"
    line += f"; permutation p {perm['p_value']:.3g}"
    return line + (": not distinguishable from chance" if perm["chance"] else "")
