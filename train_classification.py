"""Train the city classifier: which city does a satellite patch come from?

A torchvision backbone (paper: ResNet-50 from ImageNet weights) with a new final layer over the cities,
inputs resized to cities.model.input_size with random horizontal and vertical flips and ImageNet normalisation,
Adam (learning rate per cities.train.schedule; the paper's is constant), cross-entropy, class-balanced sampling
(cities.train.balanced). Each epoch writes <results>/cities/checkpoints/last.pt and a
row of <results>/cities/train_log.csv; best.pt keeps the epoch of highest validation accuracy. The
validation patches are the paper's (right halves of the test site's images) or, with cities.split.val=site, those
of a train site held out of training (urbanlens/cities/validation.py).
Patches changed since last.pt was trained (re-cut, other image or patch settings) are refused, also
with --resume: overwrite=true trains anew on them.
Re-running the same command continues from last.pt (an interrupted run loses at most the epoch it was
in; a finished one is left as it is); --resume also continues one trained with other settings (e.g. more
cities.train.epochs); overwrite=true starts over. With cities.train.freeze=backbone the backbone stays as built
and only the final layer learns, on embeddings computed once and cached in <results>/cities/embeddings/. Under
torchrun, DistributedDataParallel (cities.train.batch_size is global, batch norm synchronised: N ranks train the
model one process trains, docs/scaling.md). At the end, <results>/cities/MODEL_CARD.md says what the model was
trained on (test_classification.py adds its metrics).
"""
import os

# CPU threads sleep instead of spinning while they wait: on a shared or busy machine spinning threads
# slow training several-fold. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from urbanlens.cities import patches, report_html, training, validation
from urbanlens.cities import frozen as cities_frozen
from urbanlens.core import entry, frozen
from urbanlens.core.backbones import build_backbone
from urbanlens.core.config import data_dir
from urbanlens.core.stage import open_stage


def options(parser):
    parser.add_argument("--resume", action="store_true", help="continue from <results>/cities/checkpoints/last.pt "
                        "even when it was trained with other settings (same cities and model)")


def main() -> None:
    stage = open_stage(__doc__, "train_classification.py", "configs/cities_demo.yaml", ("cities",), options,
                       amp="cities.train.amp", channels_last="cities.train.channels_last", report=report_html.render)
    cfg, place = stage.cfg, stage.place

    # Data: the patches of the site-based split, classes = sorted IATA codes.
    manifest = patches.read_manifest(data_dir(cfg))
    classes = patches.class_names(manifest, data_dir(cfg, "cities", "patches", "manifest.csv"))  # two or more
    manifest = validation.training_splits(manifest, cfg.cities.split.val)  # which patches train and which validate
    model = build_backbone(cfg.cities.model.backbone, len(classes), cfg.cities.model.pretrained, cfg.cities.model.weights_path)
    model = place.model(model)  # (before the store: missing weights stop at once)
    train_set, val_set = training.datasets(cfg, manifest, classes, place)
    sampler, train_loader, val_loader = training.loaders(cfg, train_set, val_set, place)

    # Adam, cross-entropy; a run of the same settings continues from its last epoch.
    opt = training.optimiser(cfg, model, len(train_loader), place)
    done, best_acc = training.resume_point(cfg, stage.args.resume, stage.out, model, opt, classes, place)
    if place.main:
        print(f"[train] {len(train_set)} train / {len(val_set)} val patches (cities.split.val={cfg.cities.split.val}), "
              f"{len(classes)} cities, {cfg.cities.model.backbone} on {place.describe()}, {len(train_loader)} steps per epoch")
    if frozen.frozen(cfg.cities.train.freeze) and done < cfg.cities.train.epochs:  # the final layer alone, on cached embeddings
        model, train_loader, val_loader, place = cities_frozen.head_training(cfg, model, train_set, val_set, sampler,
                                                                            stage.out, place)
    training.run_epochs(cfg, model, opt, sampler, train_loader, val_loader, classes, stage.out, done, best_acc, place)


if __name__ == "__main__":
    entry.run(main)
