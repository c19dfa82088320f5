"""Training the city classifier: its data and loaders, learning-rate schedules, resuming, the epochs and
the training log (each epoch is ``core.loops.train_epoch`` with cross-entropy)."""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from ..core import batch_ops, loops, model_card, outputs, runs, runtime, tensorboard_log
from ..core.config import ADDED
from ..core.config import data_dir
from ..core.errors import CheckpointError, ConfigError, DataError
from ..core.files import save_run_config
from ..core.placement import Placement, unwrap, wrap_distributed
from ..core.schema import SCHEDULES
from . import data, sampling, validation
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
    trained = state.get("config", {}).get("cities", {}).get("model", {})
    if list(state.get("classes", [])) != list(classes):
        raise CheckpointError(f"{path}: trained on cities {', '.join(state.get('classes', []))}, not on those of the "
                 f"manifest ({', '.join(classes)}); train without --resume or use another paths.results")
    for key in ("backbone", "input_size"):
        if trained.get(key) != model_cfg[key]:
            raise CheckpointError(f"{path}: trained with cities.model.{key}={trained.get(key)}, config says {model_cfg[key]}; "
                     f"train without --resume or set --set cities.model.{key}={trained.get(key)}")


RUN_KEYS = ("seed", "paths.data", "cities.patch", "cities.split", "cities.model", "cities.train", "store")  # what decides a trained classifier


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
    """The validation scheme (``cities.split.val``) the classifier under ``results`` was trained with, from its
    run stamp (``paper`` for runs from before the key); None when there is no stamp."""
    try:
        stamp = runs.read_stamp(Path(results) / STAMP, "train_classification.py")
    except FileNotFoundError:
        return None
    return stamp["settings"].get("cities.split.val", ADDED["cities.split.val"])


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


def datasets(cfg, manifest: pd.DataFrame, classes: list[str], place: Placement):
    """(train, val) datasets of the patches ``manifest`` assigns to them. With ``store`` they are decoded
    once at ``cities.model.input_size`` into <patches>/store/ (again when the patches change; in ``workers``
    processes, under torchrun every rank its share), flips and normalisation then happen per batch on the
    device; without, each patch is decoded, resized, flipped and normalised in the loader every epoch."""
    patches_dir, size = data_dir(cfg, "cities", "patches"), cfg.cities.model.input_size
    if cfg.store:
        train_set, val_set = (data.split_store(
            manifest, s, patches_dir, classes, size, f"[train] store {s}" if place.main else None,
            validation.store_name(s, cfg.cities.split.val), cfg.workers, place.world_size > 1) for s in ("train", "val"))
    else:
        train_set = data.split_dataset(manifest, "train", patches_dir, classes, data.transforms(size, train=True),
                                       size)
        val_set = data.split_dataset(manifest, "val", patches_dir, classes, data.transforms(size, train=False), size)
    if len(train_set) < 2:  # batch norm in training mode needs two images a batch
        raise DataError(patches_dir / "manifest.csv", f"{len(train_set)} training patch; training needs 2 or more",
                        "add images to the cities' train sites (all but the last) and re-run preprocessing.py")
    return train_set, val_set


def loaders(cfg, train_set, val_set, place: Placement):
    """(epoch sampler, train loader, val loader): ``cities.train.batch_size`` is the global batch, split over
    the ranks (``loops.rank_batch``); class-balanced draws (``cities.train.balanced``), at most
    ``cities.train.max_steps_per_epoch`` steps."""
    batch = loops.rank_batch(cfg.cities.train.batch_size, place.world_size, "cities.train.batch_size")
    draws = len(train_set)
    if cfg.cities.train.max_steps_per_epoch > 0:
        draws = min(draws, cfg.cities.train.max_steps_per_epoch * batch * place.world_size)
    sampler = sampling.EpochSampler(train_set.labels, cfg.cities.train.balanced, draws, cfg.seed, place.rank,
                                    place.world_size)
    train_loader = loops.make_loader(train_set, batch, cfg.workers, place.device, sampler)
    val_loader = loops.make_loader(loops.shard(val_set, place.rank, place.world_size), batch, cfg.workers,
                                   place.device)
    if cfg.store:
        val_loader = batch_ops.OnDevice(val_loader, data.eval_batches, place.device)
    return sampler, train_loader, val_loader


def optimiser(cfg, model: nn.Module, steps_per_epoch: int, place: Placement) -> loops.Optimiser:
    """Adam at ``cities.train.lr`` under ``cities.train.schedule``, with the loss scaler of ``place``'s precision."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.cities.train.lr)
    scheduler = lr_schedule(optimizer, cfg.cities.train.schedule, cfg.cities.train.epochs * steps_per_epoch)
    return loops.Optimiser(optimizer, scheduler, place.scaler(), "cities.train.lr")


def resume_point(cfg, resume: bool, out: Path, model: nn.Module, opt: loops.Optimiser, classes: list[str],
                 place: Placement) -> tuple[int, float]:
    """(epochs done, best val acc) of the run under ``out``: (0, -1) for a new one. A last.pt trained on
    other patches is refused (also with ``resume``), one trained with other settings continues only with
    ``resume``; ``overwrite`` starts over (the old checkpoints removed). The run's stamp is written."""
    last_pt, best_pt = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    patches = data_dir(cfg, "cities", "patches")
    state = runtime.load_checkpoint(last_pt, writer="train_classification.py") if last_pt.exists() else None
    stamp, inputs = out / STAMP, run_inputs(cfg.paths.data)
    cut_with = patch_settings(cfg.paths.data)
    changed = runs.compare(stamp, cfg, RUN_KEYS, inputs, cut_with) if state is not None else []
    if data_changes(changed) and not cfg.overwrite:  # --resume does not continue on other data
        runs.refuse(last_pt, f"was trained on other patches than those now in {patches}", data_changes(changed),
                    "--set overwrite=true trains from scratch on these, or cut the old ones again "
                    "(preprocessing.py with their settings), or use another paths.results")
    if state is not None and changed and (not resume or data_changes(changed)):
        if not cfg.overwrite:
            runs.refuse(last_pt, "trained with other settings", changed, "re-run with --resume to continue it, "
                        "--set overwrite=true to train from scratch, or use another paths.results")
        state = None
        if place.main:  # start over: the old run's checkpoints must not be taken for this one's
            last_pt.unlink(missing_ok=True)
            best_pt.unlink(missing_ok=True)
    done, best_acc = 0, -1.0
    if state is not None:
        check_resumable(state, classes, cfg.cities.model, last_pt)
        done, best_acc = restore(state, model, opt.optimizer, opt.scaler, opt.scheduler)
        if place.main:
            print(f"[train] resuming from {last_pt} after epoch {done}")
    elif resume and place.main:
        print(f"[train] --resume: no {last_pt} yet, starting from scratch")
    if place.main:
        save_run_config(cfg, out, "train_config.yaml")
        runs.write_stamp(stamp, "train_classification.py", cfg, RUN_KEYS, inputs, cut_with)
    return done, best_acc


def run_epochs(cfg, model: nn.Module, opt: loops.Optimiser, sampler, train_loader, val_loader, classes: list[str],
               out: Path, done: int, best_acc: float, place: Placement) -> float:
    """Epochs ``done`` + 1 .. ``cities.train.epochs``: each writes a row of train_log.csv and last.pt, and best.pt
    when its validation accuracy is the best so far (ties: the later epoch). The sampling and
    augmentation of epoch e depend only on (seed, e), so a resumed run draws the same batches as an
    uninterrupted one. A diverged epoch stops the run unsaved. Returns the best validation accuracy."""
    last_pt, best_pt, log_csv = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt", out / "train_log.csv"
    log = read_log(log_csv, done)
    model = wrap_distributed(model, place.device)
    start = time.time()
    for epoch in range(done + 1, cfg.cities.train.epochs + 1):
        t0 = time.time()
        sampling.begin_epoch(sampler, cfg.seed, epoch, place.rank)
        lr_used = opt.lr  # at the start of the epoch
        augment = data.train_batches(cfg.seed, epoch, place.rank, place.world_size) if cfg.store and cfg.cities.train.freeze == "none" else None
        tr = loops.train_epoch(model, train_loader, opt, F.cross_entropy, place, augment=augment, min_batch=2,
                               desc=f"epoch {epoch}/{cfg.cities.train.epochs}", epoch=epoch,
                               max_loss=loops.loss_limit(len(classes)))  # diverged: no save
        va = loops.check_validation(loops.evaluate(model, val_loader, F.cross_entropy, place), epoch, lr_used,
                                    opt.lr_key)
        if not place.main:
            continue
        log.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                    "val_acc": va["acc"], "lr": lr_used, "seconds": time.time() - t0})
        write_log(log, log_csv)
        tensorboard_log.write_events(out, log)  # when tensorboard is installed
        improved = va["acc"] >= best_acc  # ties: the later, longer-trained epoch
        best_acc = max(best_acc, va["acc"])
        extra = dict(classes=classes, best_val_acc=best_acc, scaler=opt.scaler.state_dict(),
                     scheduler=opt.scheduler.state_dict() if opt.scheduler else None)
        if improved:
            runtime.save_checkpoint(best_pt, model, cfg, None, epoch, **extra)
        # last: the resume point is written once everything else of the epoch is, so a run killed
        # between these writes redoes the epoch rather than skip what it had not saved
        runtime.save_checkpoint(last_pt, model, cfg, opt.optimizer, epoch, **extra)
        print(f"[train] epoch {epoch}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f} | "
              f"val loss {va['loss']:.3f} acc {va['acc']:.3f}{' *' if improved else ''} | {time.time() - t0:.0f} s")
    if place.main:
        model_card.write_cities_card(out, cfg, STAMP)  # the test stage adds its metrics
        print(f"[train] {cfg.cities.train.epochs} epochs ({cfg.cities.train.epochs - done} run now) in {time.time() - start:.0f} s; "
              f"best val acc {best_acc:.3f}; checkpoints in {out / 'checkpoints'}, log {log_csv}")
    return best_acc
