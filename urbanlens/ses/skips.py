"""Cities a stage left out, and why: written by training, read by the map stage, so that a missing
model is reported by its real cause."""
from __future__ import annotations

from pathlib import Path

from ..core import files, outputs

SKIPPED = "skipped.json"


def record_skip(city_dir, city: str, reason: str) -> None:
    """Note in ``<city_dir>/skipped.json`` that ``city`` was left out, and why."""
    files.write_json(Path(city_dir) / SKIPPED, {"city": city, "reason": reason})


def clear_skip(city_dir) -> None:
    (Path(city_dir) / SKIPPED).unlink(missing_ok=True)


def skip_reason(city_dir) -> str | None:
    """Why training left the city out, or None when it did not (or nothing was recorded)."""
    path = Path(city_dir) / SKIPPED
    return outputs.read_json(path, "efficientnet_training.py", ["reason"])["reason"] if path.exists() else None
