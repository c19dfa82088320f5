"""Frozen-feature training (``cities.train.freeze`` / ``ses.train.freeze``: ``backbone``): the backbone's
embeddings (the input of the model's final linear layer) are computed once, through the trainers' own
datasets without augmentation, and cached beside a run stamp; then only the head is trained on them.

What both pipelines share lives here: freezing a model but its head (``freeze``), the head as a model of
its own that stands for the whole one in whatever is saved or loaded (``HeadOnly``: the trainers' loops,
checkpoints and resume work on it unchanged), a dataset of embeddings (``Embeddings``), embedding a
dataset under DDP (each rank its ``loops.shard``, gathered in dataset order: ``embed``) and the cache
(``cached``: reused while its stamp matches, computed again when the backbone, its weights, their
preprocessing, the input size or the data changed).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from . import loops, preprocess, runs
from .files import atomic_path
from .placement import Placement

FROZEN = "backbone"  # the freeze setting that trains the head alone ("none": every layer)


def frozen(setting: str) -> bool:
    """Whether a ``*.train.freeze`` value asks for frozen-feature training."""
    return setting == FROZEN


def freeze(model: nn.Module, head: nn.Module) -> None:
    """Every parameter of ``model`` but those of ``head`` stops learning, and ``model`` goes to eval mode
    (its batch-norm statistics stay those it was built with: the backbone is not trained at all)."""
    keep = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    model.eval()


class HeadOnly(nn.Module):
    """``layers`` (the trainable end of ``model``, e.g. its final linear layer) as a model of embeddings,
    ``output`` applied to what they put out (None: as it is). ``model`` is held, not owned: moving, DDP
    and ``train()`` reach the head only, while ``state_dict``, ``load_state_dict`` and the preprocessing
    record are the whole model's, so checkpoints written through this model are the whole model's."""

    def __init__(self, model: nn.Module, layers: nn.Module, output: Callable | None = None):
        super().__init__()
        object.__setattr__(self, "whole", model)  # not a child module
        self.layers = layers
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out if self.output is None else self.output(out)

    def state_dict(self, *args, **kwargs):
        return self.whole.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.whole.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def preprocessing(self) -> preprocess.Preprocessing:
        return preprocess.of(self.whole)


class Embeddings(Dataset):
    """(embedding, label) pairs held in memory. ``images``: the vectors (named as the cell datasets'
    in-memory images, so the loaders read them in process); ``labels`` as the samplers read them;
    ``embedded`` tells a trainer not to augment them."""

    embedded = True

    def __init__(self, vectors, labels):
        self.images = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if len(self.images) != len(self.labels):
            raise ValueError(f"Embeddings: {len(self.images)} vectors but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def subset(self, indices) -> "Embeddings":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Embeddings(self.images[idx], self.labels[idx])


def weights_digest(model: nn.Module, head: nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state but ``head``'s (what decides its embeddings: the
    pretrained file or the seeded initialisation alike), in a fixed memory layout."""
    skip = {p.data_ptr() for p in head.parameters()}
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in skip:
            continue
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather(part: np.ndarray, world_size: int) -> np.ndarray:
    """The rows each rank computed on its ``loops.shard`` (every ``world_size``-th item from its rank on),
    back in dataset order on every rank (identity in one process)."""
    if world_size == 1:
        return part
    parts: list = [None] * world_size
    dist.all_gather_object(parts, part)
    out = np.empty((sum(len(p) for p in parts), *part.shape[1:]), dtype=part.dtype)
    for rank, rows in enumerate(parts):
        out[rank::world_size] = rows
    return out


def embed(model: nn.Module, dataset: Dataset, make_loader: Callable[[Dataset], object], width: int,
          place: Placement, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings N x ``width`` in float32, labels N) of every item of ``dataset`` in order: this rank
    embeds its shard through ``make_loader(shard)`` (the trainer's loader without augmentation), then
    the shards are gathered. ``model`` in eval mode; ``width``: the head's input size."""
    shard = loops.shard(dataset, place.rank, place.world_size)
    if len(shard):
        _, vectors, labels = loops.predict(model, make_loader(shard), place, embeddings=True, desc=desc)
    else:  # more ranks than items
        vectors, labels = np.zeros((0, width), np.float32), np.zeros(0, np.int64)
    return (gather(vectors.astype(np.float32), place.world_size),
            gather(np.asarray(labels, np.int64), place.world_size))


def _sync(place: Placement) -> None:
    if place.world_size > 1:
        dist.barrier()


def stamp_path(path: str | Path) -> Path:
    """The run stamp beside a cache file: ``embeddings.pt`` -> ``embeddings.stamp.json``."""
    path = Path(path)
    return path.with_name(path.stem + ".stamp.json")


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        arrays = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated or foreign: computed again
        return None
    return {k: v.numpy() for k, v in arrays.items()} if isinstance(arrays, dict) else None


def cached(path: str | Path, stage: str, cfg, keys: Sequence[str], inputs: Mapping[str, dict], extra: Mapping,
           compute: Callable[[], dict[str, np.ndarray]], place: Placement) -> tuple[dict[str, np.ndarray], list[str]]:
    """(the arrays cached at ``path``, []) when its run stamp (``runs``: the config ``keys``, the data
    fingerprint ``inputs`` and ``extra``, e.g. the backbone's ``weights_digest``) matches this run; else
    (``compute()``, what changed): every rank computes (it may gather), the main one writes the file
    atomically, its stamp removed before and written after, so a stamp never vouches for another file."""
    path, stamp = Path(path), stamp_path(path)
    _sync(place)  # every rank decides on the same file
    changes = runs.compare(stamp, cfg, keys, inputs, extra) if path.is_file() else [f"no {path.name} yet"]
    arrays = None if changes else _load(path)
    if not changes and arrays is None:
        changes = [f"{path.name} unreadable"]
    if arrays is None:
        arrays = compute()
        if place.main:
            stamp.unlink(missing_ok=True)
            with atomic_path(path) as tmp:
                torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, tmp)
            runs.write_stamp(stamp, stage, cfg, keys, inputs, extra)
    _sync(place)
    return arrays, changes


def describe(path: str | Path, n: int, changes: Sequence[str]) -> str:
    """The line a trainer prints: embeddings reused, or computed and why."""
    if not changes:
        return f"{n} embeddings reused from {path}"
    return f"{n} embeddings computed ({runs.summary(changes)}) -> {path}"
