"""Class-activation maps shared by both pipelines: Grad-CAM, Grad-CAM++, Relevance-CAM, guided backprop.

One hook helper (``LayerHooks``) captures a layer's activations and the gradient arriving at them; each
CAM method is then a small function of ``(activations, gradients)`` returning low-resolution maps
``[B, h, w]``. Every family's CAM layer is read as feature maps [B, C, h, w] (``as_feature_maps``: vision
transformers' patch tokens on their grid, Swin's channels-last maps permuted), so each method works on all
of them; Relevance-CAM only where a zennit canonizer fits (``check_method`` refuses it elsewhere).
``class_activation_maps`` runs a batch end to end (upsampled to the input size and
min-max normalised per image); ``guided_gradcam`` is the product map of the SES study.

Targets are class indices on the model *output*: logits for the city classifier, log-probabilities for
the SES model's five classes; the score differentiated is ``output[b, targets[b]]``.

Every function leaves the model as it found it: hooks and canonizers removed, parameters and their
``.grad`` untouched (gradients are taken with ``torch.autograd.grad``, never accumulated), and the
train/eval flag restored (maps are always computed in eval mode).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from zennit.composites import EpsilonPlus, GuidedBackprop
from zennit.core import Hook

from . import backbones
from .errors import ConfigError
from .placement import Amp, autocast, unwrap
from .schema import CAM_METHODS as METHODS


def square_grid(n: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (rows, columns) of ``n`` patch tokens: ``grid`` (the patch embedding's own) when it holds ``n``
    tokens, else the square of side sqrt(n) (a model fed another size than it was built for)."""
    if grid is not None and grid[0] * grid[1] == n:
        return int(grid[0]), int(grid[1])
    side = round(n ** 0.5)
    if side * side != n:
        raise ValueError(f"{n} patch tokens fill no square grid and the patch embedding's grid {grid} holds "
                         f"{'no' if grid is None else grid[0] * grid[1]} of them; give the model square images")
    return side, side


def as_feature_maps(t: torch.Tensor, layout: str = "nchw", prefix: int = 0,
                    grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A CAM layer's output (or the gradient arriving at it) as feature maps [B, C, h, w]: ``nchw`` as it
    is; ``nhwc`` (Swin) permuted; ``tokens`` [B, N, C] (vision transformers) without its ``prefix`` leading
    tokens (class, register tokens), the rest laid out row by row on the patch grid (``square_grid``)."""
    if layout == "nchw":
        return t
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":
        patches = t[:, prefix:]
        h, w = square_grid(patches.shape[1], grid)
        return patches.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    raise ValueError(f"unknown CAM layer layout '{layout}' (nchw, nhwc or tokens)")


class LayerHooks:
    """Capture the output of ``layer`` during a forward pass and the gradient that later arrives at it.

    >>> with LayerHooks(model, model.layer4) as hooks:
    ...     out = model(x)
    ...     torch.autograd.grad(out[:, 3].sum(), hooks.output)
    >>> hooks.activations, hooks.gradients     # detached, [B, C, h, w]

    ``output`` is the live tensor (part of the graph) to differentiate with respect to. If the layer runs
    more than once in a forward pass, the last call is kept. ``activations`` and ``gradients`` are feature
    maps whatever the model's family puts out (``as_feature_maps`` with ``backbones.cam_layout(model)``):
    a vision transformer's patch tokens on their grid, Swin's channels-last maps permuted.
    """

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model, self.layer = model, layer
        self.layout = backbones.cam_layout(model)
        self.prefix = backbones.prefix_tokens(model) if self.layout == "tokens" else 0
        self.grid = backbones.patch_grid(model) if self.layout == "tokens" else None
        self.output: torch.Tensor | None = None
        self.activations: torch.Tensor | None = None
        self.gradients: torch.Tensor | None = None
        self._handle = None

    def _maps(self, t: torch.Tensor) -> torch.Tensor:
        return as_feature_maps(t, self.layout, self.prefix, self.grid)

    def _forward(self, module, inputs, output):
        self.output = output
        self.activations = self._maps(output.detach())
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.gradients = self._maps(grad.detach())

    def __enter__(self) -> "LayerHooks":
        self._handle = self.layer.register_forward_hook(self._forward)
        return self

    def __exit__(self, *exc) -> bool:
        self._handle.remove()
        self._handle = None
        self.output = None  # drop the graph
        return False


def feature_grid(model: nn.Module, layer: nn.Module, size: int) -> tuple[int, int]:
    """The (rows, columns) of ``layer``'s feature maps for square inputs of side ``size``: one forward pass
    of a blank image, without gradients (a vision transformer resizing its input to its own size gives its
    patch grid whatever ``size``). The model's train/eval flag is left as it was."""
    model = unwrap(model)
    param = next(model.parameters(), None)
    x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), LayerHooks(model, layer) as hooks:
            model(x)
    finally:
        model.train(was_training)
    return tuple(hooks.activations.shape[-2:])


@contextlib.contextmanager
def _explaining(model: nn.Module):
    """Eval mode and gradients on for the duration; the previous train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _as_targets(targets, batch: int, device: torch.device) -> torch.Tensor:
    """An int, a sequence or a tensor of class indices -> LongTensor [batch] on ``device``."""
    t = torch.as_tensor(targets, dtype=torch.long).reshape(-1).to(device)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{t.numel()} targets for a batch of {batch} images")
    return t


def _input(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``x`` that requires grad, so every activation downstream is in the graph even when
    the model's parameters are frozen."""
    return x.detach().clone().requires_grad_(True)


def _target_score(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return output.gather(1, targets[:, None]).sum()


def _weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c w[b, c] * A[b, c]) -> [B, h, w]."""
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, acts))


def gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradients;
    map = ReLU(sum_c w_c A_c). ``acts``, ``grads``: [B, C, h, w] -> [B, h, w]."""
    return _weighted_sum(grads.mean(dim=(2, 3)), acts)


def gradcampp(acts: torch.Tensor, grads: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential-score closed form).

    alpha_cij = g^2 / (2 g^2 + (sum_ij A_c) g^3 + eps) where g != 0, else 0; channel weight
    w_c = sum_ij alpha_cij ReLU(g_cij); map = ReLU(sum_c w_c A_c). ``eps`` = 1e-6 as in pytorch-grad-cam,
    so maps agree with that package.
    """
    g2 = grads.pow(2)
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g2 * grads + eps
    alpha = torch.where(grads != 0, g2 / denom, torch.zeros_like(g2))
    weights = (alpha * torch.relu(grads)).sum(dim=(2, 3))
    return _weighted_sum(weights, acts)


def relevance_weighted(acts: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Relevance-CAM's map from the layer's activations and the LRP relevance arriving at them:
    w_c = sum_ij R_cij; map = ReLU(sum_c w_c A_c)."""
    return _weighted_sum(relevance.sum(dim=(2, 3)), acts)


def activations_and_gradients(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets, amp: Amp = "off"
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of ``layer`` and the gradient of ``output[b, targets[b]]`` with respect to them, in
    float32 (the forward pass under ``placement.autocast(x.device, amp)``)."""
    model = unwrap(model)
    with _explaining(model), LayerHooks(model, layer) as hooks:
        with autocast(x.device, amp):
            out = model(_input(x))
        t = _as_targets(targets, out.shape[0], out.device)
        torch.autograd.grad(_target_score(out.float(), t), hooks.output)
    return hooks.activations.float(), hooks.gradients.float()


def lrp_composite(model: nn.Module):
    """The LRP rules of Relevance-CAM (Lee et al. 2021): z+ (alpha=1, beta=0) for convolutions, epsilon for
    the final linear layer, proportional (Norm) rule for average pooling and residual sums, activations
    passed through. Batch norms are merged into the preceding convolutions and ResNet's residual additions
    made explicit by the canonizer of the model's backbone family (``backbones.canonizer``). ConfigError
    (``check_method``) for a family no canonizer fits."""
    check_method(model, "relevancecam")
    return EpsilonPlus(canonizers=[backbones.canonizer(model)])


def working_methods(model: nn.Module) -> tuple[str, ...]:
    """The methods of ``METHODS`` that work on ``model``: all of them, less Relevance-CAM where no zennit
    canonizer fits its family (vision transformers, Swin, ConvNeXt, timm's and torchgeo's models)."""
    return tuple(m for m in METHODS if m != "relevancecam" or backbones.canonizer(model) is not None)


def check_method(model: nn.Module, method: str, key: str = "cities.saliency.method") -> None:
    """ConfigError naming ``key``, when ``method`` is unknown or does not work on ``model``'s family
    (Relevance-CAM without a canonizer), with the methods that do: for a stage to call before its first map."""
    works = working_methods(model)
    if method in works:
        return
    if method not in METHODS:
        raise ConfigError(key, f"unknown CAM method '{method}'", f"choose one of {', '.join(works)}")
    raise ConfigError(key, f"'{method}' needs a zennit canonizer for the model's LRP rules and none fits the "
                           f"{backbones.family_name(model)} family",
                      f"choose one of {', '.join(works)} (--set {key}={works[0]})")


def relevancecam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets, composite=None) -> torch.Tensor:
    """Relevance-CAM [B, h, w]: LRP from the target output down to ``layer``'s output (zennit, rules of
    ``lrp_composite`` unless another zennit composite is given); the initial relevance is the target
    output itself (one-hot times the score), so the relevance's sign does not depend on the score's.
    Channel weights are the spatial sums of the relevance at the layer; map = ReLU(sum_c w_c A_c).
    Designed for torchvision ResNets (``layer4``); models of no family get batch-norm merging only, and
    families no canonizer fits are refused (``check_method``)."""
    model = unwrap(model)
    composite = composite if composite is not None else lrp_composite(model)
    with _explaining(model), composite.context(model) as lrp_model, LayerHooks(lrp_model, layer) as hooks:
        out = lrp_model(_input(x))
        t = _as_targets(targets, out.shape[0], out.device)
        initial = torch.zeros_like(out).scatter(1, t[:, None], 1.0) * out
        torch.autograd.grad(out, hooks.output, grad_outputs=initial.detach())
    return relevance_weighted(hooks.activations, hooks.gradients)


def raw_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets, method: str = "gradcam",
             amp: Amp = "off") -> torch.Tensor:
    """Low-resolution maps [B, h, w] of ``method`` (one of ``METHODS``), before upsampling/normalising;
    ``amp`` (the gradient methods only) as in ``activations_and_gradients``."""
    if method == "relevancecam":
        return relevancecam(model, layer, x, targets)
    functions: dict[str, Callable] = {"gradcam": gradcam, "gradcampp": gradcampp}
    if method not in functions:
        raise ConfigError(f"unknown CAM method '{method}'; choose one of {', '.join(METHODS)}")
    return functions[method](*activations_and_gradients(model, layer, x, targets, amp))


def upsample(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W] by bilinear interpolation (pixel centres aligned, as image resizers do)."""
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def minmax_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of [B, H, W] to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny)
    out = (maps - lo[:, None, None]) / span[:, None, None]
    return torch.where((hi > lo)[:, None, None], out, torch.zeros_like(out))


def class_activation_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets,
                          method: str = "gradcam") -> np.ndarray:
    """Maps of ``method`` for a batch ``x`` [B, 3, H, W]: upsampled (bilinear) to H x W and min-max
    normalised to [0, 1] per image. float32 array [B, H, W]."""
    maps = upsample(raw_maps(model, layer, x, targets, method), x.shape[-2:])
    return minmax_normalise(maps).cpu().numpy().astype(np.float32)


class SiLUGuided(Hook):
    """Guided rule for SiLU, the analogue of guided backprop's ReLU rule: the gradient is passed, times
    the true local derivative SiLU'(x) = s(x) (1 + x (1 - s(x))), only where the unit's input is
    positive (x > 0, i.e. SiLU(x) > 0) and the incoming gradient is positive; elsewhere it is zero."""

    def forward(self, module, inputs, output):
        # SiLU(x) > 0 exactly where x > 0; the output is safe to keep even for in-place SiLU
        self.stored_tensors["active"] = output.detach() > 0

    def backward(self, module, grad_input, grad_output):
        keep = self.stored_tensors["active"] & (grad_output[0] > 0)
        return (grad_input[0] * keep,)


def guided_backprop(model: nn.Module, x: torch.Tensor, targets, amp: Amp = "off") -> np.ndarray:
    """Guided-backprop saliency [B, H, W] (float32): per pixel, the largest absolute input gradient over
    the colour channels, of ``output[b, targets[b]]``.

    Guidance (Springenberg et al. 2015) at every ReLU: the gradient passes only where both the unit's
    forward input and the incoming gradient are positive. At every SiLU (EfficientNet), the analogous rule:
    the gradient times SiLU'(x) passes only where x > 0 and the incoming gradient is positive. Other
    nonlinearities (e.g. the sigmoid gates of squeeze-excitation) keep their ordinary gradient. Implemented
    with zennit hooks registered for the call and removed afterwards. ``amp``: the forward pass under
    ``placement.autocast(x.device, amp)``; the gradient arrives at the float32 input.
    """
    model = unwrap(model)
    composite = GuidedBackprop(layer_map=[(nn.SiLU, SiLUGuided())])
    with _explaining(model), composite.context(model) as guided:
        xin = _input(x)
        with autocast(x.device, amp):
            out = guided(xin)
        t = _as_targets(targets, out.shape[0], out.device)
        (grad,) = torch.autograd.grad(_target_score(out.float(), t), xin)
    return grad.float().abs().amax(dim=1).cpu().numpy().astype(np.float32)


def clip_scale(maps: np.ndarray, percentile: float = 99.0) -> np.ndarray:
    """Clip each map of [B, H, W] at its own ``percentile`` and divide by that value -> [0, 1] (a map whose
    percentile is 0 becomes all zeros)."""
    maps = np.asarray(maps, dtype=np.float32)
    q = np.percentile(maps.reshape(len(maps), -1), percentile, axis=1).astype(np.float32)[:, None, None]
    safe = np.where(q > 0, q, 1.0)
    return np.where(q > 0, np.clip(maps, 0.0, q) / safe, 0.0).astype(np.float32)


def guided_gradcam(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets,
                   clip_percentile: float = 99.0, amp: Amp = "off") -> np.ndarray:
    """Guided Grad-CAM of the SES study, float32 [B, H, W] in [0, 1]: Grad-CAM upsampled to the input size
    (not normalised) times the guided-backprop saliency, clipped at its per-image ``clip_percentile``
    percentile and divided by that value. ``amp``: both passes under ``placement.autocast(x.device, amp)``
    (bf16 maps agree with float32 ones to the tolerance tests/test_amp.py states)."""
    cam = upsample(raw_maps(model, layer, x, targets, "gradcam", amp), x.shape[-2:]).cpu().numpy()
    return clip_scale(cam * guided_backprop(model, x, targets, amp), clip_percentile)
