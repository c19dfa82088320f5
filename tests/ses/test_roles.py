"""Readers choose layers and files by their role, never by their names' sort order: the Urban Atlas 2012
delivery (land use, the functional urban area's boundary and the core city's), the INSEE 2015
shapefile beside the 2019 GeoPackage."""
import zipfile
from pathlib import Path

import geopandas as gpd
import pytest
import shapely

from urbanlens.core import errors
from urbanlens.ses import census as ses_census
from urbanlens.ses import extraction, grid, urban_atlas

FUA = "FR009L2_LILLE"
E0, N0 = 3_800_000, 3_000_000  # a corner on the 200 m grid, EPSG:3035


def _square(half: float) -> shapely.Polygon:
    return shapely.box(E0 + 1000 - half, N0 + 1000 - half, E0 + 1000 + half, N0 + 1000 + half)


def build_ua2012_zip(ua_dir: Path, extra_boundary: bool = False) -> Path:
    """A city zip as Urban Atlas 2012 was delivered: ``<FUA>_UA2012.shp`` (CODE2012, ITEM2012),
    ``<FUA>_UA2012_Boundary.shp`` (the functional urban area, 1.8 km wide) and ``<FUA>_CityBoundary.shp``
    (the core city, 0.6 km wide), whose name sorts first."""
    work = ua_dir.parent / "ua2012_src" / f"{FUA}_UA2012" / "Shapefiles"
    work.mkdir(parents=True)
    crs = "EPSG:3035"
    gpd.GeoDataFrame({"CODE2012": ["11100", "14100"], "ITEM2012": ["Continuous urban fabric", "Green urban areas"]},
                     geometry=[_square(900).difference(_square(300)), _square(300)], crs=crs
                     ).to_file(work / f"{FUA}_UA2012.shp")
    gpd.GeoDataFrame({"FUA_OR_CIT": [FUA]}, geometry=[_square(900)], crs=crs).to_file(work / f"{FUA}_UA2012_Boundary.shp")
    gpd.GeoDataFrame({"FUA_OR_CIT": [FUA]}, geometry=[_square(300)], crs=crs).to_file(work / f"{FUA}_CityBoundary.shp")
    if extra_boundary:  # a second functional-area boundary of the same year (another delivery's)
        gpd.GeoDataFrame({"FUA_OR_CIT": [FUA]}, geometry=[_square(500)], crs=crs).to_file(
            work / f"FR009L3_LILLE_UA2012_Boundary.shp")
    ua_dir.mkdir(parents=True, exist_ok=True)
    out = ua_dir / f"{FUA}_UA2012.zip"
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(work.iterdir()):
            z.write(p, f"{FUA}_UA2012/Shapefiles/{p.name}")
    return out


def test_ua2012_boundary_is_the_functional_area_not_the_core_city(tmp_path):
    build_ua2012_zip(tmp_path / "UA_data")
    boundary = urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille")
    assert boundary.attrs["source"].endswith(f":{FUA}_UA2012_Boundary")
    assert boundary.geometry.iloc[0].area == pytest.approx(1800 * 1800)
    line = urban_atlas.describe("Lille", boundary)
    assert f"land use " in line and line.split("land use ")[1].split(",")[0].endswith(f":{FUA}_UA2012")
    assert f"not used: {FUA}_CityBoundary (core city)" in line
    assert urban_atlas.sources(boundary)["boundary"].endswith("_UA2012_Boundary")
    landuse, same = urban_atlas.read_urban_atlas(tmp_path / "UA_data", "Lille")
    assert sorted(landuse["ua_code"]) == ["11100", "14100"] and same.attrs["source"] == boundary.attrs["source"]


def test_core_city_only_falls_back_to_the_land_use_and_says_so(tmp_path, caplog):
    zipped = build_ua2012_zip(tmp_path / "UA_data")
    with zipfile.ZipFile(zipped) as z:
        kept = {n: z.read(n) for n in z.namelist() if "_UA2012_Boundary" not in n}
    with zipfile.ZipFile(zipped, "w") as z:
        for n, data in kept.items():
            z.writestr(n, data)
    boundary = urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille")
    assert boundary.attrs["source"].startswith("union of ")
    assert boundary.geometry.iloc[0].area == pytest.approx(1800 * 1800)   # not the 600 m core city
    assert "CityBoundary (core city) not used" in caplog.text


def test_two_boundaries_of_one_role_are_named_with_the_key(tmp_path):
    build_ua2012_zip(tmp_path / "UA_data", extra_boundary=True)
    with pytest.raises(errors.DataError) as err:
        urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille")
    msg = str(err.value)
    assert f"{FUA}_UA2012_Boundary" in msg and "FR009L3_LILLE_UA2012_Boundary" in msg and "ses.ua_boundary" in msg
    picked = urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille", "FR009L3_LILLE_UA2012_Boundary")
    assert picked.geometry.iloc[0].area == pytest.approx(1000 * 1000)
    with pytest.raises(errors.DataError, match="names no layer"):
        urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille", "nonesuch")


# ----------------------------------------------------------------------------- INSEE 2015 and 2019

def _ids(n: int = 4) -> list[str]:
    return [grid.inspire_id(E0 + 200 * i, N0) for i in range(n)]


def build_census_2015(path: Path, bad_id: bool = False) -> Path:
    """The 2015 delivery's schema: a shapefile with ``IdINSPIRE, Ind, Ind_snv`` (and ``I_est_cr``)."""
    ids = _ids()
    if bad_id:
        ids[-1] = "CRS3035RES200mN3000000E"
    path.parent.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"IdINSPIRE": ids, "Id_carr1km": ["x"] * 4, "I_est_cr": [0, 1, 0, 0],
                      "Ind": [10.0, 20.0, 5.0, 8.0], "Ind_snv": [2e5, 5e5, 1e5, 2e5]},
                     geometry=list(grid.cell_boxes(_ids())), crs="EPSG:3035").to_file(path)
    return path


def build_census_2019(path: Path) -> Path:
    ids = _ids()[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"idcar_200m": ids, "i_est_200": [0, 0], "ind": [4.0, 6.0], "ind_snv": [1e5, 2e5]},
                     geometry=list(grid.cell_boxes(ids)), crs="EPSG:3035").to_file(path, layer="carreaux_200m_met")
    return path


def test_census_2015_shapefile_is_read_and_chosen_by_its_columns(tmp_path):
    shp = build_census_2015(tmp_path / "census_data" / "Filosofi2015_carreaux_200m_metropole.shp")
    got = ses_census.read_census(tmp_path / "census_data" / "carreaux_200m_met.gpkg")   # the default name, absent
    assert got.attrs["source"] == str(shp) and "2015 shapefile" in got.attrs["note"]
    assert "ses.census_file=carreaux_200m_met.gpkg not found" in got.attrs["note"]
    assert got["income"].tolist() == pytest.approx([2e4, 2.5e4, 2e4, 2.5e4])
    assert got["imputed"].tolist() == [False, True, False, False]


def test_census_both_editions_present(tmp_path):
    folder = tmp_path / "census_data"
    shp = build_census_2015(folder / "Filosofi2015_carreaux_200m_metropole.shp")
    gpkg = build_census_2019(folder / "carreaux_200m_met.gpkg")
    got = ses_census.read_census(gpkg)                                    # the key names one: used, other named
    assert len(got) == 2 and "also present, not used: Filosofi2015_carreaux_200m_metropole.shp" in got.attrs["note"]
    assert "ses.census_file" in got.attrs["note"]
    assert len(ses_census.read_census(shp)) == 4
    with pytest.raises(errors.DataError) as err:                          # a folder, or a name absent: no guess
        ses_census.find_census(folder)
    msg = str(err.value)
    assert "carreaux_200m_met.gpkg (2019" in msg and "Filosofi2015_carreaux_200m_metropole.shp (2015" in msg
    assert "ses.census_file" in msg


def test_malformed_census_id_is_counted_and_named(tmp_path):
    shp = build_census_2015(tmp_path / "c" / "grid.shp", bad_id=True)
    got = ses_census.read_census(shp)
    assert len(got) == 3 and got.attrs["malformed"] == ["CRS3035RES200mN3000000E"]


def test_the_2012_delivery_keeps_the_study_area_cells_with_the_2015_census(tmp_path):
    """A 2 km census grid of 10 x 10 cells over the 2012 city: the study area (a 1.8 km square whose edges
    pass through the outer cells' centres) holds 8 x 8 cell centres, the core city (0.6 km) only 2 x 2."""
    build_ua2012_zip(tmp_path / "UA_data")
    ids = [grid.inspire_id(E0 + 200 * i, N0 + 200 * j) for i in range(10) for j in range(10)]
    shp = tmp_path / "census_data" / "grid_2015.shp"
    shp.parent.mkdir()
    gpd.GeoDataFrame({"IdINSPIRE": ids, "Ind": 10.0, "Ind_snv": 2e5}, geometry=list(grid.cell_boxes(ids)),
                     crs="EPSG:3035").to_crs("EPSG:2154").to_file(shp)
    boundary = urban_atlas.read_ua_boundary(tmp_path / "UA_data", "Lille")
    census = ses_census.read_census(tmp_path / "census_data", bbox=boundary.total_bounds)   # the folder's one grid
    assert len(extraction.cells_in_boundary(census, boundary)) == 64
    core = gpd.GeoDataFrame(geometry=[_square(300)], crs="EPSG:3035")
    assert len(extraction.cells_in_boundary(census, core)) == 4             # what the name order used to keep
