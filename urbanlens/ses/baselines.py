"""The shared simple baseline (urbanlens.core.baseline) on a city's cells, under exactly the CNN's folds.

In each fold the baseline's filters are drawn from, and its classifier fitted on, the fold's training
and validation cells only (seeded by the fold's seed), and it predicts the fold's test cells; the
held-out predictions of all folds are pooled as the CNN's are. It reads the cell images the CNN reads:
the extracted uint8 images at ``ses.cell_px``.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from ..core import baseline
from .data import read_cell_pixels
from .metrics import predictions_frame
from .model import N_CLASSES

NAME = baseline.NAME
BATCH = 64  # images per feature batch


def cell_images(paths) -> torch.Tensor:
    """The cells' images as float [N, 3, h, w] in [0, 1], area-averaged to at most the baseline's
    ``MAX_SIDE`` a side as it does itself (so a city's images fit in memory once)."""
    out = []
    for i in range(0, len(paths), BATCH):
        chunk = [read_cell_pixels(p).transpose(2, 0, 1) for p in paths[i:i + BATCH]]
        out.append(baseline.float_images(torch.from_numpy(np.ascontiguousarray(np.stack(chunk)))))
    return torch.cat(out) if out else torch.zeros((0, 3, 1, 1))


def fold_log_probs(images: torch.Tensor, labels, split: dict, seed: int) -> np.ndarray:
    """Class log-probabilities [len(split["test"]), 5] of the baseline fitted on the fold's training and
    validation cells (filters drawn from them, seeded by ``seed``) for the fold's test cells."""
    labels = np.asarray(labels, dtype=int)
    fit = np.sort(np.concatenate([split["train"], split["val"]])).astype(int)
    test = np.asarray(split["test"], dtype=int)
    filters = baseline.draw_filters(images[torch.as_tensor(fit)], seed=seed)
    x_fit = baseline.features(images[torch.as_tensor(fit)].split(BATCH), filters)
    x_test = baseline.features(images[torch.as_tensor(test)].split(BATCH), filters)
    return baseline.fit_predict(x_fit, labels[fit], x_test, N_CLASSES, seed=seed)


def held_out_predictions(images: torch.Tensor, cell_ids, labels, splits: list[dict], seeds) -> pd.DataFrame:
    """The baseline's held-out predictions of every fold, pooled and sorted by cell id, in the columns
    of predictions.csv."""
    cell_ids, labels = np.asarray(list(cell_ids), dtype=object), np.asarray(labels, dtype=int)
    frames = [predictions_frame(cell_ids[split["test"]], k, labels[split["test"]],
                                fold_log_probs(images, labels, split, seed))
              for k, (split, seed) in enumerate(zip(splits, seeds))]
    return pd.concat(frames).sort_values("cell_id").reset_index(drop=True)


def city_baseline(paths, cell_ids, labels, splits: list[dict], seeds) -> tuple[pd.DataFrame, float, float]:
    """(held-out predictions, seconds taken, CPU seconds taken by this process) of the baseline on one
    city's folds, images read included."""
    start, cpu = time.perf_counter(), time.process_time()
    preds = held_out_predictions(cell_images(list(paths)), cell_ids, labels, splits, seeds)
    return preds, time.perf_counter() - start, time.process_time() - cpu
