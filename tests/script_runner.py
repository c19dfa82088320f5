"""Running a stage script as a user would, for the tests that need the whole command: one place for
the command line (demo config, data and results folders, --set overrides), a quiet environment and
the failure message."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(args, data, results, sets=(), config="configs/cities_demo.yaml", launcher=(sys.executable,),
               env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """``launcher args --config config --set paths.data=data --set paths.results=results --set s ...`` from
    the repository root, progress bars off; with ``check``, a non-zero exit fails showing the output, and
    so does a successful stage whose output holds a Python traceback (e.g. a pool worker's)."""
    cmd = [*launcher, *args, "--config", config, "--set", f"paths.data={data}", "--set", f"paths.results={results}",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert_no_traceback(proc, args)
    return proc


def assert_no_traceback(proc: subprocess.CompletedProcess, args=()) -> None:
    """A stage that succeeded printed no Python traceback (a worker's, a library's warning path's)."""
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        at = (text or "").find("Traceback (most recent call last)")
        assert at < 0, f"{' '.join(map(str, args))} succeeded but its {name} holds a traceback:\n{text[at:at + 3000]}"


# the city demo config, smaller: 8 cities (4 twin pairs), one 384 px image per site, 32 px model input
CITIES_SMALL = ["cities.world.image_size=384", "cities.world.images_per_site=1", "cities.split.test_b_per_city=100",
                "cities.model.input_size=32", "cities.train.epochs=6", "workers=1"]


def run_cities_stage(args, root, extra=(), results="results", launcher=(sys.executable,), check=True):
    """A city stage on the small world under ``root`` (``root/data``, ``root/<results>``)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TORCH_HOME": str(Path(root) / "torch_home")}
    return run_script(args, Path(root) / "data", Path(root) / results, (*CITIES_SMALL, *extra), launcher=launcher,
                      env=env, check=check)


def without_timings(obj):
    """A metrics.json object without its wall-clock entries."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
