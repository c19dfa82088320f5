"""Run stamps: what a stage's outputs were made from, and whether this run would make the same.

A stage writes ``<its output folder>/<name>.stamp.json`` (atomically) holding

- ``stage``: the command that writes it, e.g. ``preprocessing.py``;
- ``settings``: the config values its outputs depend on, as dotted leaf keys (``cities.patch.size``; a section
  such as ``train`` stands for all its leaves), plus any ``extra`` values (e.g. a generator version);
- ``inputs``: a fingerprint of the data it read, ``{name: {size, mtime_ns[, sha256]}}`` per input file
  (names relative to a root, usually ``paths.data``; files up to ``HASH_UP_TO`` bytes also carry a
  content hash, so a copy with a new modification time still counts as the same file), or
  ``{name: {sha256}}`` for a table the stage derives its data from.

``compare`` answers "same run?" with the list of what differs: changed keys, then
``input <name> added|removed|modified``; [] means the outputs may be reused or resumed. ``refuse``
turns that list into a ``StaleRun`` naming the change and the way out. Stamps hold no times or host
names, so two runs of the same command on the same data write byte-identical stamps.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, NoReturn, Sequence

from .config import ADDED, current_value, upgrade_key
from .errors import StaleRun
from .files import write_json
from .locks import LOCK_DIR

HASH_UP_TO = 1 << 20  # input files up to this size (bytes) are also fingerprinted by content


CHANGES = ("added", "removed", "modified")


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, Config becomes dict)."""
    return json.loads(json.dumps(value, default=str))


def _leaves(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {key: value}
    return {k: v for name, sub in value.items() for k, v in _leaves(sub, f"{key}.{name}").items()}


def settings(cfg, keys: Iterable[str], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The dotted leaf values of ``cfg`` under each of ``keys`` (sections or values; a key missing from
    ``cfg`` reads None), then ``extra``, as they read back from JSON."""
    now = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = now
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out.update(sorted(_leaves(value, key).items()))
    out.update(extra or {})
    return _plain(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_under(root: str | Path, *names: str | Path) -> list[Path]:
    """Every file under each of ``names`` (files or folders, relative to ``root``), sorted; hidden
    files (temporary ones among them) are left out, missing names give nothing."""
    root, out = Path(root), []
    for name in names:
        p = root / name
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    return sorted(set(out))


def fingerprint(root: str | Path, paths: Iterable[str | Path], hash_up_to: int = HASH_UP_TO) -> dict[str, dict]:
    """``{path relative to root: {size, mtime_ns[, sha256]}}`` of each existing file of ``paths``
    (absolute or relative to ``root``); a content hash only for files of at most ``hash_up_to`` bytes."""
    root, out = Path(root), {}
    for p in paths:
        p = root / p
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if st.st_size <= hash_up_to:
            entry["sha256"] = _sha256(p)
        out[p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)] = entry
    return dict(sorted(out.items()))


def table_fingerprint(name: str, frame) -> dict[str, dict]:
    """``{name: {sha256}}`` of a pandas frame's values (index left out): the data a stage derived."""
    text = frame.to_csv(index=False, lineterminator="\n")
    return {name: {"sha256": hashlib.sha256(text.encode()).hexdigest()}}


def make_stamp(stage: str, cfg, keys: Iterable[str], inputs: Mapping[str, dict] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict:
    """The stamp ``write_stamp`` writes, as a dict."""
    stamp = {"stage": stage, "settings": settings(cfg, keys, extra)}
    if inputs is not None:
        stamp["inputs"] = _plain(dict(inputs))
    return stamp


def write_stamp(path: str | Path, stage: str, cfg, keys: Iterable[str], inputs: Mapping[str, dict] | None = None,
                extra: Mapping[str, Any] | None = None) -> Path:
    """Record beside a stage's outputs what they are made from (atomic: old stamp or new, never half)."""
    return write_json(path, make_stamp(stage, cfg, keys, inputs, extra))


def _load(path: Path) -> dict:
    """The stamp at ``path``; ValueError saying why it is not one, FileNotFoundError when absent."""
    try:
        stamp = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({type(e).__name__})") from None
    if not (isinstance(stamp, dict) and isinstance(stamp.get("settings"), dict)
            and isinstance(stamp.get("inputs", {}), dict)):
        raise ValueError("not a run stamp")
    stamp["settings"] = {upgrade_key(k): v for k, v in stamp["settings"].items()}  # older stamps: today's names
    return stamp


def read_stamp(path: str | Path, stage: str | None = None) -> dict:
    """The stamp at ``path``; ``StaleRun`` naming the file (and ``stage``, which writes it again) when it
    is unreadable or not a stamp. FileNotFoundError when there is none."""
    path = Path(path)
    try:
        return _load(path)
    except ValueError as e:
        fix = (f"re-run {stage} with --set overwrite=true to make it again" if stage
               else "re-run the stage that made these outputs with --set overwrite=true")
        raise StaleRun(path, f"damaged run stamp, {e}", fix) from None


def input_changes(recorded: Mapping[str, dict] | None, now: Mapping[str, dict] | None) -> dict[str, str]:
    """``{name: 'added' | 'removed' | 'modified'}`` between two fingerprints. A file counts as modified
    when its size differs, or its content hash when both have one, else its modification time."""
    recorded, now = dict(recorded or {}), dict(now or {})
    out = {}
    for name in sorted(recorded.keys() | now.keys()):
        a, b = recorded.get(name), now.get(name)
        if a is None:
            out[name] = "added"
        elif b is None:
            out[name] = "removed"
        elif a.get("size") != b.get("size"):
            out[name] = "modified"
        elif "sha256" in a and "sha256" in b:
            if a["sha256"] != b["sha256"]:
                out[name] = "modified"
        elif a.get("mtime_ns") != b.get("mtime_ns"):
            out[name] = "modified"
    return out


def differences(stamp: Mapping, cfg, keys: Sequence[str], inputs: Mapping[str, dict] | None = None,
                extra: Mapping[str, Any] | None = None, kinds: Sequence[str] = CHANGES) -> list[str]:
    """What differs between a recorded ``stamp`` and this run: the dotted keys (under ``keys``, in their
    order, then ``extra``) whose values differ, then ``input <name> <kind>`` for each input change of
    ``kinds`` (inputs are compared only when ``inputs`` is given). [] = the same run."""
    old, now = dict(stamp.get("settings", {})), settings(cfg, keys, extra)
    # a stamp's old amp boolean reads as today's choice; a key added since, as the runs before it had it
    old = {**ADDED, **{k: current_value(k, v) for k, v in old.items()}}
    own = lambda k: k in now or any(k == p or k.startswith(p + ".") for p in (*keys, *(extra or {})))  # noqa: E731
    names = list(now) + sorted(k for k in old if k not in now and own(k))
    changed = [k for k in names if old.get(k) != now.get(k)]
    if inputs is not None:
        changed += [f"input {name} {kind}" for name, kind in input_changes(stamp.get("inputs"), _plain(dict(inputs))).items()
                    if kind in kinds]
    return changed


def compare(path: str | Path, cfg, keys: Sequence[str], inputs: Mapping[str, dict] | None = None,
            extra: Mapping[str, Any] | None = None, kinds: Sequence[str] = CHANGES) -> list[str]:
    """``differences`` from the stamp at ``path``; a missing or damaged stamp is one reason
    ``unknown (...)``: the outputs there cannot be told to be this run's."""
    path = Path(path)
    try:
        stamp = _load(path)
    except FileNotFoundError:
        return [f"unknown: no {path.name}"]
    except ValueError as e:
        return [f"unknown: {path.name} is damaged, {e}"]
    return differences(stamp, cfg, keys, inputs, extra, kinds)


def summary(changes: Sequence[str], most: int = 4) -> str:
    """``'a, b, c'`` or ``'a, b, c, d and 7 more'``."""
    shown = ", ".join(changes[:most])
    return shown + (f" and {len(changes) - most} more" if len(changes) > most else "")


def refuse(where, made: str, changes: Sequence[str], fix: str) -> NoReturn:
    """Raise ``StaleRun``: ``<where>: <made> (<changes>); <fix>`` on one line."""
    raise StaleRun(where, f"{made} ({summary(changes)})", fix)


def has_outputs(folder: str | Path, besides: Iterable[str] = ()) -> bool:
    """True when ``folder`` holds anything but the names in ``besides`` (e.g. its stamp) and the lock of
    the runs writing it now."""
    folder, besides = Path(folder), {*besides, LOCK_DIR}
    return folder.is_dir() and any(p.name not in besides for p in folder.iterdir())

