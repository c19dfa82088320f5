"""What the trainers do to a batch once it is on the device: flips, ImageNet normalisation, per-image
min-max scaling, and a loader wrapper that applies them.

With a uint8 store (``urbanlens.core.store``) a loader worker only copies bytes; these functions turn
the uint8 batch [B, C, H, W] into the model's float32 input where the model runs. Each gives the same
float32 values as the per-item transform it replaces (the same operations in the same order).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


def random_flips(x: torch.Tensor, generator: torch.Generator | None = None,
                 rotate: bool = False, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Flip each image of a batch [B, C, H, W] horizontally and vertically, each with probability 1/2.

    ``rotate`` also swaps H and W with probability 1/2 (square images), which together with the two
    flips draws uniformly from all eight right-angle rotations and reflections. The draws come from
    ``generator`` (on the CPU), three per image, whatever the batch's device and dtype.

    ``share`` (rank, world size): ``x`` is that DDP rank's share of a global batch of B x world size
    images, every world size-th from the rank on (``loops.RankShare``). The draws are then those of the
    whole global batch (every rank's generator alike), and each image gets the flips it gets in one
    process.
    """
    rank, world = share
    flips = (torch.rand(3, x.shape[0] * world, generator=generator) < 0.5)[:, rank::world]
    x = x.clone()  # only the chosen images are rewritten
    h, v, t = (f.nonzero().flatten().to(x.device) for f in flips)
    if len(h):
        x[h] = x[h].flip(-1)
    if len(v):
        x[v] = x[v].flip(-2)
    if rotate and len(t):
        x[t] = x[t].transpose(-1, -2)
    return x


def imagenet_normalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 scaled to [0, 1] and normalised per channel: torchvision's
    ``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)``, on a whole batch."""
    return TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(mean), list(std))


def minmax_scale(x: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """uint8 (or float) [B, C, H, W] -> float32 in [0, 1] per image (the SES paper's scaling), after an
    antialiased resize to ``size`` x ``size`` when the images are of another size. A constant image
    becomes all zeros. Matches ``urbanlens.ses.data.load_cell_image`` item by item."""
    img = x.to(torch.float32, copy=True)  # a new tensor, scaled in place
    if size is not None and tuple(img.shape[-2:]) != (size, size):
        img = TF.resize(img, [size, size], antialias=True)
    lo, hi = img.flatten(1).aminmax(dim=1)
    span = hi - lo
    flat = span == 0
    img.sub_(lo.view(-1, 1, 1, 1)).div_(span.masked_fill(flat, 1).view(-1, 1, 1, 1))
    img[flat] = 0
    return img


class OnDevice:
    """A loader whose input batches are moved to ``device`` and mapped by ``fn`` (e.g. normalisation)
    as they are drawn; lengths, the sampler and every other attribute are the wrapped loader's."""

    def __init__(self, loader, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.loader, self.fn, self.device = loader, fn, device

    def __iter__(self):
        for x, y in self.loader:
            yield self.fn(x.to(self.device, non_blocking=True)), y

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)
