"""MODEL_CARD.md beside the trained models (numbers from the run's files), the config line every stage
prints first, and the optional TensorBoard events beside train_log.csv."""
import hashlib
import json
import re
from pathlib import Path

import pytest

from urbanlens.core import entry, model_card, tensorboard_log
from urbanlens.core.config import load_config
from script_runner import python, run, set_args

ROOT = Path(__file__).resolve().parents[2]


def _ses_metrics(gain_hi=0.02, chance=False, cv="spatial"):
    return {"city": "Lyon", "n_cells": 149, "cv": cv, "quintile_edges": [10.0, 20.0, 30.0, 40.0], "folds": 2,
            "best_fold": 1, "pooled": {"n": 149, "accuracy": 0.2751, "auc_poor_rich": 0.8489, "spearman": 0.4661},
            "intervals": {"level": 0.95, "unit": "blocks", "units": 10, "block_m": 1000.0, "resamples": 1000,
                          "bootstrap": {"auc_poor_rich": {"value": 0.8489, "lo": 0.7821, "hi": 0.9752}},
                          "over_folds": {"note": "no interval over 2 fold(s)"}},
            "permutation": {"permutations": 1000, "auc_poor_rich": {"p_value": 0.3117, "chance": chance}},
            "baseline": {"name": "simple", "pooled": {"auc_poor_rich": 0.9544},
                         "intervals": {"bootstrap": {"auc_poor_rich": {"lo": 0.9291, "hi": 0.9998}}}},
            "gain_over_baseline": {"auc_poor_rich": {"value": -0.1056, "lo": -0.1965, "hi": gain_hi}}}


def test_ses_card_states_the_files_numbers_and_limits():
    cfg = load_config(ROOT / "configs" / "ses_demo.yaml").to_dict()
    stamp = json.dumps({"stage": "efficientnet_training.py", "settings": {"seed": 0}, "inputs": {"cells.gpkg:Lyon": {}}})
    card = model_card.ses_card(cfg, "x.stamp.json", stamp, _ses_metrics(), synthetic=True)
    assert "auc_poor_rich: 0.849 (95% CI 0.782 to 0.975)" in card
    assert "1000 bootstrap resamples of 10 blocks of 1000.0 m" in card
    assert "baseline (simple), same folds: auc_poor_rich 0.954 (95% CI 0.929 to 1.000)" in card
    assert "cannot be told apart" in card and "p = 0.312" in card and "above chance" in card
    assert hashlib.sha256(stamp.encode()).hexdigest()[:12] in card and "`cells.gpkg:Lyon`" in card
    assert "synthetic world" in card and "cross-validation `spatial`" in card
    for head in ("## Trained on", "## Run stamp", "## Metrics", "## Intended use", "## Known limits"):
        assert head in card

    worse = model_card.ses_card(cfg, "x.stamp.json", None, _ses_metrics(gain_hi=-0.01, chance=True, cv="stratified"))
    limits = worse.split("## Known limits")[1]
    assert "baseline beats these models" in limits and "Not distinguishable from chance: auc_poor_rich" in limits
    assert "`stratified` puts neighbouring cells" in limits and "synthetic" not in limits
    assert "No run stamp (x.stamp.json)" in worse


def test_cities_card_before_and_after_testing():
    cfg = load_config(ROOT / "configs" / "cities_demo.yaml").to_dict()
    log = [{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.75}, {"epoch": 3, "val_acc": 0.7}]
    before = model_card.cities_card(cfg, "t.stamp.json", None, log)
    assert "Not tested yet" in before and "best validation accuracy 0.750 at epoch 2" in before
    metrics = {"accuracy": 0.9392, "macro_f1": 0.939, "n_patches": 576, "split": "test_b", "validation": "paper",
               "checkpoint_epoch": 4, "intervals": {"level": 0.95, "n_boot": 250, "resampled": "source images",
                                                    "units_total": 16, "accuracy": [0.9149, 0.9635],
                                                    "macro_f1": [0.91, 0.96], "note": "fewer than 5 source images"},
               "baseline": {"name": "simple", "accuracy": 0.9722, "intervals": {"accuracy": [0.9688, 0.9757]}},
               "gain_over_baseline": {"accuracy": {"value": -0.033, "lo": -0.0573, "hi": -0.0087}},
               "permutation": {"permutations": 1000, "accuracy": {"p_value": 0.001, "chance": False}}}
    after = model_card.cities_card(cfg, "t.stamp.json", None, log, metrics)
    assert "Not tested yet" not in after
    assert "accuracy: 0.939 (95% CI 0.915 to 0.964)" in after and "On 576 patches of `test_b`" in after
    assert "the baseline scores higher than the model" in after
    limits = after.split("## Known limits")[1]
    assert "baseline beats this model" in limits and "fewer than 5 source images" in limits
    assert "`cities.split.val: paper`" in limits


def test_the_stages_write_the_cities_card_from_their_files(cities_world):
    out = cities_world / "results" / "cities"
    card, metrics = (out / "MODEL_CARD.md").read_text(), json.loads((out / "metrics.json").read_text())
    lo, hi = metrics["intervals"]["accuracy"]
    assert f"accuracy: {metrics['accuracy']:.3f} (95% CI {lo:.3f} to {hi:.3f})" in card
    stamp = (out / "train_classification.stamp.json").read_text()
    assert hashlib.sha256(stamp.encode()).hexdigest()[:12] in card
    assert "synthetic world" in card and "Not tested yet" not in card


def test_config_line_names_config_seed_and_results():
    cfg = load_config(ROOT / "configs" / "ses_demo.yaml", ["seed=7", "paths.results=/tmp/r"])
    line = entry.config_line("x.py", cfg, overrides=2)
    assert line == f"x.py: config {ROOT / 'configs' / 'ses_demo.yaml'} + 2 --set overrides (seed 7, results /tmp/r)"
    assert "demo, no --config given" in entry.config_line("x.py", cfg, demo=True)
    assert "built-in defaults (urbanlens/core/defaults.yaml)" in entry.config_line("x.py", load_config())


def test_a_stage_prints_its_config_first(tmp_path):
    proc = run(python("preprocessing.py", *set_args([f"paths.data={tmp_path}", f"paths.results={tmp_path}"])), timeout=120)
    first = proc.stdout.splitlines()[0]
    assert re.fullmatch(rf"preprocessing\.py: built-in defaults \+ configs/cities_demo\.yaml demo, no --config "
                        rf"given \+ 2 --set overrides \(seed 0, results {re.escape(str(tmp_path))}\)", first), first


class FakeWriter:
    made = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeWriter.made.append(self)
        (Path(log_dir) / "events.out.tfevents.fake").write_text("x")

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_events_from_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "summary_writer_class", lambda: FakeWriter)
    (tmp_path / "events.out.tfevents.old").write_text("old run")
    log = [{"epoch": 1, "train_loss": 1.5, "val_acc": 0.4, "lr": 1e-3, "note": "x"},
           {"epoch": 2, "train_loss": 1.0, "val_acc": float("nan"), "lr": 1e-3}]
    assert tensorboard_log.write_events(tmp_path, log)
    w = FakeWriter.made[-1]
    assert w.closed and w.log_dir == str(tmp_path)
    assert w.scalars == [("train_loss", 1.5, 1), ("val_acc", 0.4, 1), ("lr", 1e-3, 1), ("train_loss", 1.0, 2),
                         ("lr", 1e-3, 2)]
    assert not (tmp_path / "events.out.tfevents.old").exists()  # a re-run shows each epoch once


def test_without_tensorboard_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorboard_log, "summary_writer_class", lambda: None)
    assert tensorboard_log.write_events(tmp_path, [{"epoch": 1, "train_loss": 1.0}]) is False
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(tensorboard_log.summary_writer_class() is None, reason="tensorboard not installed")
def test_real_tensorboard_writes_an_event_file(tmp_path):
    assert tensorboard_log.write_events(tmp_path, [{"epoch": 1, "train_loss": 1.0}])
    assert list(tmp_path.glob(tensorboard_log.EVENTS))


def test_run_sh_help_lists_every_subcommand():
    text = (ROOT / "run.sh").read_text()
    dispatch = text[text.rindex('case "$cmd" in'):]  # the last dispatch: the commands that run
    commands = set(re.findall(r"^\s+([a-z][a-z-]*)\)", dispatch, re.M))
    assert {"demo", "setup", "test", "cities", "ses", "bench", "gpu-check"} <= commands
    usage = run(["bash", "run.sh", "--help"], timeout=30).stdout
    listed = {line.split()[0] for line in usage.splitlines()[1:] if line.strip()}
    listed |= {w for line in usage.splitlines() for w in line.replace("|", " ").split()[:3]}
    assert commands <= listed, commands - listed
