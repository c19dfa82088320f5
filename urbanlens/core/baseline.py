"""A simple baseline for any image classifier of the project: what a linear model reads from colour,
texture and random convolutional features, fitted and scored on exactly the CNN's folds.

Features of one image (uint8, C x H x W; images larger than ``MAX_SIDE`` are area-averaged down to it):

- colour and texture statistics (36): per channel the mean, the standard deviation and an 8-bin
  histogram, and the mean absolute horizontal and vertical gradient;
- random convolutional features in the manner of MOSAIKS (Rolf et al. 2021): ``n_filters`` k x k
  patches drawn from training images (seeded) are the filters, each centred and scaled to unit norm;
  an image's response r to each is passed through ``relu(r - b)`` and ``relu(-r - b)`` and averaged
  over the image (2 x ``n_filters`` features), b being the filter's mean |r| over the images it was
  drawn from (so each half counts strong responses of one sign).

The classifier is a multinomial logistic regression (scikit-learn) on standardised features whose
inverse regularisation C is chosen by an inner stratified cross-validation on the training part
only. It gives class log-probabilities, so the pipelines score it with their own metrics.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

MAX_SIDE = 128       # px: larger images are area-averaged down to this side first
N_FILTERS = 256
KERNEL = 3
HIST_BINS = 8
CHUNK = 2            # images convolved at once (their responses stay in cache)
C_GRID = np.logspace(-3, 1, 5)   # inverse regularisation tried by the inner CV (standardised features)
NAME = "logistic regression on colour/texture statistics and random convolutional features (MOSAIKS-style)"


def float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 or float [N, C, H, W] -> float32 in [0, 1], at most MAX_SIDE px a side."""
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    side = max(x.shape[-2:])
    if side > MAX_SIDE:
        x = F.adaptive_avg_pool2d(x, (round(x.shape[-2] * MAX_SIDE / side), round(x.shape[-1] * MAX_SIDE / side)))
    return x


def colour_statistics(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images -> [N, 10 C + 2]: per-channel mean, std, 8-bin histogram; grey mean |dx|, |dy|."""
    x = float_images(x)
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    bins = torch.clamp((flat * HIST_BINS).long(), 0, HIST_BINS - 1)
    hist = F.one_hot(bins, HIST_BINS).float().mean(2)                      # [N, C, bins]
    grey = x.mean(1)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean((1, 2))
    return torch.cat([flat.mean(2), flat.std(2), hist.reshape(n, -1), dx[:, None], dy[:, None]], 1)


@torch.no_grad()
def draw_filters(images: torch.Tensor, n_filters: int = N_FILTERS, kernel: int = KERNEL,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(filters, thresholds): ``n_filters`` random k x k patches of ``images`` (training images only),
    centred, unit norm, and each filter's mean absolute response over ``images``."""
    x = float_images(images)
    g = torch.Generator().manual_seed(int(seed))
    n, c, h, w = x.shape
    i = torch.randint(0, n, (n_filters,), generator=g)
    r = torch.randint(0, h - kernel + 1, (n_filters,), generator=g)
    s = torch.randint(0, w - kernel + 1, (n_filters,), generator=g)
    patches = torch.stack([x[a, :, b:b + kernel, d:d + kernel] for a, b, d in zip(i.tolist(), r.tolist(), s.tolist())])
    patches = patches - patches.mean((1, 2, 3), keepdim=True)
    norm = patches.flatten(1).norm(dim=1).clamp_min(1e-3)
    # a flat patch would be all zeros: give it a random direction instead
    flat = patches.flatten(1).norm(dim=1) < 1e-3
    if flat.any():
        patches[flat] = torch.randn(int(flat.sum()), c, kernel, kernel, generator=g)
        norm[flat] = patches[flat].flatten(1).norm(dim=1)
    filters = patches / norm[:, None, None, None]
    thresholds = torch.cat([F.conv2d(b, filters).abs().mean((2, 3)) for b in x.split(CHUNK)]).mean(0)
    return filters, thresholds


def random_features(x: torch.Tensor, filters: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] images -> [N, 2 F]: mean-pooled relu(r - b) and relu(-r - b) of each filter."""
    b, out = thresholds[None, :, None, None], []
    for chunk in float_images(x).split(CHUNK):  # the responses of a few images at a time fit in cache
        r = F.conv2d(chunk, filters)
        out.append(torch.cat([F.relu(r - b).mean((2, 3)), F.relu(-r - b).mean((2, 3))], 1))
    return torch.cat(out)


@torch.no_grad()
def features(batches: Iterable[torch.Tensor], filters: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Baseline features of every image in ``batches`` (uint8 [B, C, H, W] tensors), in order;
    ``filters`` as ``draw_filters`` returns them."""
    out = [torch.cat([colour_statistics(b), random_features(b, *filters)], 1) for b in batches]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))


def fit_predict(x_train, y_train, x_test, classes: int, seed: int = 0) -> np.ndarray:
    """Class log-probabilities [len(x_test), classes] of a logistic regression fitted on the training
    part (C by an inner stratified CV there); a class absent from training gets log-probability -inf."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y_train).astype(int)
    present, counts = np.unique(y, return_counts=True)
    out = np.full((len(x_test), classes), -np.inf)
    if len(x_test) == 0:
        return out
    if len(present) < 2:  # nothing to learn: the only class seen
        out[:, present] = 0.0
        return out
    inner = int(min(3, counts.min()))
    clf = (LogisticRegressionCV(Cs=C_GRID, cv=inner, max_iter=300, tol=1e-3, random_state=seed) if inner >= 2
           else LogisticRegression(C=1.0, max_iter=300, tol=1e-3))
    model = make_pipeline(StandardScaler(), clf)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on tiny folds: the score says how it did
        model.fit(np.asarray(x_train), y)
        lp = model.predict_log_proba(np.asarray(x_test))
    out[:, model.classes_] = lp
    return out
