"""Patching of raw city images: urbanlens.cities.patches.write_patches vs the JPEG codec floor.

    python bench/patching.py [--cities 2] [--images 2] [--image-px 1440] [--patch 480] [--repeats 3]

Raw world: urbanlens.cities.world (cities x 2 sites x images of image-px, JPEG), cut with the paper's
rule (480 px patches, stride 240; the last site split into test / val halves). Compared on the same
images and plan (urbanlens.cities.patches.plan_split):
  write_patches, 1 worker    the project's preprocessing, one process (files written, renamed)
  write_patches, 2 workers   the same with two worker processes
  codec floor                in one process: decode each raw image once, encode each patch once
                             (same codec and quality) into memory, nothing written
Check: every patch file equals, byte for byte, the floor's encoding of the same pixels.
Targets: write_patches on 1 worker at most 1.5x the floor, 2 workers at least 1.5x faster than 1; a
missed target prints FAIL (``--strict``: exit status 1).
"""
import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, median, single_thread, table, time_runs, verdict  # noqa: E402

single_thread()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from urbanlens.cities import patches  # noqa: E402
from urbanlens.cities import world as cities_world  # noqa: E402
from urbanlens.core.config import load_config  # noqa: E402


def make_world(data: Path, cities: int, images: int, image_px: int, seed: int) -> Path:
    cfg = load_config(None, [f"paths.data={data}", f"cities.world.n_cities={cities}", "cities.world.n_sites=2",
                             f"cities.world.images_per_site={images}", f"cities.world.image_size={image_px}",
                             "cities.world.feature_scale=5.0", f"seed={seed}"])
    return cities_world.generate_world(cfg) / "raw"


def codec_floor(plan, raw: Path, quality: int) -> dict:
    """Decode each source once and encode each (non test_b) patch once into memory; {path: bytes}."""
    out = {}
    for src, group in plan[plan["split"] != "test_b"].groupby("source", sort=True):
        with Image.open(raw / src) as im:
            arr = np.asarray(im.convert("RGB"))
        for path, y, x, size in group[["path", "y", "x", "size"]].itertuples(index=False, name=None):
            buf = io.BytesIO()
            Image.fromarray(arr[y:y + size, x:x + size]).save(buf, format="JPEG", quality=quality)
            out[path] = buf.getvalue()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cities", type=int, default=2)
    ap.add_argument("--images", type=int, default=2, help="images per site (2 sites per city)")
    ap.add_argument("--image-px", type=int, default=1440, help="raw image side (paper: 4800)")
    ap.add_argument("--patch", type=int, default=480)
    ap.add_argument("--stride", type=int, default=240)
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the world and patches go (default: temporary)")
    ap.add_argument("--strict", action="store_true", help="exit status 1 when a target is missed")
    args, _ = ap.parse_known_args()
    header("patching", args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_patching_"))
    try:
        raw = make_world(workdir / "data", args.cities, args.images, args.image_px, args.seed)
        plan, problems = patches.plan_split(raw, args.patch, args.stride, test_b_per_city=20, seed=args.seed)
        assert not problems, problems
        n_src, n_cut = plan["source"].nunique(), int((plan["split"] != "test_b").sum())
        print(f"[patching] {n_src} raw images of {args.image_px} px -> {n_cut} patches of {args.patch} px "
              f"(+ {len(plan) - n_cut} test_b links), JPEG quality {args.quality}")
        out = workdir / "patches"

        def clear():
            shutil.rmtree(out, ignore_errors=True)

        def cut(workers):
            return lambda: patches.write_patches(plan, raw, out, args.quality, workers=workers, progress=False)

        # same results: the files written are the floor's encodings, byte for byte
        clear()
        written = cut(1)()
        floor = codec_floor(plan, raw, args.quality)
        assert written == len(plan), (written, len(plan))
        differ = [p for p, b in floor.items() if (out / p).read_bytes() != b]
        print(f"[patching] {len(floor)} patch files compared with the floor's encodings: {len(differ)} differ")
        assert not differ, f"{len(differ)} patches differ, e.g. {differ[0]}"

        rows = [("write_patches, 1 worker", median(time_runs(cut(1), args.repeats, setup=clear))),
                (f"write_patches, {args.workers} workers",
                 median(time_runs(cut(args.workers), args.repeats, setup=clear))),
                ("codec floor", median(time_runs(lambda: codec_floor(plan, raw, args.quality), args.repeats)))]
        clear()
        print(table(rows, n_cut, "patch", "codec floor"))
        t = [sec for _, sec in rows]
        ok = verdict(f"patching_{args.workers}_workers_speedup", t[0] / t[1], 1.5, at_least=True,
                     note="needs as many idle cores as workers")
        ok &= verdict("patching_over_floor", t[0] / t[2], 1.5, at_least=False)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
