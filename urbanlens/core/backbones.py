"""torchvision backbones with a new final layer, ImageNet weights from a local file when offline."""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import CheckpointError, ConfigError, WeightsUnavailable
from .loops import unwrap

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_b0")


def _weights_enum(name: str):
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1


def imagenet_state_dict(name: str, weights_path: str | None = None) -> dict:
    """ImageNet weights of ``name``: from ``weights_path``, else torch's hub cache. Never downloads."""
    url = _weights_enum(name).url
    candidates = [Path(weights_path)] if weights_path else []
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name)
    for p in candidates:
        if p.is_file():
            return torch.load(p, map_location="cpu", weights_only=True)
    raise WeightsUnavailable(
        f"ImageNet weights for {name} not found (looked in {', '.join(map(str, candidates))}); "
        f"download {url} on a machine with network and pass --set model.weights_path=/path/{Path(url).name} "
        f"(or copy it to {candidates[-1]}), or train from scratch with --set model.pretrained=false")


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
