"""cities.train.freeze=backbone on the small cities world, with a timm ConvNeXt: only the final layer learns (best.pt's backbone is
the seeded initial one, tensor for tensor), the test stage evaluates that checkpoint unchanged, and a second
run with other head settings reuses the cached embeddings (computed again when the backbone changes:
tests/core/test_frozen.py). Stages run in process (``entry.run(main)``, as their scripts do)."""
import contextlib
import importlib
import io
import json
import signal
import sys

import pytest
import torch
from script_runner import CONF, ROOT, set_args

from urbanlens.core import entry, runtime
from urbanlens.core.backbones import build_backbone, head

BACKBONE = "timm:test_convnext"  # a tiny random-init timm ConvNeXt (tests/e2e/test_e2e_backbones.py: the others)
FROZEN = [f"cities.model.backbone={BACKBONE}", "cities.model.input_size=64", "cities.train.freeze=backbone", "cities.train.epochs=2", "cities.train.max_steps_per_epoch=4",
          "cities.train.lr=0.01"]
QUICK_TEST = ["cities.test.baseline=false", "cities.test.bootstrap=20", "cities.test.permutations=20"]


def run_stage(script: str, root, sets) -> str:
    """``script``'s main through ``entry.run`` on the small world's data, results in ``root/frozen``; its stdout."""
    sets = [f"paths.data={root / 'data'}", f"paths.results={root / 'frozen'}", *sets]
    term = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.chdir(ROOT)
        mp.syspath_prepend(str(ROOT))
        mp.setattr(sys, "argv", [script, "--config", str(CONF / "cities_small.yaml"), *set_args(sets)])
        try:
            entry.run(importlib.import_module(script).main)
        except SystemExit as e:
            pytest.fail(f"{script} exited with {e.code}:\n{out.getvalue()[-2000:]}")
        finally:
            signal.signal(signal.SIGTERM, term)
    return out.getvalue()


@pytest.fixture(scope="module")
def frozen_run(cities_world):
    return cities_world, cities_world / "frozen" / "cities", run_stage("train_classification", cities_world, FROZEN)


def test_only_the_head_learns_and_the_test_stage_reads_the_checkpoint(frozen_run):
    root, out, log = frozen_run
    assert "embeddings computed (no embeddings.pt yet)" in log
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    runtime.seed_everything(0)  # as the stage seeds before building its model
    initial = build_backbone(BACKBONE, len(best["classes"]), pretrained=False)
    head_name = next(n for n, m in initial.named_modules() if m is head(initial))
    head_keys = {k for k in initial.state_dict() if k.startswith(f"{head_name}.")}
    assert head(initial).in_features == best["model"][f"{head_name}.weight"].shape[1]
    for k, v in initial.state_dict().items():
        if k in head_keys:
            assert not torch.equal(v, best["model"][k]), f"{k} did not learn"
        else:
            assert torch.equal(v, best["model"][k]), f"{k} changed although the backbone is frozen"
    run_stage("test_classification", root, [*FROZEN, *QUICK_TEST])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_patches"] > 0 and metrics["accuracy"] > 1 / len(best["classes"])  # above chance


def test_a_second_run_with_other_head_settings_reuses_the_embeddings(frozen_run):
    root, out, _ = frozen_run
    cache = out / "embeddings" / "embeddings.pt"
    before = cache.stat().st_mtime_ns
    again = run_stage("train_classification", root, [*FROZEN, "cities.train.lr=0.02", "cities.train.epochs=1",
                                                     "cities.train.max_steps_per_epoch=1", "overwrite=true"])
    assert f"embeddings reused from {cache}" in again and cache.stat().st_mtime_ns == before
