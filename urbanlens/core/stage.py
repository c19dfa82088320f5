"""The opening every stage script shares: its config (``--config``/``--set``), where it computes, its
seed, its results folder and that folder's lock, held until ``main`` ends; when ``main`` succeeds, the
pipeline's report.html is refreshed from what its results folder holds."""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import entry, locks, report_page
from .config import Config, cli, results_dir, value

if TYPE_CHECKING:
    from .placement import Placement


@dataclass(frozen=True)
class Stage:
    """An opened stage: its ``cfg`` and command-line ``args``, its ``place`` (None for stages that do not
    compute with torch) and its results folder ``out``, locked for the stage's run."""

    cfg: Config
    args: argparse.Namespace
    place: Placement | None
    out: Path


class _Report:
    """Refresh ``pipeline``'s report.html (``render``: its page) when the stage's ``main`` returns (not
    when it fails)."""

    def __init__(self, cfg: Config, pipeline: str, render: Callable):
        self.cfg, self.pipeline, self.render = cfg, pipeline, render

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            report_page.refresh(self.cfg, self.pipeline, self.render)
        return False


@contextlib.contextmanager
def _process_group():
    from .placement import cleanup_distributed

    try:
        yield
    finally:
        cleanup_distributed()


def open_stage(doc: str, script: str, demo_config: str, results: tuple[str, ...] | Callable,
               options: Callable | None = None,
               amp: str | None = None, channels_last: bool | str = False, compute: bool = True,
               lock: tuple[str, ...] | None = None, elsewhere: str | None = None,
               report: Callable | None = None) -> Stage:
    """Parse the command line (description: ``doc``'s first line; ``demo_config`` when no ``--config``;
    ``options(parser)`` adds the script's own arguments), place the run (precision from the config key
    ``amp``, None: float32; NHWC layout from the key ``channels_last`` or as given; ``compute`` False: no
    torch placement, for data stages, which do not import torch; under torchrun the process group is
    left when ``main`` ends), seed it (the data stages draw from their own seeded generators), and hold
    the lock of the results folder ``results`` (parts under ``paths.results``, or a function of the
    config and arguments giving them), or of ``lock`` when given; ``elsewhere``: the key of a folder
    outside the results that the script writes (its lock says so). ``report``: the pipeline's page
    (``<pipeline>.report_html.render``), refreshed in <results>/<first part of results> on success."""
    cfg, args = cli(doc.splitlines()[0], demo_config, options)
    place = None
    if compute:  # torch only here: the data stages start in a fraction of the time and memory
        from .placement import Placement
        from .runtime import seed_everything

        nhwc = value(cfg, channels_last) if isinstance(channels_last, str) else channels_last
        place = Placement.for_stage(cfg.device, "off" if amp is None else value(cfg, amp), nhwc)
        entry.keep(_process_group())
        seed_everything(cfg.seed)
    parts = results(cfg, args) if callable(results) else results
    out = results_dir(cfg, *parts)
    held = results_dir(cfg, *lock) if lock is not None else out
    entry.keep(locks.hold(held, script, cfg, **({"elsewhere": elsewhere} if elsewhere else {})))
    if report is not None:  # refreshed before the lock is released
        entry.keep(_Report(cfg, parts[0], report))
    return Stage(cfg, args, place, out)
