"""YAML experiment configs with typed ``--set a.b=value`` overrides.

Every config is merged over ``urbanlens/core/defaults.yaml``. A key that is not in the defaults is an
error naming the key and the nearest valid one; a value its schema entry (``schema.py``: type, null,
range, choices) does not allow is an error naming the key and what it must be. A key written twice in
one YAML mapping is an error too. Paths are resolved relative to the current directory.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import schema
from .errors import ConfigError
from .schema import AMP_KEYS

DEFAULTS = Path(__file__).with_name("defaults.yaml")


class Config(dict):
    """A nested dict with attribute access: ``cfg.cities.train.lr`` == ``cfg['train']['lr']``."""

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


# Values older configs (and the run stamps they wrote) hold for keys whose type has since changed:
# the amp keys were booleans (true: float16 on CUDA, off on CPU; false: off).
_LEGACY = {**{k: {True: "auto", False: "off"} for k in AMP_KEYS}}
# keys added since run stamps were first written: the value runs before them had (one a line)
ADDED = {
    "ses.cams.amp": "off",
    "store": False,
    "ses.world.withhold": 0.0,
    "ses.train.checkpoint_every": 1,
    "ses.baseline": False,
    "ses.train.bootstrap": "cells",
    "cities.split.val": "paper",
    "cities.test.baseline": False,
    "cities.test.baseline_max_train": 20000,
    "cities.test.permutations": 1000,
    "ses.cams.sanity_cells": 0,
    "cities.saliency.sanity_patches": 0,
    "ses.ua_boundary": "",
    "ses.world.withhold_mode": "random",  # withheld cells were drawn one by one
    "ses.world.withhold_block_m": 1000.0,
    "ses.world.structure": 0.0,
    "ses.world.house_share": 0.0,  # the plan as drawn
    "cities.train.freeze": "none",  # every layer fine-tuned
    "ses.train.freeze": "none",
}


# ---------------------------------------------------------------- layout versions
# Layout 1 (configs, run stamps and checkpoints before the one-tree layout): the city pipeline's
# sections at the top (world, image, ..., saliency), the SES ones prefixed or loose (france, ses_model,
# ses_train, cams, predict). Layout 2 (today): shared keys at the top, then cities: and ses: trees.
LAYOUT = 2
MOVED = {"world": "cities.world", "image": "cities.image", "patch": "cities.patch", "split": "cities.split",
         "model": "cities.model", "train": "cities.train", "test": "cities.test", "newplace": "cities.newplace",
         "saliency": "cities.saliency", "france": "ses.world", "ses_model": "ses.model", "ses_train": "ses.train",
         "cams": "ses.cams", "predict": "ses.predict"}  # layout 1 section -> layout 2 path


def upgrade_key(key: str) -> str:
    """A dotted key of the old layout under today's name (``train.lr`` -> ``cities.train.lr``); a stamp's
    ``<stage>:<key>`` keeps its prefix; today's keys are returned as they are."""
    prefix, sep, dotted = key.rpartition(":")
    section, dot, rest = dotted.partition(".")
    if section in MOVED:
        dotted = MOVED[section] + dot + rest
    return f"{prefix}{sep}{dotted}"


def upgrade(tree: dict, source: str | None = None) -> dict:
    """A config tree (a YAML file's, or the config a checkpoint was trained with) in today's layout: each
    section of the old layout moved to its place. With ``source``, one line on stderr naming each old
    section read and its new place (the file keeps working; its sections can be renamed at leisure)."""
    out = {k: (copy.deepcopy(v) if isinstance(v, dict) else v) for k, v in tree.items() if k not in MOVED}
    moves = [(old, new) for old, new in MOVED.items() if old in tree]
    if moves and source is not None:
        print(f"config: {source} is in the old layout, read as today's: " + ", ".join(f"{old} -> {new}" for old, new
              in moves) + " (rename these sections to silence this line)", file=sys.stderr)
    for old, new in moves:
        parent, _, leaf = new.partition(".")
        node = out.setdefault(parent, {})
        if not isinstance(node, dict):  # e.g. an old 'ses' that is not a mapping: left for the schema to name
            continue
        node[leaf] = tree[old]
    return out


def current_value(key: str, value: Any) -> Any:
    """``value`` of the dotted ``key`` as it reads today (an old boolean amp -> 'auto' / 'off')."""
    legacy = _LEGACY.get(key)
    if legacy is not None and isinstance(value, bool):
        return legacy[value]
    return value


def _default(key: str) -> Any:
    value: Any = _ROOT
    for k in key.split("."):
        value = value[k]
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
            base[k] = schema.check(key, current_value(key, v), _default(key), source)


_ROOT: dict = {}


class _Loader(yaml.SafeLoader):
    """yaml's safe loader, except that a key written twice in one mapping is an error (yaml keeps the
    last silently, dropping the settings of the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' written twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _first_line(e: yaml.YAMLError) -> str:
    """The problem yaml reports, with its line number (a ``--set`` value is line 1)."""
    text = (getattr(e, "problem", None) or str(e).splitlines()[0] if str(e) else "") or type(e).__name__
    mark = getattr(e, "problem_mark", None)
    return f"{text}, line {mark.line + 1}" if mark is not None else text


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'cities.train.lr=1e-4'`` -> (['cities', 'train', 'lr'], 0.0001); the value is parsed as YAML.
    A key of the old layout is read under today's name (``train.lr`` -> ``cities.train.lr``), with one
    line on stderr saying so."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected key=value, for example --set cities.train.epochs=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if upgrade_key(key) != key:
        print(f"config: --set {key}: now '{upgrade_key(key)}' (read as such)", file=sys.stderr)
        key = upgrade_key(key)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({_first_line(e)}); write a plain value, a "
                          "complete list such as [Paris, Lyon], or quote text holding ':', '[' or '{'") from None
    return key.split("."), value


def _read_yaml(path: Path) -> dict:
    """The mapping a user's config file holds; ConfigError naming the file and the fix otherwise."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file; pass a YAML file, e.g. configs/cities_demo.yaml")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing YAML, e.g. configs/cities_demo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} cannot be decoded); save the config as UTF-8 "
                          "YAML") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); check its permissions "
                          "(chmod u+r) or pass another config") from None
    try:
        user = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        fix = "write each key once (YAML keeps only the last)" if "written twice" in str(e) else "fix the syntax"
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)}); {fix}") from None
    if user is None:
        raise ConfigError(f"{path}: the config file is empty (or only comments); write the sections it "
                          "overrides, e.g. copy configs/cities_demo.yaml, or leave out --config")
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return upgrade(user, str(path))


def _check_defaults(cfg: dict, prefix: str = "") -> None:
    """Every leaf of defaults.yaml has a schema entry and satisfies it."""
    for k, v in cfg.items():
        if isinstance(v, dict):
            _check_defaults(v, f"{prefix}{k}.")
        else:
            schema.check(f"{prefix}{k}", v, v, str(DEFAULTS))


@functools.lru_cache(maxsize=2)
def _defaults(path: Path, mtime_ns: int) -> dict:
    """defaults.yaml, parsed and checked once per version of the file (callers copy it)."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    _check_defaults(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key=value`` override, all checked against
    the schema (urbanlens/core/schema.py)."""
    global _ROOT
    _ROOT = _defaults(DEFAULTS, DEFAULTS.stat().st_mtime_ns)
    cfg = copy.deepcopy(_ROOT)
    if path is not None:
        path = Path(path)
        _merge(cfg, _read_yaml(path), str(path))
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, f"--set {text}")
    cfg["config_file"] = str(path) if path is not None else None
    schema.check_pairs(cfg, f"config {path}" if path is not None else "config")
    return _wrap(cfg)


def add_config_args(parser: argparse.ArgumentParser, default: str | None = None) -> argparse.ArgumentParser:
    parser.add_argument("--config", default=default, help="experiment YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set cities.train.epochs=5 (repeatable)")
    return parser


def cli(description: str, default_config: str | None = None, extra=None) -> tuple[Config, argparse.Namespace]:
    """Parse ``--config``/``--set`` (plus ``extra(parser)`` arguments); a bad config raises ConfigError."""
    default = _Default(default_config) if default_config is not None else None
    parser = add_config_args(argparse.ArgumentParser(description=description), default)
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    from .entry import say_config

    say_config(cfg, demo=default is not None and args.config is default, overrides=len(args.overrides))
    return cfg, args


class _Default(str):
    """A script's default config path: argparse hands this very object back when no --config was given."""


def data_dir(cfg: Config, *parts: str) -> Path:
    return Path(cfg.paths.data).joinpath(*parts)


def results_dir(cfg: Config, *parts: str) -> Path:
    return Path(cfg.paths.results).joinpath(*parts)


def value(cfg: Config, key: str) -> Any:
    """The value of the dotted ``key`` in ``cfg``; ConfigError naming it when the config has no such key."""
    found: Any = cfg
    for k in key.split("."):
        if not isinstance(found, dict) or k not in found:
            raise ConfigError(f"key '{key}'", "not in the config", "name a key of urbanlens/core/defaults.yaml")
        found = found[k]
    return found


def _main() -> None:
    """``python -m urbanlens.core.config KEY [--config F] [--set k=v ...]`` prints one resolved value (for shell)."""
    parser = add_config_args(argparse.ArgumentParser(description=_main.__doc__))
    parser.add_argument("key")
    args = parser.parse_args()
    print(value(load_config(args.config, args.overrides), upgrade_key(args.key)))


if __name__ == "__main__":
    from .entry import run

    run(_main)
