"""Bad input, run as a user runs the stages: one clear line (file, problem, what to do) and a non-zero
exit for a stop; exit 0 and a report where the stage goes on (a broken image skipped, polygons repaired);
never a temporary or half-written output, and nothing valid lost."""
import os
import re
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
import torch
import yaml
from PIL import Image

from urbanlens.core import runs, runtime
from urbanlens.core.backbones import build_backbone
from urbanlens.core.config import load_config
from urbanlens.ses import results
from script_runner import assert_no_traceback, run_script

ROOT = Path(__file__).resolve().parents[2]
CITIES = "tests/conf/cities_tiny.yaml"  # 3 cities of 2 sites, 48 px patches, the maps' sanity check off
SES = "tests/conf/ses_tiny.yaml"  # one 1 km city; here 16 px cells, one epoch, the maps' sanity check off
SES_SETS = ["ses.cell_px=16", "ses.model.input_size=32", "ses.train.epochs=1", "ses.train.batch_size=16",
            "ses.train.cv=stratified", "ses.cams.sanity_cells=0"]
CENSUS = "census_data/carreaux_200m_met.gpkg"
UA = "UA_data/FR001L2_PARIS_UA2018_v013/Data/FR001L2_PARIS_UA2018_v013.gpkg"


def run(args, root, extra=(), config=None, ses=False):
    """A stage as a user runs it, with the small world's settings; paths under ``root``."""
    config = config or (SES if ses else CITIES)
    sets = [*(SES_SETS if ses else ()), *extra]
    return run_script(args, root / "data", root / "results", sets, str(config), env={"OMP_NUM_THREADS": "1"},
                      check=False, timeout=300)


def ok(proc):
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert_no_traceback(proc)
    return proc


def one_line_error(proc, *words):
    """A stop: non-zero exit and stderr is one line 'error: ...' holding every word (case ignored);
    progress bars aside."""
    lines = [l for l in re.split(r"[\r\n]+", proc.stderr) if l.strip() and not re.search(r"\d+%\|", l)]
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def temp_files(root):
    return [p for p in Path(root).rglob("*") if ".tmp-" in p.name]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ cities

@pytest.fixture(scope="module")
def cities_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cities")
    ok(run(["-m", "urbanlens.cities.world"], root))
    return root


@pytest.fixture
def cities(cities_world, tmp_path):
    """A private copy of the raw images: (root, raw dir)."""
    shutil.copytree(cities_world / "data", tmp_path / "data")
    return tmp_path, tmp_path / "data" / "cities" / "raw"


def _manifest(root):
    return pd.read_csv(root / "data" / "cities" / "patches" / "manifest.csv")


def _all_sources(raw):
    return sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.jpg"))


def test_corrupt_images_are_listed_and_the_others_processed(cities):
    root, raw = cities
    city = sorted(raw.iterdir())[0]
    good = _all_sources(raw)
    (city / "site_01" / "garbage.jpg").write_bytes(os.urandom(3000))
    body = (city / "site_01" / "img_01.jpg").read_bytes()
    (city / "site_02" / "truncated.jpg").write_bytes(body[: len(body) // 2])  # header intact, pixels cut
    proc = ok(run(["preprocessing.py"], root))
    skipped = [l for l in proc.stdout.splitlines() if "skipped" in l]
    assert len(skipped) == 2 and all("unreadable image" in l and "replace or delete" in l for l in skipped)
    assert any("garbage.jpg" in l for l in skipped) and any("truncated.jpg" in l for l in skipped)
    m = _manifest(root)
    assert sorted(m["source"].unique()) == good  # every valid image, no broken one
    out = root / "data" / "cities" / "patches"
    assert all((out / p).is_file() for p in m["path"])
    assert not list(out.rglob("*truncated*")) and not list(out.rglob("*garbage*")) and not temp_files(root)


@pytest.mark.parametrize("broken", ["garbage", "truncated"])
def test_strict_stops_at_a_corrupt_image(cities, broken):
    root, raw = cities
    site = sorted(raw.iterdir())[1] / "site_02"
    body = (site / "img_01.jpg").read_bytes()
    (site / f"{broken}.jpg").write_bytes(os.urandom(3000) if broken == "garbage" else body[: len(body) // 2])
    line = one_line_error(run(["preprocessing.py"], root, ["strict=true"]), f"{broken}.jpg", "unreadable",
                          "replace or delete")
    assert str(site) in line
    assert not (root / "data" / "cities" / "patches" / "manifest.csv").exists() and not temp_files(root)


def test_files_the_stage_does_not_use_are_listed(cities):
    root, raw = cities
    good = _all_sources(raw)
    city = sorted(raw.iterdir())[0]
    (city / "site_01" / "old").mkdir()
    for p in (city / "loose.jpg", city / "site_01" / "old" / "x.jpg", city / "site_01" / "scan.bmp"):
        Image.new("RGB", (96, 96), (90, 90, 90)).save(p, format="JPEG" if p.suffix == ".jpg" else "BMP")
    proc = ok(run(["preprocessing.py"], root))
    lines = [line for line in proc.stdout.splitlines() if "not used:" in line]
    assert len(lines) == 3 and all(any(n in line for line in lines) for n in ("loose.jpg", "x.jpg", "scan.bmp")), lines
    assert sorted(_manifest(root)["source"].unique()) == good


def test_image_smaller_than_the_patch_is_listed(cities):
    root, raw = cities
    good = _all_sources(raw)
    Image.new("RGB", (40, 40), (90, 90, 90)).save(sorted(raw.iterdir())[0] / "site_01" / "tiny.jpg")
    proc = ok(run(["preprocessing.py"], root))
    assert any("tiny.jpg" in l and "too small" in l and "cities.patch.size 48" in l for l in proc.stdout.splitlines())
    assert sorted(_manifest(root)["source"].unique()) == good
    one_line_error(run(["preprocessing.py"], root, ["cities.patch.size=200", "overwrite=true"]),
                   "no usable city image", "cities.patch.size")


def test_city_folder_without_iata_stops(cities):
    root, raw = cities
    city = sorted(raw.iterdir())[0]
    city.rename(raw / "Nowhere")
    one_line_error(run(["preprocessing.py"], root), "'Nowhere'", "IATA", "rename")
    assert not (root / "data" / "cities" / "patches").exists()


def test_city_with_too_few_sites_and_empty_city_are_left_out(cities):
    root, raw = cities
    first = sorted(raw.iterdir())[0]
    (raw / "Lonely (LNL)" / "site_01").mkdir(parents=True)
    shutil.copy(first / "site_01" / "img_01.jpg", raw / "Lonely (LNL)" / "site_01")
    (raw / "Empty (EMP)").mkdir()
    shutil.copytree(raw / "Lonely (LNL)", raw / "Hollow (HLW)")
    (raw / "Hollow (HLW)" / "site_02").mkdir()  # a last site without images: no test or val patches
    proc = ok(run(["preprocessing.py"], root))
    listed = [l for l in proc.stdout.splitlines() if "skipped" in l]
    assert len(listed) == 3
    assert any("Lonely (LNL)" in l and "1 site folder" in l for l in listed)
    assert any("Empty (EMP)" in l and "0 site folder" in l for l in listed)
    assert any("Hollow (HLW)" in l and "no val/test patches" in l and "site_02" in l for l in listed)
    assert sorted(_manifest(root)["iata"].unique()) == sorted(d.name[-4:-1] for d in raw.iterdir()
                                                               if d.name[-4:-1] not in ("LNL", "EMP", "HLW"))
    one_line_error(run(["preprocessing.py"], root, ["strict=true"]), "Empty (EMP)", "site folder")


def test_patches_of_another_run_are_kept_unless_overwrite(cities):
    root, _ = cities
    ok(run(["preprocessing.py"], root))
    out = root / "data" / "cities" / "patches"
    before = snapshot(out)
    one_line_error(run(["preprocessing.py"], root, ["cities.patch.size=64"]), str(out), "size", "overwrite=true")
    assert snapshot(out) == before
    ok(run(["preprocessing.py"], root, ["cities.patch.size=64", "overwrite=true"]))
    assert set(_manifest(root)["size"]) == {64}


# ------------------------------------------------------------------------------------------ config

def test_config_typo_wrong_type_and_missing_paths(cities, tmp_path):
    root, _ = cities
    typo = tmp_path / "typo.yaml"
    typo.write_text("cities:\n  patch: {szie: 48}\n")
    one_line_error(run(["preprocessing.py"], root, config=typo), str(typo), "'cities.patch.szie'", "cities.patch.size")
    one_line_error(run(["preprocessing.py"], root, ["cities.patch.stride=wide"]), "cities.patch.stride", "must be int")
    one_line_error(run(["preprocessing.py"], root, config=tmp_path / "nowhere.yaml"), "nowhere.yaml", "not found")
    line = one_line_error(run(["preprocessing.py"], root, [f"paths.data={tmp_path / 'no_data'}"]),
                          "no city images", "data_setup.sh")
    assert str(tmp_path / "no_data") in line and not (tmp_path / "no_data" / "cities" / "patches").exists()


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def patched_world(cities_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(cities_world / "data", root / "data")
    ok(run(["preprocessing.py"], root))
    return root


@pytest.fixture
def patched(patched_world, tmp_path):
    """(root, classes): the patches are shared (read only), results go to a private root."""
    (tmp_path / "data").symlink_to(patched_world / "data")
    return tmp_path, sorted(_manifest(patched_world)["iata"].unique())


def _checkpoint(root, backbone="resnet18", classes=("AAA", "BBB"), recorded=None, n_out=None):
    """A checkpoint as train_classification.py writes it: ``backbone`` weights with ``n_out`` outputs,
    recording ``recorded`` as its backbone and ``classes``."""
    cfg = load_config(ROOT / "configs/cities_demo.yaml", ["cities.model.input_size=32", f"cities.model.backbone={recorded or backbone}"])
    model = build_backbone(backbone, n_out or len(classes))
    path = root / "results" / "cities" / "checkpoints" / "best.pt"
    runtime.save_checkpoint(path, model, cfg, epoch=1, classes=list(classes))
    return path


def test_checkpoint_of_another_backbone_stops(patched):
    root, classes = patched
    _checkpoint(root, "resnet18", classes, recorded="resnet34")
    one_line_error(run(["test_classification.py"], root), "best.pt", "do not fit resnet34", "another backbone")
    assert not (root / "results" / "cities" / "metrics.json").exists()


def test_checkpoint_with_another_number_of_classes_stops(patched):
    root, classes = patched
    _checkpoint(root, "resnet18", classes, n_out=len(classes) + 2)
    # saliency.py loads the model through the same function (and meets a broken file below)
    one_line_error(run(["test_classification.py"], root), "best.pt", f"{len(classes)} classes", "another shape", "fc.weight")
    assert not (root / "results" / "cities" / "metrics.json").exists()
    assert not (root / "results" / "cities" / "saliency").exists() and not temp_files(root)


def test_checkpoint_of_other_cities_or_another_stage_stops(patched):
    root, classes = patched
    _checkpoint(root, "resnet18", ["XXA", "XXB"])
    one_line_error(run(["test_classification.py"], root), "are not among the model's classes", "re-run")
    path = _checkpoint(root)
    torch.save({"model": {}, "config": {"seed": 0}}, path)  # e.g. an income-model checkpoint
    one_line_error(run(["test_classification.py"], root), "best.pt", "not a city-classifier checkpoint")
    path.write_bytes(b"partial download")
    one_line_error(run(["saliency.py"], root), "best.pt", "not a readable checkpoint", "run the training stage")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_stops(patched):
    root, classes = patched
    _checkpoint(root, "resnet18", classes)
    one_line_error(run(["test_classification.py"], root, ["device=cuda"]), "device", "cuda", "device=cpu")
    assert not (root / "results" / "cities" / "metrics.json").exists()


def test_training_refuses_checkpoints_of_other_settings(patched):
    root, classes = patched
    path = _checkpoint(root, "resnet18", classes)
    shutil.copy(path, path.with_name("last.pt"))
    before = snapshot(path.parent)
    one_line_error(run(["train_classification.py"], root, ["cities.train.epochs=1", "cities.train.max_steps_per_epoch=1"]),
                   "last.pt", "other settings", "overwrite=true", "--resume")
    assert snapshot(path.parent) == before


# ------------------------------------------------------------------------------------------ SES

@pytest.fixture(scope="module")
def ses_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ses")
    ok(run(["-m", "urbanlens.ses.world"], root, ses=True))
    ok(run(["generate_fr_ua_aerial_data.py"], root, ses=True))
    return root


@pytest.fixture
def ses(ses_world, tmp_path):
    """A private copy of the French data (no results): (root, data dir, the clean run's cells)."""
    shutil.copytree(ses_world / "data", tmp_path / "data")
    clean = gpd.read_file(ses_world / "results" / "ses" / "cells.gpkg", layer="cells")
    return tmp_path, tmp_path / "data", clean


def _extract(root, extra=()):
    return run(["generate_fr_ua_aerial_data.py"], root, extra, ses=True)


def _cells(root):
    return gpd.read_file(root / "results" / "ses" / "cells.gpkg", layer="cells")


def _no_index(root):
    assert not (root / "results" / "ses" / "cells.gpkg").exists() and not temp_files(root)


def _write_census(data, gdf):
    layer = pyogrio.list_layers(data / CENSUS)[0, 0]
    (data / CENSUS).unlink()
    gdf.to_file(data / CENSUS, layer=layer, driver="GPKG")


def test_input_paths_that_do_not_exist(ses):
    root, data, _ = ses
    one_line_error(_extract(root, ["ses.census_file=census_data/nowhere.gpkg"]), "nowhere.gpkg", "not found",
                   "ses.census_file")
    one_line_error(_extract(root, ["ses.aerial_dir=no_tiles"]), "no_tiles", "dalles.shp")
    _no_index(root)


def test_census_without_needed_columns(ses):
    root, data, _ = ses
    census = gpd.read_file(data / CENSUS)
    _write_census(data, census.drop(columns=["ind_snv"]))
    one_line_error(_extract(root), CENSUS.split("/")[-1], "lacks columns", "ind_snv", "Ind_snv", "rename")
    _no_index(root)


def test_census_cells_without_individuals_are_dropped_and_counted(ses):
    root, data, clean = ses
    census = gpd.read_file(data / CENSUS)
    bad = clean["cell_id"].iloc[:3].tolist()
    rows = census["idcar_200m"].isin(bad).to_numpy().nonzero()[0]
    census["ind"] = census["ind"].astype(float)
    census.loc[rows[:2], "ind"] = 0.0
    census.loc[rows[2:], "ind"] = np.nan
    _write_census(data, census)
    proc = ok(_extract(root))
    assert "(3 census cells without income dropped" in proc.stdout
    cells = _cells(root)
    assert sorted(cells["cell_id"]) == sorted(set(clean["cell_id"]) - set(bad))
    assert np.isfinite(cells["income"]).all() and not temp_files(root)


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
@pytest.mark.parametrize("crs", [None, "EPSG:4326"])
def test_census_with_no_or_a_wrong_crs(ses, crs):
    root, data, _ = ses
    census = gpd.read_file(data / CENSUS)
    if crs is None:  # Lambert-93 coordinates, CRS lost
        census = census.to_crs("EPSG:2154").set_crs(None, allow_override=True)
    else:            # EPSG:3035 coordinates tagged as longitudes / latitudes
        census = census.set_crs(crs, allow_override=True)
    _write_census(data, census)
    assert pyogrio.read_info(data / CENSUS)["crs"] == crs
    one_line_error(_extract(root), CENSUS.split("/")[-1], "INSPIRE ids", "EPSG:3035",
                   "no CRS" if crs is None else "EPSG:4326")
    _no_index(root)


def test_census_in_lambert93_is_read(ses):
    root, data, clean = ses
    _write_census(data, gpd.read_file(data / CENSUS).to_crs("EPSG:2154"))
    ok(_extract(root))
    assert sorted(_cells(root)["cell_id"]) == sorted(clean["cell_id"])


def _ua_layers(data):
    return [(name, gpd.read_file(data / UA, layer=name)) for name in pyogrio.list_layers(data / UA)[:, 0]]


def _write_ua(data, layers):
    (data / UA).unlink()
    for name, gdf in layers:
        gdf.to_file(data / UA, layer=name, driver="GPKG")


def test_urban_atlas_without_boundary_layer_uses_the_land_use(ses):
    root, data, clean = ses
    _write_ua(data, [(n, g) for n, g in _ua_layers(data) if "boundary" not in n.lower()])
    proc = ok(_extract(root))
    assert any("no boundary layer" in l and "union of the land use" in l and UA.split("/")[1] in l
               for l in proc.stderr.splitlines()), proc.stderr
    assert sorted(_cells(root)["cell_id"]) == sorted(clean["cell_id"])


def test_urban_atlas_class_column_unknown_stops_at_extraction(ses):
    root, data, _ = ses
    layers = [(n, g if "boundary" in n.lower() else g.rename(columns={"class_2018": "landuse_label"}))
              for n, g in _ua_layers(data)]
    _write_ua(data, layers)
    one_line_error(_extract(root), UA.split("/")[1], "no land-use layer", "landuse_label", "class_2018", "ITEM2012")
    _no_index(root)


def test_invalid_polygons_are_repaired_and_reported(ses):
    root, data, clean = ses
    layers = _ua_layers(data)
    name, boundary = next((n, g) for n, g in layers if "boundary" in n.lower())
    x0, y0, x1, y1 = boundary.total_bounds
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bow = shapely.Polygon([(cx - 50, cy - 50), (cx + 50, cy + 50), (cx + 50, cy - 50), (cx - 50, cy + 50)])
    assert not bow.is_valid
    extra = gpd.GeoDataFrame({c: [boundary[c].iloc[0]] for c in boundary.columns if c != "geometry"},
                             geometry=[shapely.MultiPolygon([bow])], crs=boundary.crs)
    boundary = pd.concat([boundary, extra], ignore_index=True)
    _write_ua(data, [(n, boundary if n == name else g) for n, g in layers])
    proc = ok(_extract(root))
    assert any("1 of 2 polygon(s) invalid" in l and "repaired" in l for l in proc.stderr.splitlines()), proc.stderr
    assert sorted(_cells(root)["cell_id"]) == sorted(clean["cell_id"])


def _tiles(data):
    return sorted((data / "aerial_data").rglob("*.jp2"))


def test_tile_index_naming_missing_tiles(ses):
    root, data, clean = ses
    gone = _tiles(data)[0]
    gone.unlink()
    proc = ok(_extract(root))
    assert f"(1 listed but absent on disk, e.g. {gone.name})" in proc.stdout   # the refused tile is named
    cells = _cells(root)
    assert sorted(cells["cell_id"]) == sorted(clean["cell_id"])
    assert cells["non_void"].sum() < clean["non_void"].sum() and cells["non_void"].any()


def test_tile_in_another_crs_than_its_index_stops(ses):
    root, data, _ = ses
    tile = _tiles(data)[1]
    with rasterio.open(tile) as src:
        profile, pixels = src.profile, src.read()
    profile.update(crs="EPSG:3035")
    with rasterio.open(tile, "w", **profile) as dst:
        dst.write(pixels)
    one_line_error(_extract(root), tile.name, "EPSG:3035", "dalles.shp", "EPSG:2154", "gdalwarp")
    _no_index(root)


def test_extraction_refuses_another_runs_cells(ses, ses_world):
    root, _, _ = ses
    shutil.copytree(ses_world / "results", root / "results")
    before = snapshot(root / "results")
    one_line_error(_extract(root, ["ses.cell_px=24"]), "cell_px", "overwrite=true")
    assert snapshot(root / "results") == before


def test_ses_training_refuses_another_runs_models(ses, ses_world):
    root, _, _ = ses
    shutil.copytree(ses_world / "results", root / "results")
    other = load_config(ROOT / SES, [*SES_SETS, "seed=7"])
    city_dir = root / "results" / "ses" / "Paris"
    city_dir.mkdir()
    (city_dir / "train_config.yaml").write_text(yaml.safe_dump(other.to_dict(), sort_keys=False))
    runs.write_stamp(city_dir / results.STAMP, "efficientnet_training.py", other, results.RUN_KEYS)
    one_line_error(run(["efficientnet_training.py"], root, ses=True), str(city_dir), "seed", "overwrite=true")
    assert not list(city_dir.glob("fold_*")) and not temp_files(root)


def test_activation_maps_with_a_checkpoint_of_another_backbone(ses, ses_world):
    from urbanlens.ses import model as ses_model

    root, _, _ = ses
    shutil.copytree(ses_world / "results", root / "results")
    trained = load_config(ROOT / SES, [*SES_SETS, "ses.model.backbone=resnet18"])
    recorded = load_config(ROOT / SES, SES_SETS)  # says efficientnet_b0
    city_dir = root / "results" / "ses" / "Paris"
    runtime.save_checkpoint(city_dir / "fold_0" / "best.pt", ses_model.build_ses_model(trained), recorded, fold=0)
    (city_dir / "metrics.json").write_text('{"best_fold": 0}\n')
    one_line_error(run(["gradcaming_urban_areas.py"], root, ses=True), "best.pt", "do not fit")
    assert not (city_dir / "polygon_stats.gpkg").exists() and not temp_files(root)


def test_truncated_cell_image_stops_training_under_strict_and_is_skipped_otherwise(ses, ses_world):
    root, _, clean = ses
    shutil.copytree(ses_world / "results", root / "results")
    cells = clean[clean["non_void"]]
    broken = root / "results" / "ses" / cells["path"].iloc[0]
    broken.write_bytes(broken.read_bytes()[:200])
    one_line_error(run(["efficientnet_training.py"], root, ["strict=true"], ses=True),
                   broken.name, "unreadable", "re-run generate_fr_ua_aerial_data.py")
    assert not (root / "results" / "ses" / "Paris" / "metrics.json").exists() and not temp_files(root)
    proc = ok(run(["efficientnet_training.py"], root, ses=True))
    assert broken.name in proc.stderr and "training without them" in proc.stderr
    trained = pd.read_csv(root / "results" / "ses" / "Paris" / "predictions.csv")
    assert len(trained) == len(cells) - 1 and cells["cell_id"].iloc[0] not in set(trained["cell_id"])


def _cells_index(root, edit):
    """Rewrite the copied run's cell index through ``edit`` (a function of the frame)."""
    path = root / "results" / "ses" / "cells.gpkg"
    edit(gpd.read_file(path, layer="cells")).to_file(path, layer="cells", driver="GPKG")


def test_training_without_usable_cells_fails_and_the_map_stage_names_the_cause(ses, ses_world):
    root, _, _ = ses
    shutil.copytree(ses_world / "results", root / "results")
    _cells_index(root, lambda c: c.assign(non_void=False))
    one_line_error(run(["efficientnet_training.py"], root, ses=True), "no city has usable cells", "Paris", "void",
                   "generate_fr_ua_aerial_data.py")
    assert not (root / "results" / "ses" / "Paris" / "metrics.json").exists()
    one_line_error(run(["gradcaming_urban_areas.py"], root, ses=True), "no model for Paris",
                   "training skipped it because", "void")


def test_a_city_without_cells_is_skipped_and_named_when_another_trains(ses, ses_world):
    root, _, clean = ses
    shutil.copytree(ses_world / "results", root / "results")
    ghost = clean.iloc[:3].assign(city="Lyon", non_void=False,   # Lyon: three void cells only (own ids:
                                  cell_id=[f"CRS3035RES200mN2000000E{4000000 + 200 * i}" for i in range(3)])  # one city each)
    _cells_index(root, lambda c: pd.concat([c, ghost], ignore_index=True))
    cities = ["ses.cities=[Paris, Lyon]"]
    proc = ok(run(["efficientnet_training.py"], root, cities, ses=True))
    assert (root / "results" / "ses" / "Paris" / "metrics.json").is_file()
    assert "skipped Lyon (all 3 of its cells are void" in proc.stdout
    proc = ok(run(["gradcaming_urban_areas.py"], root, cities, ses=True))
    assert "no model for Lyon: training skipped it because all 3 of its cells are void" in proc.stderr
    assert (root / "results" / "ses" / "Paris" / "landuse_summary.csv").is_file()


def test_a_model_at_chance_gives_a_ranking_flagged_not_meaningful(ses, ses_world):
    """The reported run: every prediction equal (AUC 0.50), an all-zero poorest map; the numbers are
    written, flagged, and the closing line says the ranking means nothing."""
    from urbanlens.ses import data as ses_data
    from urbanlens.ses import metrics
    from urbanlens.ses import model as ses_model

    root, _, clean = ses
    shutil.copytree(ses_world / "results", root / "results")
    cfg = load_config(ROOT / SES, SES_SETS)
    model = ses_model.build_ses_model(cfg)
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)   # p = 0.5 for every cell: the same prediction everywhere
    city_dir = root / "results" / "ses" / "Paris"
    runtime.save_checkpoint(city_dir / "fold_0" / "best.pt", model, cfg, fold=0)
    (city_dir / "metrics.json").write_text('{"best_fold": 0}\n')
    cells = clean[clean["non_void"]].sort_values("cell_id")
    log_probs = ses_model.binomial_log_probs(torch.zeros(len(cells))).numpy()
    preds = metrics.predictions_frame(cells["cell_id"], 0, ses_data.income_quintiles(cells["income"]), log_probs)
    preds.to_csv(city_dir / "predictions.csv", index=False)
    proc = ok(run(["gradcaming_urban_areas.py"], root, ses=True))
    summary = pd.read_csv(city_dir / "landuse_summary.csv", dtype={"ua_code": str})
    assert len(summary) and not summary["meaningful"].any() and summary["rich_minus_poor"].notna().all()
    assert (summary["model_auc"] == 0.5).all() and "includes 0.5" in summary["caveat"].iloc[0]
    closing = [l for l in proc.stdout.splitlines() if l.startswith("[cams] Paris:") and "richest-reading" in l]
    assert len(closing) == 1 and "ranking not meaningful" in closing[0] and "richest-reading class" in closing[0]
    pooled = pd.read_csv(root / "results" / "ses" / "landuse_summary.csv")
    assert not pooled["meaningful"].any()
