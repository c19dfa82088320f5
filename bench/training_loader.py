"""The loader case of bench/training.py: wall-clock rates of the trainers' own loaders on their uint8
stores at the papers' sizes, read from disk, against the disk's own rate for the same reads.

    python bench/training_loader.py [--loader-items 4096] [--loader-reads 1024] [--loader-cells 320]
                                    [--loader-cell-reads 80] [--repeats 3] [--device auto]

cities: 480 px JPEG patches (configs/cities.yaml patch size and jpeg_quality) -> a store at 224 px
        (cities_data.split_store's decode, built in `workers` processes), read as train_classification.py
        reads it: sampling.EpochSampler drawing --loader-reads of the store's --loader-items patches,
        loops.make_loader with the config's `workers` (pinned memory on CUDA), then the device step
        (batch moved to the device, cities_data.train_batches: flips + ImageNet normalisation).
ses:    800 px cell PNGs (configs/ses.yaml cell_px, sensor-like noise) -> a store of 800 px cells
        (ses_data.cell_store), read as fitting.fit reads it: fitting.cell_loader (shuffled, in process,
        min-max scaling on the device), then batch_ops.random_flips; --loader-cell-reads of --loader-cells.
Before every timed pass the store file's pages are dropped from the page cache (os.posix_fadvise
DONTNEED; the store is fsynced when built, so its pages are clean), so that the reads come from the
disk, as they do for the paper's ~60 GB cities store, which does not stay in memory when read at
random; a pass reads a random subset of a larger store. Floor: the same item reads in the same order
with os.pread and nothing else, cache dropped alike. Rates are wall-clock images/s and MB/s of store
reads, median of --repeats passes (one untimed pass first), under the machine's load (printed).
MB/s a GPU needs = images/s of its training step x bytes per stored item, at published rates: one A100
80GB with AMP trains ResNet-50 (224 px) at 2,470 img/s and EfficientNet-B0 (224 px) at 2,489 img/s
(NVIDIA DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md and
efficientnet/README.md, "Training performance: NVIDIA DGX A100", 1 GPU); at 800 px EfficientNet-B0 is
taken at 2,489 / 12.76 img/s (the ratio of pixels, (800 / 224)^2).
Checks: cities store batches, normalised on the device path, equal the per-item evaluation transform
exactly, and training batches equal one of its four flips item by item; ses store batches, min-max
scaled, equal ses_data.load_cell_image exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median, single_thread  # noqa: E402

single_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from urbanlens.cities import data as cities_data  # noqa: E402
from urbanlens.cities import sampling  # noqa: E402
from urbanlens.core import batch_ops, loops, placement, store  # noqa: E402
from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import data as ses_data  # noqa: E402
from urbanlens.ses import fitting  # noqa: E402
from urbanlens.ses import model as ses_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
A100_RESNET50_224 = 2470.0  # img/s, 1x A100 80GB, AMP (DeepLearningExamples resnet50v1.5 README)
A100_EFFNET_B0_224 = 2489.0  # img/s, 1x A100 80GB, AMP (DeepLearningExamples efficientnet README)
PIXELS_800_OVER_224 = (800 / 224) ** 2


def gpu_rates() -> dict[str, float]:
    """Images per second one A100 trains each pipeline's model at, from the published rates."""
    return {"cities_224": A100_RESNET50_224, "ses_800": A100_EFFNET_B0_224 / PIXELS_800_OVER_224}


def drop_cache(path: Path) -> None:
    """Drop ``path``'s pages from the page cache (they are clean: the store was fsynced when built)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_passes(run_pass, path: Path, repeats: int) -> float:
    """Median wall-clock seconds of ``run_pass()`` with ``path`` dropped from the page cache before each
    (one untimed pass first: worker start-up code and allocator warm)."""
    drop_cache(path)
    run_pass()
    times = []
    for _ in range(repeats):
        drop_cache(path)
        t0 = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - t0)
    return median(times)


def floor_pass(path: Path, order, item_bytes: int):
    """The disk's part alone: the same items read in the same order with os.pread."""
    def run():
        fd = os.open(path, os.O_RDONLY)
        try:
            for i in order:
                os.pread(fd, item_bytes, int(i) * item_bytes)
        finally:
            os.close(fd)
    return run


def consume(batches, device) -> int:
    """Iterate ``batches`` (the device step is part of them), waiting for the device; items seen."""
    n = 0
    for x, y in batches:
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n


def build_timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cities_loader_case(files: list[Path], args, work: Path, device) -> dict:
    """``files``: paper-size JPEG patches (repeated to --loader-items)."""
    cfg = load_config(str(ROOT / "configs/cities.yaml"), ["cities.model.pretrained=false"])
    size, batch = cfg.cities.model.input_size, cfg.cities.train.batch_size
    n, reads = len(files), min(args.loader_reads, len(files))
    labels = np.arange(n) % cfg.cities.world.n_cities
    shape = (3, size, size)
    path = work / "cities_store"
    _, build_s = build_timed(lambda: store.build(path, files, lambda f: cities_data.decode_for_store(f, size), shape,
                                                 cities_data.STORE_SETTINGS, None, cfg.workers))
    ds = store.StoreDataset(path, n, shape, labels)
    sampler = sampling.EpochSampler(labels, False, reads, args.seed)
    sampling.begin_epoch(sampler, args.seed, 1)
    order = list(sampler)
    augment = cities_data.train_batches(args.seed, 1)

    def run():
        loader = loops.make_loader(ds, batch, cfg.workers, device, sampler)
        return consume(((augment(x.to(device, non_blocking=True)), y) for x, y in loader), device)

    seconds = timed_passes(run, store.paths(path)[0], args.repeats)
    floor = timed_passes(floor_pass(store.paths(path)[0], order, int(np.prod(shape))), store.paths(path)[0],
                         args.repeats)
    x = torch.stack([ds[i][0] for i in range(8)])
    plain = cities_data.PatchDataset(files[:8], labels[:8], cities_data.transforms(size, train=False), size)
    ref = torch.stack([plain[i][0] for i in range(8)])
    assert torch.equal(cities_data.eval_batches(x), ref), "cities store batch differs from the per-item path"
    for a, r in zip(cities_data.train_batches(args.seed, 1)(x), ref):
        assert any(torch.equal(a, v) for v in (r, r.flip(-1), r.flip(-2), r.flip(-1).flip(-2))), \
            "cities store training item is no flip of the per-item path's"
    print(f"[training] loader cities: {n} patches of {cfg.cities.patch.size} px -> {size} px store "
          f"({n * np.prod(shape) / 2**20:.0f} MB) built in {build_s:.2f} s with {cfg.workers} workers "
          f"({n / build_s:.0f} patches/s, once); a pass reads {reads} at random, batch {batch}, {cfg.workers} "
          f"loader workers, device step on {device}; equal to the per-item path: identical")
    return {"name": "cities_224", "items": reads, "item_bytes": int(np.prod(shape)), "seconds": seconds,
            "floor": floor}


def ses_loader_case(files: list[Path], args, work: Path, device) -> dict:
    """``files``: paper-size cell PNGs (repeated to --loader-cells)."""
    cfg = load_config(str(ROOT / "configs/ses.yaml"), ["ses.model.pretrained=false"])
    tc, size = cfg.ses.train, cfg.ses.model.input_size
    n, reads = len(files), min(args.loader_cell_reads, len(files))
    labels = np.arange(n) % ses_model.N_CLASSES
    path = work / "ses_store"
    ds, build_s = build_timed(lambda: ses_data.cell_store(files, labels, size, path, None, cfg.workers))
    subset = ds.subset(np.random.default_rng(args.seed).permutation(n)[:reads])  # a pass: part of the store
    flips = lambda x: batch_ops.random_flips(x, torch.Generator().manual_seed(args.seed), tc.rot90)  # noqa: E731

    def run():
        loader = fitting.cell_loader(subset, tc.batch_size, device, True, args.seed, cfg.workers)
        return consume(((flips(x), y) for x, y in loader), device)

    item_bytes = int(np.prod(ds.shape))
    seconds = timed_passes(run, store.paths(path)[0], args.repeats)
    floor = timed_passes(floor_pass(store.paths(path)[0], subset.indices, item_bytes), store.paths(path)[0],
                         args.repeats)
    x = torch.stack([ds[i][0] for i in range(4)])
    ref = torch.stack([ses_data.load_cell_image(f, size) for f in files[:4]])
    assert torch.equal(ds.prepare(x), ref), "ses store batch differs from load_cell_image"
    print(f"[training] loader ses: {n} cells of {ds.shape[-1]} px -> store ({n * item_bytes / 2**20:.0f} MB) "
          f"built in {build_s:.2f} s with {cfg.workers} workers ({n / build_s:.1f} cells/s, once); a pass reads "
          f"{reads} at random, batch {tc.batch_size}, in process (fitting.cell_loader), device step on {device}; "
          "equal to load_cell_image: identical")
    return {"name": "ses_800", "items": reads, "item_bytes": item_bytes, "seconds": seconds, "floor": floor}


def report(cases: list[dict]) -> None:
    rates = gpu_rates()
    print(f"wall clock, store file dropped from the page cache before each pass; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'loader':<12}{'img/s':>10}{'MB/s':>10}{'floor MB/s':>12}{'over floor':>12}{'A100 img/s':>12}"
          f"{'needs MB/s':>12}{'loaders/A100':>14}")
    for c in cases:
        mb = c["items"] * c["item_bytes"] / 2**20
        img_s, mb_s, floor_mb_s = c["items"] / c["seconds"], mb / c["seconds"], mb / c["floor"]
        need = rates[c["name"]] * c["item_bytes"] / 2**20
        print(f"{c['name']:<12}{img_s:>10.1f}{mb_s:>10.1f}{floor_mb_s:>12.1f}{c['seconds'] / c['floor']:>11.2f}x"
              f"{rates[c['name']]:>12.0f}{need:>12.1f}{need / mb_s:>14.2f}")
    for c in cases:
        mb = c["items"] * c["item_bytes"] / 2**20
        print(f"training_loader_wall_img_s_{c['name']}: {c['items'] / c['seconds']:.1f}")
        print(f"training_loader_wall_mb_s_{c['name']}: {mb / c['seconds']:.1f}")
        print(f"training_loader_a100_needs_mb_s_{c['name']}: {gpu_rates()[c['name']] * c['item_bytes'] / 2**20:.1f}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--loader-items", type=int, default=4096, help="patches in the cities store")
    ap.add_argument("--loader-reads", type=int, default=1024, help="patches a timed pass reads (at random)")
    ap.add_argument("--loader-cells", type=int, default=320, help="cells in the ses store")
    ap.add_argument("--loader-cell-reads", type=int, default=80, help="cells a timed pass reads (at random)")
    ap.add_argument("--device", default="auto", help="where the device step runs (auto: CUDA when present)")
    ap.add_argument("--loader-dir", default=None, help="folder of the stores (default: the system's temporary "
                    "folder; put it on the disk the real store lives on)")


def run(cities_files, ses_files, args) -> None:
    """The loader case on paper-size patch and cell files (repeated to the store sizes)."""
    device = placement.select_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.loader_dir) as tmp:
        cases = []
        if cities_files:
            cases.append(cities_loader_case([cities_files[i % len(cities_files)] for i in range(args.loader_items)],
                                            args, Path(tmp), device))
        if ses_files:
            cases.append(ses_loader_case([ses_files[i % len(ses_files)] for i in range(args.loader_cells)],
                                         args, Path(tmp), device))
        report(cases)


if __name__ == "__main__":
    from bench import training

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--noise", type=float, default=3.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_loader_files_") as d:
        c_files, s_files = training.paper_files(a, Path(d))
        run(c_files, s_files, a)
