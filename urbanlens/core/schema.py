"""The schema of every config key: its type, whether it may be null, its range or its allowed choices.

``SCHEMA`` holds one ``Key`` per leaf of ``defaults.yaml``; ``check`` applies it to one value when a
config is loaded, so a wrong value stops the run at once with one line naming the key, instead of
running with it or failing deep inside a stage. The choice lists below are the ones the consuming code
uses (it imports them from here), so the config and the code cannot disagree about them.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from .backbone_table import BACKBONES, SPEC_FORMS  # the families' names and timm:/torchgeo: forms: the backbone keys
from .errors import ConfigError

# ------------------------------------------------------------------------------------------- choices
AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # mixed precision: cities.train.amp, ses.train.amp, ses.cams.amp
AMP_KEYS = ("cities.train.amp", "ses.train.amp", "ses.cams.amp")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # cuda:N: the GPU of index N, e.g. cuda:1
FREEZE_CHOICES = ("none", "backbone")  # cities.train.freeze, ses.train.freeze: fine-tune, or a head on frozen embeddings
SCHEDULES = ("constant", "cosine", "warmup_cosine")  # cities.train.schedule (cities/training.py)
CAM_METHODS = ("gradcam", "gradcampp", "relevancecam")  # cities.saliency.method (core/cam.py)
SPLITS = ("train", "val", "test", "test_b")  # the split folders preprocessing.py writes
SCALES = ("auto", "percentile", "fixed", "none")  # cities.image.scale (cities/rasters.py)
ORTHO_PRODUCTS = ("RVB", "IRC")  # ses.ortho_product: IGN BD ORTHO natural or infrared colour
IMPUTED_POLICIES = ("keep", "drop")  # ses.imputed: cells INSEE imputed
CV_SCHEMES = ("stratified", "spatial", "city")  # ses.train.cv (ses/spatial_folds.py)
BOOTSTRAP_UNITS = ("blocks", "cells")  # ses.train.bootstrap: what the held-out intervals resample
VAL_SCHEMES = ("paper", "site")  # cities.split.val (cities/validation.py)
WITHHOLD_MODES = ("random", "blocks")  # ses.world.withhold_mode (ses/world_plan.py withheld_cells)

SEED_MAX = 2**32 - 1  # numpy's seeds


@dataclass(frozen=True)
class Key:
    """What one config value may be. ``type`` is that of its non-null values; a range is
    ``lo <= v <= hi`` (strict where ``lo_open``/``hi_open``); ``words`` says it where the bounds do not;
    ``choices`` are the allowed strings (``cuda:N`` stands for any ``cuda:<index>``); ``items`` is the
    kind of list: ``names`` (non-empty, distinct strings) or ``bands`` (1 or 3 band numbers from 1)."""

    type: type
    nullable: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    words: str = ""
    choices: tuple[str, ...] = ()
    items: str = ""
    empty: bool = False  # strings: may be ''

    @property
    def range_words(self) -> str:
        if self.words:
            return self.words
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}" if self.hi is not None else ""

    def in_range(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


FLAG = Key(bool)
TEXT = Key(str)
COUNT = Key(int, lo=1)  # at least 1
NUMBER = Key(int, lo=0)  # at least 0
POSITIVE = Key(float, lo=0, lo_open=True)
AMOUNT = Key(float, lo=0)  # at least 0
SHARE = Key(float, lo=0, hi=1)
OPEN_SHARE = Key(float, lo=0, hi=1, lo_open=True, hi_open=True)
PROBABILITY = Key(float, lo=0, hi=1, hi_open=True)  # a drop probability: 1 would drop everything
QUALITY = Key(int, lo=1, hi=100, words="from 1 to 100")
CLASS = Key(int, lo=0, hi=4, words="a class from 0 to 4")
NAMES = Key(list, items="names")
WEIGHTS = Key(str, nullable=True, empty=True)  # '' or null: torch's cache


def choice(*names: str) -> Key:
    return Key(str, choices=names)


SCHEMA: dict[str, Key] = {
    "seed": Key(int, lo=0, hi=SEED_MAX, words="from 0 to 2**32 - 1"),
    "device": choice(*DEVICES), "workers": NUMBER, "strict": FLAG, "overwrite": FLAG, "store": FLAG,
    "paths.data": TEXT, "paths.results": TEXT,
    # city identification
    "cities.world.n_cities": COUNT, "cities.world.n_sites": Key(int, lo=2, words=">= 2 (train sites, then one test/val site)"),
    "cities.world.images_per_site": COUNT, "cities.world.image_size": COUNT, "cities.world.twin_distance": AMOUNT,
    "cities.world.site_jitter": AMOUNT, "cities.world.feature_scale": POSITIVE, "cities.world.jpeg_quality": QUALITY,
    "cities.image.bands": Key(list, nullable=True, items="bands"), "cities.image.scale": choice(*SCALES),
    "cities.image.scale_min": Key(float, nullable=True), "cities.image.scale_max": Key(float, nullable=True),
    "cities.patch.size": COUNT, "cities.patch.stride": COUNT, "cities.patch.jpeg_quality": QUALITY, "cities.patch.max_nodata": SHARE,
    "cities.patch.ground_m": Key(float, nullable=True, lo=0, lo_open=True),
    "cities.split.test_b_per_city": NUMBER, "cities.split.val": choice(*VAL_SCHEMES),
    "cities.model.backbone": choice(*BACKBONES, *SPEC_FORMS), "cities.model.pretrained": FLAG, "cities.model.weights_path": WEIGHTS,
    "cities.model.input_size": COUNT,
    "cities.train.epochs": COUNT, "cities.train.batch_size": COUNT, "cities.train.lr": POSITIVE, "cities.train.schedule": choice(*SCHEDULES),
    "cities.train.balanced": FLAG, "cities.train.amp": choice(*AMP_CHOICES), "cities.train.channels_last": FLAG,
    "cities.train.max_steps_per_epoch": NUMBER, "cities.train.freeze": choice(*FREEZE_CHOICES),
    "cities.test.split": choice(*SPLITS), "cities.test.batch_size": COUNT, "cities.test.bootstrap": COUNT, "cities.test.stability_top_k": NUMBER,
    "cities.test.baseline": FLAG, "cities.test.baseline_max_train": COUNT, "cities.test.permutations": COUNT,
    "cities.newplace.held_out": COUNT, "cities.newplace.bootstrap": COUNT, "cities.newplace.panel_patches": COUNT,
    "cities.saliency.method": choice(*CAM_METHODS), "cities.saliency.per_city": COUNT, "cities.saliency.threshold": SHARE,
    "cities.saliency.split": choice(*SPLITS), "cities.saliency.batch_size": COUNT, "cities.saliency.sanity_patches": NUMBER,
    # socioeconomic status
    "ses.world.cities": NAMES, "ses.world.city_size_m": COUNT, "ses.world.tile_size_m": COUNT,
    "ses.world.resolution_m": POSITIVE, "ses.world.nodata_fraction": SHARE, "ses.world.noise": AMOUNT, "ses.world.leakage": AMOUNT, "ses.world.structure": SHARE, "ses.world.house_share": SHARE, "ses.world.withhold": SHARE,
    "ses.world.withhold_mode": choice(*WITHHOLD_MODES), "ses.world.withhold_block_m": POSITIVE,
    "ses.cities": NAMES, "ses.census_file": TEXT, "ses.imputed": choice(*IMPUTED_POLICIES), "ses.ua_dir": TEXT,
    "ses.aerial_dir": TEXT, "ses.ortho_product": choice(*ORTHO_PRODUCTS), "ses.cell_size_m": COUNT,
    "ses.cell_px": COUNT, "ses.max_nodata": SHARE, "ses.max_cells": NUMBER, "ses.baseline": FLAG,
    "ses.ua_boundary": Key(str, empty=True),
    "ses.model.backbone": choice(*BACKBONES, *SPEC_FORMS), "ses.model.pretrained": FLAG, "ses.model.weights_path": WEIGHTS,
    "ses.model.input_size": COUNT, "ses.model.dropout": PROBABILITY, "ses.model.stochastic_depth": PROBABILITY,
    "ses.model.bn_momentum": SHARE,
    "ses.train.cv": choice(*CV_SCHEMES), "ses.train.block_m": POSITIVE, "ses.train.buffer_m": AMOUNT, "ses.train.bootstrap": choice(*BOOTSTRAP_UNITS),
    "ses.train.folds": Key(int, lo=2), "ses.train.val_share": OPEN_SHARE, "ses.train.epochs": COUNT,
    "ses.train.batch_size": COUNT, "ses.train.lr": POSITIVE, "ses.train.plateau_factor": OPEN_SHARE,
    "ses.train.plateau_patience": NUMBER, "ses.train.early_stop_patience": COUNT, "ses.train.restarts": NUMBER, "ses.train.checkpoint_every": COUNT,
    "ses.train.amp": choice(*AMP_CHOICES), "ses.train.cache_mb": NUMBER, "ses.train.precise_bn": FLAG,
    "ses.train.rot90": FLAG, "ses.train.freeze": choice(*FREEZE_CHOICES),
    "ses.predict.batch_size": COUNT,
    "ses.cams.batch_size": COUNT, "ses.cams.clip_percentile": Key(float, lo=0, hi=100, lo_open=True), "ses.cams.poor_class": CLASS,
    "ses.cams.rich_class": CLASS, "ses.cams.panels": NUMBER, "ses.cams.amp": choice(*AMP_CHOICES), "ses.cams.sanity_cells": NUMBER,
}


_FORMS = {"N": r"\d+", "NAME": r"[\w.\-]+", "Enum.MEMBER": r"\w+\.\w+"}  # x:N, timm:NAME, torchgeo:Enum.MEMBER


def matches(choices: tuple[str, ...], value: Any) -> bool:
    """``value`` is one of ``choices`` (``x:N`` matches ``x:0``, ``x:1``, ...; ``timm:NAME`` any ``timm:<name>``;
    ``torchgeo:Enum.MEMBER`` any ``torchgeo:<Enum>.<MEMBER>``)."""
    def fits(c: str) -> bool:
        head, sep, form = c.partition(":")
        return bool(sep) and form in _FORMS and re.fullmatch(re.escape(head) + ":" + _FORMS[form], value) is not None
    return isinstance(value, str) and any(value == c or fits(c) for c in choices)


def _type_name(spec: Key) -> str:
    return f"{spec.type.__name__} or null" if spec.nullable else spec.type.__name__


_WRONG = object()  # what _coerce returns for a value of another type


def _coerce(spec: Key, value: Any) -> Any:
    """``value`` as ``spec.type``, or ``_WRONG`` when it is not one."""
    if spec.type is bool:
        return value if isinstance(value, bool) else _WRONG
    if isinstance(value, bool):
        return _WRONG
    if spec.type is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _WRONG
        return _WRONG
    return value if isinstance(value, spec.type) else _WRONG


def _list_problem(spec: Key, value: list) -> str | None:
    """What the list ``value`` (of kind ``spec.items``) must be and is not, or None."""
    if spec.items == "bands":
        if len(value) not in (1, 3) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in value):
            return ("a list of 1 or 3 band numbers from 1 (R, G, B, e.g. [3, 2, 1], or [1] for grey) or null, "
                    f"got {value!r}")
        return None
    if not value:
        return "a non-empty list of names, got []"
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        return f"a list of non-empty names, got {value!r} (holding {bad[0]!r})"
    twice = sorted({v for v in value if value.count(v) > 1})
    if twice:
        n = value.count(twice[0])
        times = "twice" if n == 2 else f"{n} times"
        return (f"a list naming each city once, got {value!r}: '{twice[0]}' is listed {times}; remove the repeat "
                "(its cells would go into both training and test)")
    return None


def check(key: str, value: Any, default: Any, source: str) -> Any:
    """``value`` of the dotted ``key`` checked against ``SCHEMA[key]`` (an int for a float key becomes a
    float); ConfigError naming ``source`` and the key otherwise."""
    spec = SCHEMA.get(key)
    if spec is None:  # a key of defaults.yaml the schema does not know: a gap in this file
        raise ConfigError(f"{source}: '{key}' has no schema entry; add it to SCHEMA in urbanlens/core/schema.py")
    if value is None:
        if spec.nullable:
            return None
        must = f"one of {', '.join(spec.choices)}" if spec.choices else _type_name(spec)
        raise ConfigError(f"{source}: '{key}' must be {must}, not null; give a value (default {default!r})")
    if spec.choices:
        if not matches(spec.choices, value):
            near = difflib.get_close_matches(str(value), spec.choices, n=1)
            prefixed = [c.split(":")[0] for c in spec.choices if c.endswith((":NAME", ":Enum.MEMBER"))]
            hint = (f" (did you mean '{near[0]}'?)" if near else
                    f" (a {' or '.join(prefixed)} model takes its prefix, e.g. "
                    f"'{prefixed[-1] if '_Weights.' in value else prefixed[0]}:{value}')"
                    if prefixed and isinstance(value, str) and ":" not in value else "")
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(spec.choices)}, got {value!r}" + hint)
        return value
    coerced = _coerce(spec, value)
    if coerced is _WRONG:
        raise ConfigError(f"{source}: '{key}' must be {_type_name(spec)} (default {default!r}), got {value!r}")
    if spec.type is float and not math.isfinite(coerced):
        raise ConfigError(f"{source}: '{key}' must be a finite number{' or null' if spec.nullable else ''}, got "
                          f"{value!r}; give a number (default {default!r})")
    if spec.type is str and not spec.empty and not coerced.strip():
        raise ConfigError(f"{source}: '{key}' must be a non-empty string, got {value!r}; give a name or path "
                          f"(default {default!r})")
    if spec.type is list:
        problem = _list_problem(spec, coerced)
        if problem:
            raise ConfigError(f"{source}: '{key}' must be {problem}")
    if spec.type in (int, float) and not spec.in_range(coerced):
        raise ConfigError(f"{source}: '{key}' must be {spec.range_words}, got {value!r}")
    return coerced


# ------------------------------------------------------------------------------ pairs of keys
def _get(cfg: dict, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _pair_problems(cfg: dict) -> list[str]:
    """Each pair of keys whose values contradict each other, as one line naming both keys."""
    out = []
    poor, rich = _get(cfg, "ses.cams.poor_class"), _get(cfg, "ses.cams.rich_class")
    if poor is not None and poor == rich:
        out.append(f"'ses.cams.poor_class' and 'ses.cams.rich_class' are both {poor}: the maps would compare a class with "
                   "itself; set them to two different classes (default 0 and 4)")
    lo, hi = _get(cfg, "cities.image.scale_min"), _get(cfg, "cities.image.scale_max")
    if lo is not None and hi is not None and not lo < hi:
        out.append(f"'cities.image.scale_min' ({lo:g}) must be below 'cities.image.scale_max' ({hi:g}); swap or correct them")
    if _get(cfg, "ses.train.cv") == "spatial":
        block, buffer, cell = (_get(cfg, k) for k in ("ses.train.block_m", "ses.train.buffer_m", "ses.cell_size_m"))
        if block is not None and buffer is not None and buffer >= block:
            out.append(f"'ses.train.buffer_m' ({buffer:g}) must be below 'ses.train.block_m' ({block:g}): a buffer as "
                       "wide as a block drops whole neighbouring blocks from training; lower the buffer or widen the blocks")
        if block is not None and cell is not None and block < cell:
            out.append(f"'ses.train.block_m' ({block:g}) must be at least 'ses.cell_size_m' ({cell:g}): a block holds "
                       "whole cells; widen the blocks")
    return out


def check_pairs(cfg: dict, source: str = "config") -> None:
    """ConfigError naming both keys of the first pair of values that contradict each other (all
    listed when several do)."""
    problems = _pair_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


CAM_STRIDE = 32  # the convolutional families and Swin: input pixels per cell of the CAM layer's feature map


def cam_map_problem(input_key: str, input_size: int, patch_key: str | None = None,
                    grid: tuple[int, int] | None = None) -> str | None:
    """A line naming the keys when ``input_size`` gives the CAM layer a feature map under 2 x 2 (a map
    of one value per image locates nothing), else None. ``grid``: the (rows, columns) the model's CAM
    layer has at that size (``cam.feature_grid``; a vision transformer's patch grid does not shrink with
    its input), else those of ``CAM_STRIDE``."""
    rows, cols = grid if grid is not None else (input_size // CAM_STRIDE,) * 2
    if min(rows, cols) >= 2:
        return None
    also = f" (images are resized from '{patch_key}' to it)" if patch_key else ""
    return (f"'{input_key}' is {input_size}{also}: the CAM layer's feature map is {rows} x {cols}, so a map "
            f"cannot say where in the image; set '{input_key}' to at least {2 * CAM_STRIDE}")
