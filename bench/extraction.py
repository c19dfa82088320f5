"""Cell extraction from orthophoto tiles: urbanlens.ses.extraction.read_cells vs warp-whole-tiles-then-clip.

    python bench/extraction.py [--city-m 2000] [--res 1.0] [--cell-px 200] [--repeats 3]

Tiles: a synthetic city of ``--city-m`` (urbanlens.ses.world: its land use rendered as 1 km
Lambert-93 tiles, EPSG:2154, JPEG 2000 when GDAL has the driver, as the IGN delivers them). Cells: every
200 m INSEE cell (EPSG:3035) lying wholly inside the tiles. Compared, on one thread, same tiles and cells:
  urbanlens.ses.extraction   read_cells on the groups extract_cells makes (cells needing the same
                  tiles, 16 at most): the group's footprint read once from its tile(s) in their own CRS
                  (a window of each, mosaicked), each cell reprojected from it onto its px x px grid
  read_cell, cell by cell    the same, each cell's windows read for it alone (the path before)
  reference       each whole tile warped to EPSG:3035 on disk (rasterio.warp.reproject onto the cells'
                  pixel grid, GeoTIFF), then each cell clipped from the warped tile(s) it overlaps
  decode floor    every tile's pixels decoded once (rasterio read), nothing else
  cell warps alone  every cell's warp from its group's mosaic already in memory: decode floor + this is
                  what any path pays that resamples with GDAL's average kernel
Both paths use the same resampling (average) and nodata (0). Saving the cell images (PNG) costs the same
in both and is left out. Check: the two paths give the same pixels (PSNR over all cells). Targets:
urbanlens at least 1.5x faster than the reference, at most 2x the floor; a missed target prints FAIL
(``--strict``: exit status 1).
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, median, psnr, single_thread, table, time_runs, verdict  # noqa: E402

single_thread()

import geopandas as gpd  # noqa: E402
import numpy as np  # noqa: E402
import rasterio  # noqa: E402
import shapely  # noqa: E402
from rasterio.enums import Resampling  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402
from rasterio.warp import reproject, transform_bounds  # noqa: E402
from rasterio.windows import from_bounds as window_from_bounds  # noqa: E402

from urbanlens.core.config import load_config  # noqa: E402
from urbanlens.ses import extraction as ses_extraction
from urbanlens.ses import grid as ses_grid
from urbanlens.ses import tiles as ses_tiles
from urbanlens.ses import (
    world,  # noqa: E402
    world_plan,
)


def make_tiles(workdir: Path, city_m: float, res: float, seed: int, fmt: str, workers: int) -> gpd.GeoDataFrame:
    """Render a synthetic city's orthophoto tiles; return the tile index [path, geometry] (EPSG:2154)."""
    cfg = load_config(None, [f"ses.world.city_size_m={city_m}", f"ses.world.resolution_m={res}",
                             "ses.world.nodata_fraction=0", f"seed={seed}"])
    city = world_plan.plan_city("Paris", 0, float(city_m), seed)
    driver, ext = world.aerial_driver() if fmt == "jp2" else ("GTiff", "tif")
    jobs, index = world.tile_jobs(city, workdir / "tiles", cfg.ses.world, seed, driver, ext)
    world.render_all(jobs, workers, progress=True)
    index["path"] = [j.path for j in jobs]
    return index[["path", "geometry"]]


def cells_inside(tiles: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The 200 m EPSG:3035 cells wholly inside the tiles' union, with the tiles each overlaps."""
    footprint = tiles.geometry.segmentize(50).to_crs(ses_grid.LAEA).union_all()
    w, s, e, n = footprint.bounds
    xs = np.arange(np.ceil(w / 200) * 200, e, 200)
    ys = np.arange(np.ceil(s / 200) * 200, n, 200)
    boxes = [shapely.box(x, y, x + 200, y + 200) for y in ys for x in xs]
    cells = gpd.GeoDataFrame(geometry=[b for b in boxes if footprint.contains(b)], crs=ses_grid.LAEA)
    cells["tiles"] = ses_tiles.tiles_for_cells(cells, tiles)
    return cells.sort_values("tiles", kind="stable").reset_index(drop=True)  # tile by tile, as extract_cells


# ------------------------------------------------------------------------------------ the compared paths
def run_urbanlens(cells, px, group_size=16):
    """ses_extraction.read_cells on the groups extract_cells makes (cells sharing tiles, at most
    ``group_size``), tiles opened once (as extract_cells keeps them open); images in cell order."""
    paths = sorted({p for t in cells["tiles"] for p in t})
    jobs = [(i, c.bounds, tuple(t)) for i, (c, t) in enumerate(zip(cells.geometry, cells["tiles"]))]
    out = [None] * len(jobs)
    with rasterio.Env():
        srcs = {p: rasterio.open(p) for p in paths}
        try:
            for group in ses_extraction.group_jobs(jobs, group_size):
                imgs = ses_extraction.read_cells([srcs[p] for p in group[0][2]], [b for _, b, _ in group], px)
                for (i, _, _), img in zip(group, imgs):
                    out[i] = img
            return out
        finally:
            for s in srcs.values():
                s.close()


def run_per_cell(cells, px):
    """ses_extraction.read_cell cell by cell (each cell's tile windows read for it alone)."""
    paths = sorted({p for t in cells["tiles"] for p in t})
    with rasterio.Env():
        srcs = {p: rasterio.open(p) for p in paths}
        try:
            return [ses_extraction.read_cell([srcs[p] for p in t], c.bounds, px) for c, t in zip(cells.geometry, cells["tiles"])]
        finally:
            for s in srcs.values():
                s.close()


def cell_warps(cells, px, group_size=16):
    """The warps alone: each group's mosaic read first (untimed, ses_extraction.cell_mosaic); the
    returned function warps every cell from them (ses_extraction.warp_cells), as read_cells does."""
    jobs = [(i, c.bounds, tuple(t)) for i, (c, t) in enumerate(zip(cells.geometry, cells["tiles"]))]
    mosaics = []
    for group in ses_extraction.group_jobs(jobs, group_size):
        srcs = [rasterio.open(p) for p in group[0][2]]
        try:
            mosaics.append(ses_extraction.cell_mosaic(srcs, [b for _, b, _ in group]))
        finally:
            for s in srcs:
                s.close()
    return lambda: [ses_extraction.warp_cells(m, px) for m in mosaics]


def warp_tile(path, out_path, res):
    """The whole tile reprojected to EPSG:3035 on a grid of ``res`` m aligned with the 200 m cells."""
    with rasterio.open(path) as src:
        data = src.read()
        src_crs = ses_tiles.tile_crs(src)
        w, s, e, n = transform_bounds(src_crs, ses_grid.LAEA, *src.bounds, densify_pts=21)
        w, s = np.floor(w / res) * res, np.floor(s / res) * res
        e, n = np.ceil(e / res) * res, np.ceil(n / res) * res
        width, height = int(round((e - w) / res)), int(round((n - s) / res))
        transform = from_origin(w, n, res, res)
        out = np.zeros((data.shape[0], height, width), np.uint8)
        reproject(data, out, src_transform=src.transform, src_crs=src_crs, src_nodata=0,
                  dst_transform=transform, dst_crs=ses_grid.LAEA, dst_nodata=0, resampling=Resampling.average,
                  UNIFIED_SRC_NODATA="YES")
    with rasterio.open(out_path, "w", driver="GTiff", width=width, height=height, count=out.shape[0],
                       dtype="uint8", crs=ses_grid.LAEA, transform=transform, nodata=0) as dst:
        dst.write(out)


def run_reference(cells, px, warp_dir: Path):
    """Warp every tile to EPSG:3035 on disk, then clip each cell from the warped tiles it overlaps."""
    res = 200 / px
    paths = sorted({p for t in cells["tiles"] for p in t})
    warped = {p: warp_dir / f"{Path(p).stem}_3035.tif" for p in paths}
    for p in paths:
        warp_tile(p, warped[p], res)
    out = []
    srcs = {p: rasterio.open(w) for p, w in warped.items()}
    try:
        for cell, tiles in zip(cells.geometry, cells["tiles"]):
            img = np.zeros((3, px, px), np.uint8)
            for p in tiles:  # the cell's window of each warped tile; gaps filled by the next tile
                ds = srcs[p]
                win = window_from_bounds(*cell.bounds, transform=ds.transform).round_offsets().round_lengths()
                part = ds.read(window=win, boundless=True, fill_value=0)
                empty = (img == 0).all(axis=0)
                img[:, empty] = part[:, empty]
            out.append(img.transpose(1, 2, 0))
    finally:
        for s in srcs.values():
            s.close()
    return out


def run_floor(paths):
    for p in paths:
        with rasterio.open(p) as ds:
            ds.read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--city-m", type=int, default=2000, help="side of the synthetic city, metres")
    ap.add_argument("--res", type=float, default=1.0, help="tile ground resolution, metres (IGN: 0.2)")
    ap.add_argument("--cell-px", type=int, default=200, help="pixels per cell side (paper: 800)")
    ap.add_argument("--format", choices=("jp2", "tif"), default="jp2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the tiles go (default: a temporary folder)")
    ap.add_argument("--strict", action="store_true", help="exit status 1 when a target is missed")
    args, _ = ap.parse_known_args()
    header("extraction", args)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extraction_"))
    try:
        tiles = make_tiles(workdir, args.city_m, args.res, args.seed, args.format, workers=2)
        cells = cells_inside(tiles)
        paths = sorted({p for t in cells["tiles"] for p in t})
        with rasterio.open(paths[0]) as ds:
            tile_desc = f"{ds.driver} {ds.width} x {ds.height} px"
        print(f"[extraction] {len(paths)} tiles ({tile_desc}, {args.res} m), {len(cells)} cells of "
              f"{args.cell_px} px ({200 / args.cell_px:.2f} m), {int((cells['tiles'].str.len() > 1).sum())} "
              "straddling tiles")

        # same pixels
        warp_dir = workdir / "warped"
        warp_dir.mkdir(exist_ok=True)
        ours, ref = run_urbanlens(cells, args.cell_px), run_reference(cells, args.cell_px, warp_dir)
        a, b = np.stack(ours), np.stack(ref)
        same = float((a == b).all(axis=-1).mean())
        worst = min(psnr(x, y) for x, y in zip(a, b))
        print(f"[extraction] same pixels: PSNR {psnr(a, b):.1f} dB over all cells (worst cell {worst:.1f} dB), "
              f"{100 * same:.2f} % of pixels identical")
        assert psnr(a, b) >= 40, "the project's cells differ from the reference's"

        rows = [("urbanlens.ses.extraction", median(time_runs(lambda: run_urbanlens(cells, args.cell_px), args.repeats))),
                ("read_cell, cell by cell", median(time_runs(lambda: run_per_cell(cells, args.cell_px), args.repeats))),
                ("reference", median(time_runs(lambda: run_reference(cells, args.cell_px, warp_dir), args.repeats))),
                ("decode floor", median(time_runs(lambda: run_floor(paths), args.repeats))),
                ("cell warps alone", median(time_runs(cell_warps(cells, args.cell_px), args.repeats)))]
        print(table(rows, len(cells), "cell", "urbanlens.ses.extraction"))
        t = dict(rows)
        bound = t["decode floor"] + t["cell warps alone"]
        print(f"[extraction] decoding the tiles costs {t['decode floor']:.2f} s: no path that decodes them can beat "
              f"the reference by more than {t['reference'] / t['decode floor']:.1f}x here; decoding plus the cells' "
              f"warps (GDAL's average kernel) cost {bound:.2f} s: {t['reference'] / bound:.2f}x the reference at best")
        ok = verdict("extraction_over_floor", t["urbanlens.ses.extraction"] / t["decode floor"], 2.0, at_least=False)
        ok &= verdict("extraction_vs_reference", t["reference"] / t["urbanlens.ses.extraction"], 1.5, at_least=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
