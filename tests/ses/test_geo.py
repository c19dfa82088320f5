"""Geography helpers: INSPIRE ids, census and Urban Atlas readers on both schemas (real excerpts in
tests/data), the tile index, and cell reading with reprojection, tile merging and untagged Lambert-93."""
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from urbanlens.core import errors
from urbanlens.ses import census as ses_census
from urbanlens.ses import extraction, grid, urban_atlas
from urbanlens.ses import tiles as ses_tiles

DATA = Path(__file__).resolve().parents[1] / "data"
CHESHIRE = DATA / "UK568L1_CHESHIRE_WEST_AND_CHESTER_change_2012_2018_excerpt.gpkg"
KOBENHAVN = DATA / "DK001L2_KOBENHAVN_clip.zip"
IGN_TIF = DATA / "test_data_rgb.tif"


# ----------------------------------------------------------------------------- ids

def test_inspire_id_round_trip_and_cell_square():
    for e, n in [(3759800, 2862200), (4252400, 2029800), (3000000, 2000000)]:
        cid = grid.inspire_id(e, n)
        assert cid == f"CRS3035RES200mN{n}E{e}"
        assert grid.parse_inspire_id(cid) == (e, n, 200)
        assert grid.parse_inspire_id(cid.lower()) == (e, n, 200)
        box = grid.cell_box(cid)
        assert box.bounds == (e, n, e + 200, n + 200) and box.area == 40000
    assert grid.parse_inspire_id("CRS3035RES1000mN2862000E3759000") == (3759000, 2862000, 1000)
    boxes = grid.cell_boxes([grid.inspire_id(1000, 2000), grid.inspire_id(1200, 2000)])
    assert [b.bounds for b in boxes] == [(1000, 2000, 1200, 2200), (1200, 2000, 1400, 2200)]
    for bad in ["N2862200E3759800", "CRS2154RES200mN1E1", "CRS3035RES200mN12E"]:
        with pytest.raises(ValueError):
            grid.parse_inspire_id(bad)


# ----------------------------------------------------------------------------- census

def _census_frame(id_col, ind_col, snv_col):
    ids = [grid.inspire_id(3759800 + 200 * i, 2862200) for i in range(5)]
    ind = [10.0, 20.0, 0.0, 5.0, 8.0]
    snv = [200000.0, 500000.0, 0.0, np.nan, 160000.0]
    # geometry as points in another CRS (the cell centres in Lambert-93): the reader must rebuild the
    # squares from the ids, and take a bbox given in EPSG:3035 to the file's CRS
    x, y = Transformer.from_crs(3035, 2154, always_xy=True).transform(
        [3759900 + 200 * i for i in range(5)], [2862300] * 5)
    return gpd.GeoDataFrame({id_col: ids, ind_col: ind, "men": [4.0, 8, 0, 2, 3], snv_col: snv},
                            geometry=shapely.points(x, y), crs="EPSG:2154")


@pytest.mark.parametrize("cols,suffix", [(("idcar_200m", "ind", "ind_snv"), ".gpkg"),
                                         (("IdINSPIRE", "Ind", "Ind_snv"), ".shp"),
                                         (("IDCAR_200M", "IND", "IND_SNV"), ".gpkg")])
def test_read_census_both_schemas(tmp_path, cols, suffix):
    path = tmp_path / f"census{suffix}"
    _census_frame(*cols).to_file(path)
    got = ses_census.read_census(path)
    assert list(got.columns) == ["cell_id", "ind", "ind_snv", "income", "imputed", "geometry"]
    assert not got["imputed"].any() and not got.attrs["imputed_flag"]   # no flag column in this file
    assert got.crs.to_epsg() == 3035
    assert got.attrs["dropped"] == 2   # zero population and missing income
    assert got["income"].tolist() == [20000.0, 25000.0, 20000.0]
    for cid, geom in zip(got["cell_id"], got.geometry):
        assert geom.equals(grid.cell_box(cid))
    # bbox (EPSG:3035) keeps the cells there only: centres of cells 0 and 1 inside, 2 to 4 outside
    inside = ses_census.read_census(path, bbox=(3759700, 2862100, 3760150, 2862400))
    assert inside["cell_id"].tolist() == [grid.inspire_id(3759800, 2862200), grid.inspire_id(3760000, 2862200)]


def test_read_census_missing_columns_names_them(tmp_path):
    path = tmp_path / "census.gpkg"
    _census_frame("idcar_200m", "ind", "ind_snv").drop(columns="ind_snv").to_file(path)
    with pytest.raises(errors.DataError) as err:
        ses_census.read_census(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:") and "ind_snv" in msg and "Ind_snv" in msg
    assert "ind (" not in msg   # only the missing column is named


# ----------------------------------------------------------------------------- Urban Atlas

def _ua_dir(tmp_path):
    ua = tmp_path / "UA_data"
    ua.mkdir()
    shutil.copy(CHESHIRE, ua / CHESHIRE.name)
    shutil.copy(KOBENHAVN, ua / KOBENHAVN.name)
    return ua


def test_read_urban_atlas_2018_gpkg_real_excerpt(tmp_path):
    ua = _ua_dir(tmp_path)
    landuse, boundary = urban_atlas.read_urban_atlas(ua, "Cheshire West and Chester")
    raw = gpd.read_file(CHESHIRE)
    assert list(landuse.columns) == ["ua_code", "ua_class", "geometry"]
    assert landuse.crs.to_epsg() == 3035 and len(landuse) == len(raw)
    # the change layer has both years: the 2018 columns win
    assert landuse["ua_code"].tolist() == raw["code_2018"].tolist()
    assert landuse["ua_class"].tolist() == raw["class_2018"].tolist()
    assert landuse["ua_code"].str.fullmatch(r"\d{5}").all()
    # no boundary layer in this file: the union of the land use stands for it
    assert len(boundary) == 1 and boundary.crs.to_epsg() == 3035
    assert boundary.geometry.iloc[0].area == pytest.approx(landuse.geometry.area.sum(), rel=1e-6)


def test_read_urban_atlas_2012_filegdb_zip_real_excerpt(tmp_path):
    ua = _ua_dir(tmp_path)
    landuse, boundary = urban_atlas.read_urban_atlas(ua, "København")
    gdb = f"/vsizip/{KOBENHAVN}/DK001L2_KOBENHAVN_clip.gdb"
    raw = gpd.read_file(gdb, layer="DK001L2_KOBENHAVN_UA2012")
    assert landuse.attrs["source"].endswith(":DK001L2_KOBENHAVN_UA2012")   # not the change layers
    assert landuse["ua_code"].tolist() == raw["CODE2012"].astype(str).tolist()
    assert landuse["ua_class"].tolist() == raw["ITEM2012"].tolist()
    assert landuse.crs.to_epsg() == 3035
    assert "Boundary2012" in boundary.attrs["source"] and boundary.crs.to_epsg() == 3035
    assert urban_atlas.read_ua_boundary(ua, "kobenhavn").geometry.iloc[0].equals(boundary.geometry.iloc[0])
    assert boundary.geometry.union_all().buffer(1).contains(landuse.geometry.union_all())


def test_read_urban_atlas_2012_spellings_and_repair(tmp_path):
    raw = gpd.read_file(CHESHIRE)
    # UA 2012 GeoPackage spelling (code_2012/class_2012), in a city folder, with a boundary layer
    folder = tmp_path / "UA" / "UK568L1_CHESHIRE_UA2012" / "Data"
    folder.mkdir(parents=True)
    gpkg = folder / "UK568L1_CHESHIRE_UA2012.gpkg"
    raw[["code_2012", "class_2012", "geometry"]].to_file(gpkg, layer="UK568L1_CHESHIRE_UA2012")
    gpd.GeoDataFrame(geometry=[raw.geometry.union_all().convex_hull], crs=raw.crs).to_file(
        gpkg, layer="UK568L1_CHESHIRE_UA2012_Boundary")
    landuse, boundary = urban_atlas.read_urban_atlas(tmp_path / "UA", "cheshire")
    assert landuse["ua_code"].tolist() == raw["code_2012"].tolist()
    assert boundary.attrs["source"].endswith("_Boundary")
    # UA 2012 shapefile spelling (CODE2012/ITEM2012), integer codes, an invalid bow-tie polygon, another CRS
    shp_dir = tmp_path / "UA2" / "UK568L1_CHESHIRE" / "Shapefiles"
    shp_dir.mkdir(parents=True)
    frame = raw[["code_2012", "class_2012", "geometry"]].head(5).rename(
        columns={"code_2012": "CODE2012", "class_2012": "ITEM2012"})
    frame["CODE2012"] = frame["CODE2012"].astype(int)
    x0, y0 = frame.geometry.iloc[0].centroid.coords[0]
    bow = shapely.Polygon([(x0, y0), (x0 + 50, y0 + 50), (x0 + 50, y0), (x0, y0 + 50)])
    frame = pd.concat([frame, gpd.GeoDataFrame({"CODE2012": [14100], "ITEM2012": ["Green urban areas"]},
                                               geometry=[bow], crs=raw.crs)], ignore_index=True)
    frame.to_crs("EPSG:4326").to_file(shp_dir / "UK568L1_CHESHIRE_UA2012.shp")
    landuse, _ = urban_atlas.read_urban_atlas(tmp_path / "UA2", "Cheshire")
    assert landuse.attrs["repaired"] == 1 and landuse.geometry.is_valid.all()
    assert landuse["ua_code"].tolist() == [*raw["code_2012"].head(5), "14100"]
    assert landuse.crs.to_epsg() == 3035
    assert landuse.geometry.iloc[-1].area == pytest.approx(2 * 25 * 50 / 2, rel=1e-3)   # two triangles


def test_find_ua_city_prefers_unpacked_folder_and_reports_missing(tmp_path):
    (tmp_path / "FR001L2_PARIS_UA2018_v013").mkdir()
    (tmp_path / "FR001L2_PARIS_UA2018_v013.zip").write_bytes(b"")
    (tmp_path / "FR003L2_LYON_UA2018_v013.zip").write_bytes(b"")
    (tmp_path / "FR001L2_PARIS_UA2012").mkdir()
    (tmp_path / "FR001L2_PARISIAN_SUBURBS_UA2021").mkdir()
    assert urban_atlas.find_ua_city(tmp_path, "paris").name == "FR001L2_PARIS_UA2018_v013"
    assert urban_atlas.find_ua_city(tmp_path, "Lyon").name == "FR003L2_LYON_UA2018_v013.zip"
    with pytest.raises(errors.DataError, match="Marseille"):
        urban_atlas.find_ua_city(tmp_path, "Marseille")


# ----------------------------------------------------------------------------- tiles and cells

def _write_tif(path, array, left, top, res, crs="EPSG:2154", nodata=0):
    with rasterio.open(path, "w", driver="GTiff", width=array.shape[2], height=array.shape[1], count=3,
                       dtype="uint8", crs=crs, transform=from_origin(left, top, res, res), nodata=nodata) as dst:
        dst.write(array)


def _smooth_rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bands = [60 + 40 * np.sin(xx / 7.0 + k) + 40 * np.cos(yy / 11.0 - k) + rng.integers(0, 30, (h, w))
             for k in range(3)]
    return np.clip(np.stack(bands), 1, 255).astype(np.uint8)


def test_straddling_cell_equals_read_from_mosaic(tmp_path):
    # a 300 m x 300 m raster at 1 m in Lambert-93, cut into a west and an east tile
    left, top, res = 652000.0, 6862300.0, 1.0
    mosaic = _smooth_rgb(300, 300)
    _write_tif(tmp_path / "mosaic.tif", mosaic, left, top, res)
    _write_tif(tmp_path / "west.tif", mosaic[:, :, :150], left, top, res)
    _write_tif(tmp_path / "east.tif", mosaic[:, :, 150:], left + 150, top, res)
    # a 200 m EPSG:3035 cell centred on the cut
    cx, cy = Transformer.from_crs(2154, 3035, always_xy=True).transform(left + 150, top - 150)
    bounds = (cx - 100, cy - 100, cx + 100, cy + 100)
    whole = extraction.read_cell([tmp_path / "mosaic.tif"], bounds, 64)
    merged = extraction.read_cell([tmp_path / "west.tif", tmp_path / "east.tif"], bounds, 64)
    assert merged.shape == (64, 64, 3) and merged.dtype == np.uint8
    assert extraction.nodata_fraction(whole) == 0.0
    np.testing.assert_array_equal(merged, whole)
    west_only = extraction.read_cell([tmp_path / "west.tif"], bounds, 64)
    assert 0.3 < extraction.nodata_fraction(west_only) < 0.7   # one tile alone leaves the other half empty
    np.testing.assert_array_equal(west_only[:, :20], whole[:, :20])


def test_cells_read_together_decode_once_and_equal_each_read_alone(tmp_path, monkeypatch):
    left, top, res = 652000.0, 6862300.0, 1.0
    mosaic = _smooth_rgb(300, 300, seed=3)
    _write_tif(tmp_path / "west.tif", mosaic[:, :, :150], left, top, res)
    _write_tif(tmp_path / "east.tif", mosaic[:, :, 150:], left + 150, top, res)
    cx, cy = Transformer.from_crs(2154, 3035, always_xy=True).transform(left + 150, top - 150)
    cells = [(cx - 50, cy - 50, cx + 50, cy + 50),      # across the cut
             (cx - 140, cy + 20, cx - 60, cy + 100),    # west tile only
             (cx + 90, cy - 100, cx + 190, cy)]         # half beyond the east edge: nodata there
    paths = [tmp_path / "west.tif", tmp_path / "east.tif"]
    alone = [extraction.read_cell(paths, b, 48) for b in cells]
    merges = []
    real_merge = extraction.merge
    monkeypatch.setattr(extraction, "merge", lambda *a, **k: merges.append(k["bounds"]) or real_merge(*a, **k))
    together = extraction.read_cells(paths, cells, 48)
    assert len(merges) == 1   # the tiles' region is read once for the three cells
    for one, both in zip(alone, together):
        np.testing.assert_array_equal(both, one)
    assert extraction.nodata_fraction(together[0]) == 0.0 and 0.3 < extraction.nodata_fraction(together[2]) < 0.7
    # the file's own nodata value (255 in every band) and an untagged Lambert-93 CRS, read as a group
    with rasterio.open(IGN_TIF) as src:
        l, b, r, t = src.bounds
    ix, iy = Transformer.from_crs(2154, 3035, always_xy=True).transform((l + r) / 2, (b + t) / 2)
    ign = [(ix - 20, iy - 20, ix, iy), (ix, iy - 10, ix + 50, iy + 10)]
    for one, both in zip([extraction.read_cell([IGN_TIF], c, 40) for c in ign], extraction.read_cells([IGN_TIF], ign, 40)):
        np.testing.assert_array_equal(both, one)


def test_untagged_lambert93_tile_is_georeferenced(tmp_path):
    with rasterio.open(IGN_TIF) as src:
        assert src.crs.to_epsg() is None and ses_tiles.is_lambert93(src.crs)
        assert ses_tiles.tile_crs(src).to_epsg() == 2154
        data, transform, (l, b, r, t) = src.read(), src.transform, src.bounds
    to_3035 = Transformer.from_crs(2154, 3035, always_xy=True)
    cx, cy = to_3035.transform((l + r) / 2, (b + t) / 2)
    bounds, px = (cx - 20, cy - 20, cx + 20, cy + 20), 100   # a 40 m box inside the 50 m footprint
    img = extraction.read_cell([IGN_TIF], bounds, px, resampling="nearest")
    assert extraction.nodata_fraction(img) < 0.001   # the file's own nodata (255) is honoured, a pixel or so
    # independent check: map each output pixel centre back to the source with PROJ, take that pixel
    xs = bounds[0] + (np.arange(px) + 0.5) * 40 / px
    ys = bounds[3] - (np.arange(px) + 0.5) * 40 / px
    gx, gy = np.meshgrid(xs, ys)
    sx, sy = Transformer.from_crs(3035, 2154, always_xy=True).transform(gx, gy)
    col, row = ~transform @ (sx, sy)
    expected = data[:, np.floor(row).astype(int), np.floor(col).astype(int)].transpose(1, 2, 0)
    same = (img == expected).all(axis=-1).mean()
    assert same > 0.97, same
    # a box beside the footprint is all nodata; one half over it is about half nodata
    assert extraction.nodata_fraction(extraction.read_cell([IGN_TIF], (cx + 100, cy, cx + 140, cy + 40), 32)) == 1.0
    half = extraction.read_cell([IGN_TIF], (cx, cy - 10, cx + 50, cy + 10), 50)
    assert 0.3 < extraction.nodata_fraction(half) < 0.7


def test_read_tile_index_resolves_names(tmp_path):
    tiles = tmp_path / "aerial" / "D075"
    (tiles / "1_DONNEES").mkdir(parents=True)
    (tiles / "3_SUPPLEMENTS").mkdir()
    names = ["75-2021-0650-6861-LA93-0M20-E080.jp2", "75-2021-0651-6861-LA93-0M20-E080.jp2",
             "75-2021-0652-6861-LA93-0M20-E080.jp2"]
    for n in names[:2]:
        (tiles / "1_DONNEES" / n).write_bytes(b"")
    index = gpd.GeoDataFrame({"nom": ["./data/" + names[0], names[1].upper(), names[2]]},
                             geometry=[shapely.box(650000 + 1000 * i, 6860000, 651000 + 1000 * i, 6861000)
                                       for i in range(3)], crs="EPSG:2154")
    index.to_file(tiles / "3_SUPPLEMENTS" / "dalles.shp")
    got = ses_tiles.read_tile_index(tmp_path / "aerial")
    assert got.crs.to_epsg() == 2154 and list(got.columns) == ["NOM", "path", "product", "geometry"]
    assert got.attrs["missing"] == 1
    assert [Path(p).name for p in got["path"]] == names[:2]
    # an index without a .prj is taken as Lambert-93
    (tiles / "3_SUPPLEMENTS" / "dalles.prj").unlink()
    assert ses_tiles.read_tile_index(tmp_path / "aerial").crs.to_epsg() == 2154
    with pytest.raises(errors.DataError, match="dalles.shp"):
        ses_tiles.read_tile_index(tmp_path / "D075_missing")


def test_cells_in_boundary_uses_cell_centres():
    ids = [grid.inspire_id(200 * i, 0) for i in range(4)]
    cells = gpd.GeoDataFrame({"cell_id": ids}, geometry=list(grid.cell_boxes(ids)), crs="EPSG:3035")
    boundary = gpd.GeoDataFrame(geometry=[shapely.box(90, -50, 510, 250)], crs="EPSG:3035")
    # centres at x = 100, 300, 500, 700: the first and third lie inside, barely
    assert extraction.cells_in_boundary(cells, boundary)["cell_id"].tolist() == ids[:3]


def test_nodata_fraction_counts_pixels_zero_in_every_band():
    img = np.full((4, 5, 3), 9, np.uint8)
    img[0, :, :] = 0            # 5 nodata pixels
    img[1, 0, 0] = 0            # zero in one band only: valid
    assert extraction.nodata_fraction(img) == pytest.approx(5 / 20)
    assert extraction.nodata_fraction(np.zeros((3, 3), np.uint8)) == 1.0


@pytest.mark.parametrize("reader, what, fix", [
    ("census", "census grid", "ses.census_file"),
    ("cells", "cell index", "generate_fr_ua_aerial_data.py"),
    ("tiles", "tile index", "dalles.shp"),
])
def test_a_file_that_is_not_what_its_name_says_is_one_data_error(tmp_path, reader, what, fix):
    from urbanlens.ses import data as ses_data

    if reader == "tiles":
        (tmp_path / "dalles.shp").write_bytes(b"not a shapefile")
        call = lambda: ses_tiles.read_tile_index(tmp_path)  # noqa: E731
    else:
        path = tmp_path / ("census.gpkg" if reader == "census" else "cells.gpkg")
        path.write_bytes(b"half a download")
        call = (lambda: ses_census.read_census(path)) if reader == "census" else (lambda: ses_data.read_cells(path))
    with pytest.raises(errors.DataError) as err:
        call()
    msg = str(err.value)
    assert f"not a readable {what}" in msg and fix in msg and "\n" not in msg
