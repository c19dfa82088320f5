"""Typed errors of the library; the scripts' entry wrapper prints them as one line."""
from __future__ import annotations


class DataError(SystemExit):
    """Bad input data. The message is one line: ``error: <file>: <problem>; <fix>``.

    It derives from SystemExit so that a script stops with that line and a non-zero status when it is
    not caught; tests and callers can still catch it by name.
    """

    def __init__(self, path, problem: str | None = None, fix: str | None = None):
        # a single argument is the finished message (how the error is rebuilt after pickling)
        super().__init__(str(path) if problem is None else f"error: {path}: {problem}; {fix}")
