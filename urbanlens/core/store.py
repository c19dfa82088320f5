"""A memory-mapped uint8 image store: training images decoded once, then read back as bytes.

A store is two files beside each other:

- ``<name>.u8``: N images of one shape (uint8, C x H x W each, back to back, C order), read with
  ``np.memmap`` (the page cache keeps it in memory when it fits; a loader worker only copies bytes);
- ``<name>.stamp.json``: its run stamp (``urbanlens.core.runs``): the decode ``settings`` (what the
  pipeline decodes with, e.g. the input size and a decoder version), the item shape and dtype, and a
  fingerprint of the source files in their order (names, sizes, modification times).

``ensure`` opens a store whose stamp matches what is asked for and builds it (again) otherwise, so a
store of other settings or of changed, added, removed or reordered files is never read. A build writes
the data under a temporary name and renames it only once it is complete; the old stamp is removed
first and the new one written last, so an interrupted build leaves no store that looks valid.

A build decodes in ``workers`` processes (forked; 0 or 1: in this one). Under ``torchrun``
(``distributed=True``, every rank calls ``ensure``) each rank decodes every world_size-th item into
the same temporary file, so no rank waits at a collective for longer than the ranks' shares differ:
the build never meets the process group's timeout, whatever its length.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import runs
from .errors import DataError
from .files import atomic_path

STAGE = "urbanlens.core.store"
DTYPE = "uint8"


def paths(path: str | Path) -> tuple[Path, Path]:
    """(data file, stamp file) of the store named ``path`` (suffixes are added)."""
    path = Path(path)
    return path.with_name(path.name + ".u8"), path.with_name(path.name + ".stamp.json")


def sources_fingerprint(files: Sequence[str | Path], root: str | Path) -> dict[str, dict]:
    """One entry ``{sources: {n, sha256}}`` over the files' names (relative to ``root``, the store's
    folder: a data folder moved with its store keeps it), sizes and modification times, in their order
    (item i is file i, so an order change is a change). Stats only: nothing is read."""
    rows = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise DataError(f"{f}: source image missing; re-run the stage that writes it") from None
        rows.append([os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"sources": {"size": len(rows), "sha256": digest}}


def _extra(shape: Sequence[int], settings: dict) -> dict:
    return {"shape": [int(s) for s in shape], "dtype": DTYPE, **{f"decode.{k}": v for k, v in settings.items()}}


def changes(path: str | Path, files: Sequence[str | Path], shape: Sequence[int], settings: dict) -> list[str]:
    """What keeps the store at ``path`` from holding ``files`` decoded with ``settings`` at ``shape``:
    [] when it does (``runs.compare`` of its stamp; a missing data file is a change too)."""
    data, stamp = paths(path)
    if not data.is_file():
        return [f"unknown: no {data.name}"]
    changed = runs.compare(stamp, {}, (), sources_fingerprint(files, data.parent), _extra(shape, settings))
    expected = len(files) * int(np.prod(shape))
    if not changed and data.stat().st_size != expected:
        changed = [f"{data.name} holds {data.stat().st_size} bytes, not {expected}"]
    return changed


def _decoded(f, decode, shape: tuple) -> np.ndarray:
    item = decode(f)
    item = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if item.shape != shape or item.dtype != np.uint8:
        raise DataError(f"{f}: decodes to {item.dtype} {tuple(item.shape)}, the store holds uint8 {shape}; "
                        "make every image of the set the same size (re-run the stage that writes them), "
                        "or read them one by one with --set store=false")
    return item


_JOB: tuple | None = None  # (file, sources, decode, shape) of the build in progress, inherited by its forked workers


def _write(positions) -> int:
    """Decode the items at ``positions`` of ``_JOB`` into its file; how many were written."""
    tmp, files, decode, shape = _JOB
    out = np.memmap(tmp, dtype=DTYPE, mode="r+", shape=(len(files), *shape))
    for i in positions:
        out[i] = _decoded(files[i], decode, shape)
    out.flush()
    del out
    return len(positions)


def _fill(tmp: Path, files, decode, shape: tuple, positions, workers: int, desc: str | None) -> None:
    """Decode the items at ``positions`` into the store file ``tmp`` (already of full size), in
    ``workers`` forked processes when more than one, then flush them to disk."""
    global _JOB
    positions = np.asarray(positions, dtype=np.int64)
    bar = tqdm(total=len(positions), desc=desc, leave=False, **({"disable": True} if desc is None else {}))
    _JOB = (tmp, files, decode, shape)
    try:
        if len(positions) == 0:
            pass
        elif workers <= 1 or len(positions) < 2:
            for chunk in np.array_split(positions, max(1, len(positions) // 64)):
                bar.update(_write(chunk))
        else:  # small chunks: the bar moves and the processes finish together
            chunks = np.array_split(positions, min(len(positions), workers * 16))
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for done in pool.imap_unordered(_write, chunks):
                    bar.update(done)
    finally:
        _JOB = None
        bar.close()
    with open(tmp, "rb+") as fh:  # on disk before another rank or process renames or reads the file
        os.fsync(fh.fileno())


def _allocate(tmp: Path, n: int, shape: tuple) -> None:
    with open(tmp, "wb") as fh:
        fh.truncate(n * int(np.prod(shape)))  # sparse until written


def build(path: str | Path, files: Sequence[str | Path], decode: Callable[[str | Path], torch.Tensor | np.ndarray],
          shape: Sequence[int], settings: dict, desc: str | None = "store", workers: int = 0) -> np.memmap:
    """Decode every file with ``decode`` (-> uint8 array or tensor of ``shape``) into a new store at
    ``path``, in ``workers`` processes, with a progress bar named ``desc``; return it opened read-only."""
    data, stamp = paths(path)
    stamp.unlink(missing_ok=True)  # from here until the new stamp is written, no store is valid
    shape = tuple(int(s) for s in shape)
    with atomic_path(data) as tmp:
        _allocate(tmp, len(files), shape)
        _fill(tmp, files, decode, shape, range(len(files)), workers, desc)
    runs.write_stamp(stamp, STAGE, {}, (), sources_fingerprint(files, data.parent), _extra(shape, settings))
    return open_store(path, len(files), shape)


def _from_rank0(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build_shared(path: str | Path, files: Sequence[str | Path], decode, shape: Sequence[int], settings: dict,
                 desc: str | None = "store", workers: int = 0) -> np.memmap:
    """``build`` by every rank of the process group together: rank r decodes items r, r + world_size, ...
    into the file rank 0 allocated; rank 0 renames it and writes the stamp once every share is on disk.
    Each collective waits only for the slowest rank's share, never for the whole build."""
    rank, world = dist.get_rank(), dist.get_world_size()
    data, stamp = paths(path)
    shape = tuple(int(s) for s in shape)
    if rank != 0:
        _fill(Path(_from_rank0(None)), files, decode, shape, range(rank, len(files), world), workers, None)
        dist.barrier()  # every share written
    else:
        stamp.unlink(missing_ok=True)
        with atomic_path(data) as tmp:
            _allocate(tmp, len(files), shape)
            _from_rank0(str(tmp))
            _fill(tmp, files, decode, shape, range(0, len(files), world), workers, desc)
            dist.barrier()
        runs.write_stamp(stamp, STAGE, {}, (), sources_fingerprint(files, data.parent), _extra(shape, settings))
    dist.barrier()  # stamped: every rank may open it
    return open_store(path, len(files), shape)


def open_store(path: str | Path, n: int, shape: Sequence[int]) -> np.memmap:
    """The store's data, read-only: an array [n, *shape] of uint8 (not checked against its stamp: see
    ``ensure``)."""
    data, _ = paths(path)
    if n == 0:
        return np.zeros((0, *shape), np.uint8)
    return np.memmap(data, dtype=DTYPE, mode="r", shape=(n, *tuple(int(s) for s in shape)))


def ensure(path: str | Path, files: Sequence[str | Path], decode, shape: Sequence[int], settings: dict,
           desc: str | None = "store", workers: int = 0, distributed: bool = False) -> tuple[np.memmap, bool]:
    """(the store of ``files`` at ``path``, whether it was built now): opened when its stamp matches,
    built (again) otherwise, in ``workers`` processes. ``distributed``: every rank of the initialised
    process group calls this; rank 0 decides, all build their share (``build_shared``)."""
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stale = _from_rank0(bool(changes(path, files, shape, settings)) if dist.get_rank() == 0 else None)
        if stale:
            return build_shared(path, files, decode, shape, settings, desc, workers), True
        return open_store(path, len(files), shape), False
    if changes(path, files, shape, settings):
        return build(path, files, decode, shape, settings, desc, workers), True
    return open_store(path, len(files), shape), False


class StoreDataset(torch.utils.data.Dataset):
    """(uint8 C x H x W tensor, label) items of a store, in the store's order (or at ``indices``).

    The memmap is opened lazily in each process (a dataset pickled to a loader worker carries only the
    path), and an item is one copy of its bytes. ``prepare``: what the trainer applies to a batch of
    these on the device (``urbanlens.core.batch_ops``), carried with the data it belongs to."""

    def __init__(self, path: str | Path, n: int, shape: Sequence[int], labels, indices=None, prepare=None):
        self.path, self.n, self.shape = Path(path), int(n), tuple(int(s) for s in shape)
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
        self.indices = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.labels) != len(self.indices):
            raise ValueError(f"{len(self.indices)} items but {len(self.labels)} labels")
        self.prepare = prepare
        self._mm = None

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices) -> "StoreDataset":
        """The items at ``indices`` (positions in this dataset), sharing the store."""
        idx = np.asarray(indices, dtype=np.int64)
        return StoreDataset(self.path, self.n, self.shape, self.labels[torch.as_tensor(idx)], self.indices[idx],
                            self.prepare)

    def __getitem__(self, i: int):
        if self._mm is None:
            self._mm = open_store(self.path, self.n, self.shape)
        return torch.from_numpy(np.array(self._mm[self.indices[i]])), self.labels[i]
