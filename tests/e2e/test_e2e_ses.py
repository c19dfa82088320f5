"""End to end on a tiny synthetic French world: the SES stages run as a user runs them, and the science
comes out: the model beats chance, and the land-use classes planted as rich and poor read as such.

The world is the demo's with 2 km cities (about 100 cells each), so that the test fits in CI time. On so
few cells EfficientNet-B0 trained from scratch stays at chance; ResNet-18 on the 64 px cells learns in
about a minute. The demo (bash run.sh ses) keeps EfficientNet-B0 on 3 km cities."""
import json
import os
import sqlite3

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterstats import zonal_stats
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from urbanlens.core import sanity
from urbanlens.ses import extraction, findings, grid, zonal
from urbanlens.ses import maps as ses_maps
from script_runner import run_script

CITIES = ("Paris", "Lyon")
CONFIG = "tests/conf/ses_e2e.yaml"  # 2 km cities, ResNet-18, the paper's random folds (the file says why)


def run_stage(args, root, extra=()):
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return run_script(args, root / "data", root / "results", extra, CONFIG, env=env).stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ses_world")
    logs = [run_stage(["-m", "urbanlens.ses.world"], root),
            run_stage(["generate_fr_ua_aerial_data.py"], root),
            run_stage(["efficientnet_training.py"], root),
            run_stage(["gradcaming_urban_areas.py"], root)]
    return root, logs


def test_model_beats_chance(world):
    """Over the held-out predictions of both cities (about 160 cells), expected and true quintile are
    correlated beyond chance (one-sided p < 0.01) and the poorest and richest quintiles are told apart;
    each city on its own (about 80 cells, so a looser bound) is on the right side of chance."""
    root, _ = world
    preds = pd.concat([pd.read_csv(root / "results" / "ses" / c / "predictions.csv") for c in CITIES])
    rho, p = spearmanr(preds["expected_class"], preds["true_class"], alternative="greater")
    assert rho > 0 and p < 0.01, (rho, p)
    ends = preds[preds["true_class"].isin([0, 4])]
    assert roc_auc_score(ends["true_class"] == 4, ends["expected_class"]) > 0.65
    for city in CITIES:
        m = json.loads((root / "results" / "ses" / city / "metrics.json").read_text())
        assert m["pooled"]["auc_poor_rich"] > 0.55 and m["pooled"]["spearman"] > 0, (city, m["pooled"])


def test_metrics_json_gives_baseline_intervals_gain_and_null(world):
    """Each city's metrics.json: intervals by a bootstrap of spatial blocks (named, counted, inside the
    metric's range), the baseline fitted on the same folds, the gain over it and the permutation null;
    the closing line and training_summary.csv say the same."""
    root, logs = world
    ses = root / "results" / "ses"
    table = pd.read_csv(ses / "training_summary.csv")
    for city in CITIES:
        m = json.loads((ses / city / "metrics.json").read_text())
        iv = m["intervals"]
        assert (iv["unit"], iv["block_m"], iv["level"]) == ("blocks", 1000.0, 0.95) and "cell_bootstrap" not in iv
        assert iv["units"] >= 2 and ("note" in iv) == (iv["units"] < 5)
        assert "values" in iv["over_folds"] and "note" in iv["over_folds"]      # 2 folds: no interval over folds
        for entry in (iv, m["baseline"]["intervals"]):
            b = entry["bootstrap"]["auc_poor_rich"]
            assert 0.0 <= b["lo"] <= b["hi"] <= 1.0 and b["resamples_used"] > 0.9 * iv["resamples"]
        assert m["baseline"]["name"] and set(m["baseline"]["pooled"]) >= {"auc_poor_rich", "kappa_quadratic", "spearman"}
        gain = m["gain_over_baseline"]["auc_poor_rich"]
        assert gain["value"] == pytest.approx(m["pooled"]["auc_poor_rich"] - m["baseline"]["pooled"]["auc_poor_rich"])
        assert gain["lo"] <= gain["value"] <= gain["hi"]
        perm = m["permutation"]
        for k in ("auc_poor_rich", "baseline_auc_poor_rich"):
            assert 0 < perm[k]["p_value"] <= 1 and perm[k]["chance"] == (perm[k]["p_value"] > 0.05)
        cnn = pd.read_csv(ses / city / "predictions.csv")
        base = pd.read_csv(ses / city / "baseline_predictions.csv")
        assert list(base.columns) == list(cnn.columns)
        assert base.set_index("cell_id")["fold"].sort_index().equals(cnn.set_index("cell_id")["fold"].sort_index())
        row = table.set_index("city").loc[city]
        assert row["baseline_auc_poor_rich"] == pytest.approx(m["baseline"]["pooled"]["auc_poor_rich"])
        assert row["auc_p_value"] == pytest.approx(perm["auc_poor_rich"]["p_value"])
        line = next(x for x in logs[2].splitlines() if x.startswith(f"[ses-train] {city}:") and "folds;" in x)
        assert "baseline" in line and "gain" in line and f"{iv['units']} blocks" in line and "permutation p" in line
        assert ("not distinguishable from chance" in line) == perm["auc_poor_rich"]["chance"]


def test_planted_classes_on_the_right_side(world):
    """Every land-use class planted as raising income reads richer (larger rich_minus_poor) than every
    class planted as lowering it."""
    root, _ = world
    truth = json.loads((root / "data" / "ses_truth.json").read_text())
    summary = pd.read_csv(root / "results" / "ses" / "landuse_summary.csv", dtype={"ua_code": str})
    assert list(summary.columns) == zonal.SUMMARY_COLUMNS + findings.SKILL_COLUMNS + sanity.COLUMNS
    first = summary.iloc[0]   # the model's held-out skill, the same on every row, its interval around it
    assert first["model_auc_lo"] <= first["model_auc"] <= first["model_auc_hi"] and first["model_auc"] > 0.6
    # the maps' sanity check ran on 16 cells of each city (2 maps a cell), and a failure is never meaningful
    assert first["sanity_maps"] == 2 * 16 * len(CITIES) and first["maps_pass_sanity"] in (True, False)
    assert first["maps_pass_sanity"] or not first["meaningful"] and "its maps" in first["caveat"]
    score = summary.set_index("ua_code")["rich_minus_poor"]
    rich = score[score.index.isin(truth["rich_codes"])]
    poor = score[score.index.isin(truth["poor_codes"])]
    assert len(rich) >= 2 and len(poor) >= 2, summary[["ua_code", "pieces"]]
    assert rich.min() > poor.max(), summary[["ua_code", "ua_class", "pieces", "rich_minus_poor"]]


def test_geotiffs_carry_crs_and_cell_bounds(world):
    root, _ = world
    for city in CITIES:
        tifs = sorted((root / "results" / "ses" / city / "cams").glob("*.tif"))
        assert tifs
        for tif in tifs[:: max(1, len(tifs) // 10)]:
            with rasterio.open(tif) as src:
                assert src.crs.to_epsg() == 3035 and src.count == 2 and src.dtypes[0] == "float32"
                np.testing.assert_allclose(tuple(src.bounds), grid.cell_box(tif.stem).bounds, rtol=0, atol=1e-6)
                assert src.overviews(1) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # opens fast, styled
            assert tif.with_suffix(".qml").is_file()
        with sqlite3.connect(root / "results" / "ses" / city / "polygon_stats.gpkg") as con:
            assert con.execute("SELECT f_table_name, useAsDefault FROM layer_styles").fetchall() == [("polygon_stats", 1)]


def test_polygon_stats_equal_rasterstats(world):
    root, _ = world
    city_dir = root / "results" / "ses" / CITIES[0]
    stats = gpd.read_file(city_dir / "polygon_stats.gpkg", layer="polygon_stats")
    assert list(stats.columns) == ses_maps.POLYGON_STATS_COLUMNS
    assert stats.crs.to_epsg() == 3035 and len(stats) > 0
    rng = np.random.default_rng(0)
    for cell_id in rng.choice(stats["cell_id"].unique(), 4, replace=False):
        rows = stats[stats["cell_id"] == cell_id]
        tif = city_dir / "cams" / f"{cell_id}.tif"
        for band, name in ((1, "poor"), (2, "rich")):
            ref = zonal_stats(list(rows.geometry), str(tif), band=band,
                              stats=["sum", "mean", "min", "max", "median", "count"])
            for k in ("sum", "mean", "min", "max", "median", "count"):
                np.testing.assert_allclose(rows[f"{name}_{k}"].to_numpy(float),
                                           [r[k] for r in ref], rtol=1e-6, atol=1e-12, err_msg=f"{cell_id} {name}_{k}")
        np.testing.assert_allclose(rows["poor_score"], rows["poor_sum"] / rows["area"], rtol=1e-12)
        np.testing.assert_allclose(rows["area"], rows.geometry.area, rtol=1e-9)


def test_cell_image_nodata_is_nodata_in_maps_and_statistics(world):
    """Pixels without imagery (all-zero in the cell PNG) are NaN, the nodata value, in the cell's maps,
    and the pieces' counts leave them out; a cell with full imagery has maps without a nodata value."""
    root, _ = world
    ses_dir = root / "results" / "ses"
    city_dir = ses_dir / CITIES[0]
    cells = gpd.read_file(ses_dir / "cells.gpkg")
    stats = gpd.read_file(city_dir / "polygon_stats.gpkg", layer="polygon_stats")
    holed = full = 0
    for row in cells[cells["city"] == CITIES[0]].itertuples():
        tif = city_dir / "cams" / f"{row.cell_id}.tif"
        if not tif.is_file():
            continue
        with rasterio.open(tif) as src:
            maps, nodata, transform = src.read(), src.nodata, src.transform
        mask = ses_maps.resample_mask(extraction.nodata_mask(extraction.read_png(ses_dir / row.path)), maps.shape[1:])
        np.testing.assert_array_equal(np.isnan(maps), np.broadcast_to(mask, maps.shape), err_msg=row.cell_id)
        if mask.any():
            holed += 1
            assert np.isnan(nodata), row.cell_id
            rows = stats[stats["cell_id"] == row.cell_id]
            valid = [int((~mask[r, c][m]).sum()) for r, c, m in
                     zonal.piece_windows(rows.geometry.values, mask.shape, transform)]
            np.testing.assert_array_equal(rows["poor_count"], valid, err_msg=row.cell_id)
            np.testing.assert_array_equal(rows["rich_count"], valid, err_msg=row.cell_id)
        else:
            full += 1
            assert nodata is None, row.cell_id
    assert holed >= 1 and full >= 1, (holed, full)


def test_rerun_reuses_maps(world):
    root, _ = world
    before = {p: p.stat().st_mtime_ns for p in (root / "results" / "ses" / CITIES[0] / "cams").glob("*.tif")}
    out = run_stage(["gradcaming_urban_areas.py"], root, [f"ses.cities=[{CITIES[0]}]"])
    assert f"{CITIES[0]}: " in out and "(0 new maps)" in out
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before
