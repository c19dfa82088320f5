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
    the repository root, progress bars off; with ``check``, a non-zero exit fails showing the output."""
    cmd = [*launcher, *args, "--config", config, "--set", f"paths.data={data}", "--set", f"paths.results={results}",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
