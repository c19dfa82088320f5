"""Where and how a stage computes: the device, mixed precision, memory layout and the DDP process group.

A stage makes one ``Placement`` at its start (``Placement.for_stage``: torchrun's process group when
launched by it, the device of ``device``, the amp and layout settings of its section) and hands it to
the loops, the loaders and the maps. ``amp`` is always the config value (auto | bf16 | fp16 | off):
``autocast_dtype`` alone decides what it means on a device, ``uses_channels_last`` whether NHWC applies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

from . import sync_bn
from .errors import ConfigError, DeviceError
from .schema import AMP_CHOICES


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run computes (``device``; ``rank`` of ``world_size`` processes) and how (``amp``: the
    config value; ``channels_last``: NHWC asked for, applied where ``uses_channels_last`` says)."""

    device: torch.device
    amp: str = "off"
    channels_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))
        object.__setattr__(self, "amp", amp_choice(self.amp))

    @classmethod
    def for_stage(cls, device: str = "auto", amp: "Amp" = "off", channels_last: bool = False) -> "Placement":
        """The placement of a stage: joins torchrun's process group when launched by it, then picks the
        device (``select_device``: this rank's GPU under torchrun)."""
        rank, world = setup_distributed()
        return cls(select_device(device), amp_choice(amp), channels_last, rank, world)

    def using(self, amp: "Amp | None" = None, channels_last: bool | None = None) -> "Placement":
        """The same place with another precision or layout (e.g. the maps' ``ses.cams.amp``)."""
        return dataclasses.replace(self, amp=self.amp if amp is None else amp_choice(amp),
                                   channels_last=self.channels_last if channels_last is None else channels_last)

    @property
    def main(self) -> bool:
        """Whether this is the process that writes (rank 0)."""
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.device, self.amp)

    @property
    def nhwc(self) -> bool:
        return uses_channels_last(self.device, self.channels_last, self.amp)

    def autocast(self):
        return autocast(self.device, self.amp)

    def scaler(self) -> torch.amp.GradScaler:
        return grad_scaler(self.device, self.amp)

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` on the device in this placement's memory layout (``to_device``)."""
        return to_device(model, self.device, self.channels_last, self.amp)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch on the device in this placement's memory layout (``batch_to_device``)."""
        return batch_to_device(x, self.device, self.channels_last, self.amp)

    def describe(self) -> str:
        return f"{self.device}" + (f" x{self.world_size}" if self.world_size > 1 else "")


# ------------------------------------------------------------------ mixed precision and memory layout
Amp = str | bool  # a choice of AMP_CHOICES; the booleans of older configs read True -> auto, False -> off


def amp_choice(amp: Amp) -> str:
    """``amp`` as one of ``AMP_CHOICES`` (True -> 'auto', False -> 'off'); ConfigError for anything else."""
    if isinstance(amp, bool):
        return "auto" if amp else "off"
    if amp not in AMP_CHOICES:
        raise ConfigError(f"amp: '{amp}' is not a mixed-precision choice; use one of {', '.join(AMP_CHOICES)}")
    return amp


def autocast_dtype(device: torch.device, amp: Amp) -> torch.dtype | None:
    """The dtype autocast runs in for the config value ``amp`` on ``device``; None = full float32, no autocast.

    ``auto``: float16 on CUDA, None on CPU; ``bf16``: bfloat16 on any device; ``fp16``: float16, on CUDA
    only (on CPU a ConfigError naming bf16); ``off``: None."""
    amp = amp_choice(amp)
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"amp fp16 on {device.type}: float16 autocast is for CUDA devices; "
                          "set the amp key (cities.train.amp, ses.train.amp, ses.cams.amp) to bf16 or off on this device")
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, amp: Amp):
    """The autocast context of ``autocast_dtype(device, amp)``; a no-op context when that is None."""
    dtype = autocast_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: Amp) -> torch.amp.GradScaler:
    """A loss scaler, enabled exactly when the forward pass runs in float16 (disabled it is a pass-through;
    bfloat16 has float32's range and needs none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, amp) == torch.float16)


def uses_channels_last(device: torch.device, channels_last: bool, amp: Amp = "off") -> bool:
    """Whether NHWC memory layout applies: when ``channels_last`` is asked for, on CUDA always, on another
    device only under autocast (``amp`` bf16 on CPU: the layout its bfloat16 kernels run fastest in; float32
    CPU runs keep NCHW)."""
    return channels_last and (device.type == "cuda" or autocast_dtype(device, amp) is not None)


def to_device(model: nn.Module, device: torch.device, channels_last: bool = False, amp: Amp = "off") -> nn.Module:
    """Move ``model`` to ``device``; NHWC memory layout when ``uses_channels_last(device, channels_last, amp)``."""
    model = model.to(device)
    if uses_channels_last(device, channels_last, amp):
        model = model.to(memory_format=torch.channels_last)
    return model


def batch_to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False,
                    amp: Amp = "off") -> torch.Tensor:
    """An input batch on ``device``, NHWC when ``uses_channels_last(device, channels_last, amp)`` (as
    ``to_device`` lays out the model)."""
    x = x.to(device, non_blocking=True)
    if uses_channels_last(device, channels_last, amp):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------ devices and DDP
def select_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. ``cuda`` without a GPU exits with a clear line."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("config asks for device 'cuda' but no CUDA GPU is visible; "
                 "use --set device=cpu (or device=auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"config asks for device '{name}' but this machine has {torch.cuda.device_count()} "
                          "CUDA GPU(s), numbered from 0; use --set device=cuda (the first) or another index")
    if name == "cpu":
        torch.set_flush_denormal(True)  # near-zero floats (untrained or tiny gradients) are 10x slower otherwise
    if name.startswith("cuda") and dist.is_available() and dist.is_initialized():
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def setup_distributed() -> tuple[int, int]:
    """Initialise torch.distributed when launched by ``torchrun``; return (rank, world_size)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_distributed() -> bool:
    """Whether torch.distributed is initialised (launched by ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel when torch.distributed is initialised (``torchrun``), else ``model``. With
    two or more ranks the batch-norm layers of ``model`` are synchronised first (``sync_bn.synchronise``:
    statistics of the global batch), so the ranks train the model one process trains on that batch."""
    if not is_distributed():
        return model
    if dist.get_world_size() > 1:
        sync_bn.synchronise(model, device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper; ``model`` itself otherwise."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
