"""One results folder, one run at a time: a run with other settings is refused while a holder lives,
same-settings runs share the folder, a dead holder's lock is taken over, and the lock goes however the
run ends."""
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from urbanlens.core import entry, locks, runs
from urbanlens.core.config import load_config
from urbanlens.core.errors import DataError, RunLocked
from script_runner import python, run_script, start

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "configs/cities_demo.yaml", [])
OTHER = load_config(ROOT / "configs/cities_demo.yaml", ["seed=7"])


def _holder(folder, pid, cfg=OTHER, stage="train_classification.py", host=None, started="live"):
    """A holder file as another run writes it (``started="live"``: the process's real start)."""
    lock_dir = Path(folder) / locks.LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    host = host or socket.gethostname()
    info = {"host": host, "pid": pid, "started": locks._start_ticks(pid) if started == "live" else started,
            "stage": stage, "since": "2026-01-02 03:04:05 UTC", "fingerprint": locks.settings_fingerprint(stage, cfg)}
    path = lock_dir / f"{host}-{pid}.json"
    path.write_text(json.dumps(info))
    return path


def _dead_pid():
    proc = start(python("-c", "pass"))
    proc.wait()
    return proc.pid


def test_a_run_with_other_settings_is_refused_while_its_holder_lives(tmp_path):
    other = _holder(tmp_path, os.getppid())  # a live process of this host
    with pytest.raises(RunLocked) as err:
        with locks.hold(tmp_path, "train_classification.py", CFG):
            pytest.fail("entered a folder another run holds")
    msg = str(err.value)
    assert all(w in msg for w in (str(tmp_path), f"pid {os.getppid()}", socket.gethostname(),
                                  "2026-01-02 03:04:05 UTC", "train_classification.py", "other settings"))
    assert "\n" not in msg and sorted((tmp_path / locks.LOCK_DIR).iterdir()) == [other]  # ours is gone again


def test_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    other = _holder(tmp_path, 1, host="node-b")
    with pytest.raises(RunLocked) as err:
        locks.acquire(tmp_path, "train_classification.py", CFG)
    assert "node-b" in str(err.value) and "another host" in str(err.value) and f"delete {other}" in str(err.value)


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    said = []
    dead = _holder(tmp_path, _dead_pid())
    reused = _holder(tmp_path, os.getppid(), stage="saliency.py", started="1")  # its pid now runs something else
    with locks.hold(tmp_path, "train_classification.py", CFG, say=said.append) as mine:
        assert sorted((tmp_path / locks.LOCK_DIR).iterdir()) == [mine]
    assert not dead.exists() and not reused.exists() and len(said) == 2
    assert all("took over" in s and "no longer running" in s for s in said)
    assert not (tmp_path / locks.LOCK_DIR).exists()


def test_runs_with_the_same_settings_share_the_folder(tmp_path):
    """The --shard jobs of one run, the ranks of one torchrun."""
    shard = _holder(tmp_path, os.getppid(), cfg=CFG, stage="generate_fr_ua_aerial_data.py")
    with locks.hold(tmp_path, "generate_fr_ua_aerial_data.py", CFG) as mine:
        assert json.loads(mine.read_text())["fingerprint"] == json.loads(shard.read_text())["fingerprint"]
        with pytest.raises(RunLocked):  # a run of other settings waits for both
            locks.acquire(tmp_path, "generate_fr_ua_aerial_data.py", OTHER)
        with pytest.raises(RunLocked):  # so does another stage
            locks.acquire(tmp_path, "efficientnet_training.py", CFG)
    assert not mine.exists() and shard.exists()


def test_the_lock_goes_on_error_and_interrupt_and_is_no_output(tmp_path):
    folder = tmp_path / "results" / "cities"
    for crash in (ValueError("bug"), KeyboardInterrupt()):
        with pytest.raises(type(crash)):
            with locks.hold(folder, "test_classification.py", CFG):
                assert not runs.has_outputs(folder)  # the lock is not taken for outputs
                raise crash
        assert not tmp_path.joinpath("results").exists()  # folders it made for itself go too
    folder.mkdir(parents=True)
    runs.write_stamp(folder / "x.stamp.json", "x.py", CFG, ["seed"])
    with locks.hold(folder, "x.py", CFG):
        assert runs.files_under(folder, ".") == [folder / "x.stamp.json"]
    assert sorted(p.name for p in folder.iterdir()) == ["x.stamp.json"]


@pytest.mark.parametrize("crash", [DataError("a.csv", "broken", "fix it"), KeyboardInterrupt()])
def test_entry_releases_what_main_keeps(tmp_path, capsys, crash):
    def main():
        entry.keep(locks.hold(tmp_path, "x.py", CFG))
        assert (tmp_path / locks.LOCK_DIR).is_dir()
        raise crash

    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as end:
            entry.run(main)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert end.value.code in (1, 130) and not (tmp_path / locks.LOCK_DIR).exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_stage_refused_by_the_lock_says_so_in_one_line(tmp_path):
    patches = tmp_path / "data" / "cities" / "patches"
    other = _holder(patches, os.getppid(), stage="preprocessing.py")
    proc = run_script(["preprocessing.py"], tmp_path / "data", tmp_path / "results", env={"OMP_NUM_THREADS": "1"},
                      check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {patches}: in use by preprocessing.py (pid {os.getppid()}")
    assert "other settings" in lines[0] and "paths.data" in lines[0]
    assert sorted((patches / locks.LOCK_DIR).iterdir()) == [other] and not list(patches.glob("*.csv"))
