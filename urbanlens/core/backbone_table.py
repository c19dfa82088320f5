"""The backbone families both pipelines build, one entry a family: adding a family is adding an entry.

Plain data (no torch import), so the config schema takes its list of names from here. Attribute paths
are dotted, with integer (also negative) indices into sequential containers (``classifier.-1``);
``core.backbones`` turns an entry into models, heads, CAM layers and canonizers.

A backbone key names a torchvision classifier (``resnet50``), any timm model (``timm:convnext_tiny``) or
a torchgeo weight (``torchgeo:ResNet50_Weights.FMOW_RGB_GASSL``, built by torchgeo's timm or torchvision
model). torchvision families are found by name; timm and torchgeo models by the class they build, and a
timm model of no entry below falls back to ``TIMM_ANY`` (CAMs on its last feature stage).
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
    mean, std: the input normalisation its ImageNet weights expect (0-1 RGB);
    layout: what ``cam_layer`` puts out: ``nchw`` feature maps, ``nhwc`` (Swin) or ``tokens`` [B, N, C]
      (vision transformers: prefix tokens first, then the patch grid row by row);
    source: ``torchvision`` (head replaced through ``head``) or ``timm`` (``get_classifier`` /
      ``reset_classifier``; ``head`` unused).
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
    layout: str = "nchw"
    source: str = "torchvision"


FAMILIES = {
    "resnet": Family(names=("resnet18", "resnet34", "resnet50", "resnet101"),
                     model_class="torchvision.models:ResNet", head="fc", cam_layer="layer4", trunk="",
                     pool="avgpool", canonizer="zennit.torchvision:ResNetCanonizer"),
    "efficientnet": Family(names=("efficientnet_b0",), model_class="torchvision.models:EfficientNet",
                           head="classifier.-1", cam_layer="features.-1", trunk="features", pool="",
                           canonizer="zennit.canonizers:SequentialMergeBatchNorm",
                           options=(("stochastic_depth", "stochastic_depth_prob"),)),
}

# models built by name through timm or torchgeo: matched by class. ``canonizer`` empty: no zennit canonizer
# fits them, so Relevance-CAM is refused with the methods that work.
BUILT_FAMILIES = {
    "timm_vit": Family(names=(), model_class="timm.models.vision_transformer:VisionTransformer", head="",
                       cam_layer="blocks.-1.norm1", trunk="", pool="", canonizer="", layout="tokens", source="timm"),
    "timm_swin": Family(names=(), model_class="timm.models.swin_transformer:SwinTransformer", head="",
                        cam_layer="layers.-1", trunk="", pool="", canonizer="", layout="nhwc", source="timm"),
    "timm_swin_v2": Family(names=(), model_class="timm.models.swin_transformer_v2:SwinTransformerV2", head="",
                           cam_layer="layers.-1", trunk="", pool="", canonizer="", layout="nhwc", source="timm"),
    "timm_convnext": Family(names=(), model_class="timm.models.convnext:ConvNeXt", head="", cam_layer="stages.-1",
                            trunk="", pool="", canonizer="", source="timm"),
    "timm_resnet": Family(names=(), model_class="timm.models.resnet:ResNet", head="", cam_layer="layer4", trunk="",
                          pool="", canonizer="", source="timm"),
    "timm_efficientnet": Family(names=(), model_class="timm.models.efficientnet:EfficientNet", head="",
                                cam_layer="bn2", trunk="", pool="", canonizer="", source="timm"),
    "torchvision_swin": Family(names=(), model_class="torchvision.models:SwinTransformer", head="head",
                               cam_layer="features.-1", trunk="", pool="", canonizer="", layout="nhwc"),
}

# any other timm model: CAMs on the module of its last feature stage (timm's ``feature_info``)
TIMM_ANY = Family(names=(), model_class="timm.models:*", head="", cam_layer="", trunk="", pool="", canonizer="",
                  source="timm")

PREFIXES = ("timm:", "torchgeo:")  # backbone keys beyond the torchvision names
SPEC_FORMS = ("timm:NAME", "torchgeo:Enum.MEMBER")  # how the schema and its messages show them

BACKBONES = tuple(name for family in FAMILIES.values() for name in family.names)


def family_of(name: str) -> Family | None:
    """The torchvision family that builds backbone ``name``; None when no entry does (timm and torchgeo
    keys among them)."""
    return next((f for f in FAMILIES.values() if name in f.names), None)
