"""The shell entry points' decisions, with a stub Python that logs its calls instead of running them: which
demo config each synthetic world is built from, and that run.sh builds one only in the demo data folder."""
import shutil
from pathlib import Path

import pytest
from script_runner import run as run_command

ROOT = Path(__file__).resolve().parents[2]

# the stub: '-c' (run.sh asks for sys.prefix) prints its prefix; 'urbanlens.core.config KEY' prints the folder
# the test chose for KEY; every call is logged, one line each
STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$1 ${2-} ${3-}" in
  "-c "*) echo "$STUB_PREFIX" ;;
  "-m urbanlens.core.config paths.data") echo "$STUB_DATA" ;;
  "-m urbanlens.core.config paths.results") echo results ;;
esac
"""


@pytest.fixture
def shell(tmp_path):
    """run(script, *args, data=...) -> (completed process, logged Python calls), in a copy of the entry
    points whose Python is the stub."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    repo.mkdir(), bin_.mkdir()
    for name in ("run.sh", "data_setup.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    (bin_ / "python").write_text(STUB)
    (bin_ / "python").chmod(0o755)
    log = tmp_path / "calls.log"

    def run(script, *args, data="data/demo"):
        log.write_text("")
        env = {"PATH": f"{bin_}:/usr/bin:/bin", "VIRTUAL_ENV": str(tmp_path), "STUB_LOG": str(log),
               "STUB_PREFIX": str(tmp_path), "STUB_DATA": str(data), "HOME": str(tmp_path)}
        proc = run_command(["bash", repo / script, *args], cwd=None, env=env, inherit=False, timeout=60)
        return proc, [line for line in log.read_text().splitlines() if not line.startswith(("-c", "-m pip"))]

    run.repo = repo
    return run


CITIES = "-m urbanlens.cities.world --config configs/cities_demo.yaml"
SES = "-m urbanlens.ses.world --config configs/ses_demo.yaml"


@pytest.mark.parametrize("args, calls", [
    (["ses"], [SES]),
    (["cities"], [CITIES]),
    ([], [CITIES, SES]),
    (["all", "--set", "seed=3"], [CITIES + " --set seed=3", SES + " --set seed=3"]),
    (["ses", "--config", "mine.yaml"], ["-m urbanlens.ses.world --config mine.yaml"]),
    (["all", "--config=mine.yaml"], ["-m urbanlens.cities.world --config=mine.yaml",
                                     "-m urbanlens.ses.world --config=mine.yaml"]),
])
def test_synthetic_worlds_are_built_from_their_own_demo_config(shell, args, calls):
    proc, logged = shell("data_setup.sh", "--synthetic", *args)
    assert proc.returncode == 0, proc.stderr
    assert logged == calls


STAGES = ["generate_fr_ua_aerial_data.py", "efficientnet_training.py", "gradcaming_urban_areas.py"]


def test_run_ses_builds_a_synthetic_world_only_in_the_demo_folder(shell, tmp_path):
    proc, logged = shell("run.sh", "ses")
    assert proc.returncode == 0, proc.stderr
    worlds = [c for c in logged if ".world" in c]
    assert worlds == [SES] and [c.split()[0] for c in logged if c.endswith(".py --config configs/ses_demo.yaml")
                               ] == STAGES

    real = tmp_path / "my_data"
    proc, logged = shell("run.sh", "ses", "--config", "configs/ses.yaml", data=real)
    assert proc.returncode == 1 and not any(".world" in c or ".py" in c.split()[0] for c in logged)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {real}/UA_data: no Urban Atlas data")
    assert "data_setup.sh --synthetic ses" in lines[0] and not real.exists()

    (real / "UA_data").mkdir(parents=True)
    (real / "UA_data" / "FR001L1_PARIS_UA2018_v013.zip").write_bytes(b"")
    proc, logged = shell("run.sh", "ses", "--config", "configs/ses.yaml", data=real)
    assert proc.returncode == 0 and not any(".world" in c for c in logged)
    assert [c.split()[0] for c in logged if c.split()[0].endswith(".py")] == STAGES
