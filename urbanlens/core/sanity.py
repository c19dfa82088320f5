"""Sanity checks of saliency maps (CAMs of the SES study, the cities' saliency maps), shared by both pipelines.

Model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps"): the maps of the trained
model against those of the same architecture with re-initialised weights, as the Spearman rank
correlation per map. Maps that explain what the model learned change when the learning is erased; the
check passes when the median correlation is below ``RHO_MAX``. Guided backprop alone is known to survive
randomisation (it reproduces image edges whatever the weights), so guided Grad-CAM can fail it.

Deletion faithfulness (Petsiuk et al. 2018, RISE): the image's pixels are replaced by a blurred copy in
the order the map ranks them (deletion), or restored from the blurred copy in that order (insertion);
the target class probability is recorded at ``STEPS`` equal shares and its curve integrated over [0, 1]
(trapezoid, scipy). The same is done for ``RANDOM_ORDERS`` random pixel orders. A map's deletion gain is
the random orders' mean deletion area minus the map's (positive: the map's pixels matter more than random
ones); its insertion gain is the map's insertion area minus the random orders' mean. The maps beat random
when the deletion gains are positive by a one-sided Wilcoxon signed-rank test at ``ALPHA``.

Written by hand in a few lines of torch rather than through ``quantus`` (a large dependency tree for two
metrics) or pytorch-grad-cam's metrics (deletion on the input without a blurred baseline, one order at a
time, no random-order reference).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import integrate, stats
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from .placement import Amp, autocast, unwrap

RHO_MAX = 0.5         # the randomisation check passes when the median Spearman rho is below this
ALPHA = 0.05          # one-sided level of the test that deletion gains are positive
STEPS = 10            # shares of pixels deleted/inserted (curve points: STEPS + 1)
RANDOM_ORDERS = 2     # random pixel orders per image, the reference of the deletion and insertion areas

COLUMNS = ["sanity_maps", "sanity_randomisation_rho", "sanity_deletion_gain", "sanity_insertion_gain",
           "sanity_deletion_p", "maps_pass_sanity"]


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (same architecture, device and eval/train flag) with every weight re-initialised:
    each module's own ``reset_parameters`` (PyTorch's default initialisation; batch norms back to unit
    scale, zero shift and fresh running statistics), N(0, 0.02) for a parameter no such method covers.
    Seeded, independent of the global random state; ``model`` is left untouched."""
    clone = copy.deepcopy(unwrap(model))
    device = next(clone.parameters()).device
    clone.to("cpu")
    covered = set()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in clone.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                covered.update(id(p) for p in module.parameters(recurse=False))
        for p in clone.parameters():
            if id(p) not in covered:
                nn.init.normal_(p, std=0.02)
    return clone.to(device)


def rank_correlations(maps: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Spearman rho between the trained model's ``maps[i]`` and the randomised model's ``other[i]`` (both
    [N, H, W]) for each i -> [N]. Where the trained map is constant (a zero Grad-CAM) the correlation is
    undefined: NaN, left out of the median (counting it would let dead maps pass). Where only the random
    model's map is constant (common for one class of a random model), the trained map's ranking is not
    reproduced at all: 0."""
    a = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    b = np.asarray(other, dtype=np.float64).reshape(len(other), -1)
    out = np.full(len(a), np.nan)
    for i, (u, v) in enumerate(zip(a, b)):
        if np.ptp(u) > 0:
            out[i] = stats.spearmanr(u, v).statistic if np.ptp(v) > 0 else 0.0
    return out


def blurred(x: torch.Tensor) -> torch.Tensor:
    """The baseline image of deletion and insertion: ``x`` [B, 3, H, W] blurred (Gaussian, sigma a tenth of
    the shorter side, so no object survives it)."""
    sigma = max(1.0, min(x.shape[-2:]) / 10)
    k = min(2 * math.ceil(2 * sigma) + 1, 2 * (min(x.shape[-2:]) // 2) - 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def _probabilities(model: nn.Module, x: torch.Tensor, amp: Amp) -> torch.Tensor:
    """Class probabilities [B, C] (softmax of the output: of logits, or of log-probabilities, which it
    leaves as they are)."""
    with torch.no_grad(), autocast(x.device, amp):
        return torch.softmax(model(x).float(), dim=1)


def curves(model: nn.Module, x: torch.Tensor, orders: torch.Tensor, insert: bool, steps: int = STEPS,
           amp: Amp = "off") -> torch.Tensor:
    """Class probabilities [B, steps + 1, C] of ``x`` [B, 3, H, W] as its pixels are deleted (replaced by
    ``blurred(x)``) or, with ``insert``, restored into the blurred image, in ``orders`` [B, H*W] (pixel
    indices, first the most salient): at step s the first round(s * H*W / steps) pixels of the order."""
    b, _, h, w = x.shape
    base = blurred(x)
    rank = torch.empty_like(orders)
    rank.scatter_(1, orders, torch.arange(h * w, device=orders.device).expand(b, -1))
    rank = rank.reshape(b, 1, h, w).to(x.device)
    out = []
    for s in range(steps + 1):
        chosen = rank < round(s * h * w / steps)
        out.append(_probabilities(model, torch.where(chosen, x, base) if insert else torch.where(chosen, base, x), amp))
    return torch.stack(out, dim=1).cpu()


def map_orders(maps: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Pixel indices [N, H*W] of each map from the highest value to the lowest, ties in random order."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    jitter = rng.random(flat.shape)
    return torch.from_numpy(np.lexsort((jitter, -flat), axis=1).copy())


def area(curve: torch.Tensor) -> np.ndarray:
    """Area under curves [..., steps + 1] sampled at equal shares of [0, 1]."""
    c = np.asarray(curve, dtype=np.float64)
    return integrate.trapezoid(c, dx=1.0 / (c.shape[-1] - 1), axis=-1)


def faithfulness(model: nn.Module, x: torch.Tensor, maps: np.ndarray, targets: np.ndarray, seed: int = 0,
                 steps: int = STEPS, random_orders: int = RANDOM_ORDERS, amp: Amp = "off"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion gains [M] of ``maps`` [M, H, W] of images ``x`` [B, 3, H, W]: the maps are
    ``K = M / B`` per image (map j belongs to image j // K, as ``maps.reshape(B, K, H, W)``), each of
    class ``targets[j]``. Random orders are drawn per image (``seed``) and shared by its K maps."""
    b, _, h, w = x.shape
    k = len(maps) // b
    rng = np.random.default_rng(seed)
    image = np.repeat(np.arange(b), k)
    targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    gains = []
    for insert in (False, True):
        own = curves(model, x[image], map_orders(maps, rng), insert, steps, amp)
        own = area(own[torch.arange(len(maps)), :, targets])
        ref = []
        for _ in range(random_orders):
            orders = torch.from_numpy(np.argsort(rng.random((b, h * w)), axis=1))
            c = curves(model, x, orders, insert, steps, amp)[image]
            ref.append(area(c[torch.arange(len(maps)), :, targets]))
        ref = np.mean(ref, axis=0)
        gains.append(own - ref if insert else ref - own)
    return gains[0], gains[1]


@dataclass
class Sanity:
    maps: int                 # maps checked (images x classes)
    rho: float                # median Spearman rho, trained vs randomised model, over the non-constant trained maps
    deletion_gain: float      # median deletion gain over the maps (positive: better than random)
    insertion_gain: float     # median insertion gain
    deletion_p: float         # one-sided Wilcoxon p-value that the deletion gains are positive
    passes_randomisation: bool
    beats_random: bool

    @property
    def passes(self) -> bool:
        return self.passes_randomisation and self.beats_random

    @property
    def reason(self) -> str:
        """Empty when the maps pass, else why they do not (one clause per failed check)."""
        why = []
        if not self.passes_randomisation:
            why.append(f"its maps fail the model-randomisation check (median Spearman rho {self.rho:.2f} between "
                       f"the trained and a randomly initialised model's maps, not below {RHO_MAX})" if np.isfinite(self.rho)
                       else "its maps' model-randomisation check is undefined (every trained map is constant)")
        if not self.beats_random:
            why.append(f"its maps do not beat random pixel orders at deletion (median gain {self.deletion_gain:+.3f}, "
                       f"one-sided Wilcoxon p = {self.deletion_p:.2g}, {self.maps} maps)")
        return "; ".join(why)

    def row(self) -> dict:
        """The values of ``COLUMNS``."""
        return dict(zip(COLUMNS, (self.maps, self.rho, self.deletion_gain, self.insertion_gain, self.deletion_p,
                                  self.passes)))


def summarise(rho: np.ndarray, deletion_gain: np.ndarray, insertion_gain: np.ndarray) -> Sanity:
    """The verdict over per-map values (rho, deletion and insertion gains, one per map)."""
    rho, dg, ig = (np.asarray(v, dtype=np.float64) for v in (rho, deletion_gain, insertion_gain))
    p = float(stats.wilcoxon(dg, alternative="greater").pvalue) if np.any(dg != 0) else 1.0
    med = float(np.nanmedian(rho)) if np.isfinite(rho).any() else float("nan")  # over the maps it is defined for
    return Sanity(len(rho), med, float(np.median(dg)) if len(dg) else float("nan"),
                  float(np.median(ig)) if len(ig) else float("nan"), p, bool(med < RHO_MAX), bool(p < ALPHA))


def unchecked_row() -> dict:
    """``COLUMNS`` of maps not checked (the check turned off): no verdict either way."""
    return dict(zip(COLUMNS, (0, float("nan"), float("nan"), float("nan"), float("nan"), None)))


def annotate(table: pd.DataFrame, verdict: Sanity | None) -> pd.DataFrame:
    """``table`` with ``COLUMNS`` (the same on every row) appended: the verdict's, or empty ones when
    the maps were not checked."""
    out = table.copy()
    for col, value in (verdict.row() if verdict is not None else unchecked_row()).items():
        out[col] = pd.Series([value] * len(out), index=out.index, dtype=object if col == "maps_pass_sanity" else None)
    return out


def sample(n_items: int, n: int, seed: int) -> np.ndarray:
    """``min(n, n_items)`` distinct item positions drawn with ``seed``, sorted."""
    return np.sort(np.random.default_rng(seed).choice(n_items, size=min(n, n_items), replace=False))
