"""Peak resident memory of the extraction and activation-map stages at N and 4N cells of the paper's size.

    python bench/memory.py [--n 100] [--factor 4] [--cell-px 800] [--cams-px 800] [--stages extraction,cams]

A synthetic French city (urbanlens.ses.world, one city, JPEG 2000 tiles at --res m) is built once.
For each cell count (ses.max_cells = N, then factor x N) the real stage scripts run as child processes,
each on its own results folder:
  extraction       generate_fr_ua_aerial_data.py (one worker), cells of --cell-px (the paper's 800 px)
  activation maps  gradcaming_urban_areas.py at ses.model.input_size = --cams-px, with an untrained SES
                   model saved as the best fold's checkpoint in the layout efficientnet_training.py writes
                   (metrics.json + fold_0/best.pt)
Peak memory is the child's maximum resident set size as the kernel accounts it (os.wait4).

The line can fail both ways. Per-cell results stream to disk, so the peak at factor x N must stay within
LIMIT (+20 %) of the peak at N. A stage that kept one item per cell (extraction: the uint8 cell image,
3 x px x px bytes; activation maps: the two float32 maps, 2 x 4 x px x px bytes) would grow by
(factor - 1) x N items; the run is conclusive only when that is at least the peak at N (keeping the items
would at least double it), else it fails as inconclusive and names the N that would be.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, header, peak_rss_mb  # noqa: E402
from urbanlens.core import files, runtime
from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import data as ses_data
from urbanlens.ses import model as ses_model
from urbanlens.ses import world as ses_world  # noqa: E402

CONFIG = str(ROOT / "configs" / "ses_demo.yaml")
LIMIT = 1.20  # peak at factor x N over peak at N above this: the stage holds per-cell data


def item_mb(stage: str, px: int) -> float:
    """MiB a stage would hold per cell if it kept its result: the uint8 RGB cell image (extraction) or
    the two float32 class maps (activation maps)."""
    return (3 * px * px if stage == "extraction" else 2 * 4 * px * px) / 2**20


def verdict(stage: str, peak_n: float, peak_kn: float, n: int, factor: int, px: int) -> tuple[bool, str]:
    """(passed, the line's reason): growth within LIMIT, and a run able to see a kept item per cell."""
    kept = (factor - 1) * n * item_mb(stage, px)
    if kept < peak_n:
        need = int(peak_n // ((factor - 1) * item_mb(stage, px))) + 1
        return False, (f"FAIL inconclusive: keeping {item_mb(stage, px):.1f} MiB a cell would add {kept:.0f} MiB, "
                       f"less than the peak {peak_n:.0f} MiB; use --n {need} or more")
    ratio = peak_kn / peak_n
    if ratio > LIMIT:
        return False, f"FAIL: peak grew {ratio:.2f}x (limit {LIMIT:.2f}x; keeping every cell would add {kept:.0f} MiB)"
    return True, f"ok: peak grew {ratio:.2f}x (limit {LIMIT:.2f}x; keeping every cell would add {kept:.0f} MiB)"


def overrides(workdir: Path, n: int, args) -> list[str]:
    return [f"paths.data={workdir / 'data'}", f"paths.results={workdir / f'results_{n}'}",
            "ses.world.cities=[Paris]", "ses.cities=[Paris]", "ses.world.withhold=0", f"ses.world.city_size_m={args.city_m}",
            f"ses.world.resolution_m={args.res}", f"ses.cell_px={args.cell_px}", f"ses.model.input_size={args.cams_px}",
            f"ses.max_cells={n}",
            # the paper's model on the composition world, whatever the demo config trains
            "ses.model.backbone=efficientnet_b0", "ses.world.structure=0", "ses.world.house_share=0",
            "workers=1", f"ses.cams.batch_size={args.batch}", "ses.cams.panels=2", f"seed={args.seed}"]


def fake_training(cfg) -> None:
    """An untrained SES model saved where gradcaming_urban_areas.py looks for the best fold's model.

    Its batch-norm statistics are set from one batch of random images, so that its activations have a
    trained model's scale: with the initial statistics (mean 0, variance 1) they shrink layer after
    layer towards subnormal floats, which CPUs compute many times slower.
    """
    import torch

    torch.manual_seed(cfg.seed)
    model = ses_model.build_ses_model(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0  # running statistics = those of the next batch
    with torch.no_grad():
        model.train()(torch.rand(8, 3, cfg.ses.model.input_size, cfg.ses.model.input_size))
    city_dir = Path(cfg.paths.results) / "ses" / cfg.ses.cities[0]
    runtime.save_checkpoint(city_dir / "fold_0" / "best.pt", model.eval(), cfg, epoch=0)
    files.write_json(city_dir / "metrics.json", {"best_fold": 0})


def stage(script: str, sets: list[str], log: Path) -> tuple[float, float]:
    cmd = [sys.executable, str(ROOT / script), "--config", CONFIG]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    mb = peak_rss_mb(cmd, cwd=ROOT, log=log)
    return mb, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="cells of the small run")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--city-m", type=int, default=4400, help="side of the synthetic city, metres (>= factor x N cells)")
    ap.add_argument("--res", type=float, default=1.0, help="orthophoto resolution, metres (cells resampled to --cell-px)")
    ap.add_argument("--cell-px", type=int, default=800, help="cell image side (the SES paper's 800 px)")
    ap.add_argument("--cams-px", type=int, default=800, help="network input of the activation maps = map side")
    ap.add_argument("--stages", default=None, help="comma-separated: extraction, cams (default: both on CUDA; "
                    "extraction alone on a CPU, where the maps of 4N cells of 800 px take hours)")
    ap.add_argument("--batch", type=int, default=4, help="ses.cams.batch_size (keep it <= --n)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the world and results go (default: temporary)")
    args, _ = ap.parse_known_args()
    header("memory", args)
    import torch

    stages = (args.stages or ("extraction,cams" if torch.cuda.is_available() else "extraction")).split(",")
    if "cams" not in stages:
        print("[memory] activation maps not measured (--stages extraction,cams to include them)")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    try:
        sizes = (args.n, args.factor * args.n)
        world_cfg = load_config(CONFIG, overrides(workdir, sizes[0], args) + ["workers=2"])
        if ses_world.existing_world(world_cfg) is None:
            truth = ses_world.build_world(world_cfg, progress=True)
            print(f"[memory] world: {truth['cities']['Paris']['census_cells']} census cells, "
                  f"{truth['cities']['Paris']['tiles']} tiles at {args.res} m")
        peaks = {}
        for n in sizes:
            sets = overrides(workdir, n, args)
            mb, sec = stage("generate_fr_ua_aerial_data.py", sets, workdir / f"extract_{n}.log")
            peaks[("extraction", n)] = mb
            print(f"[memory] extraction, {n} cells: peak {mb:.0f} MiB ({sec:.1f} s)")
            cells = ses_data.read_cells(workdir / f"results_{n}" / "ses" / "cells.gpkg")
            if len(cells) != n:
                raise SystemExit(f"[memory] the city has only {len(cells)} cells (asked {n}): raise --city-m")
            if "cams" in stages:
                fake_training(load_config(CONFIG, sets))
                mb, sec = stage("gradcaming_urban_areas.py", sets, workdir / f"cams_{n}.log")
                peaks[("activation maps", n)] = mb
                print(f"[memory] activation maps, {n} cells ({int(cells['non_void'].sum())} non-void): "
                      f"peak {mb:.0f} MiB ({sec:.1f} s)")

        print(f"{'stage':<18}{f'N={sizes[0]} MiB':>14}{f'{sizes[1]} MiB':>12}{'ratio':>8}{'MiB/cell':>10}"
              f"{'item MiB':>10}")
        failed = False
        for name, px in (("extraction", args.cell_px), ("activation maps", args.cams_px)):
            if (name, sizes[0]) not in peaks:
                continue
            a, b = peaks[(name, sizes[0])], peaks[(name, sizes[1])]
            print(f"{name:<18}{a:>14.0f}{b:>12.0f}{b / a:>8.2f}{(b - a) / (sizes[1] - sizes[0]):>10.2f}"
                  f"{item_mb(name, px):>10.2f}")
            passed, why = verdict(name, a, b, *sizes[:1], args.factor, px)
            failed |= not passed
            print(f"memory_ratio_{name.replace(' ', '_')}_{px}px: {b / a:.2f}x  {why}")
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
