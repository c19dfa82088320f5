"""Train the city classifier: which city does a satellite patch come from?

A torchvision backbone (paper: ResNet-50 from ImageNet weights) with a new final layer over the cities,
inputs resized to model.input_size with random horizontal and vertical flips and ImageNet normalisation,
Adam (learning rate per train.schedule; the paper's is constant), cross-entropy, class-balanced sampling
(train.balanced). Each epoch writes <results>/cities/checkpoints/last.pt and a
row of <results>/cities/train_log.csv; best.pt keeps the epoch of highest validation accuracy. The
validation patches are the paper's (right halves of the test site's images) or, with split.val=site, those
of a train site held out of training (urbanlens/cities/validation.py).
Patches changed since last.pt was trained (re-cut, other image or patch settings) are refused, also
with --resume: overwrite=true trains anew on them.
Re-running the same command continues from last.pt (an interrupted run loses at most the epoch it was
in; a finished one is left as it is); --resume also continues one trained with other settings (e.g. more
train.epochs); overwrite=true starts over. Under torchrun, DistributedDataParallel (train.batch_size is
global). At the end, <results>/cities/MODEL_CARD.md says what the model was trained on (test_classification.py
adds its metrics).
"""
import os

# CPU threads sleep instead of spinning while they wait: on a shared or busy machine spinning threads
# slow training several-fold. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time

import torch
from torch.nn import functional as F

from urbanlens.cities import data, patches
from urbanlens.cities import sampling as cities_sampling
from urbanlens.cities import training as cities_training
from urbanlens.cities import validation
from urbanlens.core import batch_ops, entry, locks, loops, model_card, runs, runtime, tensorboard_log
from urbanlens.core.backbones import build_backbone
from urbanlens.core.config import cli, data_dir, results_dir
from urbanlens.core.errors import DataError
from urbanlens.core.files import save_run_config


def options(parser):
    parser.add_argument("--resume", action="store_true", help="continue from <results>/cities/checkpoints/last.pt "
                        "even when it was trained with other settings (same cities and model)")


def main() -> None:
    cfg, args = cli(__doc__.splitlines()[0], "configs/cities_demo.yaml", options)
    rank, world = runtime.setup_distributed()
    main = runtime.is_main_process()
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed)
    amp, nhwc = cfg.train.amp, cfg.train.channels_last  # meaning on this device: loops.autocast_dtype, uses_channels_last

    # Data: the patches of the site-based split, classes = sorted IATA codes.
    patches_dir = data_dir(cfg, "cities", "patches")
    manifest = patches.read_manifest(data_dir(cfg))
    classes = patches.class_names(manifest, patches_dir / "manifest.csv")  # two cities or more
    manifest = validation.training_splits(manifest, cfg.split.val)  # which patches train and which validate
    model = build_backbone(cfg.model.backbone, len(classes), cfg.model.pretrained, cfg.model.weights_path)
    model = loops.to_device(model, device, nhwc, amp)  # (before the store: missing weights stop at once)
    size = cfg.model.input_size
    if cfg.store:  # decoded once at input_size into <patches>/store/ (again when the patches change);
        for split in ("train", "val") if main else ():  # flips and normalisation per batch on the device
            data.split_store(manifest, split, patches_dir, classes, size, f"[train] store {split}",
                             validation.store_name(split, cfg.split.val))
        if world > 1:
            torch.distributed.barrier()
        train_set, val_set = (data.split_store(manifest, s, patches_dir, classes, size,
                                               name=validation.store_name(s, cfg.split.val)) for s in ("train", "val"))
    else:  # each patch decoded, resized, flipped and normalised in the loader every epoch
        train_set = data.split_dataset(manifest, "train", patches_dir, classes, data.transforms(size, train=True),
                                       size)
        val_set = data.split_dataset(manifest, "val", patches_dir, classes, data.transforms(size, train=False), size)
    if len(train_set) < 2:  # batch norm in training mode needs two images a batch
        raise DataError(patches_dir / "manifest.csv", f"{len(train_set)} training patch; training needs 2 or more",
                        "add images to the cities' train sites (all but the last) and re-run preprocessing.py")
    batch = max(1, cfg.train.batch_size // world)
    draws = len(train_set)
    if cfg.train.max_steps_per_epoch > 0:
        draws = min(draws, cfg.train.max_steps_per_epoch * batch * world)
    sampler = cities_sampling.EpochSampler(train_set.labels, cfg.train.balanced, draws, cfg.seed, rank, world)
    train_loader = loops.make_loader(train_set, batch, cfg.workers, device, sampler)
    val_loader = loops.make_loader(loops.shard(val_set, rank, world), batch, cfg.workers, device)
    if cfg.store:
        val_loader = batch_ops.OnDevice(val_loader, data.eval_batches, device)

    # Optimiser.
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    scheduler = cities_training.lr_schedule(optimizer, cfg.train.schedule, cfg.train.epochs * len(train_loader))
    scaler = loops.grad_scaler(device, amp)

    out = results_dir(cfg, "cities")
    entry.keep(locks.hold(out, "train_classification.py", cfg))  # shared by the ranks of one torchrun
    last_pt, best_pt, log_csv = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt", out / "train_log.csv"
    done, best_acc = 0, -1.0
    state = runtime.load_checkpoint(last_pt, writer="train_classification.py") if last_pt.exists() else None
    stamp, inputs = out / cities_training.STAMP, cities_training.run_inputs(cfg.paths.data)
    cut_with = cities_training.patch_settings(cfg.paths.data)
    changed = runs.compare(stamp, cfg, cities_training.RUN_KEYS, inputs, cut_with) if state is not None else []
    if cities_training.data_changes(changed) and not cfg.overwrite:  # --resume does not continue on other data
        runs.refuse(last_pt, f"was trained on other patches than those now in {patches_dir}",
                    cities_training.data_changes(changed), "--set overwrite=true trains from scratch on these, "
                    "or cut the old ones again (preprocessing.py with their settings), or use another paths.results")
    if state is not None and changed and (not args.resume or cities_training.data_changes(changed)):
        if not cfg.overwrite:
            runs.refuse(last_pt, "trained with other settings", changed, "re-run with --resume to continue it, "
                        "--set overwrite=true to train from scratch, or use another paths.results")
        state = None
        if main:  # start over: the old run's checkpoints must not be taken for this one's
            last_pt.unlink(missing_ok=True)
            best_pt.unlink(missing_ok=True)
    if state is not None:
        cities_training.check_resumable(state, classes, cfg.model, last_pt)
        done, best_acc = cities_training.restore(state, model, optimizer, scaler, scheduler)
        if main:
            print(f"[train] resuming from {last_pt} after epoch {done}")
    elif args.resume and main:
        print(f"[train] --resume: no {last_pt} yet, starting from scratch")
    log = cities_training.read_log(log_csv, done)
    model = loops.wrap_distributed(model, device)
    if main:
        save_run_config(cfg, out, "train_config.yaml")
        runs.write_stamp(stamp, "train_classification.py", cfg, cities_training.RUN_KEYS, inputs, cut_with)
        print(f"[train] {len(train_set)} train / {len(val_set)} val patches (split.val={cfg.split.val}), "
              f"{len(classes)} cities, "
              f"{cfg.model.backbone} on {device} x{world}, {len(train_loader)} steps per epoch")

    # Epochs: the sampling and augmentation of epoch e depend only on (seed, e), so a resumed run draws
    # the same batches as an uninterrupted one.
    start = time.time()
    for epoch in range(done + 1, cfg.train.epochs + 1):
        t0 = time.time()
        cities_sampling.begin_epoch(sampler, cfg.seed, epoch, rank)
        lr_used = optimizer.param_groups[0]["lr"]  # at the start of the epoch
        augment = data.train_batches(cfg.seed, epoch, rank) if cfg.store else None
        tr = loops.train_epoch(model, train_loader, optimizer, F.cross_entropy, device, scaler, amp, nhwc, scheduler,
                               min_batch=2, augment=augment, desc=f"epoch {epoch}/{cfg.train.epochs}", epoch=epoch,
                               max_loss=loops.loss_limit(len(classes)), lr_key="train.lr")  # diverged: no save
        va = loops.check_validation(loops.evaluate(model, val_loader, F.cross_entropy, device, amp, nhwc), epoch,
                                    lr_used, "train.lr")
        if main:
            log.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                        "val_acc": va["acc"], "lr": lr_used, "seconds": time.time() - t0})
            cities_training.write_log(log, log_csv)
            tensorboard_log.write_events(out, log)  # when tensorboard is installed
            improved = va["acc"] >= best_acc  # ties: the later, longer-trained epoch
            best_acc = max(best_acc, va["acc"])
            extra = dict(classes=classes, best_val_acc=best_acc, scaler=scaler.state_dict(),
                         scheduler=scheduler.state_dict() if scheduler else None)
            if improved:
                runtime.save_checkpoint(best_pt, model, cfg, None, epoch, **extra)
            # last: the resume point is written once everything else of the epoch is, so a run killed
            # between these writes redoes the epoch rather than skip what it had not saved
            runtime.save_checkpoint(last_pt, model, cfg, optimizer, epoch, **extra)
            print(f"[train] epoch {epoch}: train loss {tr['loss']:.3f} acc {tr['acc']:.3f} | "
                  f"val loss {va['loss']:.3f} acc {va['acc']:.3f}{' *' if improved else ''} | {time.time() - t0:.0f} s")

    if main:
        print(f"[train] {cfg.train.epochs} epochs ({cfg.train.epochs - done} run now) in {time.time() - start:.0f} s; "
              f"best val acc {best_acc:.3f}; checkpoints in {out / 'checkpoints'}, log {log_csv}")
        model_card.write_cities_card(out, cfg, cities_training.STAMP)  # the test stage adds its metrics
    runtime.cleanup_distributed()


if __name__ == "__main__":
    entry.run(main)
