"""Fitting one fold: Adam, reduce-on-plateau, early stopping with restarts, resumable state."""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core import batch_ops, loops, runtime, store
from ..core.placement import Placement, is_distributed, wrap_distributed
from .model import N_CLASSES


@dataclass
class FitResult:
    best_state: dict
    best_val_loss: float
    best_epoch: int
    log: list[dict] = field(default_factory=list)


def cell_loader(dataset, batch_size: int, device, shuffle: bool = False, seed: int = 0, workers: int = 0,
           distributed: bool = False):
    """``loops.make_loader`` over cells, with its own generator seeded by ``seed``; a dataset whose
    images are decoded up front (``CellDataset`` cache) or memory-mapped (``data.cell_store``: items are
    byte copies, thousands a second) is read in process, without workers (no start-up every epoch). A
    store's uint8 batches are finished on the device by the dataset's ``prepare``."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset  # a loops.shard
    in_memory = getattr(base, "images", None) is not None or isinstance(base, store.StoreDataset)
    workers = 0 if in_memory else workers
    loader = loops.make_loader(dataset, batch_size, workers, device, shuffle=shuffle, seed=seed,
                               distributed=distributed, persistent_workers=True)
    return on_device(loader, base, device)


def on_device(loader, dataset, device):
    """``loader`` with each batch finished on ``device`` by ``dataset.prepare`` when it has one."""
    prepare = getattr(dataset, "prepare", None)
    return loader if prepare is None else batch_ops.OnDevice(loader, prepare, device)


def predict(model: nn.Module, dataset, place: Placement, batch_size: int = 32) -> np.ndarray:
    """Log-probabilities [N, 5] of every item of ``dataset`` (in order), model in eval mode."""
    if len(dataset) == 0:
        return np.zeros((0, N_CLASSES), np.float32)
    loader = on_device(loops.make_loader(dataset, batch_size, 0, place.device), dataset, place.device)
    log_probs, _ = loops.predict(model, loader, place, desc=None)
    return log_probs


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, loader, place: Placement) -> None:
    """Replace every batch-norm layer's running mean and variance by their exact average over ``loader``
    at the current weights (the other layers stay in eval mode, so dropout and stochastic depth are off).
    Evaluation then sees the statistics of the weights it evaluates, not a lagging running average."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training, momenta = model.training, [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    for x, _ in loader:
        if len(x) < 2:  # a last batch of one: batch norm in training mode cannot take it (nor needs it)
            continue
        with place.autocast():
            model(place.batch(x))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


FIT_STATE_VERSION = 1


def load_fit_state(path, tcfg, seed: int) -> dict | None:
    """The training state ``fit`` saved at ``path`` after its last finished epoch, or None when there is
    none or it was saved with other ``ses_train`` settings or another seed (then it must not be resumed)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = runtime.load_checkpoint(path, writer="efficientnet_training.py")
    same = (state.get("fit_state_version") == FIT_STATE_VERSION and state.get("seed") == seed
            and state.get("config") == (tcfg.to_dict() if hasattr(tcfg, "to_dict") else dict(tcfg)))
    return state if same else None


def _save_fit_state(path, model, opt, sched, scaler, gen, best: "FitResult", tcfg, seed, restart, epoch,
                    epoch_total, stale) -> None:
    rng = {"torch": torch.get_rng_state(), "flips": gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    runtime.save_checkpoint(path, model, tcfg, opt, epoch_total, fit_state_version=FIT_STATE_VERSION,
                            seed=seed, restart=restart, run_epoch=epoch, epoch_total=epoch_total, stale=stale,
                            scheduler=sched.state_dict(), scaler=scaler.state_dict(), rng=rng,
                            best_state=best.best_state, best_val_loss=best.best_val_loss,
                            best_epoch=best.best_epoch, log=best.log)


def fit(model: nn.Module, train_set, val_set, tcfg, place: Placement, seed: int = 0, workers: int = 0,
        progress=None, checkpoint=None, resume: dict | None = None) -> FitResult:
    """Train with Adam, reduce-on-plateau on the validation loss and early stopping with restarts.

    Run r (r = 0..tcfg.restarts) starts from the best weights so far with lr = tcfg.lr / 2**r and stops
    after tcfg.early_stop_patience epochs without a better validation loss, or tcfg.epochs epochs.
    ``progress(row)`` is called after every epoch. The model ends holding the best weights. ``place``:
    where and how (the stage's, with ``ses.train.amp`` and NHWC where it applies).

    ``checkpoint``: a path where the whole training state is saved after every
    ``tcfg.checkpoint_every``-th epoch (weights, optimizer,
    plateau scheduler, grad scaler, early-stopping counter, restart index, RNG states, best weights so
    far and the log). ``resume``: such a state (``load_fit_state``); training continues after its
    epoch and, with the same seed on the same device, ends exactly as an uninterrupted fit does.
    """
    distributed = is_distributed()
    rank, world, device = place.rank, place.world_size, place.device
    place.model(model)
    net = wrap_distributed(model, device)
    gen = torch.Generator().manual_seed(seed)
    batch = loops.rank_batch(tcfg.batch_size, world, "ses.train.batch_size")  # global batch, split over the ranks
    val_loader = cell_loader(loops.shard(val_set, rank, world), batch, device, seed=seed, workers=workers)
    flips = functools.partial(batch_ops.random_flips, generator=gen, rotate=tcfg.rot90,
                              share=(rank, world))  # on the device, before each step; each cell as in one process
    best = FitResult(copy.deepcopy(model.state_dict()), math.inf, -1)
    epoch_total, first_restart = 0, 0
    if resume is not None:
        best = FitResult(resume["best_state"], resume["best_val_loss"], resume["best_epoch"], list(resume["log"]))
        epoch_total, first_restart = resume["epoch_total"], resume["restart"]
        gen.set_state(resume["rng"]["flips"])
        torch.set_rng_state(resume["rng"]["torch"])
        if "cuda" in resume["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
    save = checkpoint is not None and place.main
    for restart in range(first_restart, tcfg.restarts + 1):
        resumed = resume is not None and restart == first_restart
        if restart and not resumed:
            model.load_state_dict(best.best_state)
        opt = torch.optim.Adam(net.parameters(), lr=tcfg.lr / 2 ** restart)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=tcfg.plateau_factor,
                                                           patience=tcfg.plateau_patience)
        scaler = place.scaler()
        stale, first_epoch = 0, 0
        if resumed:  # the run that was going on: its weights, optimizer, scheduler and counters
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            stale, first_epoch = resume["stale"], resume["run_epoch"]
            if stale >= tcfg.early_stop_patience:
                continue
        for epoch in range(first_epoch, tcfg.epochs):
            t0 = time.perf_counter()
            # under DDP each rank its share of the order one process takes (loops.RankShare)
            train_loader = cell_loader(train_set, batch, device, True, seed + epoch_total, workers, distributed)
            augment = None if getattr(train_set, "embedded", False) else flips  # embeddings (core.frozen): none
            tr = loops.train_epoch(net, train_loader, loops.Optimiser(opt, None, scaler, "ses.train.lr"), F.nll_loss,
                                   place, augment=augment, min_batch=2, desc=None, epoch=epoch_total + 1,
                                   max_loss=loops.loss_limit(N_CLASSES))  # diverged: no save
            if distributed:  # batch norm is synchronised (placement.wrap_distributed); rank 0's buffers all
                for buf in model.buffers():  # the same, so that every rank validates (and steps its plateau) alike
                    torch.distributed.broadcast(buf, src=0)
            if tcfg.precise_bn:
                recompute_bn_stats(model, cell_loader(train_set, tcfg.batch_size, device, seed=seed, workers=workers),
                                   place)
            va = loops.check_validation(loops.evaluate(model, val_loader, F.nll_loss, place, desc=None),
                                        epoch_total + 1, opt.param_groups[0]["lr"], "ses.train.lr") if len(val_set) else tr
            val_loss, val_acc = va["loss"], va["acc"]
            lr = opt.param_groups[0]["lr"]
            sched.step(val_loss)
            improved = val_loss < best.best_val_loss
            if improved:
                best.best_state = copy.deepcopy(model.state_dict())
                best.best_val_loss, best.best_epoch = val_loss, epoch_total
                stale = 0
            else:
                stale += 1
            row = {"run": restart, "epoch": epoch_total, "lr": lr, "train_loss": tr["loss"],
                   "train_acc": tr["acc"], "val_loss": val_loss, "val_acc": val_acc,
                   "best": improved, "seconds": round(time.perf_counter() - t0, 3)}
            best.log.append(row)
            epoch_total += 1
            if save and epoch_total % tcfg.get("checkpoint_every", 1) == 0:
                _save_fit_state(checkpoint, model, opt, sched, scaler, gen, best, tcfg, seed, restart, epoch + 1,
                                epoch_total, stale)
            if progress is not None:
                progress(row)
            if stale >= tcfg.early_stop_patience:
                break
    model.load_state_dict(best.best_state)
    return best


def show_epoch(bar, row: dict) -> None:
    """Advance a tqdm bar by one epoch of ``fit`` and show its run and losses."""
    bar.set_postfix(run=row["run"], train=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}",
                    refresh=False)  # shown when update draws the bar, at tqdm's pace
    bar.update(1)
