"""YAML experiment configs with typed ``--set a.b=value`` overrides.

Every config is merged over ``urbanlens/core/defaults.yaml``; that file is the schema. A key that is not in
the defaults, or a value whose type differs from the default's, is an error naming the key and the
nearest valid one. Paths are resolved relative to the current directory.
"""
from __future__ import annotations

import argparse
import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

DEFAULTS = Path(__file__).with_name("defaults.yaml")


class Config(dict):
    """A nested dict with attribute access: ``cfg.train.lr`` == ``cfg['train']['lr']``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _wrap(d: dict) -> Config:
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict):
            out += _flat_keys(v, key + ".")
    return out


def _nearest(key: str, valid: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # mixed precision: train.amp, ses_train.amp, cams.amp
AMP_KEYS = ("train.amp", "ses_train.amp", "cams.amp")

# Values older configs (and the run stamps they wrote) hold for keys whose type has since changed:
# the amp keys were booleans (true: float16 on CUDA, off on CPU; false: off).
_LEGACY = {**{k: {True: "auto", False: "off"} for k in AMP_KEYS}}
ADDED = {"cams.amp": "off", "france.withhold": 0.0, "ses_train.checkpoint_every": 1}  # keys added since run stamps were first written: the value runs before them had


def current_value(key: str, value: Any) -> Any:
    """``value`` of the dotted ``key`` as it reads today (an old boolean amp -> 'auto' / 'off')."""
    legacy = _LEGACY.get(key)
    if legacy is not None and isinstance(value, bool):
        return legacy[value]
    return value


def _check_type(key: str, value: Any, default: Any, source: str) -> Any:
    """Coerce ``value`` to the type of ``default``; raise ConfigError when it cannot be."""
    value = current_value(key, value)
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, type(value)):
        return value
    raise ConfigError(
        f"{source}: '{key}' must be {type(default).__name__} (default {default!r}), got {value!r}"
    )


# Values outside these ranges make no sense (an epoch count of -1, a batch of 0, a share above 1): stop
# at once, naming the key, rather than run with them or fail deep inside a stage.
_AT_LEAST_1 = ("world.n_cities", "world.images_per_site", "world.image_size", "patch.size", "patch.stride",
               "model.input_size", "train.epochs", "train.batch_size", "test.batch_size", "test.bootstrap",
               "saliency.per_city",
               "saliency.batch_size", "ses.cell_size_m", "ses.cell_px", "ses_model.input_size", "ses_train.epochs",
               "ses_train.batch_size", "ses_train.early_stop_patience", "cams.batch_size",
               "ses_train.checkpoint_every", "predict.batch_size")


_AT_LEAST_0 = ("workers", "split.test_b_per_city", "train.max_steps_per_epoch", "ses.max_cells",
               "ses_train.plateau_patience", "ses_train.restarts", "ses_train.cache_mb", "cams.panels",
               "world.twin_distance", "world.site_jitter", "france.noise", "test.stability_top_k",
               "ses_train.buffer_m", "france.leakage")


_RULES = {
    **{k: (">= 1", lambda v: v >= 1) for k in _AT_LEAST_1},
    **{k: (">= 0", lambda v: v >= 0) for k in _AT_LEAST_0},
    **{k: ("> 0", lambda v: v > 0) for k in ("train.lr", "ses_train.lr", "world.feature_scale", "ses_train.block_m",
                                              "france.city_size_m", "france.tile_size_m", "france.resolution_m")},
    **{k: ("in [0, 1]", lambda v: 0 <= v <= 1) for k in ("france.nodata_fraction", "france.withhold", "ses.max_nodata", "patch.max_nodata",
                                                         "saliency.threshold", "ses_model.dropout",
                                                         "ses_model.stochastic_depth", "ses_model.bn_momentum")},
    **{k: ("in (0, 1)", lambda v: 0 < v < 1) for k in ("ses_train.val_share", "ses_train.plateau_factor")},
    **{k: ("from 1 to 100", lambda v: 1 <= v <= 100) for k in ("world.jpeg_quality", "patch.jpeg_quality")},
    "world.n_sites": (">= 2 (train sites, then one test/val site)", lambda v: v >= 2),
    "ses_train.folds": (">= 2", lambda v: v >= 2),
    "cams.clip_percentile": ("in (0, 100]", lambda v: 0 < v <= 100),
    **{k: ("a class from 0 to 4", lambda v: 0 <= v <= 4) for k in ("cams.poor_class", "cams.rich_class")},
    "ses.ortho_product": ("RVB or IRC", lambda v: v in ("RVB", "IRC")),
    "ses.imputed": ("keep or drop", lambda v: v in ("keep", "drop")),
    "image.scale": ("auto, percentile, fixed or none", lambda v: v in ("auto", "percentile", "fixed", "none")),
    **{k: ("one of " + ", ".join(AMP_CHOICES), lambda v: v in AMP_CHOICES) for k in AMP_KEYS},
    "ses_train.cv": ("one of stratified, spatial, city", lambda v: v in ("stratified", "spatial", "city")),
}


def _check_range(key: str, value: Any, source: str) -> Any:
    rule = _RULES.get(key)
    if rule is not None and value is not None and not rule[1](value):
        raise ConfigError(f"{source}: '{key}' must be {rule[0]}, got {value!r}")
    return value


def _merge(base: dict, new: dict, source: str, prefix: str = "") -> None:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in base:
            leaf = key
            while isinstance(v, dict) and len(v) == 1:  # name the whole key the user wrote
                (k2, v), = v.items()
                leaf = f"{leaf}.{k2}"
            raise ConfigError(f"{source}: unknown key '{leaf}'{_nearest(leaf, _flat_keys(_ROOT))}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a section (mapping), got {v!r}")
            _merge(base[k], v, source, key + ".")
        else:
            base[k] = _check_range(key, _check_type(key, v, base[k], source), source)


_ROOT: dict = {}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-4'`` -> (['train', 'lr'], 0.0001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, for example --set train.epochs=5")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key=value`` override, all type-checked."""
    global _ROOT
    with open(DEFAULTS) as f:
        cfg = yaml.safe_load(f)
    _ROOT = copy.deepcopy(cfg)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found; pass an existing YAML, e.g. configs/cities_demo.yaml")
        try:
            with open(path) as f:
                user = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _merge(cfg, user, str(path))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, f"--set {text}")
    cfg["config_file"] = str(path) if path is not None else None
    return _wrap(cfg)


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=default, help="experiment YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    return parser


def cli(description: str, default_config: str | None = None, extra=None) -> tuple[Config, argparse.Namespace]:
    """Parse ``--config``/``--set`` (plus ``extra(parser)`` arguments); a bad config raises ConfigError."""
    parser = add_config_args(argparse.ArgumentParser(description=description), default_config)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    return load_config(args.config, args.overrides), args


def data_dir(cfg: Config, *parts: str) -> Path:
    return Path(cfg.paths.data).joinpath(*parts)


def results_dir(cfg: Config, *parts: str) -> Path:
    return Path(cfg.paths.results).joinpath(*parts)


def _main() -> None:
    """``python -m urbanlens.core.config KEY [--config F] [--set k=v ...]`` prints one resolved value (for shell)."""
    parser = add_config_args(argparse.ArgumentParser(description=_main.__doc__))
    parser.add_argument("key")
    args = parser.parse_args()
    value: Any = load_config(args.config, args.overrides)
    for k in args.key.split("."):
        if not isinstance(value, dict) or k not in value:
            raise ConfigError(f"key '{args.key}'", "not in the config", "name a key of urbanlens/core/defaults.yaml")
        value = value[k]
    print(value)


if __name__ == "__main__":
    from .entry import run

    run(_main)
