"""Both trainers on tiny in-memory data, in one process or under torchrun, with the same global batch;
the 2-rank models must equal the single-process ones (tests/reliability/test_ddp_equals_single.py,
bench/gpu_check.py's ``ddp`` part). Run from the repository root with PYTHONPATH=. :

    python tests/ddp_equal_train.py ONE                                                    one process
    torchrun --standalone --nproc_per_node 2 tests/ddp_equal_train.py TWO [--part PART]    two ranks
    torchrun --standalone --nproc_per_node 2 tests/ddp_equal_train.py PART --only cities --resume
    python tests/ddp_equal_train.py ONE --compare TWO                                      the verdict

The city classifier trains as train_classification.py trains it (``cities.training``: its sampler,
``resume_point``, ``run_epochs``), the income model one fold as ``ses.fitting.fit`` fits it (shuffled
loader, flips): ResNet-18 from scratch at 16 px, 2 epochs of 3 steps (global batches of 8, 8 and 4).
Rank 0 writes OUT/<trainer>.pt: the final weights and the per-epoch log. In float64: in float32 both runs carry
rounding errors of ~1e-5 of a gradient (batch norm over a few values), equal in size one process or two,
which Adam's per-weight normalisation turns into differences of whole learning-rate steps within a few
steps; in float64 what is left is rounding alone, so a real difference (another sample, flip or batch
statistic) stands out by orders of magnitude. What keeps the ranks' runs the single-process one: one
seeded global order of which each rank takes its share of every global batch, flips drawn for the whole
global batch, batch norm synchronised over the ranks. Dropout is drawn per rank, so the income model
runs without it; the city data are in-memory tensors (the store's uint8 flips: a unit test).
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from urbanlens.core import backbones, config, placement, runtime

TRAINERS = ("cities", "ses")
GLOBAL_BATCH, SIZE, N_TRAIN, N_VAL, N_CLASSES = 8, 16, 20, 8, 4  # global batches 8, 8, 4 (2 ranks: 4 + 4, 4 + 4, 2 + 2)
# weights of 2 ranks equal those of 1 process up to rounding (another summation order of the gradients and
# of the batch-norm moments): |a - b| <= WEIGHTS_RTOL x max(1, max |b|), tensor by tensor, in float64
WEIGHTS_RTOL = 1e-6
SETTINGS = ["seed=0", "workers=0", "store=false",
            "cities.model.backbone=resnet18", "cities.model.pretrained=false", f"cities.model.input_size={SIZE}",
            "cities.train.epochs=2", f"cities.train.batch_size={GLOBAL_BATCH}", "cities.train.amp=off",
            "cities.train.channels_last=false",
            "ses.model.backbone=resnet18", "ses.model.pretrained=false", f"ses.model.input_size={SIZE}",
            "ses.model.dropout=0", "ses.train.epochs=2", f"ses.train.batch_size={GLOBAL_BATCH}",
            "ses.train.restarts=0", "ses.train.amp=off"]


class Patches(torch.utils.data.Dataset):
    """Normalised images with their ``labels``: each class a brighter or darker shade, noisy."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = np.arange(n) % N_CLASSES
        base = torch.as_tensor(self.labels * 0.5 - 0.75).reshape(n, 1, 1, 1)
        self.images = base + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def train_cities(cfg, place, out: Path, resume: bool = False) -> dict:
    """The city classifier's training as train_classification.py runs it (``resume``: its --resume),
    on ``Patches`` instead of the store."""
    from urbanlens.cities import training

    runtime.seed_everything(cfg.seed)
    model = place.model(backbones.build_backbone("resnet18", N_CLASSES, False))
    train_set, val_set = Patches(N_TRAIN, 1), Patches(N_VAL, 2)
    sampler, train_loader, val_loader = training.loaders(cfg, train_set, val_set, place)
    opt = training.optimiser(cfg, model, len(train_loader), place)
    classes = [str(c) for c in range(N_CLASSES)]
    done, best_acc = training.resume_point(cfg, resume, out / "cities", model, opt, classes, place)
    training.run_epochs(cfg, model, opt, sampler, train_loader, val_loader, classes, out / "cities", done, best_acc,
                        place)
    log = training.read_log(out / "cities" / "train_log.csv", cfg.cities.train.epochs) if place.main else []
    return {"model": placement.unwrap(model).state_dict(), "log": [{k: v for k, v in r.items() if k != "seconds"}
                                                                   for r in log]}


def train_ses(cfg, place, out: Path, resume: bool = False) -> dict:
    """One fold of the income model, as efficientnet_training.py fits it (``fitting.fit``)."""
    from urbanlens.ses import fitting
    from urbanlens.ses import model as ses_model

    runtime.seed_everything(cfg.seed)
    model = ses_model.build_ses_model(cfg)
    cells = [Patches(n, s) for n, s in ((N_TRAIN, 3), (N_VAL, 4))]
    train_set, val_set = (torch.utils.data.TensorDataset(c.images, torch.as_tensor(c.labels)) for c in cells)
    result = fitting.fit(model, train_set, val_set, cfg.ses.train, place, seed=cfg.seed)
    return {"model": model.state_dict(), "log": [{k: v for k, v in r.items() if k != "seconds"} for r in result.log]}


def settings(out: Path, device: str, epochs: int):
    return config.load_config(None, [*SETTINGS, f"device={device}", f"paths.results={out}", f"paths.data={out / 'data'}",
                                     f"cities.train.epochs={epochs}", f"ses.train.epochs={epochs}"])


def train(out: Path, device: str, only: str | None = None, epochs: int = 2, resume: bool = False,
          part: Path | None = None) -> None:
    """Train ``only`` one trainer (else both) for ``epochs`` epochs into ``out``; rank 0 writes
    OUT/<trainer>.pt. ``part``: then also the city classifier for 1 epoch into ``part`` (a run stopped
    there, for a later ``--resume`` launch to continue)."""
    torch.set_default_dtype(torch.float64)  # models, data and steps in float64 (see the module's docstring)
    place = placement.Placement.for_stage(device, "off", False)
    jobs = [(name, fn, out, epochs) for name, fn in (("cities", train_cities), ("ses", train_ses)) if only in (None, name)]
    for name, fn, where, n in jobs + ([("cities", train_cities, part, 1)] if part else []):
        where.mkdir(parents=True, exist_ok=True)
        result = fn(settings(where, device, n), place, where, resume)
        if place.main:
            torch.save({**result, "world_size": place.world_size}, where / f"{name}.pt")
    placement.cleanup_distributed()


def differences(one: Path, two: Path, trainers=TRAINERS) -> dict:
    """Per trainer: the largest |a - b| / max(1, max |b|) over the weights of the runs under ``two`` and
    ``one`` (floating tensors), whether the per-epoch logs agree (validation metrics within the same
    tolerance), and the world sizes."""
    found = {}
    for name in trainers:
        a, b = (torch.load(d / f"{name}.pt", map_location="cpu", weights_only=False) for d in (two, one))
        worst = max(float((a["model"][k].double() - v.double()).abs().max() / max(1.0, float(v.double().abs().max())))
                    for k, v in b["model"].items() if v.is_floating_point())
        same_log = len(a["log"]) == len(b["log"]) and all(
            ra.keys() == rb.keys() and all(np.isclose(ra[k], rb[k], rtol=WEIGHTS_RTOL, atol=WEIGHTS_RTOL)
                                           if isinstance(rb[k], float) else ra[k] == rb[k] for k in rb)
            for ra, rb in zip(a["log"], b["log"]))
        found[name] = {"max_rel_diff": worst, "same_log": same_log, "world_sizes": (b["world_size"], a["world_size"]),
                       "ok": worst <= WEIGHTS_RTOL and same_log}
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=TRAINERS)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue the run under OUT (the city trainer's --resume)")
    ap.add_argument("--part", type=Path, help="also train the city classifier for 1 epoch into PART")
    ap.add_argument("--compare", type=Path, metavar="OTHER", help="compare OUT (one process) with OTHER, train nothing")
    args = ap.parse_args()
    if args.compare is None:
        return train(args.out, args.device, args.only, args.epochs, args.resume, args.part)
    for name, d in differences(args.out, args.compare, [args.only] if args.only else TRAINERS).items():
        print(f"{name}: world sizes {d['world_sizes'][0]} vs {d['world_sizes'][1]}, weights differ by "
              f"{d['max_rel_diff']:.1e} (limit {WEIGHTS_RTOL:g}), same log {d['same_log']}: {'ok' if d['ok'] else 'FAIL'}")


if __name__ == "__main__":
    main()
