"""Training-loop pieces both pipelines share: loaders, placement, DDP, progress, evaluation."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from . import runtime


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every ``world_size``-th item from ``rank`` on (evaluation under DDP; no padding, no duplicates)."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False)


def to_device(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Move ``model`` to ``device``; NHWC memory layout on CUDA when ``channels_last``."""
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when torch.distributed is initialised (``torchrun``), else ``model``."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _inputs(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _progress(iterable, desc: str) -> tqdm:
    """A tqdm bar on the main process only (TQDM_* environment settings apply)."""
    return tqdm(iterable, desc=desc, leave=False, **({} if runtime.is_main_process() else {"disable": True}))


def _all_reduce_sums(*values: float, device: torch.device) -> list[float]:
    """Sum scalars over DDP ranks (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
             channels_last: bool = False, desc: str = "val") -> dict:
    """Mean cross-entropy ``loss`` and ``acc`` over a (possibly sharded) loader, summed over ranks."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = correct = n = 0.0
    for x, y in _progress(loader, desc):
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        with runtime.autocast(device, amp):
            logits = model(x)
        loss_sum += loss_fn(logits.float(), y).item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    loss_sum, correct, n = _all_reduce_sums(loss_sum, correct, n, device=device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits N x C, penultimate embeddings N x D, labels N) for every item of ``loader``, in order."""
    from .backbones import logits_and_embeddings

    model.eval()
    logits, embs, labels = [], [], []
    for x, y in _progress(loader, "predict"):
        with runtime.autocast(device, amp):
            lo, em = logits_and_embeddings(model, _inputs(x, device, channels_last))
        logits.append(lo.float().cpu())
        embs.append(em.float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(embs).numpy(), torch.cat(labels).numpy()
