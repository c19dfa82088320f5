"""The per-city income model: a backbone with one sigmoid unit read as a binomial over 5 quintiles."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..core import backbones, preprocess, runtime
from ..core.errors import ConfigError

N_CLASSES = 5


CLASS_NAMES = ("q1 poorest", "q2", "q3", "q4", "q5 richest")


_LOG_BINOM = torch.tensor([math.log(math.comb(N_CLASSES - 1, k)) for k in range(N_CLASSES)])


def binomial_log_probs(logit: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [B, 5] of the binomial over ordered classes with success p = sigmoid(logit).

    log P(k) = log C(4,k) + k log p + (4-k) log(1-p), with log p and log(1-p) from ``logsigmoid`` so the
    result stays finite for any logit. Computed in float32 even under autocast.
    """
    logit = logit.float().reshape(-1, 1)
    k = torch.arange(N_CLASSES, device=logit.device, dtype=logit.dtype)
    log_c = _LOG_BINOM.to(device=logit.device, dtype=logit.dtype)
    return log_c + k * F.logsigmoid(logit) + (N_CLASSES - 1 - k) * F.logsigmoid(-logit)


def expected_class(log_probs) -> np.ndarray:
    """Mean class sum_k k P(k) of each row of log-probabilities."""
    p = np.exp(np.asarray(log_probs, dtype=np.float64))
    return p @ np.arange(p.shape[1])


class SESModel(nn.Module):
    """Convolutional ``features`` -> global average pooling -> dropout -> ``fc`` (one unit) -> binomial.

    ``forward`` returns log-probabilities [B, 5] of the income quintiles; ``logit`` the sigmoid input.
    ``features`` is a torchvision family's convolutional trunk (CAMs on its last child), or, ``pooled``, a
    timm or torchgeo classifier without its final layer that pools by itself (CAMs on its family's layer).
    """

    def __init__(self, features: nn.Module, in_features: int, dropout: float = 0.2, pooled: bool = False):
        super().__init__()
        self.features = features
        self.avgpool = nn.Identity() if pooled else nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, 1)

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "preprocess"):  # what a timm or torchgeo backbone's weights expect (core.preprocess)
            x = self.preprocess(x)
        z = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(self.dropout(z)).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binomial_log_probs(self.logit(x))

    def cam_layer(self) -> nn.Module:
        """The layer CAMs are taken on (``backbones.last_conv_layer``): the trunk's last block, or the
        CAM layer of the pooled classifier's family."""
        if isinstance(self.features, nn.Sequential):
            return self.features[-1]
        return backbones.last_conv_layer(self.features)

    def cam_layout(self) -> str:
        return "nchw" if isinstance(self.features, nn.Sequential) else backbones.cam_layout(self.features)

    def cam_model(self) -> nn.Module:
        """The module whose family decides the CAM layer, its layout and canonizer."""
        return self.features


def build_ses_model(cfg, preprocessing: dict | None = None) -> SESModel:
    """The SES model of ``cfg.ses.model``: the convolutional trunk of a torchvision family (EfficientNet-B0
    or a ResNet; ``backbones.trunk``), or a timm or torchgeo classifier without its final layer; pretrained
    weights when ``pretrained`` (``weights_path``, the library's cache, or downloaded into it), and what
    those weights expect of their input (``preprocessing``: as a checkpoint records it)."""
    mc = cfg.ses.model
    family = backbones.family_of(mc.backbone)
    options = {arg: mc[key] for key, arg in family.options} if family else {}
    net, record = backbones.classifier_and_preprocessing(mc.backbone, mc.pretrained, mc.weights_path, "ses.model",
                                                         preprocessing, **options)
    width = backbones.head(net).in_features
    if family is not None:
        model = SESModel(backbones.trunk(net), width, dropout=mc.dropout)
    else:
        model = SESModel(backbones.replace_head(net, 0), width, dropout=mc.dropout, pooled=True)
    model = preprocess.attach(model, record, hook=False)  # applied by SESModel.logit
    if mc.bn_momentum > 0:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = mc.bn_momentum
    return model


def check_backbone(ckpt: dict, cfg, path) -> None:
    """ConfigError when the model in ``path`` was trained with another ``ses.model.backbone`` than ``cfg``
    names: maps and predictions of one backbone are never mixed with, or taken for, another's."""
    trained = (ckpt.get("config", {}).get("ses", {}).get("model", {}) or {}).get("backbone")
    if trained is not None and trained != cfg.ses.model.backbone:
        raise ConfigError(path, f"trained with ses.model.backbone={trained}, while this run says "
                                f"{cfg.ses.model.backbone}", f"set --set ses.model.backbone={trained} to use it, or "
                                "train with the new backbone first (efficientnet_training.py)")


def load_ses_model(path, map_location="cpu") -> tuple[SESModel, dict]:
    """Rebuild a trained SES model (in eval mode, on ``map_location``) from a checkpoint written by the
    training stage, with no download; also return the checkpoint (config, fold, quintile_edges, ...)."""
    from ..core.config import load_config

    ckpt = runtime.load_checkpoint(path, map_location=map_location, writer="efficientnet_training.py")
    cfg = load_config(None)  # defaults, so checkpoints from before a key existed still load
    cfg.ses.model.update({k: v for k, v in ckpt["config"].get("ses", {}).get("model", {}).items() if k in cfg.ses.model})
    cfg.ses.model["pretrained"] = False
    model = runtime.load_weights(build_ses_model(cfg, ckpt.get("preprocessing")), ckpt["model"], path,
                                 f"a {cfg.ses.model.backbone} income model")
    return model.to(map_location).eval(), ckpt
