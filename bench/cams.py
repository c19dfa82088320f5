"""Guided Grad-CAM of the map stage per cell: a batch of cells in one pass vs one cell at a time.

    python bench/cams.py [--px 800] [--batch 8] [--repeats 2] [--device auto] [--amp off]

EfficientNet-B0 of the income model (untrained, ``ses.model.pretrained=false``) at --px (default: the
paper's 800 px on CUDA, 224 px on a CPU, where 800 px takes minutes a cell), the two maps
the stage computes per cell (poorest and richest class, ``urbanlens.core.cam.guided_gradcam`` with
clip percentile 99) on --batch random cells: at batch 1 (each cell alone) and at --batch in one call.
Same results: the batch's maps equal the cells' maps one at a time within TOLERANCE (max absolute
difference of maps in [0, 1]); the run stops otherwise. Prints cells per second of both and
``cams_guided_batch_speedup`` (batch over one at a time; on CPU expect about 1, on a GPU more).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, single_thread  # noqa: E402
from urbanlens.core import backbones, cam, config, placement  # noqa: E402
from urbanlens.ses import model as ses_model  # noqa: E402

TOLERANCE = 1e-4  # maps are in [0, 1]; float32 reductions in another order differ by ~1e-6


def maps_of(model, layer, x, amp):
    return np.stack([cam.guided_gradcam(model, layer, x, k, 99.0, amp) for k in (0, 4)], axis=1)


def timed(fn, device, repeats: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--px", type=int, default=None, help="cell side = network input (default: 800 on CUDA, 224 on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each (the fastest counts)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="off", help="ses.cams.amp: auto | bf16 | fp16 | off")
    args = ap.parse_args()
    device = placement.select_device(args.device)
    args.px = args.px or (800 if device.type == "cuda" else 224)
    if device.type == "cpu":
        single_thread()
    header("cams", args)
    cfg = config.load_config(None, ["ses.model.pretrained=false", f"ses.model.input_size={args.px}"])
    torch.manual_seed(0)
    model = placement.to_device(ses_model.build_ses_model(cfg).eval(), device, True, args.amp)
    layer = backbones.last_conv_layer(model)
    x = torch.rand(args.batch, 3, args.px, args.px, generator=torch.Generator().manual_seed(1))
    xb = placement.batch_to_device(x, device, True, args.amp)
    maps_of(model, layer, xb[:1], args.amp)  # warm-up
    one_s, alone = timed(lambda: np.concatenate([maps_of(model, layer, xb[i:i + 1], args.amp)
                                                 for i in range(args.batch)]), device, args.repeats)
    batch_s, together = timed(lambda: maps_of(model, layer, xb, args.amp), device, args.repeats)
    diff = float(np.abs(together - alone).max())
    print(f"[cams] EfficientNet-B0 {args.px} px, both classes, {args.batch} cells on {device} (amp {args.amp}); "
          f"batch vs one at a time: max |difference| {diff:.1e} (limit {TOLERANCE:.0e})")
    if diff > TOLERANCE:
        print(f"[cams] FAIL: batched maps differ from one cell at a time by {diff:.1e}", file=sys.stderr)
        return 1
    print(f"{'path':<24}{'s':>10}{'cells/s':>10}")
    print(f"{'batch 1 (one at a time)':<24}{one_s:>10.2f}{args.batch / one_s:>10.2f}")
    print(f"{f'batch {args.batch}':<24}{batch_s:>10.2f}{args.batch / batch_s:>10.2f}")
    print(f"cams_guided_cells_per_s_batch_1: {args.batch / one_s:.2f}")
    print(f"cams_guided_cells_per_s_batch_{args.batch}: {args.batch / batch_s:.2f}")
    print(f"cams_guided_batch_speedup: {one_s / batch_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
