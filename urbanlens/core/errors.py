"""Typed errors of the library. Each carries where (a file, folder or config key), the problem and the
fix; ``urbanlens.core.entry.run`` prints one as a single ``error:`` line and exits with its code.

Library code raises these and never ends the process itself.
"""
from __future__ import annotations

import re


class UrbanlensError(Exception):
    """A problem the user can fix. ``str(e)`` is one line: ``<where>: <problem>; <fix>``."""

    exit_code = 1

    def __init__(self, where=None, problem: str | None = None, fix: str | None = None, *, message: str | None = None):
        # one argument is the finished message (also how the error is rebuilt after pickling); ``message=``
        # is how a torch DataLoader rebuilds an error of its worker process (because of the property below)
        if message is not None:
            where = message
        message = str(where) if problem is None else f"{where}: {problem}" + (f"; {fix}" if fix else "")
        if problem is None:
            message = _from_worker(message, type(self).__name__)
        super().__init__(message.replace("\n", " "))

    @property
    def message(self) -> str:
        return self.args[0]


class ConfigError(UrbanlensError, ValueError):
    """A config value, key or file that is wrong; exit status 2, like a command-line usage error."""

    exit_code = 2


class DataError(UrbanlensError):
    """Input data that cannot be used as it is: missing, unreadable, of the wrong kind or schema."""


class WeightsUnavailable(UrbanlensError):
    """ImageNet weights asked for (``pretrained: true``) that are neither on disk nor downloadable."""

    exit_code = 2


class StaleRun(UrbanlensError):
    """Outputs already there were made with other settings or other inputs than this run's."""


class CheckpointError(UrbanlensError):
    """A checkpoint that is missing, unreadable, or of another model than the one asked for."""


class DeviceError(UrbanlensError):
    """A device asked for in the config that this machine does not have."""


class FileSystemError(DataError):
    """A file or folder the operating system refuses: no permission, read-only, disk full, a folder
    where a file is expected or the other way round."""


class DamagedOutput(DataError):
    """A file one stage wrote and another reads back that is empty, truncated or not what its name says."""


class RunLocked(UrbanlensError):
    """A results folder another run is writing now (``urbanlens.core.locks``)."""


class TrainingDiverged(UrbanlensError):
    """Training that produced a non-finite or exploding loss, or non-finite weights: stopped before the
    model is saved or scored (the learning rate too high, or non-finite inputs)."""


def _from_worker(message: str, name: str) -> str:
    """The error's own line when ``message`` is how a torch DataLoader re-raises an error of a worker
    process (``Caught <name> in DataLoader worker process N.`` then the worker's whole traceback)."""
    if not message.startswith(f"Caught {name} in DataLoader worker process"):
        return message
    found = re.search(rf"(?:^|\n)(?:[\w.]+\.)?{name}: (.*?)\s*$", message, re.S)
    return found.group(1) if found else message
