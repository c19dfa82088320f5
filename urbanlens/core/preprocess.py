"""What a model's weights expect of their input, applied inside the model and recorded with it.

Both pipelines feed every model the same thing: RGB images at the size they read them, scaled to [0, 1]
and normalised with ImageNet's mean and spread. Weights trained elsewhere (timm, torchgeo) expect their
own normalisation, band order and, for vision transformers, input size (Corley et al. 2023: matching
them is worth up to tens of accuracy points). ``attach`` gives such a model a ``preprocess`` child that
maps the pipelines' input to that, run by a forward pre-hook, so every stage (training, test, CAMs,
maps, prediction) applies it without knowing, and the checkpoint carries it: its buffers in the state
dict, its settings (``Preprocessing.to_dict``) beside them. torchvision's ImageNet models get none,
so their checkpoints are unchanged.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbone_table import IMAGENET_MEAN, IMAGENET_STD

RGB = ("R", "G", "B")


@dataclass(frozen=True)
class Preprocessing:
    """mean, std: the weights' normalisation of 0-1 values, per model input channel;
    order: which of our R, G, B (0, 1, 2) feeds each model input channel;
    bands: the weights' own names of those channels; size: the side the model takes (inputs of another
    size are resized to it, bilinear with antialiasing), None: any size; weights_size: the side the
    weights were trained at (recorded); units: what the weights' pixel values were (``8-bit``,
    ``reflectance x 10000``: our 8-bit values are then read as that range's full scale)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    order: tuple[int, ...] = (0, 1, 2)
    bands: tuple[str, ...] = RGB
    size: int | None = None
    weights_size: int | None = None
    units: str = "8-bit"

    def is_imagenet(self) -> bool:
        """Nothing to do: the pipelines' own input already is what the weights expect."""
        return (tuple(self.mean) == IMAGENET_MEAN and tuple(self.std) == IMAGENET_STD
                and tuple(self.order) == (0, 1, 2) and self.size is None)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__})


class Preprocess(nn.Module):
    """ImageNet-normalised RGB [B, 3, H, W] -> the channels, normalisation and size of ``record``: one
    channel gather, one per-channel affine map (exact: both normalisations are affine), one resize."""

    def __init__(self, record: Preprocessing):
        super().__init__()
        order = list(record.order)
        in_mean, in_std = torch.tensor(IMAGENET_MEAN)[order], torch.tensor(IMAGENET_STD)[order]
        mean, std = torch.tensor(record.mean, dtype=torch.float32), torch.tensor(record.std, dtype=torch.float32)
        # x01 = x * in_std + in_mean;  out = (x01 - mean) / std
        self.register_buffer("scale", (in_std / std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((in_mean - mean) / std).view(1, -1, 1, 1))
        self.order = order
        self.size = record.size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.order != [0, 1, 2]:
            x = x[:, self.order]
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x


def _pre_hook(module: nn.Module, args: tuple):
    return (module.preprocess(args[0]),) + tuple(args[1:])


def attach(model: nn.Module, record: Preprocessing, hook: bool = True) -> nn.Module:
    """``model`` with ``record`` applied to its input on every call (nothing for ImageNet's own), and
    ``record`` kept as ``model.preprocessing``. ``hook=False``: the model applies its ``preprocess`` child
    itself (the SES model, whose ``logit`` is called directly too)."""
    model.preprocessing = record
    if not record.is_imagenet():
        model.preprocess = Preprocess(record)
        if hook:
            model.register_forward_pre_hook(_pre_hook)
    return model


def of(model: nn.Module) -> Preprocessing:
    """The preprocessing ``attach`` gave ``model`` (ImageNet's for a model it never saw)."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(inner, "preprocessing", None) or Preprocessing()
