"""Training the city classifier: learning-rate schedules, resuming, the training log (the epoch itself is
``core.loops.train_epoch`` with cross-entropy)."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from ..core import loops, outputs, runs, runtime
from ..core.backbones import classifier_from_checkpoint
from ..core.config import ADDED
from ..core.errors import CheckpointError, ConfigError
from ..core.loops import unwrap
from ..core.schema import SCHEDULES
from .patches import SOURCES as PATCHES_SOURCES
from .patches import STAMP as PATCHES_STAMP
from .patches import patches_dir

LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


WARMUP_SHARE = 0.15  # warmup_cosine: share of the steps spent rising linearly to the full learning rate


def lr_factor(name: str, step: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step`` of ``total_steps``: ``constant`` 1 (the paper's plain Adam);
    ``cosine`` from 1 down to 0; ``warmup_cosine`` up from 1/25 over the first WARMUP_SHARE of the steps,
    then down to 0 along a half cosine (a one-cycle schedule, good for short runs from scratch)."""
    t = min(step / max(total_steps, 1), 1.0)
    if name == "constant":
        return 1.0
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if name == "warmup_cosine":
        if t < WARMUP_SHARE:
            return 0.04 + 0.96 * t / WARMUP_SHARE
        return 0.5 * (1 + math.cos(math.pi * (t - WARMUP_SHARE) / (1 - WARMUP_SHARE)))
    raise ConfigError(f"unknown learning-rate schedule '{name}'; choose one of {', '.join(SCHEDULES)}")


def lr_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """A per-step ``LambdaLR`` over ``lr_factor``, or None for ``constant``. Its state is just the step
    count, so a resumed run continues the schedule of the current config's total number of steps."""
    lr_factor(name, 0, total_steps)  # validates the name
    if name == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, name, total_steps=total_steps))


def check_resumable(state: dict, classes: Sequence[str], model_cfg: dict, path: str | Path) -> None:
    """Exit with one line when a checkpoint was trained on other cities or with another model."""
    trained = state.get("config", {}).get("model", {})
    if list(state.get("classes", [])) != list(classes):
        raise CheckpointError(f"{path}: trained on cities {', '.join(state.get('classes', []))}, not on those of the "
                 f"manifest ({', '.join(classes)}); train without --resume or use another paths.results")
    for key in ("backbone", "input_size"):
        if trained.get(key) != model_cfg[key]:
            raise CheckpointError(f"{path}: trained with model.{key}={trained.get(key)}, config says {model_cfg[key]}; "
                     f"train without --resume or set --set model.{key}={trained.get(key)}")


RUN_KEYS = ("seed", "paths.data", "patch", "split", "model", "train", "store")  # what decides a trained classifier


STAMP = "train_classification.stamp.json"  # the run stamp (urbanlens.core.runs) in <results>/cities


def run_inputs(data_dir: str | Path) -> dict:
    """Fingerprint of the data a classifier trains on: the patch manifest, the per-image table and the
    patches' own stamp (hashed whatever their size, so re-cutting the same patches is the same data)."""
    folder = patches_dir(data_dir)
    return runs.fingerprint(data_dir, [folder / "manifest.csv", folder / PATCHES_SOURCES, folder / PATCHES_STAMP],
                            hash_up_to=1 << 40)


def patch_settings(data_dir: str | Path) -> dict:
    """The settings the patches were cut with (their stamp's), as ``{"patches:<key>": value}``: recorded
    in the training stamp so that a change of them is named, not just seen."""
    path = patches_dir(data_dir) / PATCHES_STAMP
    try:
        stamp = runs.read_stamp(path, "preprocessing.py")
    except FileNotFoundError:
        return {}
    return {f"patches:{k}": v for k, v in stamp["settings"].items()}


def trained_validation(results: str | Path) -> str | None:
    """The validation scheme (``split.val``) the classifier under ``results`` was trained with, from its
    run stamp (``paper`` for runs from before the key); None when there is no stamp."""
    try:
        stamp = runs.read_stamp(Path(results) / STAMP, "train_classification.py")
    except FileNotFoundError:
        return None
    return stamp["settings"].get("split.val", ADDED["split.val"])


def data_changes(changes: list[str]) -> list[str]:
    """The changes (of ``runs.compare``) that say the patches are not those trained on."""
    return [c for c in changes if c.startswith(("input ", "patches:"))]


def check_same_patches(stamp: str | Path, data_dir: str | Path, checkpoint: str | Path) -> None:
    """``StaleRun`` when the patches under ``data_dir`` changed since the model in ``checkpoint`` was
    trained (``stamp``: the training run's), naming what changed."""
    changed = data_changes(runs.compare(stamp, {}, (), run_inputs(data_dir), patch_settings(data_dir)))
    if changed:
        runs.refuse(checkpoint, "was trained on other patches than those now in "
                    f"{patches_dir(data_dir)}", changed, "re-run train_classification.py (--set overwrite=true) on "
                    "these patches, or cut the ones it was trained on again (preprocessing.py with its settings)")


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scaler: torch.amp.GradScaler | None = None, scheduler=None) -> tuple[int, float]:
    """Load a ``runtime.save_checkpoint`` state into model/optimizer/scaler/scheduler; return
    (epochs done, best val acc)."""
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    return int(state.get("epoch") or 0), float(state.get("best_val_acc", 0.0))


def read_log(path: str | Path, upto_epoch: int) -> list[dict]:
    """Rows of an existing training log up to ``upto_epoch`` (rows of epochs after the checkpoint are dropped)."""
    path = Path(path)
    if upto_epoch <= 0 or not path.is_file():
        return []
    log = outputs.read_csv(path, "train_classification.py", ["epoch"],
                           fix="delete it (it then logs the epochs from now on) or re-run train_classification.py "
                           "with --set overwrite=true")
    return log[log["epoch"] <= upto_epoch].to_dict("records")


def write_log(rows: list[dict], path: str | Path) -> Path:
    """The training log (one row per epoch, ``LOG_COLUMNS``), written atomically."""
    from ..core.files import write_csv

    return write_csv(pd.DataFrame(rows, columns=LOG_COLUMNS), path)


def trained_classifier(cfg, results: Path, device) -> tuple[nn.Module, dict, list[str], Path, int | None]:
    """The classifier ``train_classification.py`` saved under ``results`` (``checkpoints/best.pt``), on
    ``device``, after checking that the patches it was trained with are the ones there now: (model, its
    training settings, class order, checkpoint path, epoch it was saved at). Architecture, input size and classes come from the
    checkpoint."""
    best_pt = Path(results) / "checkpoints" / "best.pt"
    state = runtime.load_checkpoint(best_pt, writer="train_classification.py")
    model, trained, classes = classifier_from_checkpoint(state, best_pt)
    model = loops.to_device(model, device, cfg.train.channels_last, cfg.train.amp)
    check_same_patches(Path(results) / STAMP, cfg.paths.data, best_pt)
    return model, trained, classes, best_pt, state.get("epoch")
