"""The French data as its providers deliver it, built from the real excerpts in tests/data: IGN BD ORTHO
folder trees (RVB and IRC side by side, several departments, three CRS tags), INSEE's zip holding a 7z,
the Copernicus portal's zip of zips; and the land-use findings flagged when the model is at chance."""
import shutil
import sys
import zipfile
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import py7zr
import pytest
import rasterio
import shapely
from pyproj import Transformer
from rasterio.transform import from_origin

from urbanlens.core import errors
from urbanlens.ses import archives, extraction, findings, grid, urban_atlas, zonal
from urbanlens.ses import census as ses_census
from urbanlens.ses import figures as ses_figures
from urbanlens.ses import tiles as ses_tiles
from script_runner import assert_no_traceback, python, run, set_args

DATA = Path(__file__).resolve().parents[1] / "data"
IGN_TIF = DATA / "test_data_rgb.tif"
INSEE = DATA / "insee_carreaux_200m_sample.gpkg"
CHESHIRE = DATA / "UK568L1_CHESHIRE_WEST_AND_CHESTER_change_2012_2018_excerpt.gpkg"
KOBENHAVN = DATA / "DK001L2_KOBENHAVN_clip.zip"
STEM = "FR999L2_MONTPELLIER_UA2018_v013"
PORTAL = "2a7d0f3e"
TO_3035 = Transformer.from_crs(2154, 3035, always_xy=True)
TO_2154 = Transformer.from_crs(3035, 2154, always_xy=True)


# ----------------------------------------------------------------------------- INSEE

def test_real_insee_sample_through_read_census():
    raw = gpd.read_file(INSEE)
    assert raw.crs.to_epsg() == 2154 and len(raw.columns) - 1 == 34 and len(raw) == 318
    got = ses_census.read_census(INSEE)
    assert got.crs.to_epsg() == 3035 and got.attrs["imputed_flag"]
    assert len(got) + got.attrs["dropped"] == len(raw)
    for cid, geom in zip(got["cell_id"], got.geometry):   # squares rebuilt where the ids put them
        assert geom.equals(grid.cell_box(cid))
    by_id = raw.set_index("idcar_200m")
    np.testing.assert_allclose(got["income"], (by_id["ind_snv"] / by_id["ind"]).loc[got["cell_id"]])
    flagged = set(by_id.index[by_id["i_est_200"] == 1])
    assert set(got.loc[got["imputed"], "cell_id"]) == flagged & set(got["cell_id"]) and len(flagged) == 32
    kept, n = ses_census.apply_imputed(got, "keep")
    assert len(kept) == len(got) and n == got["imputed"].sum()
    dropped, n = ses_census.apply_imputed(got, "drop")
    assert len(dropped) == len(got) - n and not dropped["imputed"].any()
    # a bbox in EPSG:3035 over a few cells, taken to the file's Lambert-93
    e, nn, _ = grid.parse_inspire_id(got["cell_id"].iloc[0])
    near = ses_census.read_census(INSEE, bbox=(e - 10, nn - 10, e + 210, nn + 210))
    assert got["cell_id"].iloc[0] in set(near["cell_id"]) and len(near) <= 9


def _census_7z_zip(path: Path, broken: bool = False) -> Path:
    """INSEE's delivery: a zip holding one .7z holding a folder with the three GeoPackages."""
    work = path.parent / "src"
    (work / "Filosofi2019_carreaux_200m_gpkg").mkdir(parents=True)
    for region in ("met", "mart", "reun"):
        shutil.copy(INSEE, work / "Filosofi2019_carreaux_200m_gpkg" / f"carreaux_200m_{region}.gpkg")
    seven = work / "Filosofi2019_carreaux_200m_gpkg.7z"
    with py7zr.SevenZipFile(seven, "w") as sz:
        sz.writeall(work / "Filosofi2019_carreaux_200m_gpkg", "Filosofi2019_carreaux_200m_gpkg")
    if broken:   # a download cut short
        seven.write_bytes(seven.read_bytes()[: seven.stat().st_size // 3])
    with zipfile.ZipFile(path, "w") as z:
        z.write(seven, seven.name)
    return path


def _data_setup(root: Path):
    return run(["bash", "data_setup.sh", *set_args([f"paths.data={root / 'data'}", f"paths.results={root / 'results'}"])],
               env={"PY": sys.executable}, timeout=300)


def test_data_setup_unpacks_insee_zip_holding_a_7z(tmp_path):
    (tmp_path / "data" / "census_data").mkdir(parents=True)
    _census_7z_zip(tmp_path / "data" / "census_data" / "Filosofi2019_carreaux_200m_gpkg.zip")
    proc = _data_setup(tmp_path)
    assert proc.returncode == 0, proc.stderr
    census = tmp_path / "data" / "census_data" / "carreaux_200m_met.gpkg"   # the default ses.census_file
    assert "census grid downloaded and unpacked" in proc.stdout and census.is_file()
    assert (census.parent / "carreaux_200m_reun.gpkg").is_file()
    assert len(ses_census.read_census(census)) == len(ses_census.read_census(INSEE))
    assert not [p for p in census.parent.iterdir() if ".tmp-" in p.name]
    assert "census grid present" in _data_setup(tmp_path).stdout   # the next run finds it


def test_data_setup_reports_a_failed_unpacking_as_a_failure(tmp_path):
    (tmp_path / "data" / "census_data").mkdir(parents=True)
    _census_7z_zip(tmp_path / "data" / "census_data" / "Filosofi2019_carreaux_200m_gpkg.zip", broken=True)
    proc = _data_setup(tmp_path)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode != 0 and "downloaded" not in proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Filosofi2019_carreaux_200m_gpkg.zip" in lines[0]
    assert not (tmp_path / "data" / "census_data" / "carreaux_200m_met.gpkg").exists()
    # a zip without a 7z, and a 7z without the file asked for
    bare = tmp_path / "bare.zip"
    with zipfile.ZipFile(bare, "w") as z:
        z.writestr("readme.txt", "nothing")
    with pytest.raises(errors.DataError, match="holds no .7z"):
        archives.unpack_census(bare, tmp_path / "out")
    good = _census_7z_zip(tmp_path / "g" / "good.zip") if (tmp_path / "g").mkdir() is None else None
    with pytest.raises(errors.DataError, match="carreaux_200m_metro.gpkg"):
        archives.unpack_census(good, tmp_path / "out", "carreaux_200m_metro.gpkg")


# ----------------------------------------------------------------------------- IGN BD ORTHO

def _excerpt():
    with rasterio.open(IGN_TIF) as src:
        return src.read(), src.transform, src.crs


def _mosaic_block(pixels: np.ndarray) -> np.ndarray:
    """3 x 3 mirrored copies of the excerpt (756 px), seamless."""
    row = np.concatenate([pixels, pixels[:, :, ::-1], pixels], axis=2)
    return np.concatenate([row, row[:, ::-1], row], axis=1)


def _write(path: Path, pixels, left, top, crs, driver="JP2OpenJPEG", nodata=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = {"QUALITY": "100", "REVERSIBLE": "YES"} if driver == "JP2OpenJPEG" else {}
    with rasterio.open(path, "w", driver=driver, width=pixels.shape[2], height=pixels.shape[1], count=3,
                       dtype="uint8", crs=crs, transform=from_origin(left, top, 0.2, 0.2), nodata=nodata,
                       **opts) as dst:
        dst.write(pixels)


def _centre_cell() -> tuple[str, float, float]:
    """The 200 m cell nearest the excerpt and its centre in Lambert-93."""
    _, t, _ = _excerpt()
    x, y = TO_3035.transform(t.c + 25, t.f - 25)
    e, n = 200 * round((x - 100) / 200), 200 * round((y - 100) / 200)
    cx, cy = TO_2154.transform(e + 100, n + 100)
    return grid.inspire_id(e, n), cx, cy


def build_bdortho(aerial: Path) -> dict:
    """2 x 2 tiles of 151.2 m around the centre cell, in IGN's delivery trees: the west column in D034
    (one tile untagged Lambert-93, one EPSG:2154), the east column in D030 (RGF93 v2b, EPSG:9794), each
    as RVB and as IRC (bands permuted), with a dalles.shp per delivery whose NOM has a ``./`` prefix."""
    pixels, _, untagged = _excerpt()
    block = _mosaic_block(pixels)
    _, cx, cy = _centre_cell()
    left0, top0 = round((cx - 151.2) / 0.2) * 0.2, round((cy + 151.2) / 0.2) * 0.2
    out = {"RVB": [], "IRC": []}
    for product in ("RVB", "IRC"):
        for j, dept in enumerate(("34", "30")):
            delivery = aerial / f"BDORTHO_2-0_{product}-0M20_JP2-E080_LAMB93_D0{dept}_2021-01-01" / "ORTHOHR"
            data = delivery / "1_DONNEES_LIVRAISON_2021-10-00009" / f"OHR_{product}_0M20_JP2-E080_LAMB93_D0{dept}-2021"
            noms, boxes = [], []
            for i in range(2):
                left, top = left0 + j * 151.2, top0 - i * 151.2
                suffix = "-IRC-E080" if product == "IRC" else "-E080"
                name = f"{dept}-2021-{int(left) % 10000:04d}-{int(top) % 100000:05d}-LA93-0M20{suffix}.jp2"
                crs = (untagged if i == 0 else "EPSG:2154") if dept == "34" else "EPSG:9794"
                tile = block if product == "RVB" else block[[2, 0, 1]]
                _write(data / name, tile, left, top, crs)
                noms.append(f"./{name}")
                boxes.append(shapely.box(left, top - 151.2, left + 151.2, top))
                out[product].append(str(data / name))
            index = delivery / "3_SUPPLEMENTS_LIVRAISON_2021-10-00009" / f"OHR_{product}_0M20_JP2-E080_LAMB93_D0{dept}-2021"
            index.mkdir(parents=True)
            gpd.GeoDataFrame({"NOM": noms, "HUMIDITE": [0, 0]}, geometry=boxes,
                             crs="EPSG:2154" if dept == "34" else "EPSG:9794").to_file(index / "dalles.shp")
    return out


def test_rvb_is_chosen_over_irc_across_departments_and_crs_tags(tmp_path):
    built = build_bdortho(tmp_path / "aerial")
    rvb = ses_tiles.read_tile_index(tmp_path / "aerial")
    assert sorted(rvb["path"]) == sorted(built["RVB"]) and set(rvb["product"]) == {"RVB"}
    assert rvb.attrs["other_product"] == 4 and rvb.attrs["missing"] == 0 and rvb.crs.to_epsg() == 2154
    irc = ses_tiles.read_tile_index(tmp_path / "aerial", product="IRC")
    assert sorted(irc["path"]) == sorted(built["IRC"]) and irc.attrs["other_product"] == 4
    for path in built["RVB"]:   # untagged Lambert-93, EPSG:2154 and RGF93 v2b all read as EPSG:2154
        with rasterio.open(path) as src:
            assert ses_tiles.tile_crs(src).to_epsg() == 2154
    assert ses_tiles.ortho_product(built["IRC"][0]) == "IRC" and ses_tiles.ortho_product(built["RVB"][0]) == "RVB"
    # the centre cell overlaps tiles of one product only, all four
    cid, _, _ = _centre_cell()
    cells = gpd.GeoDataFrame({"cell_id": [cid]}, geometry=[grid.cell_box(cid)], crs="EPSG:3035")
    assert sorted(ses_tiles.tiles_for_cells(cells, rvb).iloc[0]) == sorted(built["RVB"])


def test_white_pixels_survive_a_declared_nodata_of_255(tmp_path):
    pixels, t, _ = _excerpt()
    pixels = pixels.copy()
    pixels[:, :10, :10] = 255                       # a hole: every band holds the declared value
    pixels[:, 10:20, :10] = [[[255]], [[255]], [[240]]]   # a white roof saturated in two bands
    path = tmp_path / "tile.tif"
    _write(path, pixels, t.c, t.f, "EPSG:2154", driver="GTiff", nodata=255)
    bounds = (t.c, t.f - 252 * 0.2, t.c + 252 * 0.2, t.f)
    img = extraction.read_cell([path], bounds, 252, crs="EPSG:2154", resampling="nearest").transpose(2, 0, 1)
    hole = (pixels == 255).all(axis=0)
    expected = np.where(hole, 0, pixels)
    np.testing.assert_array_equal(img, expected)
    partial = (pixels == 255).any(axis=0) & ~hole
    assert partial.sum() > 100 and (img[:, partial] == pixels[:, partial]).all()   # the real excerpt's too
    assert extraction.nodata_fraction(img.transpose(1, 2, 0)) == pytest.approx(hole.mean())


# ----------------------------------------------------------------------------- Urban Atlas portal zip

def _moved_landuse(centre_3035) -> gpd.GeoDataFrame:
    """The real Cheshire polygons (2018 columns), moved so that their centre lies on ``centre_3035``."""
    lu = gpd.read_file(CHESHIRE)[["code_2018", "class_2018", "geometry"]]
    c = lu.geometry.union_all().centroid
    lu["geometry"] = lu.geometry.translate(centre_3035[0] - c.x, centre_3035[1] - c.y)
    return lu


def build_portal_zip(ua_dir: Path, centre_3035, year: int = 2018, layers=None) -> Path:
    """The portal's download: <id>.zip holding <id>/Results/<FUA>_<CITY>_UA<year>_v013.zip (which holds
    <stem>/Data/<stem>.gpkg, or Shapefiles/ for 2012) and the real Copenhagen FileGDB zip."""
    work = ua_dir.parent / f"ua_src_{year}"
    lu = _moved_landuse(centre_3035)
    x, y = centre_3035
    boundary = gpd.GeoDataFrame({"fua_code": ["FR999L2"]}, geometry=[shapely.box(x - 300, y - 300, x + 300, y + 300)],
                                crs=lu.crs)
    core = gpd.GeoDataFrame({"fua_code": ["FR999L2"]}, geometry=[shapely.box(x - 100, y - 100, x + 100, y + 100)], crs=lu.crs)
    stem = STEM if year == 2018 else "FR999L2_MONTPELLIER_UA2012"
    if year == 2018:
        folder = work / stem / "Data"
        folder.mkdir(parents=True)
        default = [(f"{stem[:-5]}", lu), (f"{stem[:-5]}_Boundary", boundary), (f"{stem[:-13]}_UrbanCore", core)]
        for name, gdf in (layers or default):
            gdf.to_file(folder / f"{stem}.gpkg", layer=name)
        (work / stem / "Metadata").mkdir()
        (work / stem / "Metadata" / f"{stem}.xml").write_text("<metadata/>")
    else:
        folder = work / stem / "Shapefiles"
        folder.mkdir(parents=True)
        old = lu.rename(columns={"code_2018": "CODE2012", "class_2018": "ITEM2012"})
        old.to_file(folder / f"{stem}.shp")
        boundary.to_file(folder / f"{stem}_Boundary.shp")
    inner = work / f"{stem}.zip"
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted((work / stem).rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(work).as_posix())
    ua_dir.mkdir(parents=True, exist_ok=True)
    portal = ua_dir / f"{PORTAL}.zip"
    with zipfile.ZipFile(portal, "w") as z:
        z.write(inner, f"{PORTAL}/Results/{inner.name}")
        z.write(KOBENHAVN, f"{PORTAL}/Results/{KOBENHAVN.name}")
    return portal


def _centre_3035():
    cid, _, _ = _centre_cell()
    e, n, _ = grid.parse_inspire_id(cid)
    return e + 100.0, n + 100.0


def test_portal_zip_of_zips_is_read_as_delivered(tmp_path):
    ua = tmp_path / "UA_data"
    portal = build_portal_zip(ua, _centre_3035())
    landuse, boundary = urban_atlas.read_urban_atlas(ua, "Montpellier")
    assert landuse.attrs["source"].endswith(f":{STEM[:-5]}")                 # the _UA2018 layer
    assert boundary.attrs["source"].endswith(f":{STEM[:-5]}_Boundary")       # not _UrbanCore
    assert len(landuse) == len(gpd.read_file(CHESHIRE)) and boundary.geometry.iloc[0].area == pytest.approx(600 * 600)
    cache = archives.cache_dir(portal) / STEM
    assert cache.is_dir() and (cache / STEM / "Data" / f"{STEM}.gpkg").is_file()
    stamp = (cache / ".unpacked.json").stat().st_mtime_ns
    by_code, _ = urban_atlas.read_urban_atlas(ua, "FR999L2")                 # the FUA code finds it too
    assert by_code["ua_code"].tolist() == landuse["ua_code"].tolist()
    assert (cache / ".unpacked.json").stat().st_mtime_ns == stamp             # unpacked once
    kob, _ = urban_atlas.read_urban_atlas(ua, "København")                   # the other city of the download
    assert kob.attrs["source"].endswith(":DK001L2_KOBENHAVN_UA2012")


def test_portal_zip_with_2012_shapefiles(tmp_path):
    ua = tmp_path / "UA_data"
    build_portal_zip(ua, _centre_3035(), year=2012)
    landuse, boundary = urban_atlas.read_urban_atlas(ua, "montpellier")
    raw = gpd.read_file(CHESHIRE)
    assert landuse["ua_code"].tolist() == raw["code_2018"].tolist()
    assert boundary.attrs["source"].endswith("_Boundary.shp:FR999L2_MONTPELLIER_UA2012_Boundary")


def test_nothing_fitting_lists_the_archive_and_blames_no_provider(tmp_path):
    ua = tmp_path / "UA_data"
    x, y = _centre_3035()
    box = gpd.GeoDataFrame({"fua_code": ["FR999L2"]}, geometry=[shapely.box(x - 300, y - 300, x + 300, y + 300)],
                           crs="EPSG:3035")
    build_portal_zip(ua, (x, y), layers=[(f"{STEM[:-5]}_Boundary", box), (f"{STEM[:-13]}_UrbanCore", box)])
    with pytest.raises(errors.DataError) as err:
        urban_atlas.read_urban_atlas(ua, "Lyon")
    assert "inside its zips" in str(err.value) and f"{STEM}.zip" in str(err.value) and PORTAL in str(err.value)
    with pytest.raises(errors.DataError) as err:
        urban_atlas.read_ua_boundary(ua, "Montpellier")
    msg = str(err.value)
    assert "no land-use layer" in msg and "UrbanCore" in msg and "Copernicus Urban Atlas delivery" in msg
    assert "use the Copernicus files" not in msg


# ----------------------------------------------------------------------------- extraction as delivered

def _census(path: Path) -> list[str]:
    """INSEE's schema (rows of the real sample, all 34 columns) for the 3 x 3 cells around the centre
    cell, geometry in Lambert-93; the cell east of the centre is flagged imputed."""
    cid, _, _ = _centre_cell()
    e, n, _ = grid.parse_inspire_id(cid)
    ids = [grid.inspire_id(e + 200 * dx, n + 200 * dy) for dy in (1, 0, -1) for dx in (-1, 0, 1)]
    rows = gpd.read_file(INSEE).iloc[:9].copy()
    rows = rows[rows["ind"] > 0].iloc[:9] if (rows["ind"] > 0).all() else rows
    rows["idcar_200m"] = ids
    rows["i_est_200"] = [0, 0, 0, 0, 0, 1, 0, 0, 0]
    rows = gpd.GeoDataFrame(rows.drop(columns="geometry"), geometry=list(grid.cell_boxes(ids)), crs="EPSG:3035")
    path.parent.mkdir(parents=True)
    rows.to_crs("EPSG:2154").to_file(path, layer="carreaux_200m_met")
    return ids


def _extract(root: Path, *sets):
    args = ["ses.cities=[Montpellier]", "ses.cell_px=64", "workers=1", f"paths.data={root / 'data'}",
            f"paths.results={root / 'results'}", *sets]
    proc = run(python("generate_fr_ua_aerial_data.py", "--config", "configs/ses_demo.yaml", *set_args(args)),
               env={"OMP_NUM_THREADS": "1"}, quiet=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_no_traceback(proc, args)
    return proc.stdout, gpd.read_file(root / "results" / "ses" / "cells.gpkg", layer="cells")


def test_extraction_from_the_delivered_layouts(tmp_path):
    data = tmp_path / "data"
    built = build_bdortho(data / "aerial_data")
    build_portal_zip(data / "UA_data", _centre_3035())
    ids = _census(data / "census_data" / "carreaux_200m_met.gpkg")
    centre, imputed = ids[4], ids[5]
    log, cells = _extract(tmp_path)
    assert "4 RVB orthophoto tiles indexed" in log and "4 tiles of the other product ignored" in log
    assert "1 imputed by INSEE kept" in log and "INSEE-imputed cells: 1 kept, 0 dropped" in log
    assert sorted(cells["cell_id"]) == sorted(ids) and set(cells["ortho_product"]) == {"RVB"}
    assert cells.set_index("cell_id")["imputed"].to_dict() == {c: c == imputed for c in ids}
    row = cells.set_index("cell_id").loc[centre]
    assert row["non_void"] and row["nodata"] == 0 and (~cells["non_void"]).sum() >= 4
    img = extraction.read_png(tmp_path / "results" / "ses" / row["path"])
    bounds = grid.cell_box(centre).bounds
    np.testing.assert_array_equal(img, extraction.read_cell(sorted(built["RVB"]), bounds, 64))
    assert not np.array_equal(img, extraction.read_cell(sorted(built["IRC"]), bounds, 64))
    # IRC on purpose, imputed cells dropped: other images, recorded in the index
    shutil.rmtree(tmp_path / "results")
    log, cells = _extract(tmp_path, "ses.ortho_product=IRC", "ses.imputed=drop")
    assert "4 IRC orthophoto tiles indexed" in log and "INSEE-imputed cells: 0 kept, 1 dropped" in log
    assert imputed not in set(cells["cell_id"]) and len(cells) == 8
    assert set(cells["ortho_product"]) == {"IRC"} and set(cells["imputed_policy"]) == {"drop"}
    row = cells.set_index("cell_id").loc[centre]
    assert row["path"].startswith("imagery-IRC/Montpellier/")
    irc = extraction.read_png(tmp_path / "results" / "ses" / row["path"])
    np.testing.assert_array_equal(irc, extraction.read_cell(sorted(built["IRC"]), bounds, 64))


# ----------------------------------------------------------------------------- findings

def _predictions(p: np.ndarray, n_per_class: int = 20) -> pd.DataFrame:
    true = np.repeat(np.arange(5), n_per_class)
    return pd.DataFrame({"cell_id": [f"c{i}" for i in range(len(true))], "true_class": true,
                         **{f"p_{k}": p[:, k] for k in range(5)}})


def _binomial(s):
    from math import comb

    return np.stack([comb(4, k) * s ** k * (1 - s) ** (4 - k) for k in range(5)], axis=1)


def _stats(poor_max: float = 0.4, rich_max: float = 0.6) -> pd.DataFrame:
    return pd.DataFrame({"ua_code": ["11100", "12210"], "ua_class": ["dense", "roads"], "area": [100.0, 50.0],
                         "poor_score": [0.1, 0.2], "rich_score": [0.3, 0.1],
                         "poor_max": [poor_max, poor_max], "rich_max": [rich_max, rich_max]})


def test_a_model_at_chance_makes_the_ranking_not_meaningful():
    at_chance = _predictions(_binomial(np.full(100, 0.5)))
    stats = _stats(poor_max=0.0)   # every prediction equal, and an all-zero poorest map (the reported run)
    finding = findings.city_finding(at_chance, stats)
    assert finding.auc == 0.5 and finding.lo <= 0.5 <= finding.hi and not finding.meaningful
    assert "includes 0.5" in finding.caveat and "poorest-class map is zero everywhere" in finding.caveat
    summary = findings.annotate(zonal.landuse_summary(stats), finding)
    assert list(summary.columns) == zonal.SUMMARY_COLUMNS + findings.SKILL_COLUMNS
    assert (~summary["meaningful"]).all() and summary["rich_minus_poor"].notna().all()   # numbers still there
    title = ses_figures.landuse_scores_figure(summary, "Lyon").axes[0].get_title()
    assert "not meaningful" in title and "0.50 [0.50, 0.50]" in title
    assert "not meaningful" in findings.describe(finding)
    # a skilled model with non-zero maps: meaningful, its interval above 0.5
    rng = np.random.default_rng(0)
    skilled = _predictions(_binomial(np.clip(np.repeat(np.arange(5), 20) / 4 + rng.normal(0, 0.3, 100), .01, .99)))
    good = findings.city_finding(skilled, _stats())
    assert good.meaningful and good.lo > 0.5 and good.caveat == ""
    assert "not meaningful" not in ses_figures.landuse_scores_figure(findings.annotate(
        zonal.landuse_summary(_stats()), good), "Paris").axes[0].get_title()
    # the same skill with a zero map, and pooled with a city at chance: not meaningful
    assert not findings.city_finding(skilled, _stats(rich_max=0.0)).meaningful
    pooled = findings.pooled_finding([skilled, at_chance], _stats(), {"Paris": good, "Lyon": finding})
    assert not pooled.meaningful and "Lyon" in pooled.caveat
    # a written summary reads back to the same finding
    assert findings.from_summary(summary) == finding
