"""Where a backbone key's model and weights come from, and what the weights expect of their input.

Three forms of ``cities.model.backbone`` / ``ses.model.backbone``:

- a torchvision name (``resnet50``, ``efficientnet_b0``): ImageNet weights, ImageNet normalisation;
- ``timm:<name>``: any timm model (``timm:convnext_tiny``, ``timm:vit_small_patch16_224``), with the
  normalisation, input size and licence of its default pretrained tag (timm's ``pretrained_cfg``);
- ``torchgeo:<Enum>.<MEMBER>``: a torchgeo weight (``torchgeo:ResNet50_Weights.FMOW_RGB_GASSL``), built by
  torchgeo's own builder of that enum (timm or torchvision models), with the normalisation, size and
  bands its transforms and metadata give. Our pipelines are RGB: weights of other bands are refused.

timm and torchgeo are imported only when a key asks for them (torchgeo takes seconds to import).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from .backbone_table import BACKBONES, PREFIXES, SPEC_FORMS
from .errors import ConfigError
from .preprocess import RGB, Preprocessing

# band names of the red, green and blue channels, as weights name them (NAIP, Sentinel-2 with and without
# the leading zero)
_RGB_NAMES = {"r": 0, "red": 0, "b4": 0, "b04": 0, "g": 1, "green": 1, "b3": 1, "b03": 1,
              "b": 2, "blue": 2, "b2": 2, "b02": 2}

# torchgeo's builders of whole classifiers (the others build segmentation or multi-modal models)
TORCHGEO_BUILDERS = ("resnet18", "resnet50", "resnet152", "swin_v2_t", "swin_v2_b", "vit_small_patch16_224",
                     "vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224",
                     "vit_small_patch14_dinov2", "vit_base_patch14_dinov2")


@dataclass(frozen=True)
class Source:
    """spec: the key's value; kind: ``torchvision``, ``timm`` or ``torchgeo``; arch: the name its builder
    takes; weight: the torchgeo enum member (None otherwise)."""

    spec: str
    kind: str
    arch: str
    weight: object = None

    @property
    def url(self) -> str | None:
        return getattr(self.weight, "url", None)


def forms() -> str:
    """The accepted forms, for messages."""
    return f"one of {', '.join(BACKBONES)}, or {' or '.join(SPEC_FORMS)}"


def parse(spec: str, key: str = "cities.model.backbone") -> Source:
    """The source of backbone ``spec``; ConfigError naming ``key`` when it is of no known form, names no
    timm model, or names a torchgeo weight our RGB pipelines cannot take."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key} must be {forms()}, got {spec!r}")
    if spec in BACKBONES:
        return Source(spec, "torchvision", spec)
    kind, sep, name = spec.partition(":")
    if not sep or f"{kind}:" not in PREFIXES or not name:
        raise ConfigError(f"{key} '{spec}' unknown; choose {forms()}")
    if kind == "timm":
        return Source(spec, "timm", _timm_name(name, key))
    member = torchgeo_weight(name, key)
    return Source(spec, "torchgeo", _torchgeo_builder(member, key), member)


def _import(module: str, key: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise ConfigError(f"{key} '{spec}' needs {package}, which does not import here ({e}); "
                          f"install it with 'pip install {package}' or choose one of {', '.join(BACKBONES)}") from None


def _timm_name(name: str, key: str) -> str:
    timm = _import("timm", key, f"timm:{name}")
    if not timm.is_model(name.split(".")[0]):
        near = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
        raise ConfigError(f"{key} 'timm:{name}': timm has no model of that name"
                          + (f" (near: {', '.join(near)})" if near else "") + "; see timm.list_models()")
    return name


def torchgeo_weight(name: str, key: str = "cities.model.backbone"):
    """The torchgeo weight enum member ``<Enum>.<MEMBER>``, checked to take RGB; ConfigError otherwise."""
    models = _import("torchgeo.models", key, f"torchgeo:{name}")
    try:
        member = models.get_weight(name)
    except ValueError:
        enum = getattr(models, name.split(".")[0], None)
        known = ", ".join(str(m) for m in enum) if enum is not None else "torchgeo.models' *_Weights enums"
        raise ConfigError(f"{key} 'torchgeo:{name}': no such torchgeo weight; choose one of {known}") from None
    bands = tuple(str(b) for b in member.meta.get("bands") or ())
    if member.meta.get("in_chans") != 3 or (bands and _rgb_order(bands) is None):
        rgb = [f"torchgeo:{m}" for m in type(member) if m.meta.get("in_chans") == 3 and _rgb_order(m.meta.get("bands") or RGB)]
        shown = ", ".join(bands) if bands else f"{member.meta.get('in_chans')} bands"
        raise ConfigError(f"{key} 'torchgeo:{name}' takes {member.meta.get('in_chans')} bands ({shown}); our images "
                          "are RGB" + (f": choose an RGB weight such as {', '.join(rgb)}" if rgb
                                       else "; choose a torchgeo weight of the red, green and blue bands"))
    return member


def _torchgeo_builder(member, key: str) -> str:
    import torchgeo.models as models

    builder = next((b.__name__ for b, enum in models.api._model_weights.items()
                    if callable(b) and enum is type(member)), None)
    if builder not in TORCHGEO_BUILDERS:
        raise ConfigError(f"{key} 'torchgeo:{member}' belongs to torchgeo's {builder}, not a classification backbone "
                          f"the pipelines can train; choose a weight of {', '.join(TORCHGEO_BUILDERS)}")
    return builder


def _rgb_order(bands) -> tuple[int, ...] | None:
    """Which of our R, G, B feeds each of ``bands`` (names of red, green and blue), None when they are not."""
    order = tuple(_RGB_NAMES.get(str(b).lower(), -1) for b in bands)
    return order if sorted(order) == [0, 1, 2] else None


def torchgeo_preprocessing(member, fixed_size: int | None) -> Preprocessing:
    """Normalisation, band order and size of a torchgeo weight, from its transforms and metadata.

    Its transforms divide raw values by a first scale (255 for 8-bit, 10000 for Sentinel-2 reflectance),
    then may normalise again: both fold into one mean and spread of 0-1 values, our 8-bit values being
    read as that scale's full range."""
    means, stds, size = [], [], None
    for t in getattr(member.transforms, "children", lambda: [])():
        name = type(t).__name__
        if name == "Normalize":
            means.append(_triple(t.mean))
            stds.append(_triple(t.std))
        elif name in ("Resize", "CenterCrop") and getattr(t, "size", None) is not None:
            size = _side(t.size)
    mean, std = (0.0,) * 3, (1.0,) * 3
    first = stds[0][0] if stds and means and means[0] == (0.0,) * 3 and len(set(stds[0])) == 1 else None
    scale = first if first and first > 1 else 1.0  # the raw-units scale our 0-1 values stand for
    for m, s in zip(means, stds):  # (x - m1) / s1, then (. - m2) / s2 ... in raw units
        mean = tuple(a + b * c for a, b, c in zip(mean, m, std))
        std = tuple(a * b for a, b in zip(std, s))
    bands = tuple(str(b) for b in member.meta.get("bands") or RGB)
    return Preprocessing(mean=tuple(m / scale for m in mean), std=tuple(s / scale for s in std),
                         order=_rgb_order(bands) or (0, 1, 2), bands=bands, size=fixed_size, weights_size=size,
                         units={255: "8-bit", 10000: "reflectance x 10000"}.get(int(scale), f"raw / {scale:g}"))


def timm_preprocessing(model, fixed_size: int | None) -> Preprocessing:
    """Normalisation and input size of a timm model's pretrained tag (``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.get("input_size")
    return Preprocessing(mean=_triple(cfg.get("mean", (0.485, 0.456, 0.406))),
                         std=_triple(cfg.get("std", (0.229, 0.224, 0.225))),
                         size=fixed_size, weights_size=_side(size[-2:]) if size else None)


def licence(spec: str) -> str:
    """The licence the weights of backbone key ``spec`` are published under, as far as their source says
    (timm's ``pretrained_cfg``; torchgeo states none, so its repository is named). Nothing is downloaded."""
    if spec in BACKBONES:
        return "torchvision's ImageNet weights: BSD-3-Clause code, ImageNet's terms of access for the data"
    kind, _, name = spec.partition(":")
    try:
        if kind == "timm":
            from timm.models import get_pretrained_cfg

            cfg = get_pretrained_cfg(name)
            return f"{getattr(cfg, 'license', None) or 'not stated by timm'} (timm tag {getattr(cfg, 'hf_hub_id', None) or name})"
        member = torchgeo_weight(name)
        return f"not stated by torchgeo: see {member.meta.get('repo') or 'the weight publication'}"
    except (ImportError, ConfigError):
        return "unknown (the library that names it does not import here)"


def _triple(v) -> tuple[float, float, float]:
    v = [float(x) for x in (v if hasattr(v, "__len__") else [v])]
    return tuple(v * 3 if len(v) == 1 else v[:3])


def _side(size) -> int:
    return int(size if isinstance(size, int) else max(size))
