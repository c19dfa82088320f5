"""Cell extraction from IGN-size JPEG 2000 tiles (5000 x 5000 px, 1 km at 0.20 m), lossy and lossless.

    python bench/extraction_jp2.py [--jp2-size 5000] [--city-m 1000] [--quality 20] [--threads 1,2]

Tiles: a synthetic city of ``--city-m`` (urbanlens.ses.world) rendered as 1 km Lambert-93 tiles, enlarged
to ``--jp2-size`` px (0.20 m at 5000 px) with sensor-like grain (``fine_tiles``; the default city is covered
by 2 x 2 tiles), then encoded with
GDAL's JP2OpenJPEG driver twice: lossy (``QUALITY=--quality``, ``REVERSIBLE=NO``, as the IGN ships its
orthophotos) and lossless (``REVERSIBLE=YES``), in 1024 px code-stream tiles. Cells: every 200 m INSEE cell
(EPSG:3035) wholly inside the tiles, at 1000 px (0.20 m). Compared per codec, as bench/extraction.py does
(same paths, same check):
  urbanlens.ses.extraction   read_cells on extract_cells' groups: each group's tile region decoded
                             once, each cell warped from it in memory
  reference                  each whole tile warped to EPSG:3035 on disk, then each cell clipped from it
  decode floor               every tile's pixels decoded once, nothing else
  cell warps alone           every cell's warp from its mosaic already in memory (no decoding): with
                             the floor, what any path using GDAL's average kernel pays
All on one thread; the decode thread settings GDAL offers (``GDAL_NUM_THREADS``, read by the
JP2OpenJPEG driver, which decodes code-stream tiles in parallel and passes it to OpenJPEG) are timed
as extra rows of the floor and of urbanlens. Targets (per codec, one thread): urbanlens at least 2x
faster than the reference and at most 1.3x the decode floor; a missed target prints FAIL (``--strict``:
exit status 1).
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, median, psnr, single_thread, table, time_runs, verdict  # noqa: E402

single_thread()

import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import rasterio.shutil  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402

from bench.extraction import (  # noqa: E402
    cell_warps,
    cells_inside,
    make_tiles,
    run_floor,
    run_reference,
    run_urbanlens,
)

CODECS = {"lossy": {"REVERSIBLE": "NO"}, "lossless": {"REVERSIBLE": "YES", "QUALITY": "100"}}


def timed(fn, repeats: int):
    """(median seconds of ``repeats`` calls of ``fn()``, no warm-up; the last call's result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return median(times), result


def fine_tiles(workdir: Path, city_m: int, size: int, seed: int):
    """The city rendered as 1 m tiles (urbanlens.ses.world; rendering at 0.20 m takes minutes a tile),
    each enlarged to ``size`` px (bilinear) with seeded sensor-like grain (uniform, +-6 levels) so that
    the codec meets fine detail; uncompressed GeoTIFFs. The index with their paths."""
    tiles = make_tiles(workdir / "render", city_m, 1.0, seed, "tif", workers=2)
    rng = np.random.default_rng(seed)
    paths = []
    for p in tiles["path"]:
        with rasterio.open(p) as src:
            arr = src.read(out_shape=(src.count, size, size), resampling=Resampling.bilinear)
            profile = {**src.profile, "width": size, "height": size, "compress": None, "blockxsize": 512,
                       "blockysize": 512, "transform": src.transform * src.transform.scale(src.width / size)}
        grain = rng.integers(-6, 7, size=arr.shape[1:], dtype=np.int16)
        keep = arr.any(axis=0)  # nodata (0 in every band) stays nodata
        arr = np.where(keep, np.clip(arr + grain, 1, 255), 0).astype(np.uint8)
        dst = workdir / "fine" / Path(p).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst, "w", **profile) as out:
            out.write(arr)
        paths.append(str(dst))
    out = tiles.copy()
    out["path"] = paths
    return out


def encode(tiles, folder: Path, codec: str, quality: int):
    """The tiles re-encoded as JPEG 2000 (``codec`` lossy or lossless, 1024 px code-stream tiles, encoded
    on every core); the index with the new paths."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = {"QUALITY": str(quality), **CODECS[codec], "BLOCKXSIZE": "1024", "BLOCKYSIZE": "1024"}
    out = tiles.copy()
    paths = []
    with rasterio.Env(GDAL_PAM_ENABLED="NO", GDAL_NUM_THREADS="ALL_CPUS"):
        for p in tiles["path"]:
            dst = folder / (Path(p).stem + ".jp2")
            rasterio.shutil.copy(p, dst, driver="JP2OpenJPEG", **opts)
            paths.append(str(dst))
    out["path"] = paths
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jp2-size", type=int, default=5000, help="tile side in px for 1 km (5000: IGN's 0.20 m)")
    ap.add_argument("--city-m", type=int, default=1000, help="side of the synthetic city, metres (1000: 2 x 2 tiles)")
    ap.add_argument("--quality", type=int, default=20, help="lossy JPEG 2000 QUALITY (percent of the raw size)")
    ap.add_argument("--codecs", default="lossy,lossless")
    ap.add_argument("--threads", default="1,2", help="GDAL_NUM_THREADS settings timed (1 is the per-core row)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strict", action="store_true", help="exit status 1 when a target is missed")
    ap.add_argument("--workdir", default=None, help="where the tiles go (default: a temporary folder)")
    args, _ = ap.parse_known_args()
    header("extraction_jp2", args)
    res = 1000 / args.jp2_size
    px = int(round(200 / res))
    threads = [t for t in args.threads.split(",") if t and t != "1"]

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extraction_jp2_"))
    ok = True
    try:
        t0 = time.perf_counter()
        raw = fine_tiles(workdir, args.city_m, args.jp2_size, args.seed)
        cells = cells_inside(raw)
        print(f"[extraction_jp2] {len(raw)} tiles of {args.jp2_size} px ({res:.2f} m), {len(cells)} cells of {px} px, "
              f"{int((cells['tiles'].str.len() > 1).sum())} straddling tiles")
        for codec in args.codecs.split(","):
            tiles = encode(raw, workdir / codec, codec, args.quality)
            paths = sorted(tiles["path"])
            mb = sum(Path(p).stat().st_size for p in paths) / 2**20
            print(f"[extraction_jp2] {codec}: {mb:.0f} MiB of JPEG 2000 ({mb / len(paths):.1f} MiB a tile)")
            cells = cells_inside(tiles)
            warp_dir = workdir / codec / "warped"
            warp_dir.mkdir(exist_ok=True)

            # the timed runs' own images are checked (no separate run: a 5000 px tile costs minutes a path)
            (t_ours, ours), (t_ref, ref) = timed(lambda: run_urbanlens(cells, px), args.repeats), \
                timed(lambda: run_reference(cells, px, warp_dir), args.repeats)
            quality = psnr(np.stack(ours), np.stack(ref))
            print(f"[extraction_jp2] {codec} same pixels: PSNR {quality:.1f} dB over all cells")
            assert quality >= 40, "the project's cells differ from the reference's"
            del ours, ref

            rows = [("urbanlens.ses.extraction", t_ours), ("reference", t_ref),
                    ("decode floor", median(time_runs(lambda: run_floor(paths), args.repeats, 0))),
                    ("cell warps alone", median(time_runs(cell_warps(cells, px), args.repeats, 0)))]
            for n in threads:
                with rasterio.Env(GDAL_NUM_THREADS=n):
                    rows += [(f"urbanlens, GDAL_NUM_THREADS={n}",
                              median(time_runs(lambda: run_urbanlens(cells, px), args.repeats, 0))),
                             (f"decode floor, GDAL_NUM_THREADS={n}", median(time_runs(lambda: run_floor(paths),
                                                                                     args.repeats, 0)))]
            print(table(rows, len(cells), "cell", "decode floor"))
            t = dict(rows)
            bound = t["decode floor"] + t["cell warps alone"]
            print(f"[extraction_jp2] {codec}: decode floor + cell warps = {bound:.2f} s, so at best "
                  f"{t['reference'] / bound:.2f}x the reference and {bound / t['decode floor']:.2f}x the floor "
                  "with GDAL's average kernel")
            ok &= verdict(f"extraction_jp2_vs_reference_{codec}", t["reference"] / t["urbanlens.ses.extraction"],
                          2.0, at_least=True)
            ok &= verdict(f"extraction_jp2_over_floor_{codec}", t["urbanlens.ses.extraction"] / t["decode floor"],
                          1.3, at_least=False)
        print(f"[extraction_jp2] took {time.perf_counter() - t0:.0f} s in all (tiles, encoding, checks, timings)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
