"""Config loading: defaults as schema, typed overrides, errors that name the key and its nearest match."""
import re

import pytest
import yaml

from urbanlens.core.config import ConfigError, load_config, parse_override
from script_runner import python, run


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_file_then_overrides_are_merged_and_typed(tmp_path):
    p = write(tmp_path, {"cities": {"train": {"epochs": 3}}, "paths": {"data": "d"}})
    cfg = load_config(p, ["cities.train.lr=1e-4", "cities.model.backbone=resnet18", "cities.train.epochs=7"])
    assert cfg.cities.train.epochs == 7
    assert cfg.cities.train.lr == pytest.approx(1e-4) and isinstance(cfg.cities.train.lr, float)
    assert cfg.cities.model.backbone == "resnet18"
    assert cfg.paths.data == "d"
    assert cfg.cities.train.batch_size == 128  # untouched default survives


def test_int_given_for_float_is_accepted_as_float(tmp_path):
    cfg = load_config(None, ["cities.train.lr=1"])
    assert cfg.cities.train.lr == 1.0 and isinstance(cfg.cities.train.lr, float)


def test_unknown_key_names_nearest(tmp_path):
    p = write(tmp_path, {"cities": {"train": {"epoch": 3}}})
    with pytest.raises(ConfigError, match=r"unknown key 'cities.train.epoch'.*'cities.train.epochs'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'cities.model.backbone'"):
        load_config(None, ["cities.model.backbon=resnet18"])


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'cities.train.epochs' must be int"):
        load_config(None, ["cities.train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'cities.train.balanced' must be bool"):
        load_config(write(tmp_path, {"cities": {"train": {"balanced": "yes please"}}}))
    with pytest.raises(ConfigError, match="must be a section"):
        load_config(write(tmp_path, {"cities": {"train": 5}}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cities: {train: {epochs: 3}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("ses.cities=[Paris, Lyon]") == (["ses", "cities"], ["Paris", "Lyon"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("a.b")


@pytest.mark.parametrize("name", ["cities.yaml", "cities_demo.yaml", "ses.yaml", "ses_demo.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(f"configs/{name}")
    assert cfg.paths.data and cfg.paths.results


def test_cli_reports_one_line_and_exit_2():
    r = run(python("-m", "urbanlens.core.config", "seed", "--config", "configs/cities_demo.yaml", "--set", "trian.epochs=3"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and re.search(r"did you mean '(cities|ses).train.epochs'", r.stderr)


@pytest.mark.parametrize("override, words", [
    ("cities.train.epochs=-1", ">= 1"), ("cities.train.batch_size=0", ">= 1"), ("workers=-2", ">= 0"),
    ("ses.train.val_share=1.5", "in (0, 1)"), ("ses.max_nodata=2", "in [0, 1]"), ("cities.train.lr=0", "> 0"),
    ("ses.cams.rich_class=5", "a class from 0 to 4"), ("cities.world.n_sites=1", ">= 2"), ("cities.patch.jpeg_quality=0", "from 1 to 100"),
])
def test_values_out_of_range_name_the_key_and_the_range(tmp_path, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    key, value = override.split("=")
    assert f"'{key}' must be {words}" in str(e.value) and value in str(e.value)
    p = write(tmp_path, {key.split(".")[0]: {key.split(".")[1]: yaml.safe_load(value)}} if "." in key
              else {key: yaml.safe_load(value)})
    with pytest.raises(ConfigError, match=str(p)):  # from a file too, naming the file
        load_config(p)


def test_the_defaults_and_every_shipped_config_are_in_range():
    from pathlib import Path

    for path in [None, *sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))]:
        load_config(path)  # raises on any value out of its range


def test_configs_stamps_and_checkpoints_of_the_old_layout_read_as_today(tmp_path, capsys):
    """A config of the flat layout (sections model, train, france, ses_model, ...) loads equal to today's
    tree with one line naming the moves; an old --set key and `python -m urbanlens.core.config OLD.KEY`
    answer under the new name; an old run stamp compares equal to today's run; an old checkpoint's
    config reads in today's layout."""
    import json

    from urbanlens.core import runs, runtime

    old = write(tmp_path, {"seed": 3, "train": {"epochs": 2}, "model": {"backbone": "resnet18"},
                           "france": {"city_size_m": 1000}, "ses": {"cell_px": 32}, "ses_train": {"lr": 0.01},
                           "cams": {"panels": 1}}, "old.yaml")
    new = write(tmp_path, {"seed": 3, "cities": {"train": {"epochs": 2}, "model": {"backbone": "resnet18"}},
                           "ses": {"cell_px": 32, "world": {"city_size_m": 1000}, "train": {"lr": 0.01},
                                   "cams": {"panels": 1}}}, "new.yaml")
    capsys.readouterr()
    a, b = load_config(old).to_dict(), load_config(new).to_dict()
    notes = capsys.readouterr().err.strip().splitlines()
    assert {k: v for k, v in a.items() if k != "config_file"} == {k: v for k, v in b.items() if k != "config_file"}
    assert len(notes) == 1 and "train -> cities.train" in notes[0] and "france -> ses.world" in notes[0]
    assert load_config(None, ["ses_train.epochs=4"]).ses.train.epochs == 4
    assert "now 'ses.train.epochs'" in capsys.readouterr().err
    for key in ("train.epochs", "cities.train.epochs"):
        out = run(python("-m", "urbanlens.core.config", key, "--config", new), returncode=0).stdout
        assert out.strip() == "2"
    # a stamp written under the old names (as runs made before this layout wrote them)
    cfg = load_config(new)
    stamp = runs.make_stamp("train_classification.py", cfg, ("seed", "cities.model", "cities.train"))
    stamp["settings"] = {k.replace("cities.", "", 1): v for k, v in stamp["settings"].items()}
    assert any(k.startswith("train.") for k in stamp["settings"])
    (tmp_path / "old.stamp.json").write_text(json.dumps(stamp))
    assert runs.compare(tmp_path / "old.stamp.json", cfg, ("seed", "cities.model", "cities.train")) == []
    other = load_config(new, ["cities.train.lr=0.5"])
    assert runs.compare(tmp_path / "old.stamp.json", other, ("seed", "cities.model", "cities.train")) == ["cities.train.lr"]
    # a checkpoint whose config is in the old layout
    import torch

    torch.save({"model": {}, "config": {"model": {"backbone": "resnet18"}, "ses_model": {"input_size": 64}}},
               tmp_path / "old.pt")
    state = runtime.load_checkpoint(tmp_path / "old.pt")
    assert state["config"]["cities"]["model"]["backbone"] == "resnet18"
    assert state["config"]["ses"]["model"]["input_size"] == 64
