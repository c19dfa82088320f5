"""Shared helpers of the benchmarks: timing, result checks, tables, peak memory of a subprocess.

Run on its own (``python bench/common.py``) it prints the machine the numbers were taken on.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def single_thread() -> None:
    """One thread for every numeric library, so that timings are per core.

    Must run before numpy or torch is imported to reach their thread pools; torch is told again
    here if it is already loaded.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GDAL_NUM_THREADS"):
        os.environ[var] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def time_runs(fn, repeats: int, warmup: int = 1, setup=None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones.

    ``setup()``, when given, runs before each call outside the timed region (e.g. to empty an
    output folder).
    """
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def median(times) -> float:
    return float(statistics.median(times))


def max_rel_diff(a, b, floor: float = 1e-12) -> float:
    """Largest |a - b| / max(|a|, |b|) over finite pairs; NaN in one and not the other counts as inf."""
    import numpy as np

    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return float("inf")
    ok = ~nan_a
    if not ok.any():
        return 0.0
    a, b = a[ok], b[ok]
    return float((np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)).max())


def psnr(a, b, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (inf when identical)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak ** 2 / mse)


def verdict(name: str, value: float, target: float, at_least: bool, note: str = "") -> bool:
    """Print a result line ``name: value (target >= or <= target: ok|FAIL[; note])``; True when met."""
    ok = value >= target if at_least else value <= target
    print(f"{name}: {value:.2f}x (target {'>=' if at_least else '<='} {target}x: {'ok' if ok else 'FAIL'}"
          + (f"; {note})" if note else ")"))
    return ok


def table(rows, items: int, item_name: str, baseline: str) -> str:
    """A text table of (path, median seconds) rows: per-item time and ratio to the ``baseline`` row.

    The ratio is ``seconds / baseline seconds`` (above 1: slower than the baseline).
    """
    base = dict(rows)[baseline]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'path':<{width}}{'seconds':>10}{'per ' + item_name:>16}{'x ' + baseline:>22}"]
    for name, sec in rows:
        lines.append(f"{name:<{width}}{sec:>10.3f}{1000 * sec / items:>13.2f} ms{sec / base:>22.2f}")
    return "\n".join(lines)


# Starts the command from a small process and prints its peak RSS (kB): a child forked from a large
# parent counts the parent's pages in its own peak until it execs, so the parent must stay small.
_RSS_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], "w") if sys.argv[1] else None,
                        stderr=subprocess.STDOUT)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_mb(cmd: list[str], cwd=ROOT, env=None, log=None) -> float:
    """Run ``cmd`` to completion and return its peak resident memory in MiB: the largest of the
    process and the workers it waited for, from the kernel's accounting of that child alone.

    Raises RuntimeError with the command's last output lines (kept in ``log``) when it fails.
    """
    res = subprocess.run([sys.executable, "-c", _RSS_LAUNCHER, str(log or ""), *map(str, cmd)], cwd=cwd,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        code, kb = map(int, res.stdout.split()[-2:])
    except ValueError:
        raise RuntimeError(f"could not measure {' '.join(map(str, cmd))}: {res.stdout[-500:]}") from None
    if code != 0:
        tail = Path(log).read_text().splitlines()[-5:] if log else []
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {code}: " + " | ".join(tail))
    return kb / 1024  # Linux reports kilobytes


def machine() -> str:
    """One line: CPU model, cores, memory, load average."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores{mem}; load average {load}"


def header(name: str, args) -> None:
    """The benchmark's name, its sizes and the machine, printed before any timing."""
    sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    print(f"[{name}] {sizes}")
    print(f"[{name}] machine: {machine()}")


if __name__ == "__main__":
    print(f"machine: {machine()}")
    print(f"python {platform.python_version()}, {platform.platform()}")
