"""Issue 23: two DDP ranks (torchrun, gloo on the CPU) train the models one process trains with the same
global batch, both trainers, within ``WEIGHTS_RTOL`` (float64: rounding alone), with the same per-epoch
log; and a 2-rank city run stopped after epoch 1 and resumed under 2 ranks ends as the uninterrupted
2-rank run (tests/ddp_equal_train.py trains; three launches, about 40 s on 2 idle cores)."""
import subprocess
import sys

import pandas as pd
import pytest
import torch

import ddp_equal_train as driver
from script_runner import ROOT, assert_no_traceback, finish, start
from script_runner import TORCHRUN as TORCHRUN_STANDALONE

SCRIPT = str(ROOT / "tests" / "ddp_equal_train.py")
TORCHRUN = (*TORCHRUN_STANDALONE, "--nproc_per_node", "2")
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(*args) -> subprocess.Popen:
    return start(args, env=ENV, quiet=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(root, resumed run): root/one trained in one process, root/two under 2 ranks, root/part 1 epoch
    under 2 ranks then resumed to 2."""
    root = tmp_path_factory.mktemp("ddp_equal")
    one = launch(sys.executable, SCRIPT, root / "one")
    two = finish(launch(*TORCHRUN, SCRIPT, root / "two", "--part", root / "part"))
    one = finish(one)
    assert one.returncode == 0, one.stderr[-3000:]
    if two.returncode != 0 and "ddp_equal_train" not in two.stderr + two.stdout:
        pytest.skip(f"torchrun could not start here: {two.stderr[-300:]}")
    assert two.returncode == 0, two.stderr[-3000:]
    resumed = finish(launch(*TORCHRUN, SCRIPT, root / "part", "--only", "cities", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for proc in (one, two, resumed):
        assert_no_traceback(proc)
    return root, resumed


@pytest.mark.parametrize("trainer", driver.TRAINERS)
def test_two_ranks_train_the_single_process_model(runs, trainer):
    root, _ = runs
    found = driver.differences(root / "one", root / "two", [trainer])[trainer]
    assert found["world_sizes"] == (1, 2)
    assert found["max_rel_diff"] <= driver.WEIGHTS_RTOL, found
    assert found["same_log"], found  # losses, accuracies (validation too) of every epoch


def test_resume_under_ddp_continues_the_same_run(runs):
    root, resumed = runs
    assert "resuming from" in resumed.stdout and "after epoch 1" in resumed.stdout
    last = torch.load(root / "part" / "cities" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 2
    assert pd.read_csv(root / "part" / "cities" / "train_log.csv")["epoch"].tolist() == [1, 2]
    found = driver.differences(root / "two", root / "part", ["cities"])["cities"]
    assert found["world_sizes"] == (2, 2)
    assert found["max_rel_diff"] <= driver.WEIGHTS_RTOL and found["same_log"], found
