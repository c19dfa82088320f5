"""Atomic output helpers: every file is written under a temporary name, then renamed."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import FileSystemError

# Temporary names carry the writer's host and process id: ``.<name>.tmp-<host>-<pid>-<random><suffix>``.
# A temporary file whose writer died (killed, out of memory, power cut) is removed by the next process
# that writes into the same folder; files of live writers, and of other hosts on a shared file system,
# are left alone.
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-")


_swept: set[str] = set()


def _process_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files in ``folder`` (not recursive) left by dead writers on this host;
    return their paths. ``atomic_path`` calls this once per folder and process."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["host"] != _HOST or int(m["pid"]) == os.getpid() or _process_alive(int(m["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                continue
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:  # another process removed it first
            pass
    return removed


_ACCESS = "give your user access to it (ls -ld; chmod u+rwx) or point the config's paths elsewhere"
# what the operating system said, in words, and what the user does about it; by errno
_OS_PROBLEMS = {
    errno.EACCES: ("permission denied", _ACCESS),
    errno.EPERM: ("operation not permitted", _ACCESS),
    errno.EROFS: ("on a read-only file system", "point paths.results (or paths.data) at a writable disk"),
    errno.ENOSPC: ("no space left on the disk", "free some space (df -h) or point paths.results at a disk with room, "
                   "then re-run: finished outputs are kept"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or point paths.results at a disk with room, then re-run"),
    errno.EISDIR: ("is a folder where a file is expected", "remove or rename that folder"),
    errno.ENOTDIR: ("a file stands where a folder is expected on this path", "remove or rename that file"),
    errno.EEXIST: ("a file stands where a folder is expected", "remove or rename that file"),
    errno.ENOTEMPTY: ("is a folder where a file is expected", "remove or rename that folder"),
    errno.ENAMETOOLONG: ("name too long for the file system", "use a shorter paths.results"),
}


FULL_BELOW = 1 << 20  # bytes free under which a failed write is put down to a full disk


def os_problem(error: BaseException, path: str | Path | None = None) -> FileSystemError | None:
    """The ``FileSystemError`` (one line: path, what the system refused, the fix) for an ``OSError`` the
    user can fix (permission, read-only, disk full, folder vs file), naming ``path`` or the error's own
    file name; None for any other exception."""
    if not isinstance(error, OSError) or error.errno not in _OS_PROBLEMS:
        return None
    problem, fix = _OS_PROBLEMS[error.errno]
    return FileSystemError(path or error.filename or "a file", problem, fix)


def _writable(folder: str | Path) -> None:
    """FileSystemError when ``folder`` cannot be written (the check GDAL-based writers need, whose own
    errors carry no errno)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FileSystemError(folder, "cannot be written (permission denied or read-only)",
                              "give your user write access (chmod u+w) or point paths.results elsewhere")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix, so writers that pick a format from it (PIL, GDAL,
    matplotlib, pandas) still work: ``cells.gpkg`` -> ``.cells.gpkg.tmp-<host>-<pid>-XXXX.gpkg``.
    A process killed mid-write leaves its temporary file behind; the next write into that folder
    (usually the re-run) removes it, so a finished re-run leaves no temporary file. What the operating
    system refuses (permission, read-only, disk full, a folder where the file goes) is a
    ``FileSystemError`` naming the path, and the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (os_problem(e, path.parent) or e) from None
    folder = os.path.abspath(path.parent)
    if folder not in _swept:
        _writable(folder)
        remove_stale_temps(folder)
        _swept.add(folder)
    if path.is_dir():
        raise FileSystemError(path, "is a folder where a file is expected", "remove or rename that folder")
    # a name no other writer uses (host, pid, 64 random bits), not created here: writers such as GDAL
    # refuse to overwrite an empty file, and creating and removing one costs as much as a small write
    tmp = path.parent / f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(8)}{path.suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        problem = os_problem(e, path)
        if problem is None and not isinstance(e, (KeyboardInterrupt, SystemExit, FileSystemError)):
            problem = _full(folder, path)  # a writer whose error carries no errno (GDAL, rasterio)
        _remove(tmp)
        if problem is None and not isinstance(e, (KeyboardInterrupt, SystemExit, FileSystemError)):
            _writable(folder)  # ... into a folder that became read-only
        if problem is not None:
            raise problem from None
        raise


def _full(folder: str, path: Path) -> FileSystemError | None:
    """The disk-full error when the disk under ``folder`` has (nearly) no room left, else None."""
    import shutil

    try:
        if shutil.disk_usage(folder).free >= FULL_BELOW:
            return None
    except OSError:
        return None
    return os_problem(OSError(errno.ENOSPC, "No space left on device"), path)


def _remove(tmp: Path) -> None:
    """Remove a temporary file (or the folder a writer such as a shapefile driver made of it)."""
    try:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def write_csv(df, path: str | Path, **kwargs) -> Path:
    """Write a pandas DataFrame as CSV atomically (index off unless asked)."""
    kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 150) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def save_run_config(cfg, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Save the full resolved config (seed included) beside a stage's results."""
    return write_text(Path(out_dir) / name, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
