"""The one entry wrapper of the top-level scripts: library errors become one ``error:`` line and an
exit status; Ctrl-C and SIGTERM end with one line saying how to resume. Nothing else ends a process.

``keep(cm)`` enters a context manager (e.g. a results folder's lock, ``urbanlens.core.locks.hold``)
for the rest of ``main()``: it is exited when ``main`` returns, raises or is interrupted, without
indenting the script's body under a ``with``."""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from typing import Callable, ContextManager, TypeVar

from .errors import UrbanlensError
from .files import os_problem

INTERRUPTED = "interrupted; re-run the same command to resume"

T = TypeVar("T")
_stack: contextlib.ExitStack | None = None  # the running main()'s, inside run()
_owner: int | None = None  # the process that runs main(); forked workers inherit the handler, not the role


def _terminate(signum, frame):
    """SIGTERM (a scheduler's kill, ``timeout``) ends the main process like Ctrl-C. A forked worker
    (a multiprocessing pool, which its owner stops with SIGTERM as it closes) ends quietly, as if the
    handler were not there: no interrupt, no traceback."""
    if os.getpid() != _owner:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise KeyboardInterrupt


def config_line(script: str, cfg, demo: bool = False, overrides: int = 0) -> str:
    """The first line a script prints: ``<script>: config <path> (seed N, results <dir>)``, saying when
    the path is the script's demo config taken because no ``--config`` was given, or that only the
    built-in defaults apply, and how many ``--set`` overrides are on top."""
    path = cfg.get("config_file")
    what = f"config {path}" if path else "built-in defaults (urbanlens/core/defaults.yaml)"
    if demo:
        what = f"built-in defaults + {path} demo, no --config given"
    sets = f" + {overrides} --set override{'s' if overrides != 1 else ''}" if overrides else ""
    return f"{script}: {what}{sets} (seed {cfg['seed']}, results {cfg['paths']['results']})"


def say_config(cfg, demo: bool = False, overrides: int = 0) -> None:
    """Print ``config_line`` for the running script (once per job: rank 0 only under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(config_line(os.path.basename(sys.argv[0]) or "python", cfg, demo, overrides), flush=True)


def keep(cm: ContextManager[T]) -> T:
    """Enter ``cm`` until the running ``main()`` ends (outside ``run``: until the process exits)."""
    if _stack is None:
        stack = contextlib.ExitStack()
        atexit.register(stack.close)
        return stack.enter_context(cm)
    return _stack.enter_context(cm)


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; exit 0 when it returns, else with one line on stderr and a non-zero status.
    An OSError the user can fix (permission, read-only, disk full, folder vs file) that no library
    call turned into a typed error is printed the same way."""
    global _stack, _owner
    _owner = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        with contextlib.ExitStack() as _stack:
            main()
    except UrbanlensError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        problem = os_problem(e)
        if problem is None or not e.filename:
            raise
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(problem.exit_code)
    finally:
        _stack = None
