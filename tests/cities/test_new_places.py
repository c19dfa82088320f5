"""A city the classifier never saw: held-out twins of known cities (same style, their own sites and
seeds) come out most similar to the city they were made from, the outputs are complete, georeferenced
images give patch footprints, and a model cut at another ground size or with other bands is refused."""
import json
import sqlite3
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_origin
from script_runner import ROOT, run_cities_stage

from urbanlens.cities import newplace
from urbanlens.core.errors import StaleRun

sys.path.insert(0, str(ROOT))
import similar_cities  # noqa: E402  (a top-level script, run in-process)


@pytest.fixture(scope="module")
def held_out(cities_world):
    run_cities_stage(["-m", "urbanlens.cities.world", "--held-out"], cities_world, ["cities.newplace.held_out=4"])
    truth = json.loads((cities_world / "data" / "cities" / "new" / "truth.json").read_text())
    return cities_world, truth["held_out"]


def similar(root, images, *sets, name=None, monkeypatch):
    argv = ["similar_cities.py", "--config", str(ROOT / "configs" / "cities_demo.yaml"), "--images", str(images),
            *(["--name", name] if name else []),
            *[a for s in ("paths.data=" + str(root / "data"), "paths.results=" + str(root / "results"),
                          "cities.newplace.bootstrap=200", "workers=0", *sets)
              for a in ("--set", s)]]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    similar_cities.main()
    return root / "results" / "cities" / "new" / (name or Path(images).name)


@pytest.fixture(scope="module")
def rankings(held_out):
    root, twins = held_out
    with pytest.MonkeyPatch.context() as mp:
        return {t["twin_of"]: similar(root, root / "data" / "cities" / t["folder"], monkeypatch=mp) for t in twins}


def test_held_out_twins_resemble_the_city_they_were_made_from(held_out, rankings):
    _, twins = held_out
    assert len(twins) == 4 and len({t["twin_of"] for t in twins}) == 4
    first = {iata: pd.read_csv(out / "similar_cities.csv").iloc[0]["iata"] for iata, out in rankings.items()}
    assert sum(first[iata] == iata for iata in first) >= 3, first


def test_outputs_are_complete_and_consistent(cities_world, rankings):
    classes = sorted(json.loads((cities_world / "results" / "cities" / "metrics.json").read_text())["per_city"])
    for out in rankings.values():
        table = pd.read_csv(out / "similar_cities.csv")
        assert sorted(table["iata"]) == classes and table["rank"].tolist() == list(range(1, len(classes) + 1))
        assert (np.diff(table["similarity"]) <= 0).all()
        assert (table["similarity_lo"] <= table["similarity"] + 1e-9).all()
        assert (table["similarity"] <= table["similarity_hi"] + 1e-9).all()
        assert table["share_predicted"].sum() == pytest.approx(1) and table["first_share"].sum() == pytest.approx(1)
        per_patch = pd.read_csv(out / "patches.csv")
        shares = per_patch["predicted"].value_counts(normalize=True)
        assert table.set_index("iata")["share_predicted"].loc[shares.index].to_numpy() == pytest.approx(shares.to_numpy())
        assert per_patch["source"].nunique() == 3 and per_patch["probability"].between(0, 1).all()
        for name in ("similar_cities.png", "nearest_patches.png", "similar_config.yaml", "similar_cities.stamp.json"):
            assert (out / name).is_file(), name
        assert not (out / "patches.gpkg").exists()  # the synthetic JPEGs carry no georeference


def _as_geotiffs(src: Path, dst: Path, res_m: float, bands=(1, 2, 3)) -> Path:
    """The JPEGs under ``src`` as GeoTIFFs under ``dst`` at ``res_m`` metres per pixel (EPSG:3857)."""
    for i, jpg in enumerate(newplace.find_images(src)):
        with rasterio.open(jpg) as ds:
            arr = ds.read(list(bands))
        out = dst / jpg.relative_to(src).with_suffix(".tif")
        out.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(out, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=len(bands),
                           dtype="uint8", crs="EPSG:3857", transform=from_origin(1000.0 * i, 5e6, res_m, res_m)) as ds:
            ds.write(arr)
    return dst


def test_georeferenced_images_give_patch_footprints(held_out, tmp_path, monkeypatch):
    root, twins = held_out
    images = _as_geotiffs(root / "data" / "cities" / twins[0]["folder"], tmp_path / "geo", res_m=0.5)
    out = similar(root, images, name="geo", monkeypatch=monkeypatch)
    gdf = gpd.read_file(out / "patches.gpkg", layer="patches")
    per_patch = pd.read_csv(out / "patches.csv")
    assert gdf.crs.to_epsg() == 3857 and len(gdf) == len(per_patch)
    assert gdf.geometry.area.to_numpy() == pytest.approx((96 * 0.5) ** 2)  # 96 px patches at 0.5 m
    first = gdf.iloc[0]
    x0 = 1000.0 * sorted(per_patch["source"].unique()).index(first["source"])
    assert gdf.geometry.iloc[0].bounds == pytest.approx((x0 + first["x"] * 0.5, 5e6 - (first["y"] + 96) * 0.5,
                                                         x0 + (first["x"] + 96) * 0.5, 5e6 - first["y"] * 0.5))
    assert {"predicted", "probability", "nearest_city"} <= set(gdf.columns)
    with sqlite3.connect(out / "patches.gpkg") as con:  # opens styled in QGIS
        assert con.execute("SELECT f_table_name, useAsDefault FROM layer_styles").fetchall() == [("patches", 1)]


def test_another_ground_size_or_other_bands_are_refused(held_out, tmp_path, monkeypatch):
    root, twins = held_out
    src = root / "data" / "cities" / twins[0]["folder"]
    with pytest.raises(StaleRun, match=r"patch\.ground_m 2\.0 \(model: None\)"):
        similar(root, _as_geotiffs(src, tmp_path / "a", res_m=1.0), "cities.patch.ground_m=2.0", monkeypatch=monkeypatch)
    with pytest.raises(StaleRun, match=r"bands used 1,1,1 \(model: 1,2,3\)"):
        similar(root, _as_geotiffs(src, tmp_path / "b", res_m=1.0, bands=(1,)), monkeypatch=monkeypatch)
