"""The income model with a frozen backbone (``ses.train.freeze=backbone``): the cells of a fit are embedded
once (the pooled features, the sigmoid unit's input; cached in <results>/ses/embeddings/<name>.pt with a
run stamp, reused by every fold whose backbone weights are the same, e.g. pretrained ones), then
``fitting.fit`` trains dropout and the sigmoid unit alone on them, with the fold's early stopping,
restarts and resumable state; the fold's checkpoints hold the whole model, as fine-tuning's do."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from ..core import frozen
from ..core.errors import DataError
from ..core.placement import Placement
from . import fitting, results
from .model import binomial_log_probs

# what decides the embeddings (with the cells' fingerprint, the backbone's weights and their preprocessing)
KEYS = ("ses.cell_px", "ses.max_nodata", "ses.model", "ses.train.amp")


def cache_path(ses_dir: str | Path, name: str) -> Path:
    """The embeddings of the cells of fit ``name`` (a city, or ``all_cities`` for a pooled scheme)."""
    return Path(ses_dir) / "embeddings" / f"{name}.pt"


def fit_inputs(cfg, model: nn.Module, data, split: dict, fit, ses_dir: Path, place: Placement):
    """(model to fit, training set, validation set, placement) for one fold: ``model`` and the fold's cells
    as they are under ``freeze: none``; else the model's head (``frozen.HeadOnly``) and the cells'
    embeddings (cached), in a placement without NHWC (embeddings are vectors)."""
    if not frozen.frozen(cfg.ses.train.freeze):
        return model, data.subset(split["train"]), data.subset(split["val"]), place
    model = place.model(model)
    layers = nn.Sequential(model.dropout, model.fc)
    frozen.freeze(model, layers)
    extra = {"backbone_sha256": frozen.weights_digest(model, layers),
             "preprocessing": frozen.HeadOnly(model, layers).preprocessing.to_dict(), "items": len(data)}
    batch = cfg.ses.train.batch_size // place.world_size

    def compute() -> dict:
        vectors, labels = frozen.embed(model, data, lambda shard: fitting.cell_loader(shard, batch, place.device,
                                                                                       workers=cfg.workers),
                                       model.fc.in_features, place, desc=f"{fit.name} embed" if place.main else None)
        return {"embeddings": vectors, "labels": labels}

    path = cache_path(ses_dir, fit.name)
    arrays, changes = frozen.cached(path, "efficientnet_training.py", cfg, KEYS,
                                    results.run_inputs(ses_dir, fit.name, fit.fit_df), extra, compute, place)
    if not np.array_equal(arrays["labels"], np.asarray(data.labels)):
        raise DataError(path, "its labels are not those of the cells in their order",
                        f"delete {path} and run efficientnet_training.py again")
    if place.main:
        print(f"[ses-train] {fit.city}: ses.train.freeze=backbone: {frozen.describe(path, len(data), changes)}")
    cells = frozen.Embeddings(arrays["embeddings"], data.labels)
    return (frozen.HeadOnly(model, layers, binomial_log_probs), cells.subset(split["train"]), cells.subset(split["val"]),
            place.using(channels_last=False))
