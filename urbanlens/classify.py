"""City classifier: patch dataset, transforms, class-balanced sampling, train and evaluation loops, metrics.

Used by ``train_classification.py`` and ``test_classification.py``. Class index ``i`` is the ``i``-th
IATA code of ``patches.class_names(manifest)`` (sorted), and checkpoints store that list as ``classes``.
"""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2
from tqdm import tqdm

from . import runtime
from .config import changed_keys

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOG_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


# ---------------------------------------------------------------- data
def transforms(input_size: int, train: bool) -> v2.Compose:
    """Resize to ``input_size`` (square), random horizontal and vertical flips when training, ImageNet
    normalisation. Input: a uint8 CxHxW tensor; output: float32."""
    steps = [v2.Resize((input_size, input_size), antialias=True)]
    if train:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def read_image(path: str | Path, decode_size: int | None = None) -> torch.Tensor:
    """An image file as a uint8 RGB CxHxW tensor. With ``decode_size``, a JPEG is decoded at a reduced scale
    (PIL's DCT-domain ``draft``) that is still at least ``decode_size`` on each side: much faster when
    patches are larger than the model input. Training and testing read patches this way."""
    try:
        with Image.open(path) as im:
            if decode_size:
                im.draft("RGB", (decode_size, decode_size))
            arr = np.array(im.convert("RGB"))
    except OSError as e:
        raise RuntimeError(f"{path}: cannot read image ({e}); re-run preprocessing.py") from None
    return torch.from_numpy(arr).permute(2, 0, 1)


class PatchDataset(Dataset):
    """Image files with integer labels, read by ``read_image`` and transformed."""

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int], transform=None,
                 decode_size: int | None = None):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files = [str(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        img = read_image(self.files[i], self.decode_size)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def split_dataset(manifest: pd.DataFrame, split: str, patches_dir: str | Path, classes: Sequence[str],
                  transform=None, decode_size: int | None = None) -> PatchDataset:
    """The patches of one split of the manifest, labelled by their index in ``classes`` (IATA codes)."""
    source = Path(patches_dir) / "manifest.csv"
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        sys.exit(f"error: {source}: no patches in split '{split}'; re-run preprocessing.py "
                 f"(splits present: {', '.join(sorted(manifest['split'].unique()))})")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["iata"]) - set(index))
    if unknown:
        sys.exit(f"error: {source}: cities {', '.join(unknown)} of split '{split}' are not among the model's "
                 f"classes ({', '.join(classes)}); train on the same patches or re-run train_classification.py")
    files = [Path(patches_dir) / p for p in rows["path"]]
    return PatchDataset(files, rows["iata"].map(index).to_numpy(), transform, decode_size)


def balanced_weights(labels: Sequence[int]) -> np.ndarray:
    """Per-sample weights 1 / (size of the sample's class): every class is drawn equally often."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


class EpochSampler(Sampler[int]):
    """Training indices for one epoch, a function of (seed, epoch) only, sharded over DDP ranks.

    ``balanced``: drawn with replacement with probability proportional to ``balanced_weights`` (what
    ``WeightedRandomSampler`` does); otherwise a random permutation (what ``DistributedSampler`` does).
    Rank ``r`` of ``world_size`` takes every ``world_size``-th index of the same global draw, so the
    union over ranks is the single-process epoch. ``num_samples`` (default: the dataset size) is the
    global number of draws per epoch, rounded up to a multiple of ``world_size``.
    """

    def __init__(self, labels: Sequence[int], balanced: bool = True, num_samples: int | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = np.asarray(labels)
        self.balanced = balanced
        n = num_samples or len(self.labels)
        self.total = math.ceil(n / world_size) * world_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balanced:
            w = torch.as_tensor(balanced_weights(self.labels), dtype=torch.double)
            return torch.multinomial(w, self.total, replacement=True, generator=g)
        reps = math.ceil(self.total / len(self.labels))
        return torch.cat([torch.randperm(len(self.labels), generator=g) for _ in range(reps)])[: self.total]

    def __iter__(self):
        return iter(self.global_indices()[self.rank:: self.world_size].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size


def begin_epoch(sampler: EpochSampler, seed: int, epoch: int, rank: int = 0) -> None:
    """Make epoch ``epoch``'s draws and augmentations a function of (seed, epoch, rank) only, so that a
    resumed run sees the same batches as an uninterrupted one (workers take their seeds from torch's RNG)."""
    sampler.set_epoch(epoch)
    torch.manual_seed(seed * 1_000_003 + 7919 * epoch + rank)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Every ``world_size``-th item from ``rank`` on (evaluation under DDP; no padding, no duplicates)."""
    return dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))


def make_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                sampler: Sampler | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=False)


# ---------------------------------------------------------------- model placement
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


# ---------------------------------------------------------------- loops
SCHEDULES = ("constant", "cosine", "warmup_cosine")
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
    raise ValueError(f"unknown learning-rate schedule '{name}'; choose one of {', '.join(SCHEDULES)}")


def lr_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """A per-step ``LambdaLR`` over ``lr_factor``, or None for ``constant``. Its state is just the step
    count, so a resumed run continues the schedule of the current config's total number of steps."""
    lr_factor(name, 0, total_steps)  # validates the name
    if name == "constant":
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, name, total_steps=total_steps))


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None, amp: bool = False, channels_last: bool = False,
                    scheduler=None, desc: str = "train") -> dict:
    """One pass of cross-entropy training (``scheduler`` stepped after every batch); returns mean ``loss``
    and ``acc`` over all ranks, and ``n``."""
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    loss_sum = correct = n = 0.0
    bar = _progress(loader, desc)
    for x, y in bar:
        x, y = _inputs(x, device, channels_last), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with runtime.autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits, y)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{correct / n:.3f}")
    loss_sum, correct, n = _all_reduce_sums(loss_sum, correct, n, device=device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}


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
    from .models import logits_and_embeddings

    model.eval()
    logits, embs, labels = [], [], []
    for x, y in _progress(loader, "predict"):
        with runtime.autocast(device, amp):
            lo, em = logits_and_embeddings(model, _inputs(x, device, channels_last))
        logits.append(lo.float().cpu())
        embs.append(em.float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(embs).numpy(), torch.cat(labels).numpy()


# ---------------------------------------------------------------- checkpoints and log
def check_resumable(state: dict, classes: Sequence[str], model_cfg: dict, path: str | Path) -> None:
    """Exit with one line when a checkpoint was trained on other cities or with another model."""
    trained = state.get("config", {}).get("model", {})
    if list(state.get("classes", [])) != list(classes):
        sys.exit(f"error: {path}: trained on cities {', '.join(state.get('classes', []))}, not on those of the "
                 f"manifest ({', '.join(classes)}); train without --resume or use another paths.results")
    for key in ("backbone", "input_size"):
        if trained.get(key) != model_cfg[key]:
            sys.exit(f"error: {path}: trained with model.{key}={trained.get(key)}, config says {model_cfg[key]}; "
                     f"train without --resume or set --set model.{key}={trained.get(key)}")


RUN_KEYS = ("seed", "paths.data", "patch", "split", "model", "train")  # what decides a trained classifier


def run_changes(saved: dict, cfg) -> list[str]:
    """The config keys (dotted, leaves) under ``RUN_KEYS`` whose values differ between a checkpoint's
    saved config and ``cfg``: empty when re-running the same command may continue the checkpoint."""
    return changed_keys(saved, cfg, RUN_KEYS)


def restore(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scaler: torch.amp.GradScaler | None = None, scheduler=None) -> tuple[int, float]:
    """Load a ``runtime.save_checkpoint`` state into model/optimizer/scaler/scheduler; return
    (epochs done, best val acc)."""
    (model.module if hasattr(model, "module") else model).load_state_dict(state["model"])
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
    log = pd.read_csv(path)
    return log[log["epoch"] <= upto_epoch].to_dict("records")


def write_log(rows: list[dict], path: str | Path) -> Path:
    """The training log (one row per epoch, ``LOG_COLUMNS``), written atomically."""
    from .io import write_csv

    return write_csv(pd.DataFrame(rows, columns=LOG_COLUMNS), path)


# ---------------------------------------------------------------- metrics
def topk_accuracy(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(labels)[:, None]).any(axis=1).mean())


def classification_metrics(labels: np.ndarray, scores: np.ndarray, classes: Sequence[str]) -> dict:
    """accuracy, top-5 accuracy, macro F1, per-class precision/recall/F1/support, number of samples."""
    labels = np.asarray(labels)
    pred = np.asarray(scores).argmax(axis=1)
    idx = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=idx, zero_division=0)
    return {
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": topk_accuracy(labels, scores, 5),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "n_patches": int(len(labels)),
        "per_city": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                     for i, c in enumerate(classes)},
    }


def confusion_frame(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Counts, rows = true class, columns = predicted class, both labelled by IATA code."""
    cm = confusion_matrix(labels, pred, labels=list(range(len(classes))))
    return pd.DataFrame(cm, index=pd.Index(classes, name="true"), columns=pd.Index(classes, name="predicted"))
