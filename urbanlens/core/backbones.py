"""Backbones of the families in ``backbone_table``: building them with a new final layer, their heads, CAM
layers, convolutional trunks and canonizers; pretrained weights from a file, the libraries' caches or a
download by their own helpers (torch's hub for torchvision and torchgeo weights, timm's for timm's).

Models of timm and torchgeo carry what their weights expect of their input (``core.preprocess``)."""
from __future__ import annotations

import contextlib
import importlib
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from . import preprocess, weights_source
from .backbone_table import BUILT_FAMILIES, FAMILIES, TIMM_ANY, Family, family_of
from .errors import CheckpointError, ConfigError, WeightsUnavailable
from .placement import unwrap
from .preprocess import Preprocessing


def weights_url(name: str) -> str:
    """Where torchvision publishes the ImageNet weights of ``name`` (the file name carries a hash prefix)."""
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1.url


def _cached(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _download(url: str, timeout_s: float) -> dict:
    """torch's own download into its hub cache, with its SHA-256 prefix check and a progress bar."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)  # a blocked network fails in seconds instead of hanging
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True,
                                                  weights_only=True)
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_state_dict(name: str, weights_path: str | None = None, url: str | None = None,
                        timeout_s: float = 30.0, section: str = "cities.model", label: str = "ImageNet weights") -> dict:
    """ImageNet weights of ``name``, as torchvision users get them: ``weights_path`` when given, else
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``), else downloaded into that cache by torch's
    helper (hash-checked, with a progress bar). ``URBANLENS_OFFLINE=1`` forbids the download.

    Raises WeightsUnavailable with the way out (a local file, or training from scratch) when the file is
    missing and cannot be downloaded, or when the download does not match its hash; the ways out name the
    keys of config ``section`` (``cities.model`` or ``ses.model``)."""
    url = url or weights_url(name)
    if weights_path:
        if not Path(weights_path).is_file():
            raise WeightsUnavailable(f"{label} {weights_path}", f"not found (--set {section}.weights_path)",
                                     f"point it at a copy of {url}, or leave it empty to use torch's cache, "
                                     f"or train from scratch with --set {section}.pretrained=false")
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    cached = _cached(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    way_out = (f"download {url} on a machine with network and pass --set {section}.weights_path=/path/{Path(url).name} "
               f"(or copy it to {cached}), or train from scratch with --set {section}.pretrained=false")
    if os.environ.get("URBANLENS_OFFLINE", "") not in ("", "0"):
        raise WeightsUnavailable(f"{label} for {name} not found in {cached} (URBANLENS_OFFLINE is set, "
                                 f"so not downloaded); {way_out}")
    try:
        return _download(url, timeout_s)
    except RuntimeError as e:  # torch's hash check: the file is removed, nothing is cached
        if "hash" not in str(e):
            raise
        raise WeightsUnavailable(f"{label} for {name} from {url}: the download does not match its hash "
                                 f"(a corrupted or intercepted transfer; nothing was cached); try again, or {way_out}"
                                 ) from None
    except (OSError, ValueError) as e:  # no network, refused, timed out, proxy page, HTTP error
        reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsUnavailable(f"{label} for {name} not found in {cached} and the download from "
                                 f"{url} failed ({reason}); {way_out}") from None


def _resolve(spec: str):
    """The object of a ``module:Name`` spec."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _get(obj: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        obj = obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
    return obj


def _set(obj: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    owner = _get(obj, parent) if parent else obj
    if last.lstrip("-").isdigit():
        owner[int(last)] = value
    else:
        setattr(owner, last, value)


def family(name: str, key: str = "cities.model.backbone") -> Family:
    """The table entry of torchvision backbone ``name``; ConfigError naming ``key`` and the known forms otherwise."""
    found = family_of(name)
    if found is None:
        raise ConfigError(f"{key} '{name}' unknown; choose {weights_source.forms()}")
    return found


def family_of_model(model: nn.Module) -> Family | None:
    """The family whose class ``model`` (unwrapped) is an instance of (``TIMM_ANY`` for a timm model of no
    entry); None for other models. Classes of a library are only imported for models of that library."""
    model = unwrap(model)
    library = type(model).__module__.split(".")[0]
    for found in (*FAMILIES.values(), *BUILT_FAMILIES.values()):
        if found.model_class.split(".")[0] == library and isinstance(model, _resolve(found.model_class)):
            return found
    return TIMM_ANY if library == "timm" else None


def torchvision_model(name: str, **options) -> nn.Module:
    """The torchvision classifier ``name`` with random weights (``options``: builder keyword arguments)."""
    return torchvision.models.get_model(name, weights=None, **options)


def classifier(name: str, pretrained: bool = False, weights_path: str | None = None, section: str = "cities.model",
               preprocessing: dict | None = None, url: str | None = None, **options) -> nn.Module:
    """The classifier backbone key ``name`` builds, with its own final layer, pretrained weights when
    ``pretrained``, and the preprocessing its weights expect attached (``preprocessing``, as a checkpoint
    records it, when rebuilding a trained model). ``url`` stands in for the source's address (a mirror)."""
    return preprocess.attach(*classifier_and_preprocessing(name, pretrained, weights_path, section, preprocessing,
                                                           url, **options))


def classifier_and_preprocessing(name: str, pretrained: bool = False, weights_path: str | None = None,
                                 section: str = "cities.model", preprocessing: dict | None = None,
                                 url: str | None = None, **options) -> tuple[nn.Module, Preprocessing]:
    """``classifier``'s model, not yet given its preprocessing, and that preprocessing."""
    source = weights_source.parse(name, f"{section}.backbone")
    if source.kind == "torchvision":
        family(name, f"{section}.backbone")
        model = torchvision_model(name, **options)
        if pretrained:
            model.load_state_dict(imagenet_state_dict(name, weights_path, url=url, section=section))
    elif source.kind == "timm":
        model = timm_model(source.arch, pretrained, weights_path, section, url)
    else:
        model = torchgeo_model(source, pretrained, weights_path, section, url)
    return model, Preprocessing.from_dict(preprocessing) if preprocessing else _preprocessing(model, source)


def _preprocessing(model: nn.Module, source) -> Preprocessing:
    if source.kind == "torchvision":
        return Preprocessing()
    if source.kind == "timm":
        return weights_source.timm_preprocessing(model, fixed_size(model))
    return weights_source.torchgeo_preprocessing(source.weight, fixed_size(model))


def fixed_size(model: nn.Module) -> int | None:
    """The one input side a model takes (vision transformers' patch embedding), None when any size goes."""
    embed = getattr(unwrap(model), "patch_embed", None)
    if embed is None or not getattr(embed, "strict_img_size", False) or getattr(embed, "img_size", None) is None:
        return None
    return int(max(embed.img_size))


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Hugging Face's hub (timm's source) answers from its cache only while ``offline``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def timm_model(name: str, pretrained: bool = False, weights_path: str | None = None, section: str = "cities.model",
               url: str | None = None, timeout_s: float = 30.0) -> nn.Module:
    """timm model ``name``: random weights, or its pretrained tag's through timm's own loader (the Hugging
    Face hub and its cache; ``weights_path``: a local file; ``url``: a mirror, through torch's hub cache with
    its hash check). WeightsUnavailable with the ways out when they cannot be had."""
    import timm
    from timm.models import _builder

    if not pretrained:
        return timm.create_model(name, pretrained=False)
    if weights_path and not Path(weights_path).is_file():
        raise WeightsUnavailable(f"timm weights {weights_path}", f"not found (--set {section}.weights_path)",
                                 f"point it at the model's weights file (.safetensors or .pth), or leave it empty to use "
                                 f"timm's cache, or train from scratch with --set {section}.pretrained=false")
    overlay = {"file": weights_path} if weights_path else {"url": url, "hf_hub_id": None} if url else None
    offline = os.environ.get("URBANLENS_OFFLINE", "") not in ("", "0") and not weights_path
    _builder.set_pretrained_check_hash(True)  # a mirror's file name carries its hash, as torch's hub wants
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        with _hub_offline(offline):
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as e:  # no network, offline and not cached, refused, hash mismatch, HTTP error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "not in Hugging Face's cache (URBANLENS_OFFLINE is set, so not downloaded)" if offline else \
            f"could not be had ({reason})"
        raise WeightsUnavailable(f"timm weights for {name} {where}; download them on a machine with network "
                                 f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\" fills the "
                                 f"cache, or fetch the weights file) and pass --set {section}.weights_path=/path/to/file, "
                                 f"or train from scratch with --set {section}.pretrained=false") from None
    finally:
        socket.setdefaulttimeout(previous)


def torchgeo_model(source, pretrained: bool = False, weights_path: str | None = None, section: str = "cities.model",
                   url: str | None = None) -> nn.Module:
    """The model torchgeo's builder of ``source``'s weight makes (a timm or torchvision classifier), with those
    weights when ``pretrained``: from ``weights_path``, torch's hub cache, or downloaded into it (torchgeo's own
    way, hash-checked by the hash in the file name)."""
    import torchgeo.models as models

    model = getattr(models, source.arch)(weights=None)
    if pretrained:
        state = imagenet_state_dict(str(source.weight), weights_path, url or source.url, section=section,
                                    label="torchgeo weights")
        missing, unexpected = model.load_state_dict(state, strict=False)
        head_keys = {k for k in model.state_dict() if k.startswith(_head_path(model) + ".")}
        if not set(missing) <= head_keys or not set(unexpected) <= head_keys | {"fc.weight", "fc.bias"}:
            raise CheckpointError(f"torchgeo weights {source.weight}: they do not fit torchgeo's {source.arch} "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected tensors); "
                                  f"check {section}.weights_path, or choose another weight")
    return model


def _head_path(model: nn.Module) -> str:
    found = _known(model)
    if found.source == "timm":
        return next(n for n, m in model.named_modules() if m is model.get_classifier())
    return found.head


def build_backbone(name: str, num_classes: int, pretrained: bool = False,
                   weights_path: str | None = None, section: str = "cities.model",
                   preprocessing: dict | None = None) -> nn.Module:
    """A classifier of backbone key ``name`` whose final layer has ``num_classes`` outputs."""
    model = classifier(name, pretrained, weights_path, section, preprocessing)
    replace_head(model, num_classes)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer: the family's ``head`` (ResNet ``fc``, EfficientNet ``classifier[-1]``, timm's
    ``get_classifier()``); the ``fc`` of a model of no family (the SES model, a model of one's own)."""
    model, found = unwrap(model), family_of_model(model)
    if found is None and isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    found = found or _known(model)  # no family and no fc: the error naming the known forms
    return model.get_classifier() if found.source == "timm" else _get(model, found.head)


def replace_head(model: nn.Module, out_features: int) -> nn.Module:
    """A new final layer of ``out_features`` outputs (0: none, the model then puts out its pooled features)."""
    found = _known(model)
    if found.source == "timm":
        unwrap(model).reset_classifier(out_features)
        return model
    new = nn.Linear(head(model).in_features, out_features) if out_features else nn.Identity()
    _set(model, found.head, new)
    return model


def _known(model: nn.Module) -> Family:
    found = family_of_model(model)
    if found is None:
        raise ValueError(f"{type(unwrap(model)).__name__} is not a model of a backbone family "
                         f"({weights_source.forms()})")
    return found


def trunk(model: nn.Module) -> nn.Sequential:
    """The convolutional trunk of a torchvision family's classifier (every layer up to its CAM layer, which
    is the trunk's last child): EfficientNet ``features``; ResNet every child before ``avgpool``."""
    found = _known(model)
    if found.source != "torchvision" or not found.names:
        raise ValueError(f"{type(unwrap(model)).__name__} has no convolutional trunk of a torchvision family")
    if found.trunk:
        return _get(model, found.trunk)
    children = list(model.named_children())
    end = [n for n, _ in children].index(found.pool)
    return nn.Sequential(*[m for _, m in children[:end]])


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The layer CAMs are taken on: the family's ``cam_layer`` (ResNet ``layer4``, EfficientNet
    ``features[-1]``), the model's own ``cam_layer()`` (the SES model: its trunk's last child), or the last
    block of the ``features`` trunk of a model of one's own."""
    model = unwrap(model)
    if hasattr(model, "cam_layer"):
        return model.cam_layer()
    if family_of_model(model) is None and isinstance(getattr(model, "features", None), nn.Sequential):
        return model.features[-1]
    found = _known(model)
    if found is TIMM_ANY:  # timm's own record of where its last feature stage is
        return _get(model, model.feature_info[-1]["module"])
    return _get(model, found.cam_layer)


def cam_layout(model: nn.Module) -> str:
    """What ``last_conv_layer`` puts out: ``nchw``, ``nhwc`` or ``tokens`` (see ``backbone_table.Family``)."""
    model = unwrap(model)
    if hasattr(model, "cam_layout"):
        return model.cam_layout()
    found = family_of_model(model)
    if found is None:
        return "nchw"
    if found is TIMM_ANY:
        return "nhwc" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "nchw"
    return found.layout


def prefix_tokens(model: nn.Module) -> int:
    """How many tokens before the patch grid a vision transformer's token maps hold (class, distillation,
    register tokens); 0 for other models."""
    model = unwrap(model)
    inner = model.cam_model() if hasattr(model, "cam_model") else model
    return int(getattr(inner, "num_prefix_tokens", 0))


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The (rows, columns) of a vision transformer's patch grid at the input size it was built for
    (``patch_embed.grid_size``); None for other models and for a patch embedding that records none."""
    model = unwrap(model)
    inner = model.cam_model() if hasattr(model, "cam_model") else model
    grid = getattr(getattr(inner, "patch_embed", None), "grid_size", None)
    return (int(grid[0]), int(grid[1])) if grid is not None else None


def family_name(model: nn.Module) -> str:
    """How messages name the family of ``model`` (the SES model: of its trunk): its table key
    (``resnet``, ``timm_vit``, ``torchvision_swin``), ``timm <Class>`` for a timm model of no entry, or
    ``<Class> (no backbone family)``."""
    inner = unwrap(model)
    inner = inner.cam_model() if hasattr(inner, "cam_model") else inner
    found = family_of_model(inner)
    if found is TIMM_ANY:
        return f"timm {type(inner).__name__}"
    names = {id(f): k for k, f in (*FAMILIES.items(), *BUILT_FAMILIES.items())}
    return names[id(found)] if found is not None else f"{type(inner).__name__} (no backbone family)"


def canonizer(model: nn.Module):
    """A new zennit canonizer for Relevance-CAM on ``model``: its family's (ResNet: residual sums made
    explicit and batch norms merged), batch-norm merging only for models of no family; None for a family
    no zennit canonizer fits (timm's and torchgeo's models: layer norms, attention)."""
    inner = unwrap(model)
    inner = inner.cam_model() if hasattr(inner, "cam_model") else inner
    found = family_of_model(inner)
    spec = found.canonizer if found is not None else "zennit.canonizers:SequentialMergeBatchNorm"
    return _resolve(spec)() if spec else None


@torch.no_grad()
def logits_and_embeddings(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the penultimate-layer embedding (input of the final linear layer) in one pass."""
    store = {}
    handle = head(model).register_forward_hook(lambda m, i, o: store.update(emb=i[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, store["emb"]
