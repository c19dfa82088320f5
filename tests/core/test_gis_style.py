"""GIS outputs open styled: COGs with overviews, class rasters with colours and names, QGIS styles."""
import sqlite3
import xml.etree.ElementTree as ET

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from urbanlens.core import gis_style
from urbanlens.ses import maps as ses_maps
from urbanlens.ses import prediction
from urbanlens.ses.grid import inspire_id


def _is_cog(path) -> bool:
    with rasterio.open(path) as src:
        return bool(src.overviews(1)) and src.profile.get("tiled") and src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"


@pytest.mark.parametrize("shape", [(4, 4), (64, 64), (1, 5), (700, 300)])
def test_every_size_is_a_cog_with_overviews(tmp_path, shape):
    data = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    path = gis_style.write_cog(tmp_path / "x.tif", data, "EPSG:3035", from_origin(0, 1000, 10, 10),
                               names=("a", "b"), qml=gis_style.qml_pseudocolor(0, 1))
    assert _is_cog(path)
    with rasterio.open(path) as src:
        assert src.descriptions == ("a", "b")
        np.testing.assert_array_equal(src.read(), data)
    assert ET.parse(tmp_path / "x.qml").getroot().find("pipe/rasterrenderer").get("type") == "singlebandpseudocolor"


def test_cam_map_is_a_cog_with_a_graduated_sidecar(tmp_path):
    maps = np.random.default_rng(1).random((2, 32, 32)).astype(np.float32)
    maps[:, 0, 0] = np.nan
    path = tmp_path / "cams" / "CRS3035RES200mN1E1.tif"
    ses_maps.write_maps_tif(path, maps, (0, 0, 200, 200))
    assert _is_cog(path)
    back, _, _ = ses_maps.read_maps_tif(path)
    np.testing.assert_array_equal(np.isnan(back), np.isnan(maps))
    shader = ET.parse(path.with_suffix(".qml")).getroot().find(".//colorrampshader")
    assert (shader.get("minimumValue"), shader.get("maximumValue")) == ("0", "1")
    colors = [i.get("color") for i in shader.findall("item")]
    assert len(colors) == 5 and len(set(colors)) == 5


def _cells(n=6):
    return [inspire_id(4_000_000 + 200 * (k % 3), 3_000_000 + 200 * (k // 3)) for k in range(n)]


def test_income_class_raster_has_colour_table_and_class_names(tmp_path):
    cells = _cells()
    expected = np.array([0.2, 1.6, np.nan, 3.4, 4.0, 2.5])
    names = prediction.class_names([100.0, 200.0, 300.0, 400.0])
    path = tmp_path / "income_class.tif"
    prediction.write_class_tif(path, cells, expected, names)
    assert _is_cog(path)
    with rasterio.open(path) as src:
        grid, cmap, nodata = src.read(1), src.colormap(1), src.nodata
    assert nodata == prediction.CLASS_NODATA
    assert sorted(grid.ravel().tolist()) == [0, 2, 2, 3, 4, 255]  # rounded; NaN is nodata
    assert cmap[0] != cmap[4] and cmap[0][3] == 255
    assert gis_style.read_category_names(path) == names  # as GDAL reads them
    rat = ET.parse(f"{path}.aux.xml").getroot().findall(".//GDALRasterAttributeTable/Row")
    assert [[f.text for f in r][:2] for r in rat] == [[str(k), n] for k, n in enumerate(names)]
    assert tuple(int(f.text) for f in rat[4][2:]) == cmap[4]
    assert names[0] == "class 0 (income <= 100)" and names[4] == "class 4 (income > 400)"
    palette = ET.parse(tmp_path / "income_class.qml").getroot().findall(".//paletteEntry")
    assert [p.get("label") for p in palette] == names
    assert palette[4].get("color") == "#{:02x}{:02x}{:02x}".format(*cmap[4][:3])


def test_expected_class_raster_labels_its_stops_with_the_class_names(tmp_path):
    path = tmp_path / "expected_class.tif"
    prediction.write_grid_tif(path, _cells(), {"expected_class": np.linspace(0, 4, 6), "fold_spread": np.zeros(6)},
                              labels=prediction.class_names())
    assert _is_cog(path)
    items = ET.parse(tmp_path / "expected_class.qml").getroot().findall(".//colorrampshader/item")
    assert [float(i.get("value")) for i in items] == [0, 1, 2, 3, 4]
    assert items[0].get("label").startswith("class 0") and "poorest" in items[0].get("label")


def test_geopackage_layer_carries_a_default_qgis_style(tmp_path):
    path = tmp_path / "cells.gpkg"
    frame = gpd.GeoDataFrame({"income": [10.0, 20.0, None, 40.0, 50.0]},
                             geometry=[shapely.box(k, 0, k + 1, 1) for k in range(5)], crs="EPSG:3035")
    frame.to_file(path, layer="cells", driver="GPKG", engine="pyogrio")
    gis_style.style_gpkg(path, "cells", "income")
    gis_style.style_gpkg(path, "cells", "income")  # styling again replaces the default, never adds one
    with sqlite3.connect(path) as con:
        cols = [r[1] for r in con.execute("PRAGMA table_info(layer_styles)")]
        rows = con.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles").fetchall()
        kind = con.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
    assert cols[1:] == ["f_table_catalog", "f_table_schema", "f_table_name", "f_geometry_column", "styleName",
                        "styleQML", "styleSLD", "useAsDefault", "description", "owner", "ui", "update_time"]
    assert kind == ("attributes",)
    (table, geom, default, qml), = rows
    assert (table, geom, default) == ("cells", "geom", 1)
    renderer = ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("type") == "graduatedSymbol" and renderer.get("attr") == "income"
    limits = [(float(r.get("lower")), float(r.get("upper"))) for r in renderer.findall("ranges/range")]
    assert limits[0][0] == 10.0 and limits[-1][1] == 50.0 and len(limits) == 5
    assert {s.get("type") for s in renderer.findall("symbols/symbol")} == {"fill"}
    # the layer still reads as it was written
    back = gpd.read_file(path, layer="cells")
    assert back["income"].isna().sum() == 1 and "cells" in pyogrio.list_layers(path)[:, 0]


def test_graduated_breaks_are_quantiles_of_the_finite_values():
    assert gis_style.graduated_breaks([0, 1, 2, 3, 4, np.nan], classes=4) == [0, 1, 2, 3, 4]
    assert gis_style.graduated_breaks([7, 7, 7]) == [7.0, 8.0]
    assert gis_style.graduated_breaks([np.nan]) == [0.0, 1.0]


def test_cog_layout_gives_one_overview_level_at_least():
    assert gis_style.cog_layout(64, 64) == (32, [2])
    assert gis_style.cog_layout(4000, 4000) == (512, [2, 4, 8])
    assert gis_style.cog_layout(10, 3) == (16, [2])
    assert gis_style.cog_layout(1, 1)[1] == [] and gis_style.cog_options(1, 1)["overviews"] == "NONE"
    assert gis_style.cog_options(10, 10, categorical=True)["predictor"] == "no"
