"""Training that diverges, and inputs that are duplicated or degenerate: one line and a non-zero exit
for a stop, nothing saved or scored from a diverged model; duplicates and malformed rows dropped and
counted where they are harmless, refused where they would put one cell on both sides of a fold.

Stages run in process (``entry.run(main)``, the scripts' own wrapper) on the smallest worlds that show
the behaviour; library functions are called directly where the script adds nothing."""
import importlib
import math
import re
import shutil
import signal
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import torch
from PIL import Image
from rasterio.transform import from_origin
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from urbanlens.cities.patches import plan_split
from urbanlens.core import entry, loops
from urbanlens.core.config import load_config
from urbanlens.core.errors import DataError, TrainingDiverged
from urbanlens.core.placement import Placement
from urbanlens.ses import census, extraction, fitting, urban_atlas
from urbanlens.ses import data as ses_data
from urbanlens.ses.model import binomial_log_probs

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# two tiny cities (tests/conf/cities_tiny.yaml), trained 2 epochs at a constant rate in batches of 16
CITIES = ["cities.world.n_cities=2", "workers=0", "cities.train.epochs=2", "cities.train.schedule=constant",
          "cities.train.batch_size=16"]
SAMPLE = ROOT / "tests" / "data" / "insee_carreaux_200m_sample.gpkg"


def stage(module: str, root: Path, sets, capsys, monkeypatch, config="tests/conf/cities_tiny.yaml"):
    """Run a stage's ``main`` through ``entry.run`` as its script does: (exit status, stdout, stderr lines
    that are not progress bars)."""
    main = importlib.import_module(module).main
    sets = [f"paths.data={root / 'data'}", f"paths.results={root / 'results'}", *sets]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [module, "--config", config, *[a for s in sets for a in ("--set", s)]])
    term = signal.getsignal(signal.SIGTERM)
    try:
        entry.run(main)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, term)
    out = capsys.readouterr()
    lines = [l for l in re.split(r"[\r\n]+", out.err) if l.strip() and not re.search(r"\d+%\|", l)]
    return code, out.out, lines


def one_line(code, lines, *words) -> str:
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ divergence

@pytest.fixture(scope="module")
def cities_patches(tmp_path_factory):
    """Two tiny cities, patched (read only: tests copy what they change)."""
    root = tmp_path_factory.mktemp("degenerate_cities")
    mp = pytest.MonkeyPatch()
    capture = type("C", (), {"readouterr": lambda self: type("O", (), {"out": "", "err": ""})()})()
    for module in ("urbanlens.cities.world", "preprocessing"):
        code, _, _ = stage(module, root, CITIES, capture, mp)
        assert code == 0
    mp.undo()
    return root


def test_a_diverging_city_classifier_stops_with_one_line_and_saves_no_checkpoint(cities_patches, tmp_path,
                                                                                capsys, monkeypatch):
    (tmp_path / "data").symlink_to(cities_patches / "data")
    code, _, err = stage("train_classification", tmp_path, [*CITIES, "cities.train.lr=1e6"], capsys, monkeypatch)
    line = one_line(code, err, "epoch 1, step", "cities.train.lr", "neither saved nor scored", "NaN or infinite")
    assert "learning rate 1e+06" in line and "x chance level" in line  # huge yet finite: still divergence
    assert not list((tmp_path / "results" / "cities").rglob("*.pt"))
    assert not (tmp_path / "results" / "cities" / "train_log.csv").exists()


def test_one_city_or_one_training_patch_stops_training_with_one_line(cities_patches, tmp_path, capsys, monkeypatch):
    shutil.copytree(cities_patches / "data", tmp_path / "data")
    manifest_csv = tmp_path / "data" / "cities" / "patches" / "manifest.csv"
    manifest = pd.read_csv(manifest_csv)
    first = sorted(manifest["iata"].unique())[0]
    manifest[manifest["iata"] == first].to_csv(manifest_csv, index=False)
    code, _, err = stage("train_classification", tmp_path, CITIES, capsys, monkeypatch)
    one_line(code, err, "manifest.csv", "1 city", first, "2 or more")
    train = manifest[manifest["split"] == "train"]
    pd.concat([train.iloc[:1], manifest[manifest["split"] != "train"]]).to_csv(manifest_csv, index=False)
    code, _, err = stage("train_classification", tmp_path, CITIES, capsys, monkeypatch)
    one_line(code, err, "manifest.csv", "1 training patch")
    assert not (tmp_path / "results" / "cities" / "checkpoints").exists()


def test_ses_cross_validation_by_city_with_one_city_stops_with_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = stage("efficientnet_training", tmp_path, ["ses.cities=[Paris]", "ses.train.cv=city"], capsys,
                         monkeypatch, config="configs/ses_demo.yaml")
    one_line(code, err, "ses.train.cv=city", "at least 2 cities")


class Cell(nn.Module):
    """conv -> batch norm -> pooled -> one logit -> the binomial log-probabilities (the SES head)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 1)

    def forward(self, x):
        return binomial_log_probs(self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))))


def _cells(n: int, nan: bool = False, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    if nan:
        x[::3, 0, 0, 0] = float("nan")  # e.g. a nodata value read as NaN
    return TensorDataset(x, torch.arange(n) % 5)


def _ses_cfg():
    return load_config(ROOT / "configs/ses_demo.yaml", ["ses.train.epochs=3", "ses.train.batch_size=4",
                                                         "ses.train.restarts=0", "ses.train.precise_bn=false",
                                                         "ses.train.amp=off"]).ses.train


@pytest.mark.parametrize("where", ["train", "val"])
def test_a_diverging_income_model_stops_and_writes_no_state(tmp_path, where):
    torch.manual_seed(0)
    train, val = _cells(12, nan=where == "train"), _cells(8, nan=where == "val", seed=1)
    state = tmp_path / "fold_0" / "last.pt"
    with pytest.raises(TrainingDiverged) as e:
        fitting.fit(Cell(), train, val, _ses_cfg(), Placement(CPU), checkpoint=state)
    assert "epoch 1" in str(e.value) and "ses.train.lr" in str(e.value)
    assert ("training loss is nan" if where == "train" else "validation loss is nan") in str(e.value)
    assert not state.exists()
    fit = fitting.fit(Cell(), _cells(12), _cells(8, seed=1), _ses_cfg(), Placement(CPU))  # the same run, finite inputs
    assert math.isfinite(fit.best_val_loss) and fit.best_epoch >= 0


def test_a_float16_scaler_skips_non_finite_steps_and_stops_only_when_they_persist():
    batches = [(x, y) for x, y in torch.utils.data.DataLoader(_cells(40), batch_size=4)]  # 10 steps
    torch.manual_seed(0)
    model = Cell()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nan_steps = {2, 3, 4}
    calls = []

    def loss_fn(out, y, reduction="mean"):
        calls.append(len(calls) + 1)
        loss = F.nll_loss(out, y, reduction=reduction)
        return loss * float("nan") if calls[-1] in nan_steps else loss

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    got = loops.train_epoch(model, batches, loops.Optimiser(opt, None, scaler), loss_fn, Placement(CPU), desc=None, epoch=1)
    assert got["n"] == 4 * (10 - len(nan_steps)) and math.isfinite(got["loss"])  # skipped steps leave the mean
    assert scaler.get_scale() == 2.0 ** 8 * 0.5 ** len(nan_steps) and loops.finite_weights(model)
    nan_steps.update(range(11, 11 + loops.SCALER_PATIENCE + 1))
    with pytest.raises(TrainingDiverged, match=f"epoch 2, step {loops.SCALER_PATIENCE + 1}: training loss is nan "
                                               f"in {loops.SCALER_PATIENCE + 1} steps in a row"):
        loops.train_epoch(model, batches, loops.Optimiser(opt, None, scaler), loss_fn, Placement(CPU), desc=None, epoch=2)
    with pytest.raises(TrainingDiverged, match="epoch 3, step 1: training loss is nan at learning rate"):
        nan_steps.add(len(calls) + 1)  # without a scaler the first non-finite loss stops
        loops.train_epoch(model, batches, loops.Optimiser(opt), loss_fn, Placement(CPU), desc=None, epoch=3)


def test_a_lone_last_batch_is_skipped_and_a_training_set_of_one_is_refused():
    model = Cell()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = list(torch.utils.data.DataLoader(_cells(9), batch_size=4))  # 4, 4, 1
    assert loops.train_epoch(model, batches, loops.Optimiser(opt), F.nll_loss, Placement(CPU), min_batch=2, desc=None)["n"] == 8
    with pytest.raises(DataError, match="training set: 1 item"):
        loops.train_epoch(model, batches[-1:], loops.Optimiser(opt), F.nll_loss, Placement(CPU), min_batch=2, desc=None)


# ------------------------------------------------------------------------------------------ census

def _census(tmp_path, edit) -> Path:
    path = tmp_path / "census.gpkg"
    edit(gpd.read_file(SAMPLE)).to_file(path, layer="carreaux", driver="GPKG")
    return path


def test_repeated_census_rows_are_dropped_and_counted_and_conflicting_ones_refused(tmp_path):
    clean = census.read_census(SAMPLE)
    twice = _census(tmp_path, lambda g: pd.concat([g, g.iloc[:5]], ignore_index=True))
    got = census.read_census(twice)
    assert got.attrs["duplicates"] == 5 and got["cell_id"].is_unique
    assert sorted(got["cell_id"]) == sorted(clean["cell_id"])
    other = lambda g: pd.concat([g, g.iloc[:4].assign(ind_snv=g["ind_snv"].iloc[:4] * 2)], ignore_index=True)
    raw = gpd.read_file(SAMPLE)
    with pytest.raises(DataError, match="4 cell id.s. listed more than once with different values") as e:
        census.read_census(_census(tmp_path, other))
    assert "census.gpkg" in str(e.value) and raw["idcar_200m"].iloc[0] in str(e.value)


def test_malformed_cell_ids_are_dropped_and_listed_and_an_empty_layer_refused(tmp_path):
    bad = ["CRS3035RES200mN28758", "N2875800E3756000", "CRS2154RES200mN2875800E3756000"]
    raw = gpd.read_file(SAMPLE)
    got = census.read_census(_census(tmp_path, lambda g: g.assign(idcar_200m=bad + list(g["idcar_200m"][3:]))))
    assert got.attrs["malformed"] == bad and sorted(got["cell_id"]) == sorted(raw["idcar_200m"][3:])
    assert "3 rows with a malformed cell id dropped (e.g. 'CRS3035RES200mN28758')" in \
        extraction.census_drops(got.attrs, 0)
    with pytest.raises(DataError, match="none of its 318 cell ids is an INSPIRE id"):
        census.read_census(_census(tmp_path, lambda g: g.assign(idcar_200m="x")))
    with pytest.raises(DataError, match="census layer 'carreaux' holds no cell"):
        census.read_census(_census(tmp_path, lambda g: g.iloc[:0]))


def test_a_cell_inside_two_cities_belongs_to_the_first_and_an_index_listing_it_twice_is_refused(tmp_path):
    cells = census.read_census(SAMPLE)
    taken = set(cells["cell_id"].iloc[:100])
    mine, n = extraction.drop_taken(cells.iloc[50:], taken)
    assert n == 50 and not set(mine["cell_id"]) & taken and len(mine) == len(cells) - 100
    index = cells.iloc[:6].assign(city=["Paris"] * 3 + ["Lyon"] * 3, path="x.png", non_void=True)
    index.loc[index.index[3], "cell_id"] = index["cell_id"].iloc[0]  # Paris's first cell again, as Lyon's
    index.to_file(tmp_path / "cells.gpkg", layer="cells", driver="GPKG")
    with pytest.raises(DataError, match="1 cell id.s. listed more than once") as e:
        ses_data.read_cells(tmp_path / "cells.gpkg")
    assert index["cell_id"].iloc[0] in str(e.value) and "overwrite=true" in str(e.value)


def test_an_empty_urban_atlas_boundary_is_refused(tmp_path):
    ua = tmp_path / "UA" / "FR001L2_PARIS_UA2018.gpkg"
    ua.parent.mkdir()
    square = shapely.box(3760000, 2880000, 3761000, 2881000)
    gpd.GeoDataFrame({"code_2018": ["11100"], "class_2018": ["Continuous urban fabric"]}, geometry=[square],
                     crs="EPSG:3035").to_file(ua, layer="FR001L2_PARIS_UA2018", driver="GPKG")
    gpd.GeoDataFrame({"fua_name": ["Paris"]}, geometry=[square], crs="EPSG:3035").iloc[:0].to_file(
        ua, layer="FR001L2_PARIS_UA2018_Boundary", driver="GPKG")
    with pytest.raises(DataError, match="Boundary: the city's boundary holds no polygon"):
        urban_atlas.read_ua_boundary(ua.parent, "Paris")


# ------------------------------------------------------------------------------------------ images and tiles

def _image(path: Path, size=(96, 96), seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_images_differing_only_by_extension_get_their_own_patches_and_twin_names_are_refused(tmp_path):
    raw = tmp_path / "raw"
    for city in ("Alpha (AAA)", "Beta (BBB)"):
        for site in ("s1", "s2"):
            _image(raw / city / site / "a.png", seed=1)
            _image(raw / city / site / "b.png", seed=2)
    _image(raw / "Alpha (AAA)" / "s1" / "a.tif", seed=3)
    plan, problems = plan_split(raw, size=48, stride=48, test_b_per_city=0, seed=0)
    assert not problems and plan["path"].is_unique
    alpha = plan[(plan["site"] == "s1") & (plan["iata"] == "AAA")]
    assert set(alpha["source"]) == {"Alpha (AAA)/s1/a.png", "Alpha (AAA)/s1/a.tif", "Alpha (AAA)/s1/b.png"}
    assert alpha.groupby("source")["path"].nunique().eq(4).all()  # 2 x 2 patches each, none shared
    (raw / "Alpha (AAA)" / "s1").rename(raw / "Alpha (AAA)" / "S2")  # beside s2
    with pytest.raises(DataError, match=r"site folders 'S2' and 's2' differ only by case"):
        plan_split(raw, size=48, stride=48, test_b_per_city=0, seed=0)
    shutil.rmtree(raw / "Alpha (AAA)" / "S2")
    shutil.copytree(raw / "Beta (BBB)", raw / "Gamma (BBB)")
    with pytest.raises(DataError, match=r"IATA code BBB used by both 'Beta \(BBB\)' and 'Gamma \(BBB\)'"):
        plan_split(raw, size=48, stride=48, test_b_per_city=0, seed=0)


def _tile(path: Path, x0: float, bands: int = 3) -> str:
    """A 100 m Lambert-93 tile of 1 m pixels with its west edge at ``x0``."""
    pixels = np.random.default_rng(int(x0)).integers(1, 255, (bands, 100, 100), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=100, height=100, count=bands, dtype="uint8",
                       crs="EPSG:2154", transform=from_origin(x0, 6860100, 1, 1)) as dst:
        dst.write(pixels)
    return str(path)


def test_a_tile_with_fewer_bands_is_named_and_a_broken_tile_leaves_its_cells_out(tmp_path):
    west, east = _tile(tmp_path / "west.tif", 650000), _tile(tmp_path / "east.tif", 650100, bands=1)
    straddling = (650050, 6860020, 650150, 6860080)  # half on each tile
    with pytest.raises(DataError, match=r"east.tif: 1 band\(s\), RGB expected \(its neighbour .*west.tif has 3\)"):
        extraction.read_cell([west, east], straddling, 16, crs="EPSG:2154")
    east = _tile(tmp_path / "east.tif", 650100)
    Path(east).write_bytes(Path(east).read_bytes()[:2000])  # header intact, pixels cut
    boxes = [shapely.box(*b) for b in [(650010, 6860010, 650060, 6860060), straddling]]
    cells = gpd.GeoDataFrame({"path": ["a.png", "b.png"], "tiles": [(west,), (west, east)]},
                             geometry=gpd.GeoSeries(boxes, crs="EPSG:2154").to_crs("EPSG:3035").envelope)
    status = extraction.extract_cells(cells, tmp_path / "out", px=16, progress=False)
    assert status["extracted"].tolist() == [True, False] and status["nodata"].iloc[1] == 1.0
    assert status["failed"].iloc[1].startswith(f"{east}: unreadable orthophoto tile")
    assert (tmp_path / "out" / "a.png").is_file() and not (tmp_path / "out" / "b.png").exists()
    with pytest.raises(DataError, match="east.tif: unreadable orthophoto tile .*strict=true"):
        extraction.report_failed(status["failed"].dropna().tolist(), strict=True)
