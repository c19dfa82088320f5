"""The one-command GPU check (bench/gpu_check.py): without CUDA it refuses in one line; its CPU dry run
goes through the DDP step, the DDP-equals-one-process check of both trainers and every speed case (tiny
sizes, bfloat16 autocast) and prints the table."""
import pytest
import torch
from script_runner import ROOT, python, run

SCRIPT = str(ROOT / "bench" / "gpu_check.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_so_in_one_line_and_fails():
    done = run(python(SCRIPT, "--parts", "speed"))
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device" in done.stderr and "--cpu-dry-run" in done.stderr


def test_cpu_dry_run_goes_through_ddp_ddp_equal_and_every_speed_case():
    done = run(python(SCRIPT, "--cpu-dry-run", "--parts", "ddp,speed"), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(("DDP", "ResNet", "EfficientNet", "guided"))]
    assert len(rows) == 9
    assert "DDP step, 2 processes (gloo)" in rows[0] and rows[0].rstrip().endswith("ok")
    for row, trainer in zip(rows[1:3], ("cities", "ses")):  # tests/ddp_equal_train.py, 1 process vs 2 ranks
        assert f"DDP = one process, {trainer} trainer, 2 ranks (gloo)" in row and "ok: weights within" in row, row
    assert sum("bf16 + channels_last" in r for r in rows) == 2 and sum("fp32 NCHW" in r for r in rows) == 2
    assert all("img/s" in r or "cell/s" in r for r in rows[3:])
    assert "FAIL" not in done.stdout
