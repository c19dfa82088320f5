"""Running commands as a user would, for the tests that need a whole process: one place for the command
line (config, data and results folders, --set overrides), the environment, the working folder, the time
limit, the expected exit status and the failure message. The small worlds' configs are files under
tests/conf/ (``CONF``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "conf"
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone")  # then --nproc_per_node N


def environment(env=None, inherit=True, quiet=False) -> dict:
    """``env`` over this process's environment (or alone, without ``inherit``); ``quiet`` turns progress
    bars off."""
    return {**(os.environ if inherit else {}), **({"TQDM_DISABLE": "1"} if quiet else {}), **(env or {})}


def run(cmd, cwd=ROOT, env=None, inherit=True, quiet=False, timeout=900, returncode=None) -> subprocess.CompletedProcess:
    """``cmd`` in ``cwd`` (the repository root), output captured as text; the environment as
    ``environment`` makes it. With ``returncode``, another exit status fails showing the output's end."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, cwd=cwd, env=environment(env, inherit, quiet), capture_output=True, text=True,
                          timeout=timeout)
    if returncode is not None:
        assert proc.returncode == returncode, \
            f"{' '.join(cmd)} exited {proc.returncode}, not {returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def start(cmd, cwd=ROOT, env=None, inherit=True, quiet=False, **popen) -> subprocess.Popen:
    """``cmd`` started in the background (``popen``: Popen's own arguments, e.g. stdout, start_new_session)."""
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=environment(env, inherit, quiet), **popen)


def python(*args) -> list[str]:
    """A command line of this interpreter: ``python("-m", "urbanlens.core.config", ...)``, ``python("x.py")``."""
    return [sys.executable, *map(str, args)]


def set_args(sets) -> list[str]:
    """``--set s`` for each ``key=value`` of ``sets``."""
    return [a for s in sets for a in ("--set", str(s))]


def script_command(args, data, results, sets=(), config="configs/cities_demo.yaml", launcher=(sys.executable,)) -> list:
    """``launcher args --config config --set paths.data=data --set paths.results=results --set s ...``."""
    return [*launcher, *args, "--config", str(config), *set_args([f"paths.data={data}", f"paths.results={results}", *sets])]


def run_script(args, data, results, sets=(), config="configs/cities_demo.yaml", launcher=(sys.executable,),
               env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    """``script_command`` run from the repository root, progress bars off; with ``check``, a non-zero
    exit fails showing the output, and so does a successful stage whose output holds a Python traceback
    (e.g. a pool worker's)."""
    proc = run(script_command(args, data, results, sets, config, launcher), env=env, quiet=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert_no_traceback(proc, args)
    return proc


def assert_no_traceback(proc: subprocess.CompletedProcess, args=()) -> None:
    """A stage that succeeded printed no Python traceback (a worker's, a library's warning path's)."""
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr)):
        at = (text or "").find("Traceback (most recent call last)")
        assert at < 0, f"{' '.join(map(str, args))} succeeded but its {name} holds a traceback:\n{text[at:at + 3000]}"


CITIES_SMALL = "tests/conf/cities_small.yaml"  # the city demo, smaller (the file says how)


def run_cities_stage(args, root, extra=(), results="results", launcher=(sys.executable,), check=True):
    """A city stage on the small world under ``root`` (``root/data``, ``root/<results>``)."""
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TORCH_HOME": str(Path(root) / "torch_home")}
    return run_script(args, Path(root) / "data", Path(root) / results, extra, config=CITIES_SMALL, launcher=launcher,
                      env=env, check=check)


def finish(proc: subprocess.Popen, timeout=600) -> subprocess.CompletedProcess:
    """A ``start``-ed process (with stdout and stderr piped, text) waited for, as ``run`` returns it."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_in_process(module: str, config, sets=(), *args: str) -> None:
    """A stage's ``main()`` in this process, as its command line ``module --config config args --set ...``
    would run it (top-level scripts by name, e.g. ``train_classification``; typed errors propagate)."""
    import importlib

    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [module, "--config", str(config), *map(str, args), *set_args(sets)]
    sys.path.insert(0, str(ROOT))  # the top-level scripts
    try:
        importlib.import_module(module).main()
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


def without_timings(obj):
    """A metrics.json object without its wall-clock entries."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj
