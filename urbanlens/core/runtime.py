"""Seeds and checkpoints shared by both training scripts (where a run computes: ``placement``)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from . import preprocess
from .config import upgrade
from .errors import CheckpointError
from .files import atomic_path, os_problem
from .placement import unwrap


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg, optimizer=None, epoch: int | None = None,
                    **extra) -> Path:
    """A ``state_dict`` checkpoint with the config it was trained with and what its weights expect of their
    input (``preprocessing``: normalisation, band order, input size; never a pickled model)."""
    state = {"model": unwrap(model).state_dict(), "config": cfg.to_dict() if hasattr(cfg, "to_dict") else cfg,
             "epoch": epoch, "preprocessing": preprocess.of(unwrap(model)).to_dict(), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location="cpu", writer: str = "") -> dict:
    """A ``save_checkpoint`` file; a missing, unreadable or foreign file is one ``CheckpointError`` line
    naming it and the training stage (``writer``, a script name) that writes it again."""
    path = Path(path)
    stage = f"the training stage ({writer})" if writer else "the training stage"
    if not path.is_file():
        if path.is_dir():
            raise CheckpointError(path, "is a folder, not a checkpoint", f"remove it and run {stage} again")
        raise CheckpointError(f"checkpoint {path} not found; run {stage} first")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated file, not a torch file, pickled classes gone...
        refused = os_problem(e, path)
        if refused is not None:
            raise refused from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); "
                 f"delete it and run {stage} again")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no state_dict with its config); "
                 f"use the best.pt / last.pt {stage} writes")
    if isinstance(state["config"], dict):  # trained under an older config layout: read in today's
        state["config"] = upgrade(state["config"])
    return state


def load_weights(model: torch.nn.Module, state_dict: dict, path: str | Path, arch: str = "") -> torch.nn.Module:
    """``model.load_state_dict(state_dict)``; weights of another architecture or number of classes
    exit with one line naming the checkpoint ``path`` and the first mismatches."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        own = model.state_dict()
        missing = [k for k in own if k not in state_dict]
        extra = [k for k in state_dict if k not in own]
        shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and hasattr(state_dict[k], "shape") and state_dict[k].shape != v.shape]
        found = "; ".join(filter(None, [
            f"{len(missing)} tensor(s) missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]))
        raise CheckpointError(f"{path}: its weights do not fit {arch or type(model).__name__} ({found}); the file comes "
                 "from another backbone or number of classes: retrain, or point paths.results at the run that wrote it")
    return model
