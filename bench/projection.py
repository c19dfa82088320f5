"""Projection of activation maps onto land-use pieces: urbanlens.zonal vs rasterstats vs exactextract.

    python bench/projection.py [--cells 12] [--pieces 10] [--px 800] [--repeats 5] [--layout voronoi|city]

Each cell is a 200 m square (EPSG:3035) with two float32 maps of px x px (poor, rich; CAM-like: values
in [0, 1], a fifth of them zero) and about ``--pieces`` Voronoi pieces clipped to it (``--layout city``:
the Urban Atlas pieces of a synthetic city's cells instead, long street polygons included). Compared, one
thread each, on the same cells:
  urbanlens.zonal     piece_stats: 6 statistics of both maps + TV / symmetric KL + scores, one call a cell
                      (what the activation-map stage runs)
  ..., stats only     piece_stats of each map alone: the 6 statistics, what rasterstats computes
  rasterstats         zonal_stats of each map over the pieces (sum mean min max median count; centre rule)
  exactextract        exact_extract of both maps, same 6 operations (coverage-fraction semantics)
  median floor        np.partition of every piece's pixels of both maps: the exact median alone
Checks: urbanlens equals rasterstats (1e-6 relative) on the same pieces; exactextract weights pixels
by the share of their area inside a piece, so it equals the centre rule only where piece edges follow
pixel edges: it is checked on such pieces (a guillotine split of each cell on the pixel grid), where its
sum, mean, min, max and count are equal; its median is a weighted quantile (interpolated), not the
middle value, so it differs by about 1 / count.
The network row: EfficientNet-B0 (the SES model) forward + backward on one px x px cell, one thread.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import header, max_rel_diff, median, single_thread, table, time_runs  # noqa: E402

single_thread()

import geopandas as gpd  # noqa: E402
import numpy as np  # noqa: E402
import shapely  # noqa: E402
from rasterio.transform import from_bounds  # noqa: E402

from urbanlens.ses import zonal  # noqa: E402

STATS = list(zonal.STATS)
MAPS = ("poor", "rich")


def voronoi_pieces(rng, bounds, n):
    w, s, e, nn = bounds
    pts = shapely.points(rng.uniform(w, e, n), rng.uniform(s, nn, n))
    frame = shapely.box(w - 100, s - 100, e + 100, nn + 100)
    cells = shapely.get_parts(shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=frame))
    pieces = shapely.intersection(cells, shapely.box(*bounds))
    return [g for g in pieces if g.area > 0]


def grid_pieces(rng, bounds, px, n):
    """About n rectangles tiling the cell, every edge on a pixel edge (guillotine cuts)."""
    w, s, e, nn = bounds
    res = (e - w) / px
    boxes = [(0, 0, px, px)]  # (col0, row0, col1, row1)
    while len(boxes) < n:
        boxes.sort(key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        c0, r0, c1, r1 = boxes.pop()
        if c1 - c0 >= r1 - r0:
            cut = int(rng.integers(c0 + 1, c1))
            boxes += [(c0, r0, cut, r1), (cut, r0, c1, r1)]
        else:
            cut = int(rng.integers(r0 + 1, r1))
            boxes += [(c0, r0, c1, cut), (c0, cut, c1, r1)]
    return [shapely.box(w + c0 * res, nn - r1 * res, w + c1 * res, nn - r0 * res) for c0, r0, c1, r1 in boxes]


def city_landuse(seed):
    """The land use of a synthetic city (urbanlens.ses.world): blocks, a street network, corridors."""
    from urbanlens.ses import world_plan

    city = world_plan.plan_city("Paris", 0, 2400.0, seed)
    return city.landuse.rename(columns={"code_2018": "ua_code", "class_2018": "ua_class"}), city.origin


def make_cells(n_cells, n_pieces, px, seed, layout):
    rng = np.random.default_rng(seed)
    if layout == "city":
        landuse, (cx, cy) = city_landuse(seed)
        picks = rng.choice(144, size=n_cells, replace=n_cells > 144)  # 12 x 12 cells of the 2.4 km city
    cells = []
    for i in range(n_cells):
        x0, y0 = 3_760_000.0 + 200 * (i % 10), 2_860_000.0 + 200 * (i // 10)
        if layout == "city":
            x0, y0 = cx + 200 * (picks[i] % 12), cy + 200 * (picks[i] // 12)
        bounds = (x0, y0, x0 + 200, y0 + 200)
        maps = rng.random((2, px, px), dtype=np.float32)
        maps[:, rng.random((px, px)) < 0.2] = 0
        if layout == "city":
            geoms = list(zonal.cell_pieces(landuse, shapely.box(*bounds)).geometry.values)
        elif layout == "voronoi":
            geoms = voronoi_pieces(rng, bounds, n_pieces)
        else:
            geoms = grid_pieces(rng, bounds, px, n_pieces)
        cells.append({"bounds": bounds, "maps": maps, "transform": from_bounds(*bounds, px, px), "geoms": geoms,
                      "frame": gpd.GeoDataFrame(geometry=geoms, crs="EPSG:3035")})
    return cells


# ------------------------------------------------------------------------------------ the compared paths
def run_urbanlens(cells):
    return [zonal.piece_stats(c["maps"], c["transform"], c["geoms"], names=MAPS) for c in cells]


def run_urbanlens_stats_only(cells):
    """What rasterstats computes, no more: the 6 statistics, one map at a time."""
    return [{f"{name}_{k}": v for name, m in zip(MAPS, c["maps"])
             for k, v in zonal.piece_stats(m, c["transform"], c["geoms"]).items()} for c in cells]


def run_rasterstats(cells):
    from rasterstats import zonal_stats

    out = []
    for c in cells:
        res = {}
        for name, m in zip(MAPS, c["maps"]):
            zs = zonal_stats(c["geoms"], m, affine=c["transform"], stats=STATS, nodata=-999.0)
            for k in STATS:  # a piece without pixels: None in rasterstats, NaN in urbanlens
                res[f"{name}_{k}"] = np.array([np.nan if z[k] is None else z[k] for z in zs], float)
        out.append(res)
    return out


def run_exactextract(cells):
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource

    out = []
    for c in cells:
        rasters = [NumPyRasterSource(m, *c["bounds"], name=name) for name, m in zip(MAPS, c["maps"])]
        df = exact_extract(rasters, c["frame"], STATS, output="pandas")
        out.append({col: df[col].to_numpy(float) for col in df.columns})
    return out


def piece_arrays(cells):
    """Every piece's pixel values of both maps, gathered once (input of the median floor)."""
    return [zonal.piece_values(c["maps"], w) for c in cells
            for w in zonal.piece_windows(c["geoms"], c["maps"].shape[1:], c["transform"])]


def run_median_floor(arrays):
    for v in arrays:
        if v.shape[1]:
            np.partition(v, v.shape[1] // 2, axis=1)


def compare(ours, ref, keys):
    return max(max_rel_diff(o[k], r[k]) for o, r in zip(ours, ref) for k in keys)


def network_seconds(px, repeats):
    """Median seconds of one forward + backward pass of the SES model on one px x px cell."""
    import torch

    from urbanlens.core.config import load_config
    from urbanlens.ses.model import build_ses_model

    torch.set_num_threads(1)
    cfg = load_config(None, ["ses.model.pretrained=false", f"ses.model.input_size={px}"])
    model = build_ses_model(cfg).eval()
    x = torch.rand(1, 3, px, px, requires_grad=True)

    def step():
        model.zero_grad(set_to_none=True)
        model.logit(x).sum().backward()

    return median(time_runs(step, repeats, warmup=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=12)
    ap.add_argument("--pieces", type=int, default=10, help="Voronoi seeds per cell")
    ap.add_argument("--px", type=int, default=800, help="map pixels per cell side")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--net-repeats", type=int, default=2, help="0 skips the network timing")
    ap.add_argument("--layout", choices=("voronoi", "city"), default="voronoi",
                    help="pieces: Voronoi cells, or a synthetic city's land use (blocks, streets, corridors)")
    ap.add_argument("--seed", type=int, default=0)
    args, _ = ap.parse_known_args()
    header("projection", args)

    cells = make_cells(args.cells, args.pieces, args.px, args.seed, args.layout)
    n_pieces = sum(len(c["geoms"]) for c in cells)
    print(f"[projection] {len(cells)} cells of {args.px} x {args.px} px, {n_pieces} {args.layout} pieces "
          f"({n_pieces / len(cells):.1f} per cell), 2 maps")

    # same results: urbanlens vs rasterstats on the same pieces (centre rule both)
    ours, rs = run_urbanlens(cells), run_rasterstats(cells)
    keys = [f"{m}_{k}" for m in MAPS for k in STATS]
    d_rs = compare(ours, rs, keys)
    print(f"[projection] urbanlens vs rasterstats: max relative difference {d_rs:.1e} over {len(keys)} columns")
    assert d_rs <= 1e-6, f"urbanlens and rasterstats disagree ({d_rs:.1e})"
    # exactextract: equal on pixel-aligned pieces; on the others only close (coverage fractions)
    grid = make_cells(min(4, args.cells), args.pieces, args.px, args.seed + 1, "grid")
    ours_grid, ee_grid = run_urbanlens(grid), run_exactextract(grid)
    d_ee = compare(ours_grid, ee_grid, [k for k in keys if not k.endswith("median")])
    d_med = compare(ours_grid, ee_grid, [k for k in keys if k.endswith("median")])
    print(f"[projection] urbanlens vs exactextract on pixel-aligned pieces: max relative difference {d_ee:.1e} "
          f"(sum mean min max count); median {d_med:.1e} (exactextract interpolates a weighted quantile)")
    assert d_ee <= 1e-6, f"urbanlens and exactextract disagree on pixel-aligned pieces ({d_ee:.1e})"
    d_cov = compare(ours, run_exactextract(cells), [f"poor_{k}" for k in ("count", "mean")])
    print(f"[projection] exactextract on the {args.layout} pieces (partial pixels weighted by coverage): "
          f"count/mean differ by up to {d_cov:.1e} relative (expected: another rule)")

    # timings, one thread, same cells
    arrays = piece_arrays(cells)
    d_one = compare(ours, run_urbanlens_stats_only(cells), keys)
    assert d_one == 0, f"one map at a time differs from both maps at once ({d_one:.1e})"
    rows = [("urbanlens.zonal", median(time_runs(lambda: run_urbanlens(cells), args.repeats))),
            ("urbanlens.zonal, stats only",
             median(time_runs(lambda: run_urbanlens_stats_only(cells), args.repeats))),
            ("rasterstats", median(time_runs(lambda: run_rasterstats(cells), args.repeats))),
            ("exactextract", median(time_runs(lambda: run_exactextract(cells), args.repeats))),
            ("median floor", median(time_runs(lambda: run_median_floor(arrays), args.repeats)))]
    print(table(rows, len(cells), "cell", "urbanlens.zonal"))
    t = dict(rows)
    per_cell = t["urbanlens.zonal"] / len(cells)
    print(f"[projection] an exact median by selection costs {t['median floor'] / len(cells) * 1000:.1f} ms a cell: "
          f"no exact path can beat rasterstats by more than {t['rasterstats'] / t['median floor']:.1f}x here")
    if args.net_repeats > 0:
        net = network_seconds(args.px, args.net_repeats)
        print(f"[projection] EfficientNet-B0 forward + backward, one {args.px} px cell, one thread: {net:.2f} s; "
              f"projection of a cell: {per_cell * 1000:.1f} ms")
        print(f"projection_share_of_network: {100 * per_cell / net:.2f} %")
    print(f"projection_vs_exactextract: {t['exactextract'] / t['urbanlens.zonal']:.1f}x")
    print(f"projection_full_vs_rasterstats: {t['rasterstats'] / t['urbanlens.zonal']:.1f}x")
    print(f"projection_vs_rasterstats: {t['rasterstats'] / t['urbanlens.zonal, stats only']:.1f}x")


if __name__ == "__main__":
    main()
