"""City identification on real imagery formats: the Inria Austin crop (uint8 RGB), the SpaceNet Atlanta
crop (1 band uint16, 11-bit values, band-interleaved, nodata 0) and the SpaceNet Rotterdam crop (4 bands
float64), see tests/data/SOURCES.md. Each crop is cut into two sites (top and bottom 96 rows, written
with rasterio keeping dtype, bands, interleaving and georeference); the first site of Atlanta gets a
40 px wide strip of its nodata value 0 on the left, the first site of Rotterdam a strip of a declared
nodata value -9999. Then preprocessing, one short training and the test run as a user runs them."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from rasterio.windows import Window
from script_runner import run_script

from urbanlens.cities import rasters
from urbanlens.core import errors
from urbanlens.core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CROPS = ROOT / "tests" / "data" / "cities"
CITIES = {"Austin (AUS)": "austin_inria_rgb_uint8.tif", "Atlanta (ATL)": "atlanta_spacenet_pan_uint16.tif",
          "Rotterdam (RTM)": "rotterdam_spacenet_ms_float64.tif"}
STRIP = 40
CONFIG = "tests/conf/cities_real.yaml"  # 32 px patches, 2 training steps on the CPU


def write_site(src: Path, dst: Path, rows: slice, strip_value=None, declare=None) -> None:
    with rasterio.open(src) as ds:
        win = Window(0, rows.start, ds.width, rows.stop - rows.start)
        data = ds.read(window=win)
        prof = ds.profile.copy()
        prof.update(height=win.height, transform=ds.window_transform(win))
        if declare is not None:
            prof["nodata"] = declare
        if strip_value is not None:
            data[:, :, :STRIP] = strip_value
        dst.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(dst, "w", **prof) as out:
            out.write(data)
            out.colorinterp = ds.colorinterp


def make_raw(data: Path, atlanta_value=0) -> Path:
    raw = data / "cities" / "raw"
    for city, name in CITIES.items():
        strip = {"Atlanta (ATL)": (atlanta_value, None), "Rotterdam (RTM)": (-9999.0, -9999.0)}.get(city, (None, None))
        write_site(CROPS / name, raw / city / "s1" / "a.tif", slice(0, 96), *strip)
        write_site(CROPS / name, raw / city / "s2" / "a.tif", slice(96, 192))
    return raw


def stage(script, data, results, *extra, check=True):
    return run_script([script], data, results, extra, CONFIG, env={"OMP_NUM_THREADS": "1"}, check=check,
                      timeout=600)


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    make_raw(root / "data")
    proc = stage("preprocessing.py", root / "data", root / "results")
    return root, proc


def independent_stretch(path: Path, band: int) -> np.ndarray:
    """2-98 % of the valid pixels -> 0..255, computed here with numpy alone."""
    with rasterio.open(path) as ds:
        v = ds.read(band).astype(np.float64)
        valid = v != ds.nodata if ds.nodata is not None else np.ones(v.shape, bool)
    lo, hi = np.percentile(v[valid], [2, 98])
    return np.where(valid, np.clip(np.rint((v - lo) / (hi - lo) * 255), 0, 255), 0)


def test_sources_table_records_how_each_image_was_read(cut):
    root, _ = cut
    table = pd.read_csv(root / "data" / "cities" / "patches" / "sources.csv", keep_default_na=False)
    by = {r.source: r for r in table.itertuples()}
    aus, atl, rtm = (by[f"{c}/s1/a.tif"] for c in CITIES)
    assert (aus.dtype, aus.bands, aus.bands_used, aus.scale, aus.limits) == ("uint8", 3, "1,2,3", "none", "")
    assert (atl.dtype, atl.bands, atl.bands_used, atl.scale) == ("uint16", 1, "1,1,1", "percentile")
    assert (rtm.dtype, rtm.bands, rtm.bands_used, rtm.scale) == ("float64", 4, "1,2,3", "percentile")
    assert len(rtm.limits.split(";")) == 3 and len(set(rtm.limits.split(";"))) == 3  # one stretch per band
    assert [round(float(r), 2) for r in (aus.res_m, atl.res_m, rtm.res_m)] == [0.3, 0.5, 1.0]
    assert atl.nodata_share == pytest.approx(STRIP / 192, abs=1e-3) and aus.nodata_share == 0
    with rasterio.open(root / "data" / "cities" / "raw" / atl.source) as ds:
        v = ds.read(1)
        lo, hi = np.percentile(v[v != 0], [2, 98])
    assert atl.limits == ";".join([f"{lo:.6g}..{hi:.6g}"] * 3)
    assert 0.005 < atl.saturated_share < 0.05   # the 98th percentile up: about 2 %, not the 91-96 % of a clip


def test_stretched_patches_match_numpy_and_are_not_saturated(cut):
    root, _ = cut
    data = root / "data" / "cities"
    manifest = pd.read_csv(data / "patches" / "manifest.csv")
    atl = manifest[(manifest.iata == "ATL") & (manifest.split != "test_b")]
    assert len(atl) > 0
    for src, rows in atl.groupby("source"):
        expected = independent_stretch(data / "raw" / src, 1)
        for r in rows.itertuples():
            patch = np.asarray(Image.open(data / "patches" / r.path).convert("RGB")).astype(float)
            want = expected[r.y:r.y + r.size, r.x:r.x + r.size]
            assert np.abs(patch - want[..., None]).mean() < 3        # bar JPEG
            assert (patch == 255).all(axis=-1).mean() < 0.5          # the raw 11-bit data is not saturated
    with rasterio.open(CROPS / CITIES["Atlanta (ATL)"]) as ds:
        v = ds.read(1)
        assert v.max() < 2 ** 16 - 1 and (v == v.max()).mean() < 0.01   # the source is not saturated
        assert (v > 255).mean() > 0.5                                   # a cast to 8 bits would be


def test_nodata_patches_are_left_out_and_counted(cut):
    root, proc = cut
    manifest = pd.read_csv(root / "data" / "cities" / "patches" / "manifest.csv")
    for iata in ("ATL", "RTM"):
        s1 = manifest[(manifest.iata == iata) & (manifest.site == "s1")]
        assert len(s1) > 0 and (s1.x >= STRIP).all()                # every patch touching the strip is out
    aus = manifest[(manifest.iata == "AUS") & (manifest.site == "s1")]
    assert (aus.x < STRIP).any()
    assert "ATL: left out 6 blank patches (6 nodata" in proc.stdout  # 2 strip columns x 3 patch rows
    on_disk = {p.relative_to(root / "data" / "cities" / "patches").as_posix()
               for p in (root / "data" / "cities" / "patches").rglob("*.jpg")}
    assert on_disk == set(manifest.path)


def test_short_test_b_and_mixed_resolutions_are_named(cut):
    _, proc = cut
    assert "ATL: 9 test_b patches, fewer than cities.split.test_b_per_city=50" in proc.stdout
    assert "differ 3.3x (ATL 0.5 m/px, AUS 0.3 m/px, RTM 1 m/px)" in proc.stdout


def test_ground_m_resamples_to_the_same_ground(tmp_path):
    raw = make_raw(tmp_path)
    opts = {**rasters.DEFAULTS, "ground_m": 1.0}
    for city in CITIES:
        rgb, valid, info = rasters.convert(raw / city / "s2" / "a.tif", opts)
        assert rgb.shape[:2] == (round(96 * info["res_m"]), round(192 * info["res_m"]))
        assert rgb.dtype == np.uint8 and valid.all()


def test_scale_none_refuses_more_than_8_bits_and_fixed_is_applied(tmp_path):
    raw = make_raw(tmp_path)
    atl = raw / "Atlanta (ATL)" / "s2" / "a.tif"
    with pytest.raises(errors.DataError, match="uint16 image with cities.image.scale none"):
        rasters.convert(atl, {**rasters.DEFAULTS, "scale": "none"})
    rgb, _, info = rasters.convert(atl, {**rasters.DEFAULTS, "scale": "fixed", "scale_min": 0, "scale_max": 2047})
    with rasterio.open(atl) as ds:
        want = np.clip(np.rint(ds.read(1).astype(float) * 255 / 2047), 0, 255)
    assert np.array_equal(rgb[..., 0], want) and info["limits"] == "0..2047;0..2047;0..2047"
    with pytest.raises(errors.ConfigError, match="scale_min"):
        rasters.options(load_config(None, ["cities.image.scale=fixed"]))


def test_changed_patches_are_refused_by_training_and_test(tmp_path):
    data, results = tmp_path / "data", tmp_path / "results"
    make_raw(data)
    stage("preprocessing.py", data, results)
    stage("train_classification.py", data, results)
    stage("test_classification.py", data, results)
    metrics = json.loads((results / "cities" / "metrics.json").read_text())
    assert "top5_accuracy" not in metrics                           # 3 cities: top-5 would be 1 by construction
    assert sorted(metrics["per_site"]) == ["ATL/s2", "AUS/s2", "RTM/s2"]
    assert {c: v["support"] for c, v in metrics["per_city"].items()} == {"ATL": 9, "AUS": 9, "RTM": 9}
    # a source image changes: preprocessing refuses, then cuts again when told to
    make_raw(data, atlanta_value=7)
    proc = stage("preprocessing.py", data, results, check=False)
    assert proc.returncode != 0 and "Atlanta (ATL)/s1/a.tif modified" in proc.stderr
    stage("preprocessing.py", data, results, "overwrite=true")
    for script in ("test_classification.py", "train_classification.py"):
        proc = stage(script, data, results, check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(err) == 1, proc.stderr
        assert "trained on other patches" in err[0] and "manifest.csv modified" in err[0] and "overwrite=true" in err[0]
    # other patch settings are named as such
    stage("preprocessing.py", data, results, "overwrite=true", "cities.patch.max_nodata=0.5")
    cmd_resume = stage("train_classification.py", data, results, "cities.train.epochs=2", check=False)
    assert cmd_resume.returncode != 0 and "patches:cities.patch.max_nodata" in cmd_resume.stderr
