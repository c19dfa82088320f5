"""The training core both pipelines share: loaders, the optimisation step and epoch, evaluation and
prediction, on a ``placement.Placement`` (device, precision, memory layout, DDP rank).

What differs between the pipelines comes in as arguments: the loss (``F.cross_entropy`` on the city
classifier's logits, ``F.nll_loss`` on the income model's binomial log-probabilities), the sampler, an
augmentation applied on the device, and the ``Optimiser`` (optimizer, per-step scheduler, loss scaler,
and the config key of its learning rate, named when training diverges).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .backbones import logits_and_embeddings
from .errors import ConfigError, DataError, TrainingDiverged
from .placement import Placement, is_distributed, is_main_process, unwrap

LossFn = Callable[..., torch.Tensor]  # loss_fn(outputs, targets, reduction="mean" | "sum"), as torch's losses


# ------------------------------------------------------------------ loaders and DDP
def shuffled_order(n: int, seed: int) -> torch.Tensor:
    """The order in which ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    visits ``n`` items in one process: its iterator first draws the workers' base seed from that
    generator, then its ``RandomSampler`` permutes with it."""
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return torch.randperm(n, generator=g)


class RankShare(Sampler[int]):
    """This rank's share of one global order of ``n`` items: the seeded ``shuffled_order`` when
    ``shuffle`` (the order of one process's shuffled loader), else 0..n-1. Rank ``rank`` takes every
    ``world_size``-th item from ``rank`` on, so with a per-rank batch of B / ``world_size`` the ranks'
    k-th batches together hold global batch k of B, whatever the number of ranks. The last
    ``n % world_size`` items are left out, so that every global batch, the last one too, splits evenly
    (each rank's mean loss then weighs alike, and DDP's average of the gradients is the global mean's)."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size

    def global_order(self) -> torch.Tensor:
        order = shuffled_order(self.n, self.seed) if self.shuffle else torch.arange(self.n)
        return order[: self.n - self.n % self.world_size]

    def __iter__(self):
        return iter(self.global_order()[self.rank:: self.world_size].tolist())

    def __len__(self) -> int:
        return self.n // self.world_size


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None, shuffle: bool = False, seed: int | None = None,
                distributed: bool = False, persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over ``dataset`` in batches of ``batch_size`` (the last one may be smaller).

    Order: ``sampler`` when given; else ``distributed`` -> ``RankShare`` (this rank's share of the
    order one process would take, shuffled with ``seed`` when ``shuffle``); else shuffled when ``shuffle``.
    ``seed``: the loader's own generator (shuffling and worker seeds), so iterating it leaves the global
    torch RNG untouched; None draws them from the global RNG. Pinned memory on CUDA."""
    if distributed:
        if sampler is not None:
            raise ValueError("make_loader: pass a sampler or distributed=True, not both")
        if shuffle and seed is None:
            raise ValueError("make_loader: a distributed shuffled loader needs a seed (every rank the same)")
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        sampler = RankShare(len(dataset), shuffle, 0 if seed is None else seed, rank, world)
        shuffle = False
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle,
                      generator=None if seed is None else torch.Generator().manual_seed(seed),
                      num_workers=workers, persistent_workers=persistent_workers and workers > 0,
                      pin_memory=device.type == "cuda", drop_last=False)


def rank_batch(batch_size: int, world_size: int, key: str) -> int:
    """The per-rank batch of a global ``batch_size`` (the config value ``key``) split over ``world_size``
    DDP ranks: both trainers' rule, so one optimisation step sees ``batch_size`` items whatever the
    number of GPUs. ConfigError naming ``key`` when it does not divide evenly."""
    if batch_size % world_size:
        raise ConfigError(key, f"the global batch of {batch_size} does not split evenly over {world_size} "
                          f"processes", f"set {key} to a multiple of {world_size} (e.g. "
                          f"{max(world_size, batch_size // world_size * world_size)}) or run another number of processes")
    return batch_size // world_size


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every ``world_size``-th item from ``rank`` on (evaluation under DDP; no padding, no duplicates)."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def _all_reduce_sums(*values: float, device: torch.device) -> list[float]:
    """Sum scalars over DDP ranks (identity in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _progress(iterable, desc: str | None) -> tqdm:
    """A tqdm bar on the main process only (TQDM_* environment settings apply); none when ``desc`` is None."""
    return tqdm(iterable, desc=desc, leave=False, disable=desc is None or not is_main_process())


def _means(loss_sum: float, correct: float, n: float, device: torch.device) -> dict:
    loss_sum, correct, n = _all_reduce_sums(loss_sum, correct, n, device=device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}


# ------------------------------------------------------------------ training
@dataclasses.dataclass
class Optimiser:
    """What steps the weights: ``optimizer``; ``scheduler`` stepped after every batch (None: constant);
    ``scaler`` the float16 loss scaler (None: plain steps); ``lr_key`` the config key of the learning
    rate, named by the error of a diverged run."""

    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: torch.amp.GradScaler | None = None
    lr_key: str = "the learning rate"

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()


def train_step(model: nn.Module, opt: Optimiser, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
               place: Placement) -> tuple[float, int]:
    """One optimisation step on a batch: inputs placed by ``place``, forward and ``loss_fn(outputs, y)``
    under its autocast, backward and optimizer step through ``opt.scaler`` (plain when None), then the
    scheduler's step. Returns the batch's mean loss and its number of correct argmax predictions."""
    x, y = place.batch(x), y.to(place.device, non_blocking=True)
    opt.optimizer.zero_grad(set_to_none=True)
    with place.autocast():
        out = model(x)
        loss = loss_fn(out, y)
    if opt.scaler is None:
        loss.backward()
        opt.optimizer.step()
    else:
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    if opt.scheduler is not None:
        opt.scheduler.step()
    return loss.item(), int((out.detach().argmax(1) == y).sum().item())


# ------------------------------------------------------------------ divergence
DIVERGED_FACTOR = 1000.0  # a mean batch loss above this many times chance level (ln C) is divergence


SCALER_PATIENCE = 8  # under a float16 loss scaler: consecutive non-finite losses tolerated (steps skipped)


def loss_limit(n_classes: int) -> float:
    """The mean batch loss above which training has diverged: ``DIVERGED_FACTOR`` x ln(``n_classes``), the
    cross-entropy of a uniform guess. A healthy run stays within a few times ln C; weights blown up by a
    learning rate far too high give losses of 1e10 and more while staying finite."""
    return DIVERGED_FACTOR * math.log(max(n_classes, 2))


def diverged(problem: str, epoch: int | None, step: int | None = None, lr: float | None = None,
             lr_key: str = "the learning rate") -> TrainingDiverged:
    """The error that stops a diverged run: where (epoch and step), what, and the two likely causes."""
    where = "training" + (f" epoch {epoch}" if epoch is not None else "") + (f", step {step}" if step else "")
    rate = f" at learning rate {lr:g}" if lr is not None else ""
    return TrainingDiverged(where, f"{problem}{rate}; training stopped, this model is neither saved nor scored",
                            f"lower {lr_key} (e.g. ten times), or check the inputs for NaN or infinite values")


def finite_weights(model: nn.Module) -> bool:
    """Whether every parameter and floating-point buffer (batch-norm statistics) of ``model`` is finite."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    return not tensors or bool(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())


def check_validation(metrics: dict, epoch: int | None, lr: float | None = None,
                     lr_key: str = "the learning rate") -> dict:
    """``metrics`` of ``evaluate`` when its loss is finite, else ``diverged``: a NaN loss compares False
    with everything, so it must never reach the choice of the best epoch."""
    if not math.isfinite(metrics["loss"]):
        raise diverged(f"validation loss is {metrics['loss']} although training losses were finite "
                       "(outputs overflow on the validation images)", epoch, lr=lr, lr_key=lr_key)
    return metrics


def _loss_problem(loss: float, max_loss: float, in_a_row: int) -> str:
    if math.isfinite(loss):
        return f"training loss is {loss:g}, above {max_loss:.0f} ({DIVERGED_FACTOR:g} x chance level)"
    return f"training loss is {loss}" + (f" in {in_a_row} steps in a row (the float16 loss scaler skipped "
                                         "them without recovering)" if in_a_row > 1 else "")


# ------------------------------------------------------------------ the epoch
def train_epoch(model: nn.Module, loader, opt: Optimiser, loss_fn: LossFn, place: Placement,
                augment: Callable[[torch.Tensor], torch.Tensor] | None = None, min_batch: int = 1,
                desc: str | None = "train", epoch: int | None = None, max_loss: float = math.inf) -> dict:
    """One pass of ``train_step`` over ``loader`` (any iterable of (inputs, targets) batches), model in
    training mode (the scheduler of ``opt`` steps after every batch). ``augment`` maps each input batch
    once it is on the device; a global batch (this rank's x ``place.world_size``: the samplers give
    every rank an equal share) of fewer than ``min_batch`` items is skipped (a lone sample breaks batch
    norm in training mode), and an epoch of such batches only is a DataError. Returns mean ``loss`` and
    ``acc`` over all ranks, and ``n``; a bar named ``desc`` shows the running means (none when None).

    Divergence (``TrainingDiverged``, naming ``epoch``, the step and ``opt.lr_key``): a non-finite batch loss,
    one above ``max_loss`` (``loss_limit``), or non-finite weights at the end of the epoch. Under an
    enabled loss scaler (float16) a non-finite loss is the scaler's business: it skips that step (its
    gradients are not finite) and lowers its scale; only more than ``SCALER_PATIENCE`` in a row stop."""
    model.train()
    loss_sum = correct = n = 0.0
    skipped = in_a_row = 0
    bar = _progress(loader, desc)
    for step, (x, y) in enumerate(bar, start=1):
        if len(y) * place.world_size < min_batch:  # every rank alike, so all skip the same steps
            skipped += len(y)
            continue
        if augment is not None:
            x = augment(x.to(place.device, non_blocking=True))
        lr = opt.lr
        loss, hits = train_step(model, opt, x, y, loss_fn, place)
        if not math.isfinite(loss) or loss > max_loss:
            in_a_row += 1
            if math.isfinite(loss) or not opt.scaling or in_a_row > SCALER_PATIENCE:
                raise diverged(_loss_problem(loss, max_loss, in_a_row), epoch, step, lr, opt.lr_key)
            continue  # the scaler skipped this step
        in_a_row = 0
        loss_sum += loss * len(y)
        correct += hits
        n += len(y)
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}", refresh=False)  # drawn at tqdm's pace
    if n == 0 and in_a_row:
        raise diverged(_loss_problem(math.nan, max_loss, in_a_row) + ", every step of the epoch", epoch,
                       lr=opt.lr, lr_key=opt.lr_key)
    if n == 0 and skipped:
        raise DataError("training set", f"{skipped} item(s) per step, but batch norm in training mode needs "
                        f"batches of {min_batch} or more", "add training images (cells) or raise the batch size")
    if not finite_weights(unwrap(model)):
        raise diverged("weights are no longer finite after the epoch's last step", epoch, lr=opt.lr,
                       lr_key=opt.lr_key)
    return _means(loss_sum, correct, n, place.device)


# ------------------------------------------------------------------ evaluation and prediction
@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: LossFn, place: Placement, desc: str | None = "val") -> dict:
    """Mean ``loss_fn`` ``loss`` (computed in float32) and argmax ``acc`` over a loader, model in eval mode;
    summed over DDP ranks, so each rank passes its ``shard`` of the data. Also ``n``."""
    model.eval()
    loss_sum = correct = n = 0.0
    for x, y in _progress(loader, desc):
        x, y = place.batch(x), y.to(place.device, non_blocking=True)
        with place.autocast():
            out = model(x)
        loss_sum += loss_fn(out.float(), y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return _means(loss_sum, correct, n, place.device)


@torch.no_grad()
def predict(model: nn.Module, loader, place: Placement, embeddings: bool = False,
            desc: str | None = "predict") -> tuple[np.ndarray, ...]:
    """(outputs N x C, labels N) of every item of ``loader`` in order, model in eval mode, in float32;
    with ``embeddings`` (a torchvision classifier) (logits, penultimate-layer embeddings N x D, labels)."""
    model.eval()
    parts = []
    for x, y in _progress(loader, desc):
        x = place.batch(x)
        with place.autocast():
            out = logits_and_embeddings(model, x) if embeddings else (model(x),)
        parts.append([o.float().cpu() for o in out] + [y])
    if not parts:
        raise ValueError("predict: the loader yields no batches")
    return tuple(torch.cat(column).numpy() for column in zip(*parts))
