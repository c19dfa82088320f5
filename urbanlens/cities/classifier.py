"""The trained city classifier: rebuilt from its checkpoint (architecture, input size and class order as
trained), checked against the patches it was trained on."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core import runtime, schema
from ..core.backbone_table import BACKBONES, SPEC_FORMS
from ..core.backbones import build_backbone
from ..core.errors import CheckpointError
from ..core.placement import Placement
from . import training

BACKBONE_FORMS = (*BACKBONES, *SPEC_FORMS)


def classifier_from_checkpoint(state: dict, path: str | Path) -> tuple[nn.Module, dict, list[str]]:
    """The city classifier of a training checkpoint -> (model on CPU, its ``model`` config, class names).

    The architecture, input size and class order come from the checkpoint, not from the current config.
    A checkpoint of another stage, or whose weights do not fit the backbone and classes it records, exits
    with one line naming ``path``.
    """
    trained, classes = state.get("config", {}).get("cities", {}).get("model") or {}, state.get("classes")
    if not classes or not schema.matches(BACKBONE_FORMS, trained.get("backbone")) or "input_size" not in trained:
        raise CheckpointError(f"{path}: not a city-classifier checkpoint (no classes or cities.model.backbone recorded); "
                 "use the best.pt that train_classification.py writes")
    model = build_backbone(trained["backbone"], len(classes), pretrained=False, preprocessing=state.get("preprocessing"))
    runtime.load_weights(model, state["model"], path, f"{trained['backbone']} with {len(classes)} classes")
    return model, trained, list(classes)


def trained_classifier(cfg, results: Path, place: Placement) -> tuple[nn.Module, dict, list[str], Path, int | None]:
    """The classifier ``train_classification.py`` saved under ``results`` (``checkpoints/best.pt``), on
    ``place``'s device and layout, after checking that the patches it was trained with are the ones there now: (model, its
    training settings, class order, checkpoint path, epoch it was saved at). Architecture, input size and classes come from the
    checkpoint."""
    best_pt = Path(results) / "checkpoints" / "best.pt"
    state = runtime.load_checkpoint(best_pt, writer="train_classification.py")
    model, trained, classes = classifier_from_checkpoint(state, best_pt)
    model = place.model(model)
    training.check_same_patches(Path(results) / training.STAMP, cfg.paths.data, best_pt)
    return model, trained, classes, best_pt, state.get("epoch")
