"""Peak resident memory of the extraction and activation-map stages at N and factor x N cells.

    python bench/memory.py [--n 8] [--factor 4] [--res 1.0] [--cell-px 64]

A synthetic French city (urbanlens.ses.world, one city, JPEG 2000 tiles at --res m) is built once.
For each cell count (ses.max_cells = N, then factor x N) the real stage scripts run as child processes,
each on its own results folder:
  extraction       generate_fr_ua_aerial_data.py (one worker)
  activation maps  gradcaming_urban_areas.py, with an untrained SES model saved as the best fold's
                   checkpoint in the layout efficientnet_training.py writes (metrics.json + fold_0/best.pt)
Peak memory is the child's maximum resident set size as the kernel accounts it (os.wait4). The ratio
(factor x N) / N should stay near 1: per-cell results stream to disk, only a batch is held at a time.
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


def overrides(workdir: Path, n: int, args) -> list[str]:
    return [f"paths.data={workdir / 'data'}", f"paths.results={workdir / f'results_{n}'}",
            "france.cities=[Paris]", "ses.cities=[Paris]", f"france.city_size_m={args.city_m}",
            f"france.resolution_m={args.res}", f"ses.cell_px={args.cell_px}", f"ses_model.input_size={args.cell_px}",
            f"ses.max_cells={n}",
            "workers=1", f"cams.batch_size={args.batch}", "cams.panels=2", f"seed={args.seed}"]


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
        model.train()(torch.rand(8, 3, cfg.ses_model.input_size, cfg.ses_model.input_size))
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
    ap.add_argument("--n", type=int, default=8, help="cells of the small run")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--city-m", type=int, default=2400, help="side of the synthetic city, metres")
    ap.add_argument("--res", type=float, default=1.0, help="orthophoto resolution, metres")
    ap.add_argument("--cell-px", type=int, default=64, help="cell image side = network input")
    ap.add_argument("--batch", type=int, default=4, help="cams.batch_size (keep it <= --n)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the world and results go (default: temporary)")
    args, _ = ap.parse_known_args()
    header("memory", args)

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
            fake_training(load_config(CONFIG, sets))
            mb, sec = stage("gradcaming_urban_areas.py", sets, workdir / f"cams_{n}.log")
            peaks[("activation maps", n)] = mb
            print(f"[memory] activation maps, {n} cells: peak {mb:.0f} MiB ({sec:.1f} s)")
            cells = ses_data.read_cells(workdir / f"results_{n}" / "ses" / "cells.gpkg")
            done = int(cells["non_void"].sum())
            if len(cells) != n:
                print(f"[memory] warning: the city has only {len(cells)} cells (asked {n}); "
                      "raise --city-m", file=sys.stderr)
            print(f"[memory]   ({len(cells)} cells extracted, {done} non-void through the activation maps)")

        print(f"{'stage':<18}{f'N={sizes[0]} MiB':>14}{f'{sizes[1]} MiB':>12}{'ratio':>8}{'MiB/cell':>10}")
        ratios = {}
        for name in ("extraction", "activation maps"):
            a, b = peaks[(name, sizes[0])], peaks[(name, sizes[1])]
            ratios[name] = b / a
            print(f"{name:<18}{a:>14.0f}{b:>12.0f}{b / a:>8.2f}{(b - a) / (sizes[1] - sizes[0]):>10.2f}")
        print(f"memory_ratio_extraction: {ratios['extraction']:.2f}x")
        print(f"memory_ratio_activation_maps: {ratios['activation maps']:.2f}x")
        print(f"memory_ratio: {max(ratios.values()):.2f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
