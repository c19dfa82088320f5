"""Split a data stage's cells among n independent jobs (a SLURM array, say) and merge what they wrote.

Shards are numbered from 1: ``--shard 2/4`` is the second of four. Cells are split per city, in
cell-id order, into contiguous chunks whose sizes differ by at most one (one block of ``align`` cells
when chunks are aligned to a batch size), so n shards cover every cell once. Each shard writes its
partial table beside the final one under ``<stem>.shard-<i>-of-<n><suffix>``; a merge step checks that
all n are there and writes the table an unsharded run writes.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import outputs
from .errors import DataError

SHARD_HELP = ("run only shard I of N (numbered from 1: 1/4 .. 4/4, e.g. $SLURM_ARRAY_TASK_ID/4); the cells "
              "are split with no overlap and no gap and this job writes partial outputs *.shard-I-of-N.*; "
              "combine them afterwards with --merge N")


MERGE_HELP = "merge the partial outputs of an N-shard run into the files an unsharded run writes"


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``'2/4'`` -> (2, 4); ValueError saying what is accepted for anything else (``3/2``, ``0/0``, ``x``)."""
    m = _SHARD.match(str(text))
    if not m:
        raise ValueError(f"--shard {text!r}: expected I/N with whole numbers, e.g. --shard 1/4")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise ValueError(f"--shard {text!r}: the number of shards N must be at least 1, e.g. --shard 1/4")
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text!r}: shards are numbered 1 to N, so I must be in 1..{n}, e.g. --shard 1/{n}")
    return i, n


def parse_count(text: str) -> int:
    """``--merge N``: the number of shards, a whole number >= 1."""
    if not re.fullmatch(r"\s*\d+\s*", str(text)) or int(text) < 1:
        raise ValueError(f"--merge {text!r}: expected the number of shards N (a whole number >= 1), e.g. --merge 4")
    return int(text)


class _ParsedAction(argparse.Action):
    """Parses its value with ``parse``; a bad value ends the program with one line and exit status 2."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.parse(values))
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")


class _ShardAction(_ParsedAction):
    parse = staticmethod(parse_shard)


class _MergeAction(_ParsedAction):
    parse = staticmethod(parse_count)


def add_shard_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--shard I/N`` (args.shard = (I, N) or None) and ``--merge N`` (args.merge = N or None)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--shard", action=_ShardAction, default=None, metavar="I/N", help=SHARD_HELP)
    group.add_argument("--merge", action=_MergeAction, default=None, metavar="N", help=MERGE_HELP)
    return parser


def chunk_bounds(total: int, n: int) -> list[tuple[int, int]]:
    """n contiguous [start, stop) ranges covering range(total); sizes differ by at most one, larger first."""
    if total < 0 or n < 1:
        raise ValueError(f"cannot split {total} items into {n} chunks")
    size, extra = divmod(total, n)
    starts = [k * size + min(k, extra) for k in range(n + 1)]  # the first `extra` chunks hold one more
    return list(zip(starts[:-1], starts[1:]))


def shard_range(total: int, i: int, n: int, align: int = 1) -> tuple[int, int]:
    """[start, stop) of shard i of n (from 1) over ``total`` ordered items, cut only at multiples of
    ``align`` (e.g. a batch size, so every item sees the batch companions of an unsharded run)."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    blocks = -(-total // align)
    b0, b1 = chunk_bounds(blocks, n)[i - 1]
    return min(b0 * align, total), min(b1 * align, total)


def shard_positions(keys: Sequence, groups: Sequence, i: int, n: int) -> np.ndarray:
    """Row positions (ascending) of shard i of n: within each group (city), the rows sorted by key
    (cell id) are cut into n contiguous chunks, and the shard takes chunk i of every group."""
    keys, groups = np.asarray(keys, dtype=object), np.asarray(groups, dtype=object)
    picked = []
    for g in pd.unique(groups):
        rows = np.flatnonzero(groups == g)
        rows = rows[np.argsort(keys[rows].astype(str), kind="stable")]
        start, stop = shard_range(len(rows), i, n)
        picked.append(rows[start:stop])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)


def shard_path(path, i: int, n: int) -> Path:
    """``cells.gpkg`` -> ``cells.shard-2-of-4.gpkg`` (same folder)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shard-{i}-of-{n}{path.suffix}")


def shard_paths(path, n: int, newer_than: float = 0.0) -> list[Path]:
    """The n partial files of ``path``; ValueError naming every shard whose file is missing, or older
    than ``newer_than`` (a POSIX time, e.g. the model's), with the command that makes it."""
    paths = [shard_path(path, i, n) for i in range(1, n + 1)]
    missing = [i for i, p in enumerate(paths, 1) if not p.is_file()]
    stale = [i for i, p in enumerate(paths, 1) if p.is_file() and p.stat().st_mtime < newer_than]
    if missing:
        raise DataError(f"{Path(path).parent}: {len(missing)} of {n} shard outputs missing (shard "
                         f"{_listing(missing)}, e.g. {paths[missing[0] - 1].name}); run those shards "
                         f"(--shard {missing[0]}/{n} ...) and merge again")
    if stale:
        raise DataError(f"{Path(path).parent}: shard output(s) of shard {_listing(stale)} older than the model "
                         f"(e.g. {paths[stale[0] - 1].name}); re-run them (--shard {stale[0]}/{n} ...) and merge again")
    return paths


def _listing(numbers: Sequence[int], most: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:most]))
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


def merge_in_order(parts: Sequence[pd.DataFrame], order: Sequence, key: str = "cell_id",
                   names: Sequence[str] | None = None) -> pd.DataFrame:
    """The shards' rows concatenated and put in ``order`` (the key values of an unsharded run).

    ValueError when a key is in two shards (overlap), in none (gap) or in no place of ``order``;
    ``names`` (one per part, e.g. file names) are used in the message.
    """
    names = list(names) if names is not None else [f"shard {k + 1}" for k in range(len(parts))]
    merged = pd.concat(parts, ignore_index=True)
    source = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    dup = merged[key].duplicated(keep=False).to_numpy()
    if dup.any():
        where = sorted({names[s] for s in source[dup]})
        raise DataError(f"{int(dup.sum())} rows share a {key} (e.g. {merged.loc[dup, key].iloc[0]}) across "
                         f"{', '.join(where)}; these shards come from runs with different settings: re-run them")
    order = pd.Index(order)
    extra = ~merged[key].isin(order).to_numpy()
    if extra.any():
        raise DataError(f"{int(extra.sum())} {key}(s) in {names[source[extra][0]]} (e.g. "
                         f"{merged.loc[extra, key].iloc[0]}) are not among the cells of this config; "
                         "re-run the shards with this config")
    gap = ~order.isin(merged[key])
    if gap.any():
        raise DataError(f"{int(gap.sum())} {key}(s) of this config are in no shard output (e.g. "
                         f"{order[gap][0]}); re-run the shards with this config and the same N")
    return merged.set_index(key).loc[order].reset_index()[list(merged.columns)]


def append_layers(paths: Sequence, dst, layer: str, empty) -> int:
    """Copy the ``layer`` of each GeoPackage in ``paths``, in order, into a new GeoPackage ``dst`` one file
    at a time (memory holds one shard); ``empty`` (a GeoDataFrame with the columns) is written when no
    file has rows. Returns the number of rows written."""
    rows = 0
    for path in paths:
        part = outputs.read_gpkg(path, layer, "this stage's --shard job", fix="re-run that shard's job, then merge again")
        if len(part):
            part.to_file(dst, layer=layer, driver="GPKG", mode="a" if rows else "w", promote_to_multi=True)
            rows += len(part)
    if rows == 0:
        empty.to_file(dst, layer=layer, driver="GPKG")
    return rows
