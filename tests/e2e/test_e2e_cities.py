"""End to end on a tiny synthetic cities world: the stages run as a user runs them, and the science comes
out: the classifier is far above chance and the planted look-alike cities ("twins") are found similar.
Also: --resume gives the run an uninterrupted one gives, torchrun (DDP, gloo on CPU) trains a model that
test_classification.py evaluates, and missing ImageNet weights give one clear line and exit 2."""
import json
import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from script_runner import run_cities_stage

from urbanlens.cities import similarity

ROOT = Path(__file__).resolve().parents[2]
run_stage = run_cities_stage


@pytest.fixture(scope="module")
def world(cities_world):
    return cities_world


@pytest.fixture(scope="module")
def trained(cities_world):
    return cities_world, cities_world / "results" / "cities"


def test_outputs_are_complete_and_consistent(trained):
    root, out = trained
    truth = json.loads((root / "data" / "cities" / "truth.json").read_text())
    cities = sorted(c for pair in truth["twins"] for c in pair)
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = pd.read_csv(root / "data" / "cities" / "patches" / "manifest.csv")
    assert metrics["n_patches"] == (manifest["split"] == "test_b").sum()
    assert sorted(metrics["per_city"]) == cities
    assert {"accuracy", "top5_accuracy", "macro_f1"} <= set(metrics)
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    cm = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert list(cm.index) == cities and list(cm.columns) == cities
    assert cm.to_numpy().sum() == metrics["n_patches"]
    assert cm.to_numpy().trace() / metrics["n_patches"] == pytest.approx(metrics["accuracy"])
    for c in cities:  # recall of a city = its diagonal share of its row
        assert metrics["per_city"][c]["recall"] == pytest.approx(cm.loc[c, c] / cm.loc[c].sum())
    table = pd.read_csv(out / "similarity.csv")
    for method in similarity.METHODS:
        sim = similarity.read_similarity_table(table, method)
        assert list(sim.index) == cities and (sim.to_numpy() == sim.to_numpy().T).all()
    pairs = pd.read_csv(out / "similar_pairs.csv")
    assert len(pairs) == 2 * math.comb(len(cities), 2)
    log = pd.read_csv(out / "train_log.csv")
    assert log["epoch"].tolist() == list(range(1, 7))
    for name in ("confusion_matrix.png", "dendrogram_confusion.png", "dendrogram_embedding.png",
                 "train_config.yaml", "test_config.yaml", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name


def test_accuracy_is_well_above_chance(trained):
    _, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    chance = 1 / len(metrics["per_city"])
    assert metrics["accuracy"] >= 0.6 > 4 * chance, metrics["accuracy"]
    perm = metrics["permutation"]
    assert perm["accuracy"]["p_value"] <= 2 / perm["permutations"] and not perm["accuracy"]["chance"]


def test_metrics_carry_baseline_gain_units_and_validation(trained):
    root, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    manifest = pd.read_csv(root / "data" / "cities" / "patches" / "manifest.csv")
    test_b = manifest[manifest["split"] == "test_b"]
    iv = metrics["intervals"]
    assert iv["unit"] == "source images" and iv["units_total"] == test_b["source"].nunique()
    assert iv["units_per_city"] == test_b.groupby("iata")["source"].nunique().to_dict()
    assert "fewer than 5 source images" in iv["note"]    # the small world has one test image a city
    assert metrics["validation"] == "paper"
    base = metrics["baseline"]
    assert base["train_patches"] == (manifest["split"] == "train").sum() and 0 <= base["accuracy"] <= 1
    assert set(base["intervals"]) >= {"accuracy", "macro_f1", "unit", "units_total"}
    gain = metrics["gain_over_baseline"]
    for k in ("accuracy", "macro_f1"):
        assert gain[k]["value"] == pytest.approx(metrics[k] - base[k])
        assert gain[k]["lo"] <= gain[k]["hi"]
    assert "p_value" in metrics["permutation"]["baseline_accuracy"]
    preds = {n: pd.read_csv(out / n) for n in ("predictions.csv", "baseline_predictions.csv")}
    assert preds["predictions.csv"]["path"].tolist() == preds["baseline_predictions.csv"]["path"].tolist() \
        == test_b["path"].tolist()
    assert (preds["baseline_predictions.csv"].eval("true == predicted")).mean() == pytest.approx(base["accuracy"])


def test_site_validation_trains_tests_and_is_recorded(world):
    """cities.split.val=site: the validation patches come from a train site; the test stage records the scheme
    and refuses a config that says another one."""
    short = ["cities.split.val=site", "cities.train.epochs=1", "cities.train.max_steps_per_epoch=2", "cities.test.baseline=false",
             "cities.test.bootstrap=20", "cities.test.permutations=20"]
    proc = run_stage(["train_classification.py"], world, short, results="siteval")
    manifest = pd.read_csv(world / "data" / "cities" / "patches" / "manifest.csv")
    train = manifest[manifest["split"] == "train"]
    held = train.groupby("iata")["site"].max()            # each city's last train site validates
    n_val = int((train["site"] == train["iata"].map(held)).sum())
    assert "cities.split.val=site" in proc.stdout and train.groupby("iata")["site"].nunique().min() == 2
    assert f"[train] {len(train) - n_val} train / {n_val} val patches" in proc.stdout
    run_stage(["test_classification.py"], world, short, results="siteval")
    out = world / "siteval" / "cities"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation"] == "site" and "baseline" not in metrics
    assert not (out / "baseline_predictions.csv").exists()
    refused = run_stage(["test_classification.py"], world, [*short, "cities.split.val=paper"], results="siteval", check=False)
    assert refused.returncode == 2 and "trained with cities.split.val=site" in refused.stderr


def test_most_planted_twins_are_found(trained):
    root, out = trained
    twins = {tuple(sorted(p)) for p in json.loads((root / "data" / "cities" / "truth.json").read_text())["twins"]}
    pairs = pd.read_csv(out / "similar_pairs.csv")
    found = {m: sum((a, b) in twins for a, b in g.head(len(twins))[["city_a", "city_b"]].to_numpy())
             for m, g in pairs.groupby("method", sort=False)}
    assert max(found.values()) > len(twins) / 2, found


def test_saliency_panels_follow_the_sample(trained, tmp_path):
    """One figure per sampled patch, listed in index.csv; a smaller sample leaves no panel of the
    larger one behind. (On a copy of the shared world's results, which other test files read as the
    test stage left them.)"""
    root, shared = trained
    out = tmp_path / "results" / "cities"
    shutil.copytree(shared, out)
    for per_city in (2, 1):
        proc = run_stage(["saliency.py"], root, [f"cities.saliency.per_city={per_city}", "cities.saliency.method=gradcam"],
                         results=tmp_path / "results")
        index = pd.read_csv(out / "saliency" / "index.csv")
        cities = json.loads((out / "metrics.json").read_text())["per_city"]
        assert sorted(index["iata"].unique()) == sorted(cities) and len(index) == per_city * len(cities)
        assert sorted(p.relative_to(out / "saliency").as_posix() for p in (out / "saliency").glob("*/*.png")) \
            == sorted(index["figure"])
    assert "panels of an earlier sample removed" in proc.stdout


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_matches_an_uninterrupted_run(world):
    # a constant learning rate: with a schedule, changing cities.train.epochs changes the first epoch too
    short = ["cities.train.max_steps_per_epoch=3", "cities.train.schedule=constant"]
    run_stage(["train_classification.py"], world, [*short, "cities.train.epochs=2"], results="straight")
    run_stage(["train_classification.py"], world, [*short, "cities.train.epochs=1"], results="resumed")
    proc = run_stage(["train_classification.py", "--resume"], world, [*short, "cities.train.epochs=2"], results="resumed")
    assert "resuming" in proc.stdout
    ck = world / "resumed" / "cities" / "checkpoints" / "last.pt"
    assert torch.load(ck, map_location="cpu", weights_only=False)["epoch"] == 2
    assert pd.read_csv(world / "resumed" / "cities" / "train_log.csv")["epoch"].tolist() == [1, 2]
    straight = _weights(world / "straight" / "cities" / "checkpoints" / "last.pt")
    for k, v in _weights(ck).items():
        assert torch.allclose(v.float(), straight[k].float(), atol=1e-5), k


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_ddp_trains_and_the_checkpoint_evaluates(world):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    ddp = ["cities.train.epochs=1", "cities.train.max_steps_per_epoch=2", "device=cpu", "workers=0"]
    proc = run_stage(["train_classification.py"], world, ddp, results="ddp", launcher=launcher, check=False)
    if proc.returncode != 0 and "train_classification" not in proc.stderr + proc.stdout:
        pytest.skip(f"torchrun could not start here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2" in proc.stdout  # two processes
    run_stage(["test_classification.py"], world, ddp, results="ddp")
    metrics = json.loads((world / "ddp" / "cities" / "metrics.json").read_text())
    assert metrics["checkpoint_epoch"] == 1 and metrics["n_patches"] > 0


def test_missing_imagenet_weights_is_one_clear_line(world):
    proc = run_stage(["train_classification.py"], world,
                     ["cities.model.pretrained=true", f"cities.model.weights_path={world / 'nowhere.pth'}"],
                     results="noweights", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ImageNet weights") and "cities.model.pretrained=false" in err[0]
