"""Training: the trainers' loaders at the papers' sizes (bench/training_loader.py) and, on CUDA, the
project's training step against a plain fp32 loop.

    python bench/training.py [--gpu-steps 10] [--repeats 3] [loader flags: bench/training_loader.py --help]

Loader case (bench/training_loader.py): the trainers' uint8 store path at 224 px patches and 800 px
cells, wall-clock through the trainers' own loaders; prints training_loader_* lines.
GPU part (only where CUDA is available): ResNet-50 at 224, the project's step (loops.train_epoch
with placement.autocast mixed precision, placement.grad_scaler and channels_last) vs a plain fp32 NCHW loop; the two
losses on the same first batch agree within 1 %.
(The former pipeline-over-step lines compared a CPU loader with a CPU training step, a comparison that
could not fail; they are retired.)
"""
import argparse
import os
import shutil
import sys
import tempfile
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

from urbanlens.cities import world, world_render  # noqa: E402
from urbanlens.core import backbones, loops, placement  # noqa: E402
from urbanlens.core.placement import Placement  # noqa: E402
from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import extraction as ses_extraction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {("cities", "paper"): "configs/cities.yaml", ("ses", "paper"): "configs/ses.yaml"}
GPU = "cuda"  # the GPU part's device


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
    cc = load_config(str(ROOT / CONFIGS["cities", "paper"]), ["cities.model.pretrained=false", "device=cpu"])
    sc = load_config(str(ROOT / CONFIGS["ses", "paper"]), ["ses.model.pretrained=false", "device=cpu"])
    patches = write_jpegs(draw_images(args.files, cc.cities.patch.size, cc.cities.world.feature_scale, args.seed),
                          work / "loader_cities", cc.cities.patch.jpeg_quality)
    px = sc.ses.cell_px
    return patches, write_cells(draw_images(args.cells, px, px / 96, args.seed), work / "loader_ses", args.noise, args.seed)


# ------------------------------------------------------------------------------------------ GPU step
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


def gpu_part(args) -> float | None:
    if not torch.cuda.is_available():
        print("[training] GPU part skipped: no CUDA GPU visible")
        return None
    device = torch.device(GPU)
    cfg = load_config(str(ROOT / CONFIGS["cities", "paper"]), ["cities.model.pretrained=false"])
    batch, size, n_classes = args.gpu_batch or cfg.cities.train.batch_size, cfg.cities.model.input_size, cfg.cities.world.n_cities
    g = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randn(batch, 3, size, size, generator=g).to(device),
                torch.randint(0, n_classes, (batch,), generator=g).to(device)) for _ in range(args.gpu_steps)]
    torch.manual_seed(args.seed)
    init = backbones.build_backbone(cfg.cities.model.backbone, n_classes, False, None).state_dict()

    def fresh():
        m = backbones.build_backbone(cfg.cities.model.backbone, n_classes, False, None)
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
    opt_a = torch.optim.Adam(amp_model.parameters(), lr=cfg.cities.train.lr)
    opt_f = torch.optim.Adam(fp32_model.parameters(), lr=cfg.cities.train.lr)
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
    print(f"[training] gpu: {torch.cuda.get_device_name(0)}; {cfg.cities.model.backbone} at {size} px, batch {batch}, "
          f"{args.gpu_steps} steps per run")
    print(table([("amp + channels_last (project)", amp_s), ("plain fp32 NCHW", fp32_s)], n, "image",
                "plain fp32 NCHW"))
    print(f"[training] gpu: project step {n / amp_s:.0f} img/s, plain fp32 {n / fp32_s:.0f} img/s")
    return fp32_s / amp_s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=16, help="distinct patch files of the loader case")
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
    try:
        if not args.no_loader:
            training_loader.run(*paper_files(args, work), args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    speedup = gpu_part(args)
    if speedup is not None:
        print(f"training_gpu_amp_speedup: {speedup:.2f}x")


if __name__ == "__main__":
    main()
