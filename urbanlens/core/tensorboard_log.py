"""Optional TensorBoard event files beside a training log (train_log.csv), when ``tensorboard`` is installed.

The events are written again from the whole log each time (old event files of the folder removed
first), so a resumed or re-run training shows each epoch once. Without tensorboard nothing is written
and nothing is said: train_log.csv holds the same numbers.
"""
from __future__ import annotations

import math
from numbers import Real
from pathlib import Path
from typing import Mapping, Sequence

EVENTS = "events.out.tfevents.*"  # the names SummaryWriter gives its files


def summary_writer_class():
    """torch's SummaryWriter, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def scalars(row: Mapping) -> dict[str, float]:
    """The finite numeric values of a log row, without its ``epoch`` (the step)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))}


def write_events(folder, log: Sequence[Mapping]) -> bool:
    """Write the rows of ``log`` (one per epoch, with ``epoch``) as scalars of event files in ``folder``;
    False (nothing written) when tensorboard is not installed."""
    writer_class = summary_writer_class()
    if writer_class is None:
        return False
    folder = Path(folder)
    for old in folder.glob(EVENTS):
        old.unlink(missing_ok=True)
    writer = writer_class(log_dir=str(folder))
    try:
        for i, row in enumerate(log, 1):
            step = int(row.get("epoch", i))
            for tag, value in scalars(row).items():
                writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return True
