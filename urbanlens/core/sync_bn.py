"""Batch norm whose training statistics are those of the global batch under DDP.

Each DDP rank sees its share of a global batch; plain batch norm would normalise with the share's mean
and variance, so two ranks train another model than one process with the same global batch. Under
torchrun every batch-norm layer is therefore synchronised (``synchronise``): torch's ``SyncBatchNorm``
on GPUs, and on other devices (gloo on the CPU, where torch's kernel is missing) ``SharedBatchNorm``,
which sums the per-channel moments over the ranks with the differentiable all-reduce, so gradients
reach every rank's inputs as they do in one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

GPU_TYPES = ("cuda", "xpu", "hpu")  # where torch's own SyncBatchNorm runs


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients (every
    rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x)


class SharedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the inputs of every rank of the default process group (training mode); in eval
    mode, or without a process group of two or more ranks, exactly ``nn.BatchNorm2d``. Its state_dict
    is a ``BatchNorm2d``'s, so checkpoints load into the plain model."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SharedBatchNorm: expected an input of 2 or more dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        shared = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not shared:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1, *[1] * (x.dim() - 2))
        count = x.new_tensor([float(x.numel() // x.size(1))])  # values per channel on this rank
        total = sum_over_ranks(torch.cat([x.sum(dims), count]))
        n = float(total[-1].detach())
        mean = total[:-1] / n
        centred = x - mean.reshape(shape)
        var = sum_over_ranks((centred * centred).sum(dims)) / n  # biased: what batch norm normalises with
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), n)
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As ``F.batch_norm`` in training mode: momentum (None: the cumulative average) on the mean and
        the unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = var * (n / max(n - 1, 1.0))
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def _shared_copy(bn: nn.modules.batchnorm._BatchNorm) -> SharedBatchNorm:
    new = SharedBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same parameters: an optimizer made before still steps them
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def _replace(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, (SharedBatchNorm,
                                                                                           nn.SyncBatchNorm)):
            setattr(module, name, _shared_copy(child))
        else:
            _replace(child)
    return module


def synchronise(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every batch-norm layer computing global-batch statistics over the process group:
    ``nn.SyncBatchNorm`` on a GPU, ``SharedBatchNorm`` elsewhere. Layers are replaced inside ``model``
    (itself returned), keeping their parameters and buffers. A batch-norm module itself is not replaced."""
    if device.type in GPU_TYPES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace(model)


def uses_shared_stats(model: nn.Module) -> bool:
    """Whether every batch-norm layer of ``model`` is synchronised over the ranks."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(isinstance(m, (SharedBatchNorm, nn.SyncBatchNorm)) for m in bns)
