"""Whether a results folder of a resumable, shardable stage (cell extraction, income map) may take this
run: outputs made with other settings or inputs are refused, or cleared under overwrite=true."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..core import runs


def claim(out: Path, stamp: Path, script: str, cfg, keys: Sequence[str], inputs: Mapping[str, dict], holds: str,
          clear: Callable, sharded: bool, extra: Mapping | None = None) -> None:
    """Refuse ``out`` when it holds outputs whose ``stamp`` differs from this run's ``keys``, ``inputs`` and
    ``extra`` (``holds`` says what it holds); under overwrite=true ``clear(out)`` empties it instead, except
    for a sharded job, which would clear its companions' work. Then the stamp is this run's."""
    changed = runs.compare(stamp, cfg, keys, inputs, extra) if runs.has_outputs(out, [stamp.name]) else []
    if changed and (not cfg.overwrite or sharded):
        runs.refuse(out, holds, changed,
                    f"delete {out} before sharded runs" if cfg.overwrite else
                    "use another paths.results or --set overwrite=true")
    if changed:  # overwrite=true: nothing of the other run is kept
        clear(out)
    runs.write_stamp(stamp, script, cfg, keys, inputs, extra)
