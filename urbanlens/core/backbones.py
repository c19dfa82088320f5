"""torchvision backbones with a new final layer; ImageNet weights from a file, torch's cache or a download."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import CheckpointError, ConfigError, WeightsUnavailable
from .loops import unwrap
from .schema import BACKBONES


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
                        timeout_s: float = 30.0) -> dict:
    """ImageNet weights of ``name``, as torchvision users get them: ``weights_path`` when given, else
    torch's hub cache (``$TORCH_HOME/hub/checkpoints``), else downloaded into that cache by torch's
    helper (hash-checked, with a progress bar). ``URBANLENS_OFFLINE=1`` forbids the download.

    Raises WeightsUnavailable with the way out (a local file, or training from scratch) when the file is
    missing and cannot be downloaded, or when the download does not match its hash."""
    url = url or weights_url(name)
    if weights_path:
        if not Path(weights_path).is_file():
            raise WeightsUnavailable(f"ImageNet weights {weights_path}", "not found (--set model.weights_path)",
                                     f"point it at a copy of {url}, or leave it empty to use torch's cache, "
                                     "or train from scratch with --set model.pretrained=false")
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    cached = _cached(url)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    way_out = (f"download {url} on a machine with network and pass --set model.weights_path=/path/{Path(url).name} "
               f"(or copy it to {cached}), or train from scratch with --set model.pretrained=false")
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


def build_backbone(name: str, num_classes: int, pretrained: bool = False,
                   weights_path: str | None = None) -> nn.Module:
    """A torchvision classifier whose final layer has ``num_classes`` outputs."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    model = torchvision.models.get_model(name, weights=None)
    if pretrained:
        model.load_state_dict(imagenet_state_dict(name, weights_path))
    replace_head(model, num_classes)
    return model


def head(model: nn.Module) -> nn.Linear:
    """The final linear layer (ResNet ``fc``, EfficientNet ``classifier[-1]``)."""
    if hasattr(model, "fc"):
        return model.fc
    return model.classifier[-1]


def replace_head(model: nn.Module, out_features: int) -> nn.Module:
    new = nn.Linear(head(model).in_features, out_features)
    if hasattr(model, "fc"):
        model.fc = new
    else:
        model.classifier[-1] = new
    return model


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The layer CAMs are taken on: ResNet ``layer4`` (last residual block), EfficientNet ``features[-1]``."""
    model = unwrap(model)
    if hasattr(model, "layer4"):
        return model.layer4
    if hasattr(model, "features"):
        return model.features[-1]
    if hasattr(model, "backbone"):
        return last_conv_layer(model.backbone)
    raise ValueError(f"no known last conv layer for {type(model).__name__}")


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


def classifier_from_checkpoint(state: dict, path: str | Path) -> tuple[nn.Module, dict, list[str]]:
    """The city classifier of a training checkpoint -> (model on CPU, its ``model`` config, class names).

    The architecture, input size and class order come from the checkpoint, not from the current config.
    A checkpoint of another stage, or whose weights do not fit the backbone and classes it records, exits
    with one line naming ``path``.
    """
    from .runtime import load_weights

    trained, classes = state.get("config", {}).get("model") or {}, state.get("classes")
    if not classes or trained.get("backbone") not in BACKBONES or "input_size" not in trained:
        raise CheckpointError(f"{path}: not a city-classifier checkpoint (no classes or model.backbone recorded); "
                 "use the best.pt that train_classification.py writes")
    model = build_backbone(trained["backbone"], len(classes), pretrained=False)
    load_weights(model, state["model"], path, f"{trained['backbone']} with {len(classes)} classes")
    return model, trained, list(classes)
