"""Projection of activation maps onto polygon pieces: known sums and counts, agreement with rasterstats."""
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.features
import shapely
from rasterio.transform import from_bounds
from shapely.geometry import Polygon, box

from urbanlens.ses import maps as ses_maps
from urbanlens.ses import zonal

STAT_KEYS = ("sum", "mean", "min", "max", "median", "count")
REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"


def rasterstats_reference(geoms, array, transform):
    from rasterstats import zonal_stats

    zs = zonal_stats(list(geoms), array, affine=transform, stats=list(STAT_KEYS), nodata=-999.0)
    return {k: np.array([np.nan if z[k] is None else z[k] for z in zs], float) for k in STAT_KEYS}


def assert_matches_rasterstats(geoms, maps, transform):
    s = zonal.piece_stats(maps, transform, geoms)
    for b, name in enumerate(("poor", "rich")):
        ref = rasterstats_reference(geoms, maps[b], transform)
        for k in STAT_KEYS:
            np.testing.assert_allclose(s[f"{name}_{k}"], ref[k], rtol=1e-6, atol=0, equal_nan=True,
                                       err_msg=f"{name}_{k}")
    return s


def voronoi_pieces(rng, bounds, n):
    w, s, e, nn = bounds
    pts = shapely.points(rng.uniform(w, e, n), rng.uniform(s, nn, n))
    vor = shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=box(w - 50, s - 50, e + 50, nn + 50))
    cell = box(*bounds)
    geoms = [g.intersection(cell) for g in shapely.get_parts(vor)]
    return [g for g in geoms if g.area > 0]


# ------------------------------------------------------------------------------ hand-made cases
def test_two_rectangles_known_sums_and_counts():
    # 4 x 4 raster of 1 m pixels over [0, 4] x [0, 4]; value = row * 4 + col (row 0 at the top)
    maps = np.arange(16, dtype=np.float32).reshape(4, 4)
    transform = from_bounds(0, 0, 4, 4, 4, 4)
    left, right = box(0, 0, 1, 4), box(1, 0, 4, 4)  # column 0 | columns 1..3
    s = zonal.piece_stats(maps, transform, [left, right])
    assert list(s["count"]) == [4, 12]
    assert s["sum"][0] == 0 + 4 + 8 + 12
    assert s["sum"][1] == sum(range(16)) - 24
    assert s["min"][0] == 0 and s["max"][0] == 12 and s["median"][0] == 6
    assert s["min"][1] == 1 and s["max"][1] == 15
    assert s["median"][1] == np.median([v for v in range(16) if v % 4])
    assert s["mean"][1] == pytest.approx(s["sum"][1] / 12)


def test_pixel_centre_rule_on_a_triangle():
    # the triangle covers half of each diagonal pixel but only the centres strictly below the diagonal
    maps = np.ones((4, 4), np.float32)
    transform = from_bounds(0, 0, 4, 4, 4, 4)
    tri = Polygon([(0, 0), (3.9, 0), (0, 3.9)])  # centre (i+.5, j+.5) inside iff i + j + 1 < 3.9
    s = zonal.piece_stats(maps, transform, [tri])
    assert s["count"][0] == 6  # i + j <= 2: 3 + 2 + 1; the 4 cut pixels of the diagonal i + j = 3 are out
    touched = rasterio.features.rasterize([(tri, 1)], out_shape=(4, 4), transform=transform, all_touched=True)
    assert touched.sum() == 10  # the all-touched rule would have counted them
    # a sliver that touches pixels without holding a centre gets no pixel
    sliver = box(0.6, 0.6, 0.9, 3.9)
    s = zonal.piece_stats(maps, transform, [sliver])
    assert s["count"][0] == 0 and np.isnan(s["sum"][0]) and np.isnan(s["mean"][0])  # rasterstats: None


def test_single_map_keys_and_two_map_scores():
    rng = np.random.default_rng(1)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    transform = from_bounds(0, 0, 16, 16, 8, 8)  # 2 m pixels
    geoms = [box(0, 0, 16, 8), box(0, 8, 16, 16)]
    one = zonal.piece_stats(maps[0], transform, geoms)
    assert set(one) == set(STAT_KEYS)
    two = zonal.piece_stats(maps, transform, geoms)
    np.testing.assert_allclose(two["poor_sum"], one["sum"])
    np.testing.assert_allclose(two["rich_score"], two["rich_sum"] / 128.0)  # area 16 x 8 m
    # bottom half = rows 4..7 of the array (north up)
    assert two["poor_sum"][0] == pytest.approx(maps[0, 4:].astype(float).sum(), rel=1e-9)


def test_overlapping_pieces_share_pixels():
    maps = np.arange(16, dtype=np.float32).reshape(1, 4, 4).repeat(2, 0)
    transform = from_bounds(0, 0, 4, 4, 4, 4)
    a, b = box(0, 0, 3, 4), box(1, 0, 4, 4)  # columns 0..2 and 1..3 overlap on columns 1..2
    s = zonal.piece_stats(maps, transform, [a, b])
    assert list(s["poor_count"]) == [12, 12]
    assert s["poor_sum"][0] == sum(v for v in range(16) if v % 4 != 3)
    assert s["poor_sum"][1] == sum(v for v in range(16) if v % 4 != 0)


# ----------------------------------------------------------------------- agreement with rasterstats
@pytest.mark.parametrize("seed,size", [(0, 16), (1, 37), (2, 64)])
def test_matches_rasterstats_on_random_pieces(seed, size):
    rng = np.random.default_rng(seed)
    bounds = (4_000_000.0, 2_800_000.0, 4_000_200.0, 2_800_200.0)  # a 200 m cell in EPSG:3035 metres
    maps = rng.random((2, size, size)).astype(np.float32)
    maps[:, rng.random((size, size)) < 0.2] = 0  # CAM-like zeros
    geoms = voronoi_pieces(rng, bounds, 25)
    transform = from_bounds(*bounds, size, size)
    s = assert_matches_rasterstats(geoms, maps, transform)
    # pieces tile the cell: every pixel counted exactly once
    assert s["poor_count"].sum() == size * size
    assert s["poor_sum"].sum() == pytest.approx(maps[0].astype(float).sum(), rel=1e-9)


def test_matches_rasterstats_on_non_convex_pieces_with_holes():
    rng = np.random.default_rng(5)
    maps = rng.random((2, 50, 50)).astype(np.float32)
    transform = from_bounds(0, 0, 100, 100, 50, 50)
    ring = box(10, 10, 90, 90).difference(box(30, 30, 70, 70))
    ell = Polygon([(0, 0), (60, 0), (60, 7.3), (7.3, 7.3), (7.3, 60), (0, 60)])
    multi = shapely.union(box(75, 0, 99, 5), box(92, 20, 100, 40))
    star = shapely.Point(50, 50).buffer(17, quad_segs=3).difference(shapely.Point(50, 50).buffer(6))
    assert_matches_rasterstats([ring, ell, multi, star], maps, transform)


@pytest.mark.parametrize("size", [37, 64])
def test_matches_rasterstats_when_edges_pass_through_pixel_centres(size):
    # a grid of rectangles whose shared edges run exactly through pixel centres: the centre rule gives
    # such pixels to both neighbours, and the arithmetic must decide the ties as rasterstats does
    rng = np.random.default_rng(size)
    x0, y0, res = 4_000_000.0, 2_800_000.0, 200.0 / size
    xs = [x0, *sorted(x0 + res * (0.5 + rng.choice(np.arange(1, size - 1), 3, replace=False))), x0 + 200]
    ys = [y0, *sorted(y0 + res * (0.5 + rng.choice(np.arange(1, size - 1), 3, replace=False))), y0 + 200]
    geoms = [box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for i in range(4) for j in range(4)]
    maps = rng.random((2, size, size)).astype(np.float32)
    s = assert_matches_rasterstats(geoms, maps, from_bounds(x0, y0, x0 + 200, y0 + 200, size, size))
    assert s["poor_count"].sum() > size * size  # the tied pixels are counted twice


@pytest.mark.skipif(not (REALDATA / "UK568L1_CHESHIRE_WEST_AND_CHESTER_change_2012_2018.gpkg").is_file(),
                    reason="real Urban Atlas excerpt not present")
def test_real_urban_atlas_pieces_match_rasterstats():
    ua = gpd.read_file(REALDATA / "UK568L1_CHESHIRE_WEST_AND_CHESTER_change_2012_2018.gpkg")
    ua = ua.rename(columns={"code_2018": "ua_code", "class_2018": "ua_class"})
    c = ua.geometry.iloc[np.argmax(ua.area.to_numpy())].representative_point()
    x0, y0 = np.floor(c.x / 200) * 200, np.floor(c.y / 200) * 200
    cell = box(x0 - 200, y0 - 200, x0 + 400, y0 + 400)  # 600 m, enough to cut several polygons
    pieces = zonal.cell_pieces(ua, cell)
    assert len(pieces) >= 1 and pieces.crs == ua.crs
    assert set(pieces.geom_type) <= {"Polygon", "MultiPolygon"}
    rng = np.random.default_rng(3)
    maps = rng.random((2, 120, 120)).astype(np.float32)
    assert_matches_rasterstats(pieces.geometry.values, maps, from_bounds(*cell.bounds, 120, 120))


# --------------------------------------------------------------------------------------- pieces
def make_landuse():
    geoms = [box(0, 0, 100, 100), box(100, 0, 300, 100), box(0, 100, 300, 200), box(300, 0, 400, 400)]
    return gpd.GeoDataFrame({"ua_code": ["11100", "12100", "14100", "50000"],
                             "ua_class": ["continuous urban", "industrial", "green", "water"]},
                            geometry=geoms, crs="EPSG:3035")


def test_cell_pieces_clip_and_drop_non_areal():
    lu = make_landuse()
    cell = box(50, 50, 300, 150)  # touches the water polygon only along x = 300
    pieces = zonal.cell_pieces(lu, cell)
    assert list(pieces.columns) == ["ua_code", "ua_class", "area", "geometry"]
    assert list(pieces["ua_code"]) == ["11100", "12100", "14100"]
    np.testing.assert_allclose(pieces["area"], [50 * 50, 200 * 50, 250 * 50])
    assert pieces["area"].sum() == pytest.approx(cell.area)
    assert pieces.crs.to_epsg() == 3035
    assert len(zonal.cell_pieces(lu, box(1000, 1000, 1200, 1200))) == 0


def test_cell_pieces_refuses_geographic_crs():
    lu = make_landuse().set_crs("EPSG:4326", allow_override=True)
    with pytest.raises(ValueError, match="projected"):
        zonal.cell_pieces(lu, box(0, 0, 1, 1))


# --------------------------------------------------------------------------- distribution distances
def test_distances_identical_maps_are_zero():
    rng = np.random.default_rng(0)
    a = rng.random(30)
    g = np.repeat([0, 1, 2], 10)
    tv, kl = zonal.distribution_distances(a, a * 3.0, g, 4)  # same shape, different scale
    np.testing.assert_allclose(tv[:3], 0, atol=1e-5)
    np.testing.assert_allclose(kl[:3], 0, atol=1e-5)
    assert np.isnan(tv[3]) and np.isnan(kl[3])


def test_distances_on_known_distributions():
    # p = (1, 0), q = (0, 1): disjoint supports -> TV = 1; with eps the KL is large and finite
    g = np.array([0, 0])
    tv, kl = zonal.distribution_distances(np.array([1.0, 0.0]), np.array([0.0, 1.0]), g, 1)
    assert tv[0] == pytest.approx(1.0, abs=1e-5)
    assert np.isfinite(kl[0]) and kl[0] > 20
    # p = (3/4, 1/4), q = (1/4, 3/4): TV = 1/2, symmetric KL = 2 * (1/2) * log 3 = log 3
    tv, kl = zonal.distribution_distances(np.array([3.0, 1.0]), np.array([1.0, 3.0]), g, 1, eps=0.0)
    assert tv[0] == pytest.approx(0.5)
    assert kl[0] == pytest.approx(np.log(3.0))


# --------------------------------------------------------------------------------------- summary
def test_landuse_summary_hand_made():
    stats = pd.DataFrame({
        "ua_code": ["A", "A", "A", "B", "B", "C"],
        "ua_class": ["alpha"] * 3 + ["beta"] * 2 + ["gamma"],
        "area": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "poor_score": [1.0, 2.0, 3.0, 5.0, 5.0, 0.0],
        "rich_score": [4.0, 4.0, 4.0, 1.0, 3.0, 2.5],
    })
    out = zonal.landuse_summary(stats)
    assert list(out.columns) == zonal.SUMMARY_COLUMNS
    assert list(out["ua_code"]) == ["C", "A", "B"]  # rich_minus_poor 2.5, 2, -3
    a = out.set_index("ua_code").loc["A"]
    assert a["pieces"] == 3 and a["area"] == 6.0 and a["ua_class"] == "alpha"
    assert a["poor_score_mean"] == pytest.approx(2.0)
    # no cell_id: each piece its own cell; a bootstrap mean of 1, 2, 3 lies in [1, 3] and rarely at the ends
    assert 1.0 <= a["poor_score_lo"] < 2.0 < a["poor_score_hi"] <= 3.0
    assert a["rich_score_lo"] == pytest.approx(4.0) and a["rich_score_hi"] == pytest.approx(4.0)
    assert a["rich_minus_poor"] == pytest.approx(2.0)
    b = out.set_index("ua_code").loc["B"]
    assert b["rich_minus_poor"] == pytest.approx(2.0 - 5.0)
    c = out.set_index("ua_code").loc["C"]  # one piece: no interval
    assert c["rich_minus_poor"] == pytest.approx(2.5) and np.isnan(c["poor_score_lo"])


# ------------------------------------------------------------------------------ GeoTIFF round trip
def test_maps_tif_round_trip_and_cell_stats(tmp_path):
    bounds = (3_760_000.0, 2_880_000.0, 3_760_200.0, 2_880_200.0)
    rng = np.random.default_rng(2)
    maps = rng.random((2, 20, 20)).astype(np.float32)
    path = tmp_path / "cams" / "CRS3035RES200mN2880000E3760000.tif"
    ses_maps.write_maps_tif(path, maps, bounds)
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 3035 and src.count == 2 and src.dtypes == ("float32", "float32")
        assert tuple(src.bounds) == pytest.approx(bounds)
        assert src.descriptions == ("poor", "rich") and src.nodata is None
    back, transform, crs = ses_maps.read_maps_tif(path)
    np.testing.assert_array_equal(back, maps)
    lu = make_landuse()
    lu["geometry"] = lu.geometry.translate(bounds[0] - 100, bounds[1])  # cell = 12100 | 14100
    pieces = zonal.cell_pieces(lu, box(*bounds))
    pieces = pd.concat([pieces, gpd.GeoDataFrame(  # a sliver holding no pixel centre is left out
        {"ua_code": ["99999"], "ua_class": ["sliver"], "area": [0.5]},
        geometry=[box(bounds[0] + 1, bounds[1] + 1, bounds[0] + 1.5, bounds[1] + 2)], crs=lu.crs)],
        ignore_index=True)
    rows = ses_maps.cell_polygon_stats(back, transform, pieces, "CRS3035RES200mN2880000E3760000", "Paris")
    assert list(rows.columns) == ses_maps.POLYGON_STATS_COLUMNS
    assert "99999" not in set(rows["ua_code"]) and len(rows) == len(pieces) - 1
    assert rows["poor_count"].sum() == 400
    np.testing.assert_allclose(rows["poor_score"], rows["poor_sum"] / rows["area"])
    ref = rasterstats_reference(rows.geometry.values, back[1], transform)
    np.testing.assert_allclose(rows["rich_median"], ref["median"], rtol=1e-6)


def test_cell_map_batches_writes_then_resumes(tmp_path):
    ids = ["CRS3035RES200mN2880000E3760000", "CRS3035RES200mN2880000E3760200", "CRS3035RES200mN2880200E3760000"]
    cells = gpd.GeoDataFrame({"cell_id": ids}, geometry=[box(3760000, 2880000, 3760200, 2880200),
                                                          box(3760200, 2880000, 3760400, 2880200),
                                                          box(3760000, 2880200, 3760200, 2880400)], crs="EPSG:3035")
    calls = []

    def compute(rows):
        calls.append(list(rows["cell_id"]))
        base = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8) / 128
        return np.stack([base + i for i in range(len(rows))])

    first = [item for b in ses_maps.cell_map_batches(cells, compute, tmp_path, batch_size=2) for item in b]
    assert calls == [ids[:2], ids[2:]] and all(new for *_, new in first)
    with rasterio.open(tmp_path / f"{ids[1]}.tif") as src:
        assert tuple(src.bounds) == pytest.approx(cells.geometry.iloc[1].bounds)
    calls.clear()
    again = [item for b in ses_maps.cell_map_batches(cells, compute, tmp_path, batch_size=2) for item in b]
    assert calls == [] and not any(new for *_, new in again)
    for (_, m1, t1, _), (_, m2, t2, _) in zip(first, again):
        np.testing.assert_array_equal(m1, m2)
        assert tuple(t1) == pytest.approx(tuple(t2))
    # maps older than the model (e.g. after retraining) are computed again
    newer = max((tmp_path / f"{i}.tif").stat().st_mtime for i in ids) + 1
    list(ses_maps.cell_map_batches(cells, compute, tmp_path, batch_size=3, newer_than=newer))
    assert calls == [ids]


def test_figures_draw_pieces_and_scores():
    from urbanlens.ses import figures

    lu = make_landuse()
    cell = box(0, 0, 300, 200)
    pieces = zonal.cell_pieces(lu, cell)
    rng = np.random.default_rng(0)
    panel = {"cell_id": "c", "bounds": cell.bounds, "image": rng.random((8, 12, 3)),
             "poor": rng.random((8, 12)), "rich": rng.random((8, 12)), "pieces": pieces}
    fig = figures.cam_panels_figure([panel, panel], {"11100": "continuous urban"})
    assert len(fig.axes) == 8
    coloured = fig.axes[3].collections[0]
    assert len(coloured.get_paths()) == len(pieces) == 3
    holed = figures.polygon_collection([box(0, 0, 10, 10).difference(box(2, 2, 4, 4))])
    assert len(holed.get_paths()[0].to_polygons()) == 2  # exterior and hole
    summary = zonal.landuse_summary(pd.DataFrame({"ua_code": ["A", "A", "B"], "ua_class": ["a", "a", "b"],
                                                  "area": [1.0, 1, 1], "poor_score": [1.0, 2, 3],
                                                  "rich_score": [2.0, 3, 1]}))
    fig = figures.landuse_scores_figure(summary)
    assert len(fig.axes[0].patches) == 2 * len(summary)
    import matplotlib.pyplot as plt
    plt.close("all")
