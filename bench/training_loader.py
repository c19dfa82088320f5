"""The loader case of bench/training.py: per-core rates of the trainers' uint8 store path at the papers'
sizes, against today's per-item path on the same files, and the loader cores a GPU needs.

    python bench/training_loader.py [--loader-items 2048] [--loader-cells 160] [--repeats 3]

cities: 480 px JPEG patches (configs/cities.yaml patch size and jpeg_quality) -> a store at 224 px
        (cities_data.split_store's decode: PIL draft + antialiased uint8 resize), then
        store.StoreDataset + sampling.EpochSampler + loops.make_loader in one process (0 workers);
ses:    800 px cell PNGs (configs/ses.yaml cell_px, sensor-like noise) -> a store of 800 px cells
        (ses_data.cell_store), then the same loader (shuffled, fitting.cell_loader without the device step).
Each store is built once (timed on its own: the decode cost, paid once per data set instead of once per
epoch) and the loader's items per second are the median of --repeats passes, per second of the process's
CPU time (one thread: per core; equal to the wall-clock rate on an idle machine, and not lowered by other
processes on a shared one; the store path's wall-clock rate is printed beside it). The per-item path
(PatchDataset with the training transform; CellDataset without cache) is timed on the same files in one
process. The device step (cities: flips + ImageNet normalisation; ses: min-max scaling) is timed on the
CPU too, for information: on a GPU it runs on the GPU.
Checks: cities store batches, normalised on the device path, equal the per-item evaluation transform
exactly, and training batches equal one of its four flips item by item; ses store batches, min-max
scaled, equal ses_data.load_cell_image exactly (cell_px = input_size; a resized batch agrees within
1e-6, tests/test_store.py).
Cores a GPU needs at the published rates: ResNet-50 at 224 px with AMP 2,470 img/s on an A100
(NVIDIA's reference), about twice that on an H100; EfficientNet-B0 at 800 px: 1/12 of those rates
(12.75x the pixels of 224 px).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median, single_thread, time_runs  # noqa: E402

single_thread()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from urbanlens.cities import data as cities_data  # noqa: E402
from urbanlens.cities import sampling  # noqa: E402
from urbanlens.core import batch_ops, loops, placement, store  # noqa: E402
from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import data as ses_data  # noqa: E402
from urbanlens.ses import model as ses_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
A100_RESNET50_224 = 2470.0  # img/s, ResNet-50 training at 224 px with AMP (NVIDIA's reference)
H100_OVER_A100 = 2.0
EFFNET_800_PIXEL_FACTOR = 12.0  # an 800 px cell has about 12x the pixels of a 224 px patch


def gpu_rates() -> dict[str, tuple[float, float]]:
    """(A100, H100) images per second each pipeline's GPU steps at the published rates."""
    a100 = A100_RESNET50_224
    return {"cities_224": (a100, a100 * H100_OVER_A100),
            "ses_800": (a100 / EFFNET_800_PIXEL_FACTOR, a100 * H100_OVER_A100 / EFFNET_800_PIXEL_FACTOR)}


def items_per_second(make_iter, n: int, repeats: int) -> float:
    """Items per second of CPU time of this process (user + system: one thread, so per core) over one
    pass of ``make_iter()``, median of ``repeats`` after a warm-up; on an idle machine it equals the
    wall-clock rate, on a shared one it leaves out the time other processes held the core."""
    def run():
        for _ in make_iter():
            pass
    run()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        run()
        times.append(time.process_time() - t0)
    return n / median(times)


def wall_items_per_second(make_iter, n: int, repeats: int) -> float:
    def run():
        for _ in make_iter():
            pass
    return n / median(time_runs(run, repeats))


def build_timed(fn) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cities_loader_case(files: list[Path], args, work: Path) -> dict:
    """``files``: paper-size JPEG patches (repeated to --loader-items)."""
    cfg = load_config(str(ROOT / "configs/cities.yaml"), ["model.pretrained=false", "device=cpu"])
    size, batch, device = cfg.model.input_size, cfg.train.batch_size, placement.select_device("cpu")
    n = len(files)
    labels = np.arange(n) % cfg.world.n_cities
    shape = (3, size, size)
    _, build_s = build_timed(lambda: store.build(work / "cities_store", files,
                                                 lambda f: cities_data.decode_for_store(f, size), shape,
                                                 cities_data.STORE_SETTINGS, None))
    ds = store.StoreDataset(work / "cities_store", n, shape, labels)

    def loader(dataset, count):
        sampler = sampling.EpochSampler(labels[:count], cfg.train.balanced, count, args.seed)
        sampling.begin_epoch(sampler, args.seed, 1)
        return lambda: iter(loops.make_loader(dataset, batch, 0, device, sampler))

    new, wall = items_per_second(loader(ds, n), n, args.repeats), wall_items_per_second(loader(ds, n), n, args.repeats)
    k = min(n, args.loader_old_items)
    old_ds = cities_data.PatchDataset(files[:k], labels[:k], cities_data.transforms(size, train=True), size)
    old = items_per_second(loader(old_ds, k), k, args.repeats)
    x = torch.stack([ds[i][0] for i in range(batch)])
    prep = items_per_second(lambda: [cities_data.train_batches(args.seed, 1)(x)], batch, args.repeats)
    # checks: identical tensors to the per-item path
    plain = cities_data.PatchDataset(files[:batch], labels[:batch], cities_data.transforms(size, train=False), size)
    ref = torch.stack([plain[i][0] for i in range(batch)])
    assert torch.equal(cities_data.eval_batches(x), ref), "cities store batch differs from the per-item path"
    for a, r in zip(cities_data.train_batches(args.seed, 1)(x), ref):
        assert any(torch.equal(a, v) for v in (r, r.flip(-1), r.flip(-2), r.flip(-1).flip(-2))), \
            "cities store training item is no flip of the per-item path's"
    print(f"[training] loader cities: {n} patches of {cfg.patch.size} px -> {size} px store "
          f"({n * np.prod(shape) / 2**20:.0f} MB) built in {build_s:.2f} s ({n / build_s:.0f} patches/s, once); "
          f"equal to the per-item path: identical")
    return {"name": "cities_224", "old": old, "new": new, "wall": wall, "prep": prep, "build": n / build_s}


def ses_loader_case(files: list[Path], args, work: Path) -> dict:
    """``files``: paper-size cell PNGs (repeated to --loader-cells)."""
    cfg = load_config(str(ROOT / "configs/ses.yaml"), ["ses_model.pretrained=false", "device=cpu"])
    size, batch, device = cfg.ses_model.input_size, cfg.ses_train.batch_size, placement.select_device("cpu")
    n = len(files)
    labels = np.arange(n) % ses_model.N_CLASSES
    ds, build_s = build_timed(lambda: ses_data.cell_store(files, labels, size, work / "ses_store", None))
    loader = lambda dataset: lambda: iter(loops.make_loader(dataset, batch, 0, device, shuffle=True,  # noqa: E731
                                                           seed=args.seed))
    new, wall = items_per_second(loader(ds), n, args.repeats), wall_items_per_second(loader(ds), n, args.repeats)
    k = min(n, args.loader_old_cells)
    old = items_per_second(loader(ses_data.CellDataset(files[:k], labels[:k], size)), k, args.repeats)
    x = torch.stack([ds[i][0] for i in range(batch)])
    prep = items_per_second(lambda: [ds.prepare(x)], batch, args.repeats)
    ref = torch.stack([ses_data.load_cell_image(f, size) for f in files[:batch]])
    assert torch.equal(ds.prepare(x), ref), "ses store batch differs from load_cell_image"
    flipped = batch_ops.random_flips(ds.prepare(x), torch.Generator().manual_seed(args.seed), cfg.ses_train.rot90)
    assert torch.all(flipped.amin((1, 2, 3)) == 0) and torch.all(flipped.amax((1, 2, 3)) == 1)
    print(f"[training] loader ses: {n} cells of {ds.shape[-1]} px -> store ({n * np.prod(ds.shape) / 2**20:.0f} MB) "
          f"built in {build_s:.2f} s ({n / build_s:.1f} cells/s, once); equal to load_cell_image: identical")
    return {"name": "ses_800", "old": old, "new": new, "wall": wall, "prep": prep, "build": n / build_s}


def report(cases: list[dict]) -> None:
    rates = gpu_rates()
    print("items per second of CPU time, one thread (wall clock: store path on this machine's load)")
    print(f"{'loader, one core':<18}{'per-item path':>16}{'store path':>14}{'(wall)':>12}{'speed-up':>10}"
          f"{'device step on CPU':>20}{'cores A100':>12}{'cores H100':>12}")
    for c in cases:
        a100, h100 = rates[c["name"]]
        print(f"{c['name']:<18}{c['old']:>12.1f} /s{c['new']:>10.1f} /s{c['wall']:>10.1f}/s{c['new'] / c['old']:>9.1f}x"
              f"{c['prep']:>16.1f} /s{a100 / c['new']:>12.2f}{h100 / c['new']:>12.2f}")
        print(f"[training] loader {c['name']}: a GPU stepping at {a100:.0f} (A100) / {h100:.0f} (H100) img/s needs "
              f"{a100 / c['new']:.2f} / {h100 / c['new']:.2f} loader cores on the store path "
              f"({a100 / c['old']:.1f} / {h100 / c['old']:.1f} on the per-item path)")
    for c in cases:
        print(f"training_loader_per_core_{c['name']}: {c['new']:.0f}")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--loader-items", type=int, default=1024, help="patches in the cities store")
    ap.add_argument("--loader-cells", type=int, default=80, help="cells in the ses store")
    ap.add_argument("--loader-old-items", type=int, default=256, help="patches read by the per-item path")
    ap.add_argument("--loader-old-cells", type=int, default=20, help="cells read by the per-item path")


def run(cities_files, ses_files, args) -> None:
    """The loader case on paper-size patch and cell files (repeated to the store sizes)."""
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        cases = []
        if cities_files:
            cases.append(cities_loader_case([cities_files[i % len(cities_files)] for i in range(args.loader_items)],
                                            args, Path(tmp)))
        if ses_files:
            cases.append(ses_loader_case([ses_files[i % len(ses_files)] for i in range(args.loader_cells)],
                                         args, Path(tmp)))
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
