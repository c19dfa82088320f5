"""urbanlens.ses.zonal against rasterstats on rasterstats' own zonal cases, and on hand-made edge cases.

The rasters and polygons of rasterstats' test suite (version 0.21.0, BSD-3-Clause) are in
tests/data/rasterstats/. For every case of that suite within our scope (polygon and multipolygon zones;
the statistics sum, mean, min, max, median, count) the values of urbanlens.ses.zonal.piece_stats are checked
twice: against the values rasterstats' tests expect, and against rasterstats.zonal_stats run now on the
same files. The hand-made cases cover what those files do not: rasters whose rows run north or whose
columns run west, polygon vertices and edges exactly on pixel centres, NaN pixels, a nodata value, a
piece without a valid pixel and overlapping pieces (the per-piece path).
"""
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.transform import from_bounds
from shapely.geometry import Polygon, box

from urbanlens.ses import maps as ses_maps
from urbanlens.ses import zonal, zonal_pixels

RS = Path(__file__).resolve().parents[1] / "data" / "rasterstats"
STATS = list(zonal.STATS)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PendingDeprecationWarning",
                                        "ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------ helpers
def read_raster(name: str):
    """(band 1 as float, transform, the file's nodata value); pixels outside a dataset mask are NaN."""
    with rasterio.open(RS / name) as src:
        if all(rasterio.enums.MaskFlags.per_dataset in f for f in src.mask_flag_enums):
            arr = np.ma.filled(src.read(1, masked=True).astype(np.float64), np.nan)
        else:
            arr = src.read(1)
        return arr, src.transform, src.nodata


def read_zones(name: str) -> list:
    return list(gpd.read_file(RS / name).geometry)


def live(zones, raster, **kw) -> dict:
    """rasterstats.zonal_stats as arrays of the six statistics (None -> NaN)."""
    from rasterstats import zonal_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = zonal_stats(zones, raster, stats=STATS, **kw)
    return {k: np.array([np.nan if r[k] is None else r[k] for r in res], float) for k in STATS}


def assert_same(ours: dict, ref: dict, what: str = "") -> None:
    np.testing.assert_array_equal(ours["count"], ref["count"], err_msg=f"{what} count")
    for k in STATS:
        np.testing.assert_allclose(np.asarray(ours[k], float), ref[k], rtol=1e-6, atol=1e-9, equal_nan=True,
                                   err_msg=f"{what} {k}")


def flipped_like_rasterstats(maps, transform):
    """The same raster flipped to north-up, west-to-east: what rasterstats can read."""
    t, flip_rows, flip_cols = zonal_pixels.north_up(transform, maps.shape[-2:])
    if flip_rows:
        maps = maps[..., ::-1, :]
    if flip_cols:
        maps = maps[..., ::-1]
    return np.ascontiguousarray(maps), t


def assert_two_maps_match(geoms, maps, transform, nodata=None):
    """piece_stats of two maps equals rasterstats on each map (flipped north-up when needed)."""
    s = zonal.piece_stats(maps, transform, geoms, nodata=nodata)
    ref_maps, ref_t = flipped_like_rasterstats(maps, transform)
    for b, name in enumerate(("poor", "rich")):
        ref = live(list(geoms), ref_maps[b], affine=ref_t, nodata=-999.0 if nodata is None else nodata)
        assert_same({k: s[f"{name}_{k}"] for k in STATS}, ref, name)
    return s


# ----------------------------------------------------------------------------- rasterstats' cases
# (case, zones file, raster file, nodata: "file" = the raster's own, else the value passed, and the values
# rasterstats' tests assert, per zone)
FILE_CASES = [
    ("main", "polygons.shp", "slope.tif", "file", {"count": [75, 50]}),
    ("nodata_zero", "polygons.shp", "slope.tif", 0.0, {"count": [75, 50]}),
    ("multipolygons", "multipolygons.shp", "slope.tif", "file", {"count": [125]}),
    ("classes", "polygons.shp", "slope_classes.tif", "file", {"count": [75, 50], "min": [1.0, None],
                                                               "max": [1.0, None]}),
    ("classes_nodata_one", "polygons.shp", "slope_classes.tif", 1.0, {"count": [0, 49]}),
    ("dataset_mask", "polygons.shp", "dataset_mask.tif", "file", {"count": [75, 0]}),
    ("partial_overlap", "polygons_partial_overlap.shp", "slope.tif", "file", {}),
    ("no_overlap", "polygons_no_overlap.shp", "slope.tif", "file", {"count": [0] * 9}),
    ("all_nodata", "polygons.shp", "all_nodata.tif", "file", {"count": [0, 0]}),
    ("some_nodata", "polygons.shp", "slope_nodata.tif", "file", {"count": [39, 31]}),
    ("some_nodata_array_without_nodata", "polygons.shp", "slope_nodata.tif", None,
     {"count": [75, None], "min": [-9999.0, None]}),
    ("some_nodata_array_nodata", "polygons.shp", "slope_nodata.tif", -9999.0, {"count": [39, None]}),
]


@pytest.mark.parametrize("case,zones,raster,nodata,expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_rasterstats_file_cases(case, zones, raster, nodata, expected):
    arr, transform, file_nodata = read_raster(raster)
    geoms = read_zones(zones)
    ours = zonal.piece_stats(arr, transform, geoms, nodata=file_nodata if nodata == "file" else nodata)
    for k, values in expected.items():  # what rasterstats' tests assert
        for i, v in enumerate(values):
            if v is not None:
                assert ours[k][i] == v, (case, k, i)
    # what rasterstats computes now: from the file (its own nodata and mask handling), or from the array
    if nodata == "file":
        ref = live(str(RS / zones), str(RS / raster))
    else:
        ref = live(str(RS / zones), arr, affine=transform, nodata=-999.0 if nodata is None else nodata)
    assert_same(ours, ref, case)
    empty = ours["count"] == 0  # a zone without a valid pixel: count 0 and nothing else
    assert np.isnan(np.column_stack([ours[k] for k in STATS if k != "count"])[empty]).all()
    if case == "main":
        assert round(ours["mean"][0], 2) == 14.66
    if case == "partial_overlap":
        assert (ours["count"] > 0).all()
    if case == "some_nodata_array_nodata":
        assert ours["min"][0] >= 0


ARRAY_CASES = [
    # (case, zone, array, transform, nodata, expected)
    ("nan_and_nodata", box(0, 0, 2, 2), np.array([[np.nan, 12.25], [-999, 12.75]]), Affine(1, 0, 0, 0, -1, 2),
     -999, {"count": 2, "mean": 12.5, "min": 12.25, "max": 12.75}),
    ("nan_counts", shapely.from_wkt("POLYGON ((1 0, 4 0, 4 3, 1 3, 1 0))"),
     np.array([[np.nan] * 3, [0, 0, 0], [1, 4, 5]]), Affine(1, 0, 1, 0, -1, 3), 0.0, {"count": 3}),
    ("cut_corner", Polygon([(0, 0), (0, 0.5), (1, 1.5), (1.5, 2), (2, 2), (2, 0)]),
     np.array([[100, 1], [100, 1]]), Affine(1, 0, 0, 0, -1, 2), None, {"mean": 34}),
]


@pytest.mark.parametrize("case,zone,arr,transform,nodata,expected", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_rasterstats_array_cases(case, zone, arr, transform, nodata, expected):
    ours = zonal.piece_stats(arr, transform, [zone], nodata=nodata)
    for k, v in expected.items():
        assert ours[k][0] == v, (case, k)
    assert_same(ours, live([zone], arr, affine=transform, nodata=-999 if nodata is None else nodata), case)


OUT_OF_SCOPE = [
    ("points, multipoints, points_categorical", "points are out of scope: urbanlens.ses.zonal reduces polygon pieces"),
    ("lines, multilines", "lines are out of scope: urbanlens.ses.zonal reduces polygon pieces"),
    ("all_touched", "urbanlens.ses.zonal offers the pixel-centre rule only (rasterstats' default), not all_touched"),
    ("categorical, category_map, nodata with categorical counts",
     "categorical counts are not computed; the same zones and rasters are checked above on the six statistics"),
    ("percentile_*, std, majority, minority, unique, range, nodata and nan counts",
     "statistics urbanlens.ses.zonal does not compute; its six are checked on the same zones above"),
    ("zone_func, add_stats, raster_out, geojson_out, prefix, copy_properties",
     "options of rasterstats' interface that urbanlens.ses.zonal does not have"),
    ("vector and raster sources (paths, features, collections, GeoDataFrames, chunk_size, global extent, "
     "band alias, GDAL transforms, bad paths)", "input handling of rasterstats; urbanlens.ses.zonal takes arrays and "
     "shapely geometries"),
]


@pytest.mark.parametrize("cases,reason", OUT_OF_SCOPE, ids=[c[0].split(",")[0] for c in OUT_OF_SCOPE])
def test_rasterstats_cases_out_of_scope(cases, reason):
    pytest.skip(f"{cases}: {reason}")


# ----------------------------------------------------------------------------------- hand-made cases
BOUNDS = (4_000_000.0, 2_800_000.0, 4_000_200.0, 2_800_200.0)  # a 200 m cell in EPSG:3035 metres


def voronoi_pieces(rng, n, bounds=BOUNDS):
    w, s, e, nn = bounds
    pts = shapely.points(rng.uniform(w, e, n), rng.uniform(s, nn, n))
    vor = shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=box(w - 50, s - 50, e + 50, nn + 50))
    return [g for g in shapely.intersection(shapely.get_parts(vor), box(*bounds)) if g.area > 0]


def centre_vertex_pieces(rng, px: int, k: int = 5, bounds=BOUNDS):
    """A tiling of the cell into quadrilaterals and triangles whose every vertex is a pixel centre."""
    w, s, e, n = bounds
    res = (e - w) / px
    step = px // k
    idx = [0, *[i * step + int(rng.integers(-step // 4, step // 4 + 1)) for i in range(1, k)], px - 1]
    iy = [0, *[j * step + int(rng.integers(-step // 4, step // 4 + 1)) for j in range(1, k)], px - 1]
    v = {(i, j): (w + (idx[i] + 0.5) * res, s + (iy[j] + 0.5) * res) for i in range(k + 1) for j in range(k + 1)}
    geoms = []
    for i in range(k):
        for j in range(k):
            a, b, c, d = v[i, j], v[i + 1, j], v[i + 1, j + 1], v[i, j + 1]
            geoms += [Polygon([a, b, c]), Polygon([a, c, d])] if (i + j) % 2 else [Polygon([a, b, c, d])]
    return geoms


def oriented(bounds, px, flip_rows: bool, flip_cols: bool) -> Affine:
    """The transform of a px x px raster over bounds with rows running north / columns running west."""
    w, s, e, n = bounds
    res = (e - w) / px
    return Affine(-res if flip_cols else res, 0, e if flip_cols else w, 0, res if flip_rows else -res,
                  s if flip_rows else n)


@pytest.mark.parametrize("flip_rows,flip_cols", [(True, False), (False, True), (True, True)],
                         ids=["positive_y_scale", "negative_x_scale", "both"])
def test_any_axis_direction_equals_rasterstats_on_the_flipped_raster(flip_rows, flip_cols):
    rng = np.random.default_rng(7)
    px = 64  # 200 m / 64 = 3.125 m: exact in binary, so the flipped transform is exact too
    t = oriented(BOUNDS, px, flip_rows, flip_cols)
    maps = rng.random((2, px, px)).astype(np.float32)
    geoms = voronoi_pieces(rng, 12) + centre_vertex_pieces(rng, px, 3)
    s = assert_two_maps_match(geoms, maps, t)
    assert (s["poor_count"] > 0).all()
    # the same pixels whatever the direction: flipping the array with its transform changes nothing but
    # the order of the pixels (so the last bits of sums)
    north_up = zonal.piece_stats(*flipped_like_rasterstats(maps, t), geoms)
    for k in s:
        np.testing.assert_allclose(s[k], north_up[k], rtol=1e-12, err_msg=k)
    np.testing.assert_array_equal(s["poor_count"], north_up["poor_count"])


def test_a_south_up_raster_pixel_by_pixel():
    # rows run north: row 0 is the southern row, so a piece over the south half holds rows 0..1
    maps = np.arange(16, dtype=np.float32).reshape(4, 4)
    t = Affine(1, 0, 0, 0, 1, 0)  # origin at the south-west corner, y grows with the row
    s = zonal.piece_stats(maps, t, [box(0, 0, 4, 2), box(0, 2, 1, 4)])
    assert list(s["count"]) == [8, 2]
    assert s["sum"][0] == maps[:2].sum() and s["sum"][1] == maps[2, 0] + maps[3, 0]
    t = Affine(-1, 0, 4, 0, -1, 4)  # columns run west: column 0 is the eastern one
    s = zonal.piece_stats(maps, t, [box(3, 0, 4, 4)])
    assert s["count"][0] == 4 and s["sum"][0] == maps[:, 0].sum()


def test_rotated_grid_is_refused_with_a_fix():
    with pytest.raises(zonal.ZonalError, match="rotated.*reproject"):
        zonal.piece_stats(np.zeros((4, 4)), Affine(1, 0.1, 0, 0, -1, 4), [box(0, 0, 2, 2)])


@pytest.mark.parametrize("px", [96, 109, 140, 173, 224])
def test_vertices_on_pixel_centres_match_rasterstats(px):
    # every vertex on a pixel centre, so many edges run through centres (ties), which rasterstats decides
    # per piece on its own window; at 109, 140, 173 and 224 px a single rasterisation of the whole cell
    # would give some of these pixels to other pieces than rasterstats does
    rng = np.random.default_rng(px)
    t = from_bounds(*BOUNDS, px, px)
    geoms = centre_vertex_pieces(rng, px, 5)
    assert zonal_pixels.centre_ties(geoms, t, (px, px)).all()
    s = assert_two_maps_match(geoms, rng.random((2, px, px)).astype(np.float32), t)
    # the cell is tiled from its first to its last pixel centre: every centre strictly inside counts once
    # at least (twice where it lies on an edge that rasterstats gives to both pieces)
    assert s["poor_count"].sum() >= (px - 2) ** 2


@pytest.mark.parametrize("seed", range(3))
def test_tied_and_untied_pieces_in_one_cell_match_rasterstats(seed):
    # the west half tiled with vertices on pixel centres (per-piece path), the east half with Voronoi
    # pieces (one pass); then overlapping copies added, which sends every piece down the per-piece path
    rng = np.random.default_rng(seed)
    px = 2 * int(rng.integers(48, 113))  # 96..224
    t = from_bounds(*BOUNDS, px, px)
    w, s0, e, n = BOUNDS
    geoms = centre_vertex_pieces(rng, px // 2, 4, (w, s0, w + 100, n)) + voronoi_pieces(rng, 8, (w + 100.37, s0, e, n))
    tied = zonal_pixels.centre_ties(geoms, t, (px, px))
    assert tied.any() and not tied.all()
    maps = rng.random((2, px, px)).astype(np.float32)
    assert_two_maps_match(geoms, maps, t)
    assert_two_maps_match(geoms + [shapely.affinity.translate(g, 7.0, -3.0) for g in geoms[:4]], maps, t)


def test_edges_through_centres_of_a_south_up_raster():
    rng = np.random.default_rng(11)
    px = 100
    t = oriented(BOUNDS, px, flip_rows=True, flip_cols=False)
    assert_two_maps_match(centre_vertex_pieces(rng, px, 4), rng.random((2, px, px)).astype(np.float32), t)


def test_nan_pixels_count_for_nothing():
    rng = np.random.default_rng(3)
    px = 50
    t = from_bounds(*BOUNDS, px, px)
    maps = rng.random((2, px, px)).astype(np.float32)
    maps[0][rng.random((px, px)) < 0.3] = np.nan
    maps[1][rng.random((px, px)) < 0.1] = np.nan
    geoms = voronoi_pieces(rng, 15)
    s = assert_two_maps_match(geoms, maps, t)
    assert s["poor_count"].sum() == np.isfinite(maps[0]).sum()
    assert np.isfinite(s["poor_median"]).all() and np.isfinite(s["poor_sum"]).all()
    # the distances use the pixels valid in both maps
    where = zonal.piece_windows(geoms, (px, px), t)[0]
    v = zonal.piece_values(maps, where)
    both = np.isfinite(v).all(axis=0)
    tv, kl = zonal.pair_distances(v[0][both], v[1][both])
    assert s["totvar"][0] == pytest.approx(tv) and s["sym_kl"][0] == pytest.approx(kl)


def test_a_nodata_value_counts_for_nothing():
    rng = np.random.default_rng(4)
    px = 40
    t = from_bounds(*BOUNDS, px, px)
    maps = rng.random((2, px, px)).astype(np.float32)
    maps[:, rng.random((px, px)) < 0.25] = -9999.0
    geoms = voronoi_pieces(rng, 10)
    s = assert_two_maps_match(geoms, maps, t, nodata=-9999.0)
    assert s["poor_count"].sum() == (maps[0] != -9999.0).sum()
    assert (s["poor_min"] >= 0).all()
    without = zonal.piece_stats(maps, t, geoms)  # no nodata value: -9999 is data
    assert without["poor_count"].sum() == px * px and without["poor_min"].min() == -9999.0


def test_a_piece_without_a_valid_pixel_gets_count_0_and_nothing_else():
    maps = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    maps[:, :, 0] = np.nan  # column 0 has no data
    t = from_bounds(0, 0, 4, 4, 4, 4)
    s = zonal.piece_stats(maps, t, [box(0, 0, 1, 4), box(1, 0, 4, 4)])
    for name in ("poor", "rich"):
        assert list(s[f"{name}_count"]) == [0, 12]
        for k in ("sum", "mean", "min", "max", "median"):
            assert np.isnan(s[f"{name}_{k}"][0]) and np.isfinite(s[f"{name}_{k}"][1])
    assert np.isnan(s["poor_score"][0]) and np.isnan(s["totvar"][0]) and np.isnan(s["sym_kl"][0])
    pieces = gpd.GeoDataFrame({"ua_code": ["1", "2"], "ua_class": ["a", "b"], "area": [4.0, 12.0]},
                              geometry=[box(0, 0, 1, 4), box(1, 0, 4, 4)], crs="EPSG:3035")
    rows = ses_maps.cell_polygon_stats(maps, t, pieces, "c", "Paris")
    assert list(rows.columns) == ses_maps.POLYGON_STATS_COLUMNS
    assert list(rows["ua_code"]) == ["2"]  # the piece over nodata only is left out, like a sliver
    assert rows["poor_sum"].iloc[0] == maps[0][:, 1:].sum()


def test_overlapping_pieces_with_nodata_take_the_per_piece_path():
    rng = np.random.default_rng(9)
    px = 60
    t = oriented(BOUNDS, px, flip_rows=True, flip_cols=True)
    maps = rng.random((2, px, px)).astype(np.float32)
    maps[:, :10, :] = np.nan
    w, s0, e, n = BOUNDS
    geoms = [box(w, s0, w + 120, n), box(w + 80, s0, e, n), box(w + 30.5, s0 + 40.2, w + 170.1, s0 + 90.7),
             box(w, s0, e, s0 + 30)]
    s = assert_two_maps_match(geoms, maps, t)
    assert s["poor_count"].sum() > np.isfinite(maps[0]).sum()  # overlapping pixels count for each piece


# ------------------------------------------------------------------------- the maps stage's nodata
def test_resample_mask_takes_the_pixel_under_each_centre():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    np.testing.assert_array_equal(ses_maps.resample_mask(mask, (4, 4)), mask)
    up = ses_maps.resample_mask(mask, (6, 6))  # centres (i + .5) * 4 / 6: 0.33, 1.0, 1.67, ... -> rows 0, 1, 1
    assert up.sum() == 1 and up[0, 0]
    down = ses_maps.resample_mask(np.kron(mask, np.ones((2, 2), bool)), (4, 4))
    np.testing.assert_array_equal(down, mask)


def test_maps_files_carry_nan_nodata_only_where_the_image_has_none(tmp_path):
    ids = ["CRS3035RES200mN2880000E3760000", "CRS3035RES200mN2880000E3760200"]
    cells = gpd.GeoDataFrame({"cell_id": ids}, geometry=[box(3760000, 2880000, 3760200, 2880200),
                                                          box(3760200, 2880000, 3760400, 2880200)], crs="EPSG:3035")
    base = np.random.default_rng(0).random((2, 2, 8, 8)).astype(np.float32)
    holes = np.zeros((2, 8, 8), bool)
    holes[1, :2, :3] = True  # the second cell's image has no data in its north-west corner

    def batches(out, nodata):
        return [it for b in ses_maps.cell_map_batches(cells, lambda rows: base, out, 2, nodata=nodata) for it in b]

    plain = batches(tmp_path / "plain", None)
    masked = batches(tmp_path / "masked", lambda rows: holes)
    # a cell without nodata pixels: the same file byte for byte, no nodata value
    assert (tmp_path / "plain" / f"{ids[0]}.tif").read_bytes() == (tmp_path / "masked" / f"{ids[0]}.tif").read_bytes()
    with rasterio.open(tmp_path / "masked" / f"{ids[0]}.tif") as src:
        assert src.nodata is None
    with rasterio.open(tmp_path / "masked" / f"{ids[1]}.tif") as src:
        assert np.isnan(src.nodata)
        assert (src.read_masks(1) == 0).sum() == 6 and (src.read_masks(2) == 0).sum() == 6
    m = masked[1][1]
    assert np.isnan(m[:, :2, :3]).all() and np.isfinite(m).sum() == 2 * (64 - 6)
    np.testing.assert_array_equal(plain[0][1], masked[0][1])
    # maps read back (a re-run) are masked too, also from a file written without the mask
    again = batches(tmp_path / "plain", lambda rows: holes)
    assert not any(new for *_, new in again)
    np.testing.assert_array_equal(again[1][1], m)
    back, t, _ = ses_maps.read_maps_tif(tmp_path / "masked" / f"{ids[1]}.tif")
    np.testing.assert_array_equal(back, m)
    pieces = gpd.GeoDataFrame({"ua_code": ["1"], "ua_class": ["a"], "area": [40000.0]},
                              geometry=[cells.geometry.iloc[1]], crs="EPSG:3035")
    rows = ses_maps.cell_polygon_stats(back, t, pieces, ids[1], "Paris")
    assert rows["poor_count"].iloc[0] == 64 - 6
    assert rows["poor_sum"].iloc[0] == pytest.approx(base[1, 0][~holes[1]].astype(float).sum())


def test_cell_image_nodata_is_all_zero_pixels():
    from urbanlens.ses import extraction as geo

    img = np.full((4, 4, 3), 9, np.uint8)
    img[0, 0] = 0
    img[1, 1] = (0, 5, 0)  # one band zero: still data
    mask = geo.nodata_mask(img)
    assert mask.sum() == 1 and mask[0, 0]
    assert geo.nodata_fraction(img) == 1 / 16
