"""Config loading: defaults as schema, typed overrides, errors that name the key and its nearest match."""
import subprocess
import sys

import pytest
import yaml

from urbanlens.core.config import ConfigError, load_config, parse_override


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_file_then_overrides_are_merged_and_typed(tmp_path):
    p = write(tmp_path, {"train": {"epochs": 3}, "paths": {"data": "d"}})
    cfg = load_config(p, ["train.lr=1e-4", "model.backbone=resnet18", "train.epochs=7"])
    assert cfg.train.epochs == 7
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.backbone == "resnet18"
    assert cfg.paths.data == "d"
    assert cfg.train.batch_size == 128  # untouched default survives


def test_int_given_for_float_is_accepted_as_float(tmp_path):
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_unknown_key_names_nearest(tmp_path):
    p = write(tmp_path, {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*'train.epochs'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"'model.backbone'"):
        load_config(None, ["model.backbon=resnet18"])


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'train.balanced' must be bool"):
        load_config(write(tmp_path, {"train": {"balanced": "yes please"}}))
    with pytest.raises(ConfigError, match="must be a section"):
        load_config(write(tmp_path, {"train": 5}))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
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
    r = subprocess.run([sys.executable, "-m", "urbanlens.core.config", "seed", "--config", "configs/cities_demo.yaml",
                        "--set", "trian.epochs=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean 'train.epochs'" in r.stderr


@pytest.mark.parametrize("override, words", [
    ("train.epochs=-1", ">= 1"), ("train.batch_size=0", ">= 1"), ("workers=-2", ">= 0"),
    ("ses_train.val_share=1.5", "in (0, 1)"), ("ses.max_nodata=2", "in [0, 1]"), ("train.lr=0", "> 0"),
    ("cams.rich_class=5", "a class from 0 to 4"), ("world.n_sites=1", ">= 2"), ("patch.jpeg_quality=0", "from 1 to 100"),
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
