"""The project's simple baseline (urbanlens/core/baseline.py) on the city patches: fitted on the
training patches the CNN trained on (at most ``max_train`` of them, a seeded sample stratified by city;
its random filters drawn from these only) and scored on the patches the CNN is tested on, in their order.

Patches are decoded at no more than the baseline's working side (``core.baseline.MAX_SIDE``) and
resized to one square side, so patches of any size give features of the same meaning.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..core import baseline
from . import data

BATCH = 64           # patches decoded and featurised at once
FILTER_PATCHES = 500  # training patches the random filters are drawn from (and thresholded over)


def training_sample(rows: pd.DataFrame, max_train: int, seed: int) -> pd.DataFrame:
    """``rows`` when at most ``max_train``, else a seeded sample of ``max_train`` of them that keeps each
    city's share (scikit-learn's stratified split), in manifest order."""
    if len(rows) <= max_train:
        return rows
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(rows, train_size=max_train, stratify=rows["iata"], random_state=seed)
    return keep.sort_index()


def patch_batches(paths: Sequence[str | Path], side: int, desc: str | None = None) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, side, side] batches of the patch files, in order (a bar when ``desc`` is given)."""
    resize = data.resize(side)
    for i in tqdm(range(0, len(paths), BATCH), desc=desc, unit="batch", disable=desc is None):
        yield torch.stack([resize(data.read_image(p, side)) for p in paths[i:i + BATCH]])


def fit_score(train_rows: pd.DataFrame, test_rows: pd.DataFrame, patches_dir: str | Path, classes: Sequence[str],
              max_train: int, seed: int, progress: bool = True) -> tuple[np.ndarray, dict]:
    """(class log-probabilities of the baseline on ``test_rows`` [n, classes], ``{"name", "train_patches",
    "seconds"}``); rows are manifest rows (``path``, ``iata``)."""
    t0 = time.time()
    index = {c: i for i, c in enumerate(classes)}
    sample = training_sample(train_rows, max_train, seed)
    side = int(min(baseline.MAX_SIDE, sample["size"].max(), test_rows["size"].max()))
    files = lambda rows: [Path(patches_dir) / p for p in rows["path"]]  # noqa: E731
    drawn = sample.sample(min(FILTER_PATCHES, len(sample)), random_state=seed)
    filters = baseline.draw_filters(torch.cat(list(patch_batches(files(drawn), side))), seed=seed)
    say = (lambda what: f"[test] baseline {what}") if progress else (lambda what: None)
    x_train = baseline.features(patch_batches(files(sample), side, say("train features")), filters)
    x_test = baseline.features(patch_batches(files(test_rows), side, say("test features")), filters)
    log_probs = baseline.fit_predict(x_train, sample["iata"].map(index).to_numpy(), x_test, len(classes), seed)
    return log_probs, {"name": baseline.NAME, "train_patches": int(len(sample)), "seconds": round(time.time() - t0, 1)}
