"""The city classifier with a frozen backbone (``cities.train.freeze=backbone``): the train and validation
patches are embedded once (cached in <results>/cities/embeddings/ with a run stamp, reused while the
backbone, its weights, the input size, the precision and the patches are the same), then ``training.run_epochs`` trains
the final linear layer alone on them, with the run's optimiser, schedule, sampler and epoch choice, and
writes best.pt / last.pt of the whole model as fine-tuning does."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from torch import nn

from ..core import backbones, batch_ops, frozen, loops
from ..core.errors import DataError
from ..core.placement import Placement
from . import data, training

CACHE = Path("embeddings") / "embeddings.pt"  # under <results>/cities
# what decides the embeddings (with the patches' fingerprint, the backbone's weights and their preprocessing)
KEYS = ("paths.data", "cities.patch", "cities.split", "cities.model", "cities.train.amp")


def unaugmented(dataset, cfg):
    """``dataset`` as evaluation reads it: a patch dataset with the evaluation transforms (no flips); a
    store as it is (its batches are finished by ``data.eval_batches``)."""
    if cfg.store:
        return dataset
    view = copy.copy(dataset)
    view.transform = data.transforms(cfg.cities.model.input_size, train=False)
    return view


def embed_splits(cfg, model: nn.Module, train_set, val_set, place: Placement) -> dict:
    """Embeddings and labels of the train and validation patches, in dataset order, on every rank."""
    batch = loops.rank_batch(cfg.cities.train.batch_size, place.world_size, "cities.train.batch_size")

    def loader(shard):
        raw = loops.make_loader(shard, batch, cfg.workers, place.device)
        return batch_ops.OnDevice(raw, data.eval_batches, place.device) if cfg.store else raw

    width, out = backbones.head(model).in_features, {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        out[name], out[f"{name}_labels"] = frozen.embed(model, unaugmented(dataset, cfg), loader, width, place,
                                                        desc=f"[train] embed {name}" if place.main else None)
    return out


def head_training(cfg, model: nn.Module, train_set, val_set, sampler, out: Path, place: Placement):
    """(the head as the model to train, its train loader, its val loader, the placement to train it in):
    ``model`` frozen but its final layer; the embeddings from the cache or computed now; the train loader
    draws with the run's ``sampler`` (same steps per epoch as fine-tuning), the val loader this rank's shard."""
    layer = backbones.head(model)
    frozen.freeze(model, layer)
    extra = {"backbone_sha256": frozen.weights_digest(model, layer),
             "preprocessing": frozen.HeadOnly(model, layer).preprocessing.to_dict(),
             **training.patch_settings(cfg.paths.data)}
    arrays, changes = frozen.cached(out / CACHE, "train_classification.py", cfg, KEYS,
                                    training.run_inputs(cfg.paths.data), extra,
                                    lambda: embed_splits(cfg, model, train_set, val_set, place), place)
    if place.main:
        print(f"[train] cities.train.freeze=backbone: "
              f"{frozen.describe(out / CACHE, len(arrays['train']) + len(arrays['val']), changes)}")
    train, val = (frozen.Embeddings(arrays[s], arrays[f"{s}_labels"]) for s in ("train", "val"))
    if not np.array_equal(arrays["train_labels"], np.asarray(train_set.labels)):
        raise DataError(out / CACHE, "its labels are not those of the training patches in their order",
                        f"delete {out / CACHE.parent} and run train_classification.py again")
    batch = loops.rank_batch(cfg.cities.train.batch_size, place.world_size, "cities.train.batch_size")
    train_loader = loops.make_loader(train, batch, 0, place.device, sampler)
    val_loader = loops.make_loader(loops.shard(val, place.rank, place.world_size), batch, 0, place.device)
    return frozen.HeadOnly(model, layer), train_loader, val_loader, place.using(channels_last=False)
