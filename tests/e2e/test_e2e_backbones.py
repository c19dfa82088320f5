"""Both pipelines end to end on timm backbones: tiny random-init models of timm's own test families, so
nothing is downloaded. A ConvNeXt and a ViT learn the small cities world (above chance, against
permuted labels), and saliency runs on them, while Relevance-CAM is refused at the stage's start. The
SES stages with a timm ConvNeXt go through training, maps and the income map. Each checkpoint carries
its model's preprocessing, and a later stage refuses a model of another backbone.

Stages run in this process, as their command lines would (their one-line exits are tested elsewhere)."""
import json

import geopandas as gpd
import pandas as pd
import pytest
import torch

from script_runner import CONF, run_in_process

from urbanlens.core import backbones, preprocess, runtime
from urbanlens.core.errors import ConfigError

CITIES = CONF / "cities_small.yaml"  # the small world of tests/conftest.py's cities_world
TIMM = ["workers=0", "device=cpu", "cities.model.pretrained=false", "cities.model.input_size=64", "cities.train.epochs=3",
        "cities.test.baseline=false", "cities.test.permutations=200", "cities.saliency.method=gradcam",
        "cities.saliency.per_city=1", "cities.saliency.sanity_patches=0"]


@pytest.fixture(scope="module")
def cities_runs(cities_world, tmp_path_factory):
    """The small world's patches, a classifier trained, tested and explained per backbone."""
    runs = {}
    for spec in ("timm:test_convnext", "timm:test_vit"):
        results = tmp_path_factory.mktemp(spec.replace(":", "_"))
        sets = [f"paths.data={cities_world / 'data'}", f"paths.results={results}", *TIMM, f"cities.model.backbone={spec}"]
        for module in ("train_classification", "test_classification", "saliency"):
            run_in_process(module, CITIES, sets)
        runs[spec] = (results / "cities", sets)
    # the ViT on frozen features (the ConvNeXt's frozen run: tests/e2e/test_frozen_cities.py)
    results = tmp_path_factory.mktemp("frozen_vit")
    sets = [f"paths.data={cities_world / 'data'}", f"paths.results={results}", *TIMM,
            "cities.model.backbone=timm:test_vit", "cities.train.freeze=backbone", "cities.train.lr=0.01"]
    for module in ("train_classification", "test_classification"):
        run_in_process(module, CITIES, sets)
    runs["frozen timm:test_vit"] = (results / "cities", sets)
    return runs


@pytest.mark.parametrize("spec", ["timm:test_convnext", "timm:test_vit"])
def test_timm_classifiers_learn_the_cities_and_their_maps_run(cities_runs, spec):
    out, _ = cities_runs[spec]
    metrics = json.loads((out / "metrics.json").read_text())
    chance = 1 / len(metrics["per_city"])
    assert metrics["accuracy"] >= 2 * chance, metrics["accuracy"]
    assert metrics["permutation"]["accuracy"]["p_value"] <= 0.05
    index = pd.read_csv(out / "saliency" / "index.csv")
    assert len(index) == len(metrics["per_city"]) and all((out / "saliency" / f).is_file() for f in index["figure"])


@pytest.mark.parametrize("spec", ["timm:test_convnext", "timm:test_vit"])
def test_the_checkpoint_carries_the_backbones_preprocessing(cities_runs, spec):
    out, _ = cities_runs[spec]
    state = runtime.load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["config"]["cities"]["model"]["backbone"] == spec
    assert state["preprocessing"] == preprocess.of(backbones.build_backbone(spec, 2)).to_dict()


def test_a_frozen_vit_keeps_its_initial_backbone_and_its_head_learns(cities_runs):
    out, _ = cities_runs["frozen timm:test_vit"]
    best = runtime.load_checkpoint(out / "checkpoints" / "best.pt")
    runtime.seed_everything(0)  # as the stage seeds before building its model
    initial = backbones.build_backbone("timm:test_vit", len(best["classes"])).state_dict()
    changed = {k for k, v in initial.items() if not torch.equal(v, best["model"][k])}
    assert changed == {"head.weight", "head.bias"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > 1 / len(metrics["per_city"])  # a linear read of random ViT features


def test_relevance_cam_is_refused_at_the_start_naming_what_works(cities_runs):
    out, sets = cities_runs["timm:test_vit"]
    before = sorted(p.name for p in (out / "saliency").iterdir())
    with pytest.raises(ConfigError, match="cities.saliency.method.*gradcam"):
        run_in_process("saliency", CITIES, [*sets, "cities.saliency.method=relevancecam"])
    assert sorted(p.name for p in (out / "saliency").iterdir()) == before


SES_CONFIG = CONF / "ses_timm.yaml"
SES: list[str] = []  # the file holds the world and settings


@pytest.fixture(scope="module")
def ses_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ses_timm")
    sets = [f"paths.data={root / 'data'}", f"paths.results={root / 'results'}", *SES]
    for module in ("urbanlens.ses.world", "generate_fr_ua_aerial_data", "efficientnet_training",
                   "gradcaming_urban_areas"):
        run_in_process(module, SES_CONFIG, sets)
    run_in_process("predict_income", SES_CONFIG, sets, "--city", "Paris")
    return root / "results" / "ses" / "Paris", sets


def test_ses_stages_run_through_maps_and_the_income_map_on_a_timm_backbone(ses_run):
    city, _ = ses_run
    metrics = json.loads((city / "metrics.json").read_text())
    assert metrics["folds"] == 2 and "auc_poor_rich" in json.dumps(metrics)
    for k in range(2):
        state = runtime.load_checkpoint(city / f"fold_{k}" / "best.pt")
        assert state["config"]["ses"]["model"]["backbone"] == "timm:test_convnext" and "preprocessing" in state
    assert list(city.glob("**/*.tif")), "no CAM GeoTIFFs"
    cells = gpd.read_file(city / "predicted" / "cells.gpkg", layer="cells")
    scored = cells["expected_class"].dropna()
    assert len(scored) >= len(cells) // 2 and scored.between(0, 4).all()


def test_a_model_of_another_backbone_is_never_taken_for_this_ones(ses_run):
    city, sets = ses_run
    with pytest.raises(ConfigError, match="ses.model.backbone=timm:test_convnext"):
        run_in_process("predict_income", SES_CONFIG, [*sets, "ses.model.backbone=resnet18"], "--city", "Paris")
    with pytest.raises(ConfigError, match="ses.model.backbone=timm:test_convnext"):
        run_in_process("gradcaming_urban_areas", SES_CONFIG, [*sets, "ses.model.backbone=resnet18"])
