"""The one entry wrapper of the top-level scripts: library errors become one ``error:`` line and an
exit status; Ctrl-C and SIGTERM end with one line saying how to resume. Nothing else ends a process."""
from __future__ import annotations

import signal
import sys
from typing import Callable

from .errors import UrbanlensError

INTERRUPTED = "interrupted; re-run the same command to resume"


def _terminate(signum, frame):  # SIGTERM (a scheduler's kill, ``timeout``) ends like Ctrl-C
    raise KeyboardInterrupt


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; exit 0 when it returns, else with one line on stderr and a non-zero status."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UrbanlensError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
