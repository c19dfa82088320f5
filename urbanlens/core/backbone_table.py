"""The backbone families both pipelines build, one entry a family: adding a family is adding an entry.

Plain data (no torch import), so the config schema takes its list of names from here. Attribute paths
are dotted, with integer (also negative) indices into sequential containers (``classifier.-1``);
``core.backbones`` turns an entry into models, heads, CAM layers and canonizers.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """How to build and read one family of torchvision classifiers.

    names: the ``cities.model.backbone`` / ``ses.model.backbone`` values it builds (``torchvision.models.get_model``);
    model_class: the torchvision class its models are instances of (``module:Class``);
    head: path of the final linear layer (replaced by one over our classes);
    cam_layer: path of the layer CAMs are taken on (the last convolutional block);
    pool: the child the convolutional trunk ends before, or ``""`` when ``trunk`` names it;
    trunk: path of the convolutional trunk whose last child is ``cam_layer`` (``""``: every child before
      ``pool``); the SES model is that trunk, global pooling and one unit;
    canonizer: the zennit canonizer (``module:Class``) Relevance-CAM merges batch norms with;
    options: SES config keys -> keyword arguments of the builder (e.g. EfficientNet's stochastic depth);
    mean, std: the input normalisation its ImageNet weights expect (0-1 RGB).
    """

    names: tuple[str, ...]
    model_class: str
    head: str
    cam_layer: str
    trunk: str
    pool: str
    canonizer: str
    options: tuple[tuple[str, str], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


FAMILIES = {
    "resnet": Family(names=("resnet18", "resnet34", "resnet50", "resnet101"),
                     model_class="torchvision.models:ResNet", head="fc", cam_layer="layer4", trunk="",
                     pool="avgpool", canonizer="zennit.torchvision:ResNetCanonizer"),
    "efficientnet": Family(names=("efficientnet_b0",), model_class="torchvision.models:EfficientNet",
                           head="classifier.-1", cam_layer="features.-1", trunk="features", pool="",
                           canonizer="zennit.canonizers:SequentialMergeBatchNorm",
                           options=(("stochastic_depth", "stochastic_depth_prob"),)),
}

BACKBONES = tuple(name for family in FAMILIES.values() for name in family.names)


def family_of(name: str) -> Family | None:
    """The family that builds backbone ``name``; None when no entry does."""
    return next((f for f in FAMILIES.values() if name in f.names), None)
