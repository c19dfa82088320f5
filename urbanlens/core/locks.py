"""One results folder, one run at a time: a lock that every stage writing a folder holds while it runs.

The lock of ``<folder>`` is the hidden folder ``<folder>/.urbanlens.lock/``, holding one file per
holder, ``<host>-<pid>.json``: host, pid, the process's start, since when (UTC), the script, and the
fingerprint of the run's settings (script + resolved config). A holder file is created with
``os.open(O_CREAT | O_EXCL)``, never overwritten; a run first registers itself, then reads the other
holders ("register, then check"): two runs with different settings that start at the same instant
both see each other and both stop, never both go on. No ``flock``: it is not honoured by every
network file system, and the holder files say who holds the folder in plain text.

- Holders with the same fingerprint share the folder: the jobs of ``--shard I/N``, the ranks of a
  ``torchrun`` training, parallel map jobs.
- A holder with another fingerprint stops this run (``RunLocked``, one line naming host, pid, script
  and since when), unless it is a dead process on this host: then its file is removed and the run goes
  on, saying so. A holder on another host cannot be checked: the line says to delete its file if that
  run is gone.
- ``hold`` removes this run's file on normal exit, on error and on Ctrl-C / SIGTERM (which
  ``urbanlens.core.entry`` turns into KeyboardInterrupt), and the lock folder once it is empty. A run
  killed with SIGKILL leaves its file; the next run on the same host takes it over.

The lock folder is hidden: run stamps and input fingerprints (``urbanlens.core.runs``) skip it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import RunLocked
from .files import os_problem

LOCK_DIR = ".urbanlens.lock"


def settings_fingerprint(stage: str, cfg) -> str:
    """A short hash of the script and its full resolved config: equal for runs that may share a folder."""
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    text = json.dumps({"stage": stage, "config": values}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _start_ticks(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), telling a reused pid apart; None when
    unknown (no /proc) or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(holder: dict) -> bool:
    """True when the holder's process runs on this host (a zombie, or a new process that reuses its
    pid, counts as dead)."""
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists
    started = holder.get("started")
    return started is None or started == _start_ticks(pid)


def describe(holder: dict) -> str:
    return (f"{holder.get('stage', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


def _holders(lock_dir: Path) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(lock_dir.glob("*.json")):
        try:
            out.append((path, json.loads(path.read_text())))
        except FileNotFoundError:  # released meanwhile
            continue
        except (OSError, ValueError):  # half-written by a process killed while registering
            out.append((path, {"stage": "an unknown run", "host": socket.gethostname(), "pid": -1}))
    return out


def _register(lock_dir: Path, me: dict) -> Path:
    """Create this process's holder file (O_CREAT | O_EXCL); the lock folder is made when needed."""
    path = lock_dir / f"{me['host']}-{me['pid']}.json"
    for _ in range(5):  # a holder that leaves may remove the empty folder between mkdir and open
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            continue
        except FileExistsError:  # a file of this host and pid: an earlier process with the same pid
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise (os_problem(e, lock_dir) or e) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise RunLocked(lock_dir, "could not register this run", "try again")


def _release(lock_dir: Path, path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        lock_dir.rmdir()  # only when no holder is left


def acquire(folder, stage: str, cfg, say=None, elsewhere: str = "paths.results") -> Path:
    """Register this run as a holder of ``folder``'s lock and return its holder file; ``RunLocked`` when
    a live run with other settings holds it (this run's file is removed again). ``elsewhere``: the
    config key that moves this run to another folder; ``say`` prints the take-over line (stderr)."""
    say = say or (lambda msg: print(msg, file=sys.stderr))
    lock_dir = Path(folder) / LOCK_DIR
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "started": _start_ticks(os.getpid()), "stage": stage,
          "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "fingerprint": settings_fingerprint(stage, cfg)}
    mine = _register(lock_dir, me)
    for path, other in _holders(lock_dir):
        if path == mine:
            continue
        local = other.get("host") == host
        if local and not alive(other):
            path.unlink(missing_ok=True)
            say(f"[lock] {folder}: took over the lock of {describe(other)}, which is no longer running")
            continue
        if other.get("fingerprint") == me["fingerprint"]:
            continue  # same settings: a shard, a rank or a parallel job of this run
        _release(lock_dir, mine)
        if local:
            raise RunLocked(folder, f"in use by {describe(other)} with other settings",
                            f"wait for it to finish (or stop it), or use another {elsewhere}")
        raise RunLocked(folder, f"in use by {describe(other)} with other settings, on another host",
                        f"wait for it to finish; if that run is gone, delete {path} and re-run")
    return mine


@contextlib.contextmanager
def hold(folder, stage: str, cfg, say=None, elsewhere: str = "paths.results") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block (see the module's description); released however it ends."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # removed again if left empty
    mine = acquire(folder, stage, cfg, say, elsewhere)
    try:
        yield mine
    finally:
        _release(folder / LOCK_DIR, mine)
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
