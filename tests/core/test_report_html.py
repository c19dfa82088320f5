"""report.html of each pipeline: opened in a real headless Chromium, offline, with every image shown and
no script error; numbers read from the results' files; parts whose stage has not run say so."""
import json
import re
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.transform import from_bounds
from shapely.geometry import box

from urbanlens.cities import report_html as cities_html
from urbanlens.core import report_page
from urbanlens.ses import report_html as ses_html
from script_runner import run

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=5000"]
# a PNG of 1 x 1 pixel
PIXEL = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c4890000000d4944415478da63f8cf"
                      "c0f01f0005000201a2e1b8d10000000049454e44ae426082")


@pytest.fixture(scope="module")
def chromium():
    """Chromium of the distribution (.ci/run installs it where it is missing)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed and this test does not install it: 'apt-get install -y chromium' "
                    "(.ci/run does this)")
    return path


def open_in_browser(chromium, page: Path, profile: Path, screenshot: Path | None = None) -> dict:
    """Load ``page`` from disk in headless Chromium (no network needed: every part is inline) and read back
    what the page's own load check wrote: ``ok`` (every image decoded, no script error), ``images`` and
    ``errors``."""
    url = page.resolve().as_uri()
    dom = run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url], cwd=None, timeout=60).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, f"Chromium returned no page for {url}:\n{dom[:500]}"
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    errors = re.search(r'<pre id="report-errors"[^>]*>(.*?)</pre>', dom, re.S)
    if screenshot is not None:
        run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,1600",
             f"--screenshot={screenshot}", url], cwd=None, timeout=60)
    return {"ok": attrs.get("data-ok"), "images": int(attrs.get("data-images", -1)),
            "errors": errors.group(1).strip() if errors else None}


# the tiny SES results folder: one city of 2 x 2 cells of 200 m, as the stages lay it out
CITY, X0, Y0 = "Testville", 3760000.0, 2888000.0
CELLS = [(f"CRS3035RES200mN{int(Y0 + 200 * j)}E{int(X0 + 200 * i)}", i, j) for j in range(2) for i in range(2)]
INCOMES = [12000.0, 18000.0, 26000.0, 41000.0]


def tiny_ses_results(ses: Path) -> Path:
    city = ses / CITY
    (city / "cams").mkdir(parents=True)
    (city / "figures").mkdir()
    geoms = [box(X0 + 200 * i, Y0 + 200 * j, X0 + 200 * (i + 1), Y0 + 200 * (j + 1)) for _, i, j in CELLS]
    ids = [c for c, _, _ in CELLS]
    gpd.GeoDataFrame({"cell_id": ids, "city": CITY, "income": INCOMES}, geometry=geoms, crs="EPSG:3035").to_file(
        ses / "cells.gpkg", layer="cells")
    pd.DataFrame({"cell_id": ids, "fold": [0, 0, 1, 1], "true_class": [0, 1, 3, 4], "pred_class": [0, 2, 2, 4],
                  "expected_class": [0.4, 1.6, 2.5, 3.7]}).to_csv(city / "predictions.csv", index=False)
    auc = {"value": 0.81, "lo": 0.62, "hi": 0.93}
    (city / "metrics.json").write_text(json.dumps({
        "n_cells": 4, "cv": "spatial", "folds": 2, "pooled": {"auc_poor_rich": 0.81},
        "intervals": {"level": 0.95, "unit": "blocks", "units": 3, "block_m": 1000.0, "bootstrap": {"auc_poor_rich": auc},
                      "over_folds": {"note": "no interval over 2 fold(s)"}},
        "baseline": {"name": "colour statistics", "pooled": {"auc_poor_rich": 0.7},
                     "intervals": {"bootstrap": {"auc_poor_rich": {"value": 0.7, "lo": 0.5, "hi": 0.85}}}},
        "gain_over_baseline": {"auc_poor_rich": {"value": 0.11, "lo": -0.05, "hi": 0.2}},
        "permutation": {"auc_poor_rich": {"p_value": 0.004, "chance": False},
                        "baseline_auc_poor_rich": {"p_value": 0.2, "chance": True}}}))
    (city / "figures" / "income_map.png").write_bytes(PIXEL)
    for (cid, i, j), g in zip(CELLS, geoms):
        with rasterio.open(city / "cams" / f"{cid}.tif", "w", driver="GTiff", width=8, height=8, count=2, dtype="float32",
                           crs="EPSG:3035", transform=from_bounds(*g.bounds, 8, 8)) as dst:
            dst.write(np.random.default_rng(i + 2 * j).random((2, 8, 8), dtype=np.float32))
            dst.descriptions = ("poor", "rich")
    stats = gpd.GeoDataFrame({"cell_id": ids * 2, "ua_class": ["Forests"] * 4 + ["Green urban areas"] * 4,
                              "area": [30000.0] * 4 + [10000.0] * 4, "rich_score": [0.3, 0.2, 0.1, 0.0] * 2,
                              "poor_score": [0.0, 0.1, 0.1, 0.2] * 2}, geometry=geoms * 2, crs="EPSG:3035")
    stats.to_file(city / "polygon_stats.gpkg", layer="polygon_stats")
    pd.DataFrame({"ua_class": ["Forests", "Green urban areas"], "rich_minus_poor": [0.05, -0.01],
                  "meaningful": [False, False], "caveat": ["ranking not meaningful: too few cells"] * 2,
                  "maps_pass_sanity": [True, True]}).to_csv(ses / "landuse_summary.csv", index=False)
    return ses


def test_the_test_stage_wrote_a_cities_report_that_opens_offline(cities_world, chromium, tmp_path):
    page = cities_world / "results" / "cities" / report_page.NAME   # written by test_classification.py's refresh
    assert page.is_file()
    seen = open_in_browser(chromium, page, tmp_path / "profile", tmp_path / "cities.png")
    assert seen == {"ok": "1", "images": 3, "errors": ""}   # confusion matrix and the two dendrograms
    assert (tmp_path / "cities.png").stat().st_size > 10_000
    text = page.read_text()
    metrics = json.loads((cities_world / "results" / "cities" / "metrics.json").read_text())
    lo, hi = metrics["intervals"]["accuracy"]
    assert f"{metrics['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert f"saliency panels: {report_page.NOT_RUN} (saliency.py)" in text


def test_ses_report_map_and_overlays_open_offline(chromium, tmp_path):
    ses = tiny_ses_results(tmp_path / "ses")
    page = report_page.write(ses_html.render, ses)
    seen = open_in_browser(chromium, page, tmp_path / "profile", tmp_path / "ses.png")
    assert seen == {"ok": "1", "images": 1, "errors": ""}   # the figure; the CAMs are SVG images
    text = page.read_text()
    cells = re.findall(r'<path [^>]*data-cell="([^"]+)"[^>]*data-census="([^"]*)"', text)
    assert cells == [(c, f"{v:.0f}") for (c, _, _), v in zip(CELLS, INCOMES)]
    assert text.count('<image href="data:image/png;base64,') == 2 * len(CELLS)   # poor and rich band per cell
    assert "0.810 [0.620, 0.930]" in text and "0.110 [-0.050, 0.200]" in text
    assert "not distinguishable from chance" in text and "ranking not meaningful: too few cells" in text
    # cell 0: (0.3 - 0.0) weighted 3:1 with (0.3 - 0.0) -> 0.3; cell 3: 0.0 - 0.2 -> -0.2
    assert 'data-landuse="0.3000"' in text and 'data-landuse="-0.2000"' in text


def test_the_page_check_catches_a_broken_image_and_a_script_error(chromium, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(PIXEL[:30])
    page = tmp_path / "bad.html"
    page.write_text(report_page.page("bad", "", [("a", "a", report_page.image(broken, "broken picture"))],
                                     "no_such_function();"))
    seen = open_in_browser(chromium, page, tmp_path / "profile")
    assert seen["ok"] == "0" and seen["images"] == 1
    assert "image not shown: broken picture" in seen["errors"] and "no_such_function" in seen["errors"]


@pytest.mark.parametrize("pipeline, parts", [(cities_html, cities_html.PARTS), (ses_html, ses_html.PARTS)])
def test_an_empty_results_folder_says_not_run_yet_and_fetches_nothing(tmp_path, pipeline, parts):
    text = pipeline.render(tmp_path)
    assert text.count(report_page.NOT_RUN) == len(parts)
    assert not re.search(r'(src|href)="(https?:)?//|<link|@import|url\(', text)


def test_nothing_in_a_full_report_is_fetched(tmp_path):
    text = ses_html.render(tiny_ses_results(tmp_path / "ses"))
    assert not re.search(r'(src|href)="(https?:)?//|<link|@import|url\(', text)
    assert report_page.NOT_RUN in text   # no predict_income.py run in this folder


def test_the_same_results_give_the_same_page_wherever_they_lie(tmp_path):
    first = ses_html.render(tiny_ses_results(tmp_path / "a" / "ses"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert ses_html.render(tmp_path / "b" / "ses") == first   # re-runs compare result folders file by file


def test_the_income_map_stage_s_cells_are_mapped_when_there(tmp_path):
    ses = tiny_ses_results(tmp_path / "ses")
    cells = gpd.read_file(ses / "cells.gpkg", layer="cells")
    predicted = ses / CITY / "predicted"
    predicted.mkdir()
    gpd.GeoDataFrame({"cell_id": cells["cell_id"], "expected_class": [3.5, 2.0, 1.0, 0.25],
                      "census_income": [np.nan, 18000.0, 26000.0, 41000.0], "observed_class": [np.nan, 1, 3, 4],
                      "scored_by": ["all folds (not trained on)"] + ["out-of-fold (fold 0)"] * 3},
                     geometry=cells.geometry, crs="EPSG:3035").to_file(predicted / "cells.gpkg", layer="cells")
    text = ses_html.render(ses)
    assert re.findall(r'data-pred="([^"]*)" data-census="([^"]*)"', text) == [
        ("3.50", ""), ("2.00", "18000"), ("1.00", "26000"), ("0.25", "41000")]
    assert 'data-scored="all folds (not trained on)"' in text


def test_cam_overlays_are_thinned_on_large_cities(tmp_path, monkeypatch):
    from urbanlens.ses import report_map

    monkeypatch.setattr(report_map, "CAM_CELLS", 2)
    text = ses_html.render(tiny_ses_results(tmp_path / "ses"))
    assert text.count('<image href="data:image/png;base64,') == 2 * 2   # cells 1 and 3 of 4, both bands
    assert "CAM overlays on one cell in 2 (2 cells)" in text
