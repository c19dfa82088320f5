"""Training input and step: images per second of the data pipeline alone and of the training step alone.

    python bench/training.py [--scripts cities,ses] [--sizes demo,paper] [--batches 4] [--repeats 3]
                             [--paper-steps 2] [--workers 2] [--gpu-steps 10]

For each training script at its paper and demo sizes (configs/cities.yaml, cities_demo.yaml, ses.yaml,
ses_demo.yaml: backbone, input size, batch size, patch / cell pixels, workers), on synthetic files of
the right pixel size (urbanlens.cities.world drawings; JPEG patches at patch.jpeg_quality, cell PNGs
written by urbanlens.ses.extraction.write_png):
  pipeline, N workers   the script's per-item Dataset (store=false; the store path is the loader case
                        below) and DataLoader with `workers` processes, iterated over
                        --batches batches (worker start-up included, as in every epoch):
                          cities: cities_data.PatchDataset (JPEG draft decode, resize, flips, ImageNet
                                  normalisation) + sampling.EpochSampler + loops.make_loader
                          ses:    ses_data.CellDataset (PNG decode, resize, min-max scaling) + fitting.cell_loader,
                                  then ses_data.random_flips on each batch (done in fitting.fit's loop)
  pipeline, in process  the same with 0 workers: the pipeline's cost per core
  pipeline, cached      ses only, where ses_data.fits_in_memory decides that a city's cells are decoded once
                        up front (the demo): indexing, collation and flips
  step                  forward + backward + optimiser step on batches already in memory, one thread:
                          cities: loops.train_epoch over in-memory batches (Adam, cross-entropy), as the script
                          ses:    loops.train_step, the step fitting.fit takes (Adam, binomial head, NLL)
A paper-size step is slow on a CPU and its activations are large (about 120 MB an image for ResNet-50 at
224 px, 1.2 GB for EfficientNet-B0 at 800 px; 16 GB and 13 GB at the paper batches): it is
timed on --cities-step-batch / --ses-step-batch images of the paper batches (per-image CPU time does not
fall with a larger batch), --paper-steps steps after a warm-up step on up to 4 images.
Checks: every pipeline item has the model's input shape and dtype; cities items equal one of the four
flips of the un-augmented transform of the same file; ses items are min-max scaled to [0, 1] and the
flipped batch is a flip of the loaded one; cached and decoded SES items are equal.
Tables give seconds per batch of the script's batch size (the step's from its time per image); the last
lines are pipeline / step in images per second, the pipeline as the script runs it (workers, or the cache).
Loader case (bench/training_loader.py): per-core rates of the trainers' uint8 store path at the paper
sizes against the per-item path, with equality checks; prints training_loader_per_core_{cities_224,ses_800}.
GPU part (only where CUDA is available): ResNet-50 at 224, the project's step (loops.train_epoch
with placement.autocast mixed precision, placement.grad_scaler and channels_last) vs a plain fp32 NCHW loop; the two
losses on the same first batch agree within 1 %.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import training_loader  # noqa: E402
from bench.common import header, median, single_thread, table, time_runs  # noqa: E402

single_thread()
os.environ.setdefault("TQDM_DISABLE", "1")  # train_epoch's progress bar
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_classification.py sets it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from urbanlens.cities import data as cities_data
from urbanlens.cities import (
    sampling,
    world,  # noqa: E402
    world_render,
)
from urbanlens.core import backbones, loops, placement
from urbanlens.core.placement import Placement
from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import data as ses_data
from urbanlens.ses import extraction as ses_extraction
from urbanlens.ses import fitting
from urbanlens.ses import model as ses_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {("cities", "demo"): "configs/cities_demo.yaml", ("cities", "paper"): "configs/cities.yaml",
           ("ses", "demo"): "configs/ses_demo.yaml", ("ses", "paper"): "configs/ses.yaml"}
GPU = "cuda"  # the GPU part's device
CITY_CELLS = 1000  # cells of one city, for ses_data.fits_in_memory (paper cities have thousands, demo ~200)


# ------------------------------------------------------------------------------------------ inputs
def draw_images(n: int, size: int, scale: float, seed: int) -> list[np.ndarray]:
    """``n`` overhead views of ``size`` px from different synthetic city styles."""
    styles = world.city_styles(max(2, n), seed, 0.15)
    return [world_render.render_image(styles[i], np.random.default_rng([seed, i]), size, scale) for i in range(n)]


def write_jpegs(images, folder: Path, quality: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"patch_{i:03d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=quality)
    return paths


def write_cells(images, folder: Path, noise: float, seed: int) -> list[Path]:
    """Cell PNGs as the extraction stage writes them, with sensor-like noise (aerial photos are noisy,
    which makes their PNGs larger and slower to decode than clean drawings)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, img in enumerate(images):
        noisy = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"cell_{i:03d}.png")
        ses_extraction.write_png(paths[-1], noisy)
    return paths


def paper_files(args, work: Path) -> tuple[list[Path], list[Path]]:
    """Paper-size inputs of the loader case: JPEG patches (configs/cities.yaml) and cell PNGs (ses.yaml)."""
    cc = load_config(str(ROOT / CONFIGS["cities", "paper"]), ["model.pretrained=false", "device=cpu"])
    sc = load_config(str(ROOT / CONFIGS["ses", "paper"]), ["ses_model.pretrained=false", "device=cpu"])
    patches = write_jpegs(draw_images(args.files, cc.patch.size, cc.world.feature_scale, args.seed),
                          work / "loader_cities", cc.patch.jpeg_quality)
    px = sc.ses.cell_px
    return patches, write_cells(draw_images(args.cells, px, px / 96, args.seed), work / "loader_ses", args.noise, args.seed)


def repeat(files, n: int) -> list[Path]:
    return [files[i % len(files)] for i in range(n)]


# ------------------------------------------------------------------------------------------ checks
def flips(x: torch.Tensor) -> list[torch.Tensor]:
    return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]


def check_cities_items(ds, size: int, k: int = 6) -> None:
    plain = cities_data.transforms(size, train=False)
    for i in range(k):
        x, _ = ds[i]
        assert x.shape == (3, size, size) and x.dtype == torch.float32, (x.shape, x.dtype)
        ref = plain(cities_data.read_image(ds.files[i], size))
        err = min(float((x - f).abs().max()) for f in flips(ref))
        assert err < 1e-5, f"cities pipeline item {i} is no flip of its un-augmented image ({err})"


def check_ses_batch(x: torch.Tensor, flipped: torch.Tensor, size: int, rotate: bool) -> None:
    assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32, (x.shape, x.dtype)
    lo, hi = x.amin((1, 2, 3)), x.amax((1, 2, 3))
    assert torch.all(lo == 0) and torch.all(hi == 1), "ses pipeline items are not min-max scaled"
    for a, b in zip(x, flipped):
        variants = flips(a) + (flips(a.transpose(-1, -2)) if rotate else [])
        assert any(torch.equal(b, v) for v in variants), "ses flipped item is no flip of the loaded one"


# ------------------------------------------------------------------------------------------ steps
def ses_steps(net, opt, scaler, batches, device, amp: bool) -> float:
    """fitting.fit's step (loops.train_step with the NLL of the binomial log-probabilities) over in-memory
    batches (already flipped); mean loss."""
    net.train()
    loss_sum, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss, _ = loops.train_step(net, loops.Optimiser(opt, None, scaler), x, y, F.nll_loss, Placement(device, amp, True))
        loss_sum += loss * len(y)
        n += len(y)
    return loss_sum / n


def plain_fp32_steps(model, opt, batches, device) -> float:
    """A plain fp32 loop in NCHW, no autocast, no scaler (like the original code's training)."""
    model.train()
    loss_sum, n = 0.0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(y)
        n += len(y)
    return loss_sum / n


# ------------------------------------------------------------------------------------------ cases
def time_pipeline(make_iter, repeats: int) -> tuple[float, list]:
    """Median seconds to run one pass of ``make_iter()`` and the batches of the last pass."""
    kept = []

    def run():
        kept.clear()
        kept.extend(make_iter())

    return median(time_runs(run, repeats)), list(kept)


def time_steps(run_step, batches, paper: bool, step_batch: int, steps: int, repeats: int) -> float:
    """Median seconds per image of the step. Paper sizes: ``steps`` single steps on batches of
    ``step_batch`` images cut from the pipeline's batches, after a warm-up step on up to 4 images. Demo sizes:
    ``repeats`` passes over all the pipeline's batches after one untimed pass."""
    if paper:
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        run_step([(x[:min(4, step_batch)], y[:min(4, step_batch)])])
        starts = range(0, len(y) - step_batch + 1, step_batch)
        chunks = [(x[i:i + step_batch], y[i:i + step_batch]) for i in starts]
        assert chunks, f"step batch {step_batch} is larger than the {len(y)} images loaded"
        times = [time_runs(lambda c=c: run_step([c]), 1, warmup=0)[0] for c in (chunks * steps)[:steps]]
        return median(times) / step_batch
    return median(time_runs(lambda: run_step(batches), repeats)) / sum(len(b[1]) for b in batches)


def cities_case(size_name: str, args, work: Path) -> dict:
    cfg = load_config(str(ROOT / CONFIGS["cities", size_name]), ["model.pretrained=false", "device=cpu"])
    device = placement.select_device("cpu")
    paper = size_name == "paper"
    px, size, n_classes = cfg.patch.size, cfg.model.input_size, cfg.world.n_cities
    batch = cfg.train.batch_size
    step_batch = min(args.cities_step_batch or batch, batch) if paper else batch
    workers = args.workers if args.workers is not None else cfg.workers
    n_images = args.batches * batch
    files = write_jpegs(draw_images(args.files, px, cfg.world.feature_scale, args.seed),
                        work / f"cities_{size_name}", cfg.patch.jpeg_quality)
    files = repeat(files, n_images)
    labels = np.arange(n_images) % n_classes
    ds = cities_data.PatchDataset(files, labels, cities_data.transforms(size, train=True), decode_size=size)
    check_cities_items(ds, size)
    print(f"[training] cities {size_name}: {cfg.model.backbone} at {size} px from {px} px JPEG patches "
          f"(q {cfg.patch.jpeg_quality}), batch {batch} (step timed at {step_batch}), {n_classes} classes, "
          f"{workers} workers")

    def loader(w):
        sampler = sampling.EpochSampler(labels, cfg.train.balanced, n_images, args.seed)
        sampling.begin_epoch(sampler, args.seed, 1)
        return lambda: iter(loops.make_loader(ds, batch, w, device, sampler))

    pipe_w, batches = time_pipeline(loader(workers), args.repeats)
    pipe_0, _ = time_pipeline(loader(0), args.repeats)
    assert sum(len(y) for _, y in batches) == n_images and batches[0][0].shape == (batch, 3, size, size)

    torch.manual_seed(args.seed)
    model = placement.to_device(backbones.build_backbone(cfg.model.backbone, n_classes, False, None), device,
                               cfg.train.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    step = lambda bs: loops.train_epoch(model, bs, loops.Optimiser(opt), F.cross_entropy,
                                        Placement(device, False, cfg.train.channels_last))
    step_s = time_steps(step, batches, paper, step_batch, args.paper_steps, args.repeats)
    return {"script": "cities", "size": size_name, "batch": batch, "workers": workers,
            "pipeline": pipe_w / args.batches, "pipeline_0": pipe_0 / args.batches, "cached": None,
            "step": step_s * batch, "step_batch": step_batch, "script_path": "pipeline"}


def ses_case(size_name: str, args, work: Path) -> dict:
    cfg = load_config(str(ROOT / CONFIGS["ses", size_name]), ["ses_model.pretrained=false", "device=cpu"])
    device = placement.select_device("cpu")
    paper = size_name == "paper"
    tc, px, size = cfg.ses_train, cfg.ses.cell_px, cfg.ses_model.input_size
    batch = tc.batch_size
    step_batch = min(args.ses_step_batch or batch, batch) if paper else batch
    workers = args.workers if args.workers is not None else cfg.workers
    n_images = args.batches * batch
    scale = px / 96  # features of a 96 px drawing, stretched to the cell's pixels
    files = write_cells(draw_images(args.cells if paper else args.files, px, scale, args.seed),
                        work / f"ses_{size_name}", args.noise, args.seed)
    files = repeat(files, n_images)
    labels = np.arange(n_images) % ses_model.N_CLASSES
    cache = ses_data.fits_in_memory(CITY_CELLS, size, tc.cache_mb)
    print(f"[training] ses {size_name}: {cfg.ses_model.backbone} + binomial head at {size} px from {px} px "
          f"PNG cells, batch {batch} (step timed at {step_batch}), {workers} workers; a city of {CITY_CELLS} "
          f"cells is {'cached (decoded once)' if cache else 'decoded every epoch'}")
    ds = ses_data.CellDataset(files, labels, size)
    gen = torch.Generator().manual_seed(args.seed)

    def loader(dataset, w):
        def run():
            out = []
            for x, y in fitting.cell_loader(dataset, batch, device, True, args.seed, w):
                out.append((ses_data.random_flips(x, gen, rotate=tc.rot90), y))
            return out
        return run

    pipe_w, batches = time_pipeline(loader(ds, workers), args.repeats)
    pipe_0, _ = time_pipeline(loader(ds, 0), args.repeats)
    x0, _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=batch)))
    check_ses_batch(x0, ses_data.random_flips(x0, gen, rotate=tc.rot90), size, tc.rot90)
    assert sum(len(y) for _, y in batches) == n_images
    cached = None
    if cache:
        t0 = time.perf_counter()
        ds_c = ses_data.CellDataset(files, labels, size, cache=True)
        decode_s = time.perf_counter() - t0
        differ = [i for i in range(len(ds)) if not torch.equal(ds_c[i][0], ds[i][0])]
        assert not differ, f"{len(differ)} cached items differ from the decoded ones, e.g. {differ[0]}"
        cached, _ = time_pipeline(loader(ds_c, workers), args.repeats)
        cached /= args.batches
        print(f"[training] ses {size_name}: decoding the {n_images} cells up front took {decode_s:.2f} s")

    torch.manual_seed(args.seed)
    model = ses_model.build_ses_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    scaler = placement.grad_scaler(device, False)
    step = lambda bs: ses_steps(model, opt, scaler, bs, device, False)
    step_s = time_steps(step, batches, paper, step_batch, args.paper_steps, args.repeats)
    return {"script": "ses", "size": size_name, "batch": batch, "workers": workers,
            "pipeline": pipe_w / args.batches, "pipeline_0": pipe_0 / args.batches, "cached": cached,
            "step": step_s * batch, "step_batch": step_batch, "script_path": "cached" if cache else "pipeline"}


def report(r: dict) -> float:
    """Print one case's table and rates; return pipeline / step in images per second (the script's path)."""
    b = r["batch"]
    rows = [(f"pipeline, {r['workers']} workers", r["pipeline"]), ("pipeline, in process", r["pipeline_0"])]
    if r["cached"] is not None:
        rows.append(("pipeline, cached", r["cached"]))
    rows.append(("step", r["step"]))
    print(table(rows, b, "image", "step"))
    rate = {name: b / sec for name, sec in rows}
    used = rate["pipeline, cached"] if r["script_path"] == "cached" else rate[rows[0][0]]
    print(f"[training] {r['script']} {r['size']}: " + ", ".join(f"{n} {v:.1f} img/s" for n, v in rate.items())
          + f"; per core pipeline / step {rate['pipeline, in process'] / rate['step']:.1f}x")
    return used / rate["step"]


def gpu_part(args) -> float | None:
    if not torch.cuda.is_available():
        print("[training] GPU part skipped: no CUDA GPU visible")
        return None
    device = torch.device(GPU)
    cfg = load_config(str(ROOT / CONFIGS["cities", "paper"]), ["model.pretrained=false"])
    batch, size, n_classes = args.gpu_batch or cfg.train.batch_size, cfg.model.input_size, cfg.world.n_cities
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, n_classes, (batch,), generator=g).to(device)) for _ in range(args.gpu_steps)]
    torch.manual_seed(args.seed)
    init = backbones.build_backbone(cfg.model.backbone, n_classes, False, None).state_dict()

    def fresh():
        m = backbones.build_backbone(cfg.model.backbone, n_classes, False, None)
        m.load_state_dict(init)
        return m

    amp_model = placement.to_device(fresh(), device, channels_last=True)
    fp32_model = fresh().to(device)
    with torch.no_grad():  # same results: the first batch's loss under both paths (batch statistics)
        x, y = batches[0]
        with placement.autocast(device, "auto"):
            l_amp = F.cross_entropy(amp_model(x.contiguous(memory_format=torch.channels_last)).float(), y).item()
        l_fp32 = F.cross_entropy(fp32_model(x), y).item()
    rel = abs(l_amp - l_fp32) / abs(l_fp32)
    print(f"[training] gpu: first-batch loss amp {l_amp:.5f} vs fp32 {l_fp32:.5f} (relative difference {rel:.1e})")
    assert rel < 1e-2, f"mixed-precision loss differs from fp32 by {rel:.1e}"
    opt_a = torch.optim.Adam(amp_model.parameters(), lr=cfg.train.lr)
    opt_f = torch.optim.Adam(fp32_model.parameters(), lr=cfg.train.lr)
    scaler = placement.grad_scaler(device, "auto")

    def timed(fn):
        def run():
            fn()
            torch.cuda.synchronize()
        return median(time_runs(run, args.repeats))

    amp_s = timed(lambda: loops.train_epoch(amp_model, batches, loops.Optimiser(opt_a, None, scaler), F.cross_entropy,
                                            Placement(device, "auto", True)))
    fp32_s = timed(lambda: plain_fp32_steps(fp32_model, opt_f, batches, device))
    n = batch * args.gpu_steps
    print(f"[training] gpu: {torch.cuda.get_device_name(0)}; {cfg.model.backbone} at {size} px, batch {batch}, "
          f"{args.gpu_steps} steps per run")
    print(table([("amp + channels_last (project)", amp_s), ("plain fp32 NCHW", fp32_s)], n, "image",
                "plain fp32 NCHW"))
    print(f"[training] gpu: project step {n / amp_s:.0f} img/s, plain fp32 {n / fp32_s:.0f} img/s")
    return fp32_s / amp_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scripts", default="cities,ses", help="comma-separated: cities, ses")
    ap.add_argument("--sizes", default="demo,paper", help="comma-separated: demo, paper")
    ap.add_argument("--batches", type=int, default=4, help="batches per timed pipeline pass")
    ap.add_argument("--paper-steps", type=int, default=2, help="timed training steps at paper sizes")
    ap.add_argument("--cities-step-batch", type=int, default=16,
                    help="images per timed paper-size ResNet-50 step (0: the config's 128, ~16 GB of memory)")
    ap.add_argument("--ses-step-batch", type=int, default=2,
                    help="images per timed paper-size EfficientNet-B0 step (0: the config's 10, ~13 GB)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default: the config's)")
    ap.add_argument("--files", type=int, default=16, help="distinct patch / demo cell files")
    ap.add_argument("--cells", type=int, default=4, help="distinct paper-size cell files (slow to draw)")
    ap.add_argument("--noise", type=float, default=3.0, help="sensor noise of the cell PNGs (8-bit levels)")
    ap.add_argument("--gpu-batch", type=int, default=None, help="default: configs/cities.yaml (128)")
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-loader", action="store_true", help="skip the store loader case (bench/training_loader.py)")
    training_loader.add_arguments(ap)
    args, _ = ap.parse_known_args()
    header("training", args)

    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    ratios = {}
    try:
        for script in args.scripts.split(","):
            for size_name in args.sizes.split(","):
                case = cities_case if script == "cities" else ses_case
                ratios[f"{script}_{size_name}"] = report(case(size_name, args, work))
        if not args.no_loader:
            training_loader.run(*paper_files(args, work), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = gpu_part(args)
    for name, ratio in ratios.items():
        print(f"training_pipeline_over_step_{name}: {ratio:.2f}x")
    if speedup is not None:
        print(f"training_gpu_amp_speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
