"""Every run is reproducible: two runs with the same seed on CPU give byte-identical split manifests and
equal metrics, and every stage saves the seed and the full resolved config beside its results.

(Byte-identical synthetic worlds are asserted in test_synth_cities.py and test_synth_france.py; a
resumed run equal to an uninterrupted one in test_interrupt.py.) A seed other than the default runs
here, so a config that only looks right because it holds the defaults would fail."""
import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from script_runner import assert_no_traceback, run_script, without_timings

from urbanlens.core import files
from urbanlens.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SEED = 7
# the small cities world (tests/conf/cities_small.yaml), 20 test_b patches a city, 2 epochs of 2 steps
CITIES = ("tests/conf/cities_small.yaml", [f"seed={SEED}", "cities.split.test_b_per_city=20", "cities.train.epochs=2",
                                           "cities.train.max_steps_per_epoch=2"])
# one 1 km city (tests/conf/ses_tiny.yaml); the demo's spatial folds, blocks scaled to the 1 km city
SES = ("tests/conf/ses_tiny.yaml", [f"seed={SEED}", "ses.train.block_m=400"])


def stage(args, config_sets, data, results):
    """Run a stage as a user does; return (stdout, the full resolved config of that command)."""
    config, sets = config_sets
    proc = run_script(args, data, results, sets, config, env={"OMP_NUM_THREADS": "1"}, check=False, timeout=600)
    assert proc.returncode == 0, f"{args[-1]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert_no_traceback(proc, args)
    resolved = load_config(ROOT / config, [f"paths.data={data}", f"paths.results={results}", *sets]).to_dict()
    resolved["config_file"] = config  # as the stage, started in the repository root, records it
    return proc.stdout, resolved


def digests(folder, skip=()):
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(tuple(skip))}


def assert_saved_config(path, expected):
    """``path`` holds the run's full resolved config: every key and value, the seed among them."""
    assert path.is_file(), f"{path}: no saved config beside the results"
    saved = yaml.safe_load(path.read_text())
    assert saved["seed"] == SEED
    assert saved == expected, path


@pytest.fixture(scope="module")
def cities(tmp_path_factory):
    """One synthetic world; preprocessing and training twice (a and b) from copies of it; testing once."""
    root = tmp_path_factory.mktemp("repro_cities")
    configs = {}
    run = lambda args, x: stage(args, CITIES, root / f"data_{x}", root / f"results_{x}")  # noqa: E731
    _, configs["world"] = run(["-m", "urbanlens.cities.world"], "a")
    shutil.copytree(root / "data_a" / "cities" / "raw", root / "data_b" / "cities" / "raw")
    for x in "ab":
        _, configs["patches", x] = run(["preprocessing.py"], x)
        _, configs["train", x] = run(["train_classification.py"], x)
    _, configs["test"] = run(["test_classification.py"], "a")
    return root, configs


@pytest.fixture(scope="module")
def ses_runs(tmp_path_factory):
    """One synthetic French world and its cells; SES training twice (a and b). (The activation-map
    stage's saved config is checked in test_interrupt.py, which runs that stage anyway.)"""
    root = tmp_path_factory.mktemp("repro_ses")
    configs = {}
    run = lambda args, x: stage(args, SES, root / "data", root / f"results_{x}")  # noqa: E731
    _, configs["world"] = run(["-m", "urbanlens.ses.world"], "a")
    _, configs["extract"] = run(["generate_fr_ua_aerial_data.py"], "a")
    shutil.copytree(root / "results_a" / "ses", root / "results_b" / "ses")
    for x in "ab":
        _, configs["train", x] = run(["efficientnet_training.py"], x)
    return root, configs


def test_city_split_manifest_and_patches_are_byte_identical(cities):
    root, _ = cities
    a, b = (root / f"data_{x}" / "cities" / "patches" for x in "ab")
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    manifest = pd.read_csv(a / "manifest.csv")
    assert set(manifest["split"]) == {"train", "val", "test", "test_b"}
    cut = lambda d: {k: v for k, v in digests(d, skip=("config.yaml",)).items()  # noqa: E731
                     if not k.startswith("store/")}  # the trainer's uint8 store: a cache, stamped with file times
    assert cut(a) == cut(b)


def test_city_training_twice_gives_equal_metrics_and_weights(cities):
    root, _ = cities
    a, b = (root / f"results_{x}" / "cities" for x in "ab")
    # the validation metrics of every epoch, and the weights (so any later evaluation) are equal
    la, lb = (pd.read_csv(d / "train_log.csv").drop(columns="seconds") for d in (a, b))
    assert la["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(la, lb, check_exact=True)
    for name in ("last.pt", "best.pt"):
        wa = torch.load(a / "checkpoints" / name, map_location="cpu", weights_only=False)["model"]
        wb = torch.load(b / "checkpoints" / name, map_location="cpu", weights_only=False)["model"]
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_every_cities_stage_saves_seed_and_resolved_config(cities):
    root, configs = cities
    assert_saved_config(root / "data_a" / "cities" / "world_config.yaml", configs["world"])
    assert files.read_json(root / "data_a" / "cities" / "truth.json")["seed"] == SEED
    for x in "ab":
        assert_saved_config(root / f"data_{x}" / "cities" / "patches" / "config.yaml", configs["patches", x])
        out = root / f"results_{x}" / "cities"
        assert_saved_config(out / "train_config.yaml", configs["train", x])
    assert_saved_config(root / "results_a" / "cities" / "test_config.yaml", configs["test"])
    assert files.read_json(root / "results_a" / "cities" / "metrics.json")["n_patches"] == 8 * 20
    ckpt = torch.load(root / "results_a" / "cities" / "checkpoints" / "best.pt", map_location="cpu",
                      weights_only=False)
    assert ckpt["config"] == configs["train", "a"]  # checkpoints carry the config they were trained with


def test_ses_folds_and_metrics_are_equal(ses_runs):
    root, _ = ses_runs
    a, b = (root / f"results_{x}" / "ses" / "Paris" for x in "ab")
    assert (a / "folds.csv").read_bytes() == (b / "folds.csv").read_bytes()
    folds = pd.read_csv(a / "folds.csv")
    cells = set(pd.read_csv(a / "predictions.csv")["cell_id"])
    for _, fold in folds.groupby("fold"):  # each fold's parts are disjoint and cover every cell
        assert sorted(fold["cell_id"]) == sorted(cells) and set(fold["part"]) == {"train", "val", "test"}
    assert sorted(folds.loc[folds["part"] == "test", "cell_id"]) == sorted(cells)
    assert without_timings(files.read_json(a / "metrics.json")) == without_timings(files.read_json(b / "metrics.json"))
    for name in ("predictions.csv", "fold_0/predictions.csv", "fold_1/confusion_matrix.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_every_ses_stage_saves_seed_and_resolved_config(ses_runs):
    root, configs = ses_runs
    truth = files.read_json(root / "data" / "ses_truth.json")
    assert truth["seed"] == SEED and truth["params"]["france"] == configs["world"]["ses"]["world"]
    ses = root / "results_a" / "ses"
    assert_saved_config(ses / "extract_config.yaml", configs["extract"])
    assert_saved_config(ses / "Paris" / "train_config.yaml", configs["train", "a"])
    assert_saved_config(root / "results_b" / "ses" / "Paris" / "train_config.yaml", configs["train", "b"])
    ckpt = torch.load(ses / "Paris" / "fold_0" / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["config"] == configs["train", "a"]
