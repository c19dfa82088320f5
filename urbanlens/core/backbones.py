"""Backbones of the families in ``backbone_table``: building them with a new final layer, their heads, CAM
layers, convolutional trunks and canonizers; ImageNet weights from a file, torch's cache or a download."""
from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from .backbone_table import BACKBONES, FAMILIES, Family, family_of
from .errors import ConfigError, WeightsUnavailable
from .placement import unwrap


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
                        timeout_s: float = 30.0, section: str = "cities.model") -> dict:
    """ImageNet weights of ``name``, as torchvision users get them: ``weights_path`` when given, else
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``), else downloaded into that cache by torch's
    helper (hash-checked, with a progress bar). ``URBANLENS_OFFLINE=1`` forbids the download.

    Raises WeightsUnavailable with the way out (a local file, or training from scratch) when the file is
    missing and cannot be downloaded, or when the download does not match its hash; the ways out name the
    keys of config ``section`` (``cities.model`` or ``ses.model``)."""
    url = url or weights_url(name)
    if weights_path:
        if not Path(weights_path).is_file():
            raise WeightsUnavailable(f"ImageNet weights {weights_path}", f"not found (--set {section}.weights_path)",
                                     f"point it at a copy of {url}, or leave it empty to use torch's cache, "
                                     f"or train from scratch with --set {section}.pretrained=false")
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    cached = _cached(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    way_out = (f"download {url} on a machine with network and pass --set {section}.weights_path=/path/{Path(url).name} "
               f"(or copy it to {cached}), or train from scratch with --set {section}.pretrained=false")
    if os.environ.get("URBANLENS_OFFLINE", "") not in ("", "0"):
        raise WeightsUnavailable(f"ImageNet weights for {name} not found in {cached} (URBANLENS_OFFLINE is set, "
                                 f"so not downloaded); {way_out}")
    try:
        return _download(url, timeout_s)
    except RuntimeError as e:  # torch's hash check: the file is removed, nothing is cached
        if "hash" not in str(e):
            raise
        raise WeightsUnavailable(f"ImageNet weights for {name} from {url}: the download does not match its hash "
                                 f"(a corrupted or intercepted transfer; nothing was cached); try again, or {way_out}"
                                 ) from None
    except (OSError, ValueError) as e:  # no network, refused, timed out, proxy page, HTTP error
        reason = str(getattr(e, "reason", "") or e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsUnavailable(f"ImageNet weights for {name} not found in {cached} and the download from "
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
    """The table entry of backbone ``name``; ConfigError naming ``key`` and the known names otherwise."""
    found = family_of(name)
    if found is None:
        raise ConfigError(f"{key} '{name}' unknown; choose one of {', '.join(BACKBONES)}")
    return found


def family_of_model(model: nn.Module) -> Family | None:
    """The family whose torchvision class ``model`` (unwrapped) is an instance of; None for other models."""
    model = unwrap(model)
    return next((f for f in FAMILIES.values() if isinstance(model, _resolve(f.model_class))), None)


def torchvision_model(name: str, **options) -> nn.Module:
    """The torchvision classifier ``name`` with random weights (``options``: builder keyword arguments)."""
    return torchvision.models.get_model(name, weights=None, **options)


def build_backbone(name: str, num_classes: int, pretrained: bool = False,
                   weights_path: str | None = None) -> nn.Module:
    """A classifier of the table's family of ``name`` whose final layer has ``num_classes`` outputs."""
    family(name)
    model = torchvision_model(name)
    if pretrained:
        model.load_state_dict(imagenet_state_dict(name, weights_path))
    replace_head(model, num_classes)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer: the family's ``head`` (ResNet ``fc``, EfficientNet ``classifier[-1]``); the
    ``fc`` of a model of no family (the SES model, a model of one's own)."""
    found = family_of_model(model)
    if found is None and isinstance(getattr(unwrap(model), "fc", None), nn.Linear):
        return unwrap(model).fc
    return _get(unwrap(model), _known(model).head)


def replace_head(model: nn.Module, out_features: int) -> nn.Module:
    _set(model, _known(model).head, nn.Linear(head(model).in_features, out_features))
    return model


def _known(model: nn.Module) -> Family:
    found = family_of_model(model)
    if found is None:
        raise ValueError(f"{type(unwrap(model)).__name__} is not a model of a backbone family "
                         f"({', '.join(BACKBONES)})")
    return found


def trunk(model: nn.Module) -> nn.Sequential:
    """The convolutional trunk of a family's classifier (every layer up to its CAM layer, which is the
    trunk's last child): EfficientNet ``features``; ResNet every child before ``avgpool``."""
    found = _known(model)
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
    return _get(model, _known(model).cam_layer)


def canonizer(model: nn.Module):
    """A new zennit canonizer for Relevance-CAM on ``model``: its family's (ResNet: residual sums made
    explicit and batch norms merged), batch-norm merging only for other models."""
    found = family_of_model(model)
    spec = found.canonizer if found is not None else "zennit.canonizers:SequentialMergeBatchNorm"
    return _resolve(spec)()


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
