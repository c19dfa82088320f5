"""Patch grid, site-based split, test_b sample, patch files and resumable preprocessing."""
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from urbanlens.cities.patches import (
    RUN_KEYS,
    STAMP,
    class_names,
    clear_patches,
    parse_city_folder,
    patch_changes,
    patch_grid,
    plan_split,
    read_manifest,
    write_patches,
)
from urbanlens.core import errors, runs
from urbanlens.core.config import load_config
from script_runner import python, run, run_script, set_args


def test_patch_grid_paper_numbers():
    grid = patch_grid(4800, 4800, 480, 240)
    assert len(grid) == 19 * 19 == 361
    assert grid[0] == (0, 0) and grid[1] == (0, 240) and grid[19] == (240, 0)
    assert max(y for y, _ in grid) == max(x for _, x in grid) == 4800 - 480
    assert len(set(grid)) == 361


def test_patch_grid_edges():
    assert patch_grid(480, 480, 480, 240) == [(0, 0)]               # exact fit
    assert patch_grid(719, 480, 480, 240) == [(0, 0)]               # leftover rows are dropped
    assert patch_grid(720, 480, 480, 240) == [(0, 0), (240, 0)]
    assert patch_grid(479, 4800, 480, 240) == []                    # smaller than a patch
    assert patch_grid(0, 0, 480, 240) == []
    g = patch_grid(4800, 2400, 480, 240)                            # a half image
    assert len(g) == 19 * 9 and all(x + 480 <= 2400 for _, x in g)
    with pytest.raises(ValueError):
        patch_grid(100, 100, 10, 0)


@pytest.mark.parametrize("name, expected", [
    ("Astana (NQZ)", ("Astana", "NQZ")),
    ("New York City (JFK)", ("New York City", "JFK")),
    ("São Paulo (GRU)", ("São Paulo", "GRU")),
])
def test_parse_city_folder(name, expected):
    assert parse_city_folder(name) == expected


@pytest.mark.parametrize("bad", ["Astana", "Astana (nqz)", "Astana (NQZX)", "(NQZ)", "Astana NQZ", "Astana (NQ)"])
def test_parse_city_folder_rejects(bad):
    with pytest.raises(errors.DataError, match="City Name \\(IATA\\)"):
        parse_city_folder(bad)


def make_raw(root: Path, cities=("Alpha (AAA)", "Beta (BBB)"), sites=("s1", "s2", "s3"), images=2,
             size=(120, 100)) -> Path:
    """Random-noise JPEGs in the raw layout (content does not matter here)."""
    rng = np.random.default_rng(0)
    for c in cities:
        for s in sites:
            for i in range(images):
                p = root / c / s / f"im{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
    return root


def test_split_by_site_and_halves(tmp_path):
    raw = make_raw(tmp_path / "raw")
    plan, problems = plan_split(raw, size=40, stride=20, test_b_per_city=5, seed=0)
    assert problems == []
    # no site in two splits (test and val share the last site by design; train never does)
    train_sites = set(zip(plan.city[plan.split == "train"], plan.site[plan.split == "train"]))
    held_sites = set(zip(plan.city[plan.split != "train"], plan.site[plan.split != "train"]))
    assert train_sites.isdisjoint(held_sites)
    assert held_sites == {("Alpha (AAA)", "s3"), ("Beta (BBB)", "s3")}
    assert train_sites == {(c, s) for c in ("Alpha (AAA)", "Beta (BBB)") for s in ("s1", "s2")}
    # left half -> test, right half -> val, each patched on its own (no patch crosses the middle)
    w = 120
    test, val = plan[plan.split == "test"], plan[plan.split == "val"]
    assert (test.x + test["size"] <= w // 2).all() and (val.x >= w // 2).all()
    assert (val.x + val["size"] <= w).all()
    per_image_half = len(patch_grid(100, 60, 40, 20))
    assert len(test) == len(val) == 2 * 2 * per_image_half
    assert len(plan[plan.split == "train"]) == 2 * 2 * 2 * len(patch_grid(100, 120, 40, 20))
    # test_b: a fixed subset of test, 5 per city
    tb = plan[plan.split == "test_b"]
    assert tb.groupby("iata").size().to_dict() == {"AAA": 5, "BBB": 5}
    key = ["source", "y", "x"]
    assert set(map(tuple, tb[key].values)) <= set(map(tuple, test[key].values))
    again, _ = plan_split(raw, size=40, stride=20, test_b_per_city=5, seed=0)
    pd.testing.assert_frame_equal(plan, again)
    other, _ = plan_split(raw, size=40, stride=20, test_b_per_city=5, seed=1)
    assert not other[other.split == "test_b"][key].equals(tb[key])
    many, _ = plan_split(raw, size=40, stride=20, test_b_per_city=10_000, seed=0)
    assert (many.split == "test_b").sum() == len(test)                # all of them if fewer
    assert list(plan.columns) == ["path", "city", "iata", "site", "source", "split", "y", "x", "size"]
    assert plan.path.is_unique
    assert class_names(plan) == ["AAA", "BBB"]


def test_bad_city_folder_and_broken_image(tmp_path):
    raw = make_raw(tmp_path / "raw", cities=("Alpha (AAA)",), sites=("s1", "s2"), images=1)
    (raw / "Alpha (AAA)" / "s1" / "broken.jpg").write_bytes(b"not a jpeg")
    plan, problems = plan_split(raw, 40, 20, 3, 0)
    assert len(problems) == 1 and "broken.jpg" in problems[0]
    with pytest.raises(errors.DataError, match="broken.jpg"):
        plan_split(raw, 40, 20, 3, 0, strict=True)
    (raw / "Gamma").mkdir()
    with pytest.raises(errors.DataError, match="Gamma"):
        plan_split(raw, 40, 20, 3, 0)


def test_patch_files_match_the_source_pixels(tmp_path):
    raw = make_raw(tmp_path / "raw", cities=("Alpha (AAA)",), sites=("s1", "s2"), images=1)
    plan, _ = plan_split(raw, 40, 20, 3, 0)
    out = tmp_path / "patches"
    assert write_patches(plan, raw, out, quality=100, workers=1, progress=False) == len(plan)
    row = plan[plan.split == "val"].iloc[-1]
    src = np.asarray(Image.open(raw / row.source).convert("RGB")).astype(int)
    patch = np.asarray(Image.open(out / row.path)).astype(int)
    assert patch.shape == (40, 40, 3)
    assert np.abs(patch - src[row.y:row.y + 40, row.x:row.x + 40]).mean() < 12   # same pixels, bar JPEG
    tb = plan[plan.split == "test_b"].iloc[0]
    linked = out / tb.path
    original = out / ("test/" + tb.path.split("/", 1)[1])
    assert linked.read_bytes() == original.read_bytes()
    assert not list(out.rglob(".*tmp*"))                              # no temporary files left


def _run_preprocessing(data: Path) -> subprocess.CompletedProcess:
    """preprocessing.py on ``data`` with the tiny world's patches (tests/conf/cities_tiny.yaml), overlapping by half."""
    res = run_script(["preprocessing.py"], data, data / "results", ["cities.patch.stride=24", "workers=2"],
                     "tests/conf/cities_tiny.yaml", env={"OMP_NUM_THREADS": "1"}, check=False)
    assert res.returncode == 0, res.stderr
    return res


def test_preprocessing_rerun_does_not_redo_work(tmp_path):
    make_raw(tmp_path / "cities" / "raw", size=(96, 96))
    _run_preprocessing(tmp_path)
    out = tmp_path / "cities" / "patches"
    manifest = (out / "manifest.csv").read_bytes()
    df = read_manifest(tmp_path)
    files = sorted(p for p in out.rglob("*.jpg"))
    assert len(files) == len(df) and {p.relative_to(out).as_posix() for p in files} == set(df.path)
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    res = _run_preprocessing(tmp_path)
    assert "0 written now" in res.stdout
    assert (out / "manifest.csv").read_bytes() == manifest
    assert sorted(out.rglob("*.jpg")) == files
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stats
    # a lost patch is the only one written again
    files[0].unlink()
    assert "1 written now" in _run_preprocessing(tmp_path).stdout


def test_patches_of_other_settings_are_not_reused(tmp_path):
    raw = make_raw(tmp_path / "raw", cities=("Alpha (AAA)",), sites=("s1", "s2"), images=1)
    out = tmp_path / "patches"
    cfg40, cfg60 = (load_config(None, [f"cities.patch.size={s}", "cities.patch.stride=20"]) for s in (40, 60))
    sources = runs.fingerprint(tmp_path, sorted(raw.rglob("*.jpg")))
    assert patch_changes(out, cfg40, sources) == []                     # nothing there yet
    plan40, _ = plan_split(raw, 40, 20, 3, 0)
    write_patches(plan40, raw, out, progress=False)
    runs.write_stamp(out / STAMP, "preprocessing.py", cfg40, RUN_KEYS, sources)
    assert patch_changes(out, cfg40, sources) == []                     # same: kept
    assert (out / plan40.path.iloc[0]).exists()
    assert patch_changes(out, cfg60, sources) == ["cities.patch.size"]         # other: named, then emptied
    clear_patches(out)
    assert not list(out.rglob("*.jpg"))
    plan60, _ = plan_split(raw, 60, 20, 3, 0)
    assert write_patches(plan60, raw, out, progress=False) == len(plan60)
    with Image.open(out / plan60.path.iloc[0]) as im:
        assert im.size == (60, 60)
    runs.write_stamp(out / STAMP, "preprocessing.py", cfg60, RUN_KEYS, sources)
    # a source image changed since its patches were cut is named; an added one is not a conflict
    src = sorted(raw.rglob("*.jpg"))[0]
    Image.new("RGB", (120, 120), (1, 2, 3)).save(src)
    Image.new("RGB", (120, 120)).save(src.with_name("new.jpg"))
    now = runs.fingerprint(tmp_path, sorted(raw.rglob("*.jpg")))
    assert patch_changes(out, cfg60, now) == [f"input {src.relative_to(tmp_path).as_posix()} modified"]


def test_preprocessing_bad_folder_is_one_clear_line(tmp_path):
    make_raw(tmp_path / "cities" / "raw", cities=("Alpha (AAA)", "Beta"), size=(96, 96))
    res = run(python("preprocessing.py", "--config", "configs/cities_demo.yaml", *set_args([f"paths.data={tmp_path}"])))
    assert res.returncode != 0
    assert res.stderr.strip().startswith("error:") and "Beta" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_read_manifest_missing_says_what_to_run(tmp_path):
    with pytest.raises(errors.DataError, match="preprocessing.py"):
        read_manifest(tmp_path)


def test_jpeg2000_images_are_listed_and_read(tmp_path):
    """A site of .jp2 files (how IGN and many portals deliver) is not skipped: listed and read as RGB."""
    import rasterio
    from rasterio.transform import from_origin

    from urbanlens.cities import patches as patches_mod
    from urbanlens.cities import rasters
    from urbanlens.core.config import load_config

    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32)).astype("uint8")
    path = tmp_path / "tile.jp2"
    with rasterio.open(path, "w", driver="JP2OpenJPEG", width=32, height=32, count=3, dtype="uint8",
                       crs="EPSG:2154", transform=from_origin(650000, 6860000, 0.5, 0.5), QUALITY=100,
                       REVERSIBLE="YES") as dst:
        dst.write(pixels)
    assert patches_mod._images(tmp_path) == [path]
    rgb, _, _ = rasters.convert(path, rasters.options(load_config("configs/cities_demo.yaml")))
    np.testing.assert_array_equal(rgb, pixels.transpose(1, 2, 0))


def test_blank_reason_with_and_without_holes():
    from urbanlens.cities.cutting import blank_reason

    flat = np.full((8, 8, 3), 90, np.uint8)
    varied = flat.copy()
    varied[3, 4, 1] = 91
    full = np.ones((8, 8), bool)
    holed = full.copy()
    holed[:2] = False                      # 25 % nodata
    flat_holed = flat.copy()
    flat_holed[~holed] = 0                 # holes hold another colour: only the valid pixels count
    assert blank_reason(full, flat, 0.01) == "constant"
    assert blank_reason(full, flat, 0.01, drop_constant=False) is None
    assert blank_reason(full, varied, 0.01) is None
    assert blank_reason(holed, flat_holed, 0.5) == "constant"
    assert blank_reason(holed, varied, 0.5) is None
    assert blank_reason(holed, varied, 0.2) == "nodata"
    none = np.zeros((8, 8), bool)
    assert blank_reason(none, flat, 1.0) == "constant" and blank_reason(none, flat, 1.0, drop_constant=False) is None


def test_converted_image_is_pixel_interleaved_and_as_pillow_decodes(tmp_path):
    from urbanlens.cities import rasters

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(rgb[..., 1]).save(tmp_path / "g.jpg", quality=90)
    out, valid, info = rasters.convert(tmp_path / "a.jpg", rasters.DEFAULTS)
    with Image.open(tmp_path / "a.jpg") as im:
        np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))
    assert out.shape == (40, 56, 3) and out.flags.c_contiguous and valid.all()
    saturated = (np.asarray(out) == 255).any(axis=-1).mean()
    assert info["saturated_share"] == pytest.approx(saturated, abs=1e-6)
    grey, _, _ = rasters.convert(tmp_path / "g.jpg", rasters.DEFAULTS)   # one band -> grey RGB
    with Image.open(tmp_path / "g.jpg") as im:
        np.testing.assert_array_equal(grey, np.repeat(np.asarray(im)[..., None], 3, axis=-1))
    swapped, _, _ = rasters.convert(tmp_path / "a.jpg", {**rasters.DEFAULTS, "bands": [3, 2, 1]})
    np.testing.assert_array_equal(swapped, out[..., ::-1])
