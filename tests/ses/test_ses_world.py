"""Synthetic French world: real schemas and layouts, planted income, byte determinism, and the cell
extraction stage end to end on a tiny world (index columns, void cells, resume)."""
import hashlib
import json
import re
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import rasterio
import shapely
from PIL import Image

from urbanlens.core import errors
from urbanlens.core.config import load_config
from urbanlens.ses import census as ses_census
from urbanlens.ses import extraction as ses_extraction
from urbanlens.ses import grid, urban_atlas, world_plan
from urbanlens.ses import tiles as ses_tiles
from urbanlens.ses import world as ses_world
from script_runner import assert_no_traceback, python, run, set_args

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/conf/ses_world.yaml"  # two 1 km cities at 4 m, 32 px cells, the whole census


def tiny_config(data, results=None, extra=()):
    sets = [f"paths.data={data}", f"paths.results={results or data.parent / 'results'}", *extra]
    return load_config(ROOT / CONFIG, sets), sets


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    data = tmp_path_factory.mktemp("fr") / "data"
    cfg, sets = tiny_config(data)
    truth = ses_world.build_world(cfg, progress=False)
    return cfg, sets, data, truth


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_world(world, tmp_path):
    cfg, _, data, _ = world
    again, _ = tiny_config(tmp_path / "data")
    ses_world.build_world(again, progress=False)
    first, second = _digests(data), _digests(tmp_path / "data")
    assert first == second
    assert any(k.endswith((".jp2", ".tif")) for k in first) and any(k.endswith(".gpkg") for k in first)
    other, _ = tiny_config(tmp_path / "other", extra=["seed=1"])
    ses_world.build_world(other, progress=False)
    census = "census_data/carreaux_200m_met.gpkg"
    assert _digests(tmp_path / "other")[census] != first[census]


def test_urban_atlas_layout_and_schema(world):
    cfg, _, data, truth = world
    for city in cfg.ses.world.cities:
        stem = next(p.name for p in (data / "UA_data").iterdir() if city.upper() in p.name)
        assert re.fullmatch(r"FR\d{3}L2_[A-Z]+_UA2018_v013", stem)
        gpkg = data / "UA_data" / stem / "Data" / f"{stem}.gpkg"
        layers = pyogrio.list_layers(gpkg)[:, 0].tolist()
        assert layers == [stem[:-5], f"{stem[:-5]}_Boundary"]
        lu = gpd.read_file(gpkg, layer=layers[0])
        assert lu.crs.to_epsg() == 3035
        assert {"code_2018", "class_2018"} <= set(lu.columns)
        assert (lu["class_2018"] == lu["code_2018"].map(world_plan.UA_CLASSES)).all()
        codes = set(lu["code_2018"])
        assert {"11100", "11210", "12100", "12220", "14100", "50000"} <= codes   # a plausible city
        assert set(truth["rich_codes"]) & codes and set(truth["poor_codes"]) & codes
        # the land use tiles the boundary: no gaps, no overlaps
        boundary = gpd.read_file(gpkg, layer=layers[1]).geometry.union_all()
        assert lu.area.sum() == pytest.approx(boundary.area, rel=2e-3)
        assert lu.geometry.union_all().area == pytest.approx(lu.area.sum(), rel=1e-4)   # slivers only


def test_census_schema_and_planted_income(world):
    cfg, _, data, truth = world
    path = data / cfg.ses.census_file
    assert pyogrio.list_layers(path)[:, 0].tolist() == ["carreaux_200m_met"]
    census = gpd.read_file(path)
    assert [c for c in census.columns if c != "geometry"] == ["idcar_200m", "ind", "men", "ind_snv"]
    assert census.crs.to_epsg() == 3035 and (census["ind"] >= 1).all()   # no empty cells listed
    for cid, geom in zip(census["idcar_200m"], census.geometry):
        assert geom.equals(grid.cell_box(cid))
    # income follows land-use composition: shares measured here independently with an overlay
    lu = pd.concat([urban_atlas.read_urban_atlas(data / cfg.ses.ua_dir, c)[0] for c in cfg.ses.world.cities])
    pieces = gpd.overlay(census[["idcar_200m", "geometry"]], gpd.GeoDataFrame(lu, crs=3035), how="intersection")
    pieces["share"] = pieces.area / 40000.0
    shares = pieces.pivot_table(index="idcar_200m", columns="ua_code", values="share", aggfunc="sum", fill_value=0)
    effect = sum(shares.get(c, 0.0) * e for c, e in truth["class_effects"].items())
    log_income = np.log(census.set_index("idcar_200m")["ind_snv"] / census.set_index("idcar_200m")["ind"])
    r = np.corrcoef(effect.reindex(log_income.index, fill_value=0.0), log_income)[0, 1]
    assert r > 0.6, r
    assert all(truth["class_effects"][c] > 0 for c in truth["rich_codes"])
    assert all(truth["class_effects"][c] < 0 for c in truth["poor_codes"])
    assert truth["seed"] == cfg.seed and truth["params"]["france"]["noise"] == cfg.ses.world.noise


def test_orthophotos_follow_the_land_use(world):
    cfg, _, data, _ = world
    tiles = ses_tiles.read_tile_index(data / cfg.ses.aerial_dir)
    assert tiles.crs.to_epsg() == 2154 and tiles.attrs["missing"] == 0
    assert all(re.fullmatch(r"\d\d-2021-\d{4}-\d{4}-LA93-4M00-E080\.(jp2|tif)", n) for n in tiles["NOM"])
    with rasterio.open(tiles["path"].iloc[0]) as src:
        assert src.crs.to_epsg() == 2154 and src.res == (4.0, 4.0) and src.count == 3
        assert src.bounds.right - src.bounds.left == cfg.ses.world.tile_size_m
    landuse, _ = urban_atlas.read_urban_atlas(data / cfg.ses.ua_dir, "Paris")
    colours = {}
    for code in ("50000", "14100", "12100"):
        cores = landuse[landuse["ua_code"] == code].buffer(-12)
        core = cores[~cores.is_empty].iloc[0]
        x, y = core.representative_point().coords[0]
        box = (x - 8, y - 8, x + 8, y + 8)
        hits = tiles[tiles.to_crs(3035).intersects(shapely.box(*box))]
        img = ses_extraction.read_cell(list(hits["path"]), box, 8)
        if ses_extraction.nodata_fraction(img) == 0:
            colours[code] = img.reshape(-1, 3).mean(axis=0)
    assert len(colours) >= 2
    if "50000" in colours:
        r, g, b = colours["50000"]
        assert b > r + 20 and b < 140          # dark blue water
    if "14100" in colours:
        r, g, b = colours["14100"]
        assert g > r + 20 and g > b + 20       # green park
    if "12100" in colours:
        r, g, b = colours["12100"]
        assert min(r, g, b) > 90                # bright roofs and yards


def test_rebuild_is_skipped_and_other_parameters_refused(world, monkeypatch, capsys):
    cfg, sets, data, _ = world
    argv = ["synth_france", "--config", str(ROOT / CONFIG), *set_args(sets)]
    monkeypatch.setattr(sys, "argv", argv)
    ses_world.main()
    assert "nothing to do" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [*argv, "--set", "ses.world.noise=0.5"])
    with pytest.raises(errors.StaleRun, match="overwrite=true"):
        ses_world.main()


def _extract(sets):
    proc = run(python("generate_fr_ua_aerial_data.py", "--config", CONFIG, *set_args(sets)), env={"OMP_NUM_THREADS": "1"},
               quiet=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_no_traceback(proc)
    return proc.stdout


def test_extraction_end_to_end_and_resume(world, tmp_path):
    cfg, sets, data, truth = world
    results = tmp_path / "results"
    sets = [*sets, f"paths.results={results}", "workers=2"]
    log = _extract(sets)
    index = gpd.read_file(results / "ses" / "cells.gpkg", layer="cells")
    assert {"cell_id", "city", "income", "path", "non_void", "geometry"} <= set(index.columns)
    assert index.crs.to_epsg() == 3035 and set(index["city"]) == {"Paris", "Lyon"}
    census = ses_census.read_census(data / cfg.ses.census_file)
    expected = census.set_index("cell_id")["income"]
    np.testing.assert_allclose(index["income"], expected.loc[index["cell_id"]].to_numpy())
    for cid, geom in zip(index["cell_id"], index.geometry):
        assert geom.equals(grid.cell_box(cid))
    # every cell's image exists at the configured size; void cells are those with > 1 % nodata
    fractions = []
    for rel in index["path"]:
        path = results / "ses" / rel
        assert path.name.startswith("FR_URBANATLAS_200m_CRS3035RES200mN")
        with Image.open(path) as im:
            assert im.size == (32, 32)
        fractions.append(ses_extraction.nodata_fraction(ses_extraction.read_png(path)))
    fractions = np.array(fractions)
    assert (index["non_void"].to_numpy() == (fractions <= cfg.ses.max_nodata)).all()
    assert (~index["non_void"]).sum() >= 1 and index["non_void"].sum() > len(index) / 2
    assert (results / "ses" / "extract_config.yaml").is_file()
    # the file or layer used for each role, printed and recorded in the run stamp
    used = json.loads((results / "ses" / ses_extraction.STAMP).read_text())["settings"]["used"]
    assert used["census"] == str(data / cfg.ses.census_file) and f"census grid {data / cfg.ses.census_file}" in log
    for city in ("Paris", "Lyon"):
        assert used["urban_atlas"][city]["boundary"].endswith("_Boundary") and f"{city}: Urban Atlas land use" in log
    # a re-run reads no tile again and leaves the images untouched
    stamps = {p: p.stat().st_mtime_ns for p in (results / "ses" / "imagery").rglob("*.png")}
    log = _extract(sets)
    assert f"0 extracted, {len(index)} already there" in log
    assert stamps == {p: p.stat().st_mtime_ns for p in (results / "ses" / "imagery").rglob("*.png")}
    again = gpd.read_file(results / "ses" / "cells.gpkg", layer="cells")
    assert again["non_void"].tolist() == index["non_void"].tolist()


def test_blocks_mode_withholds_whole_blocks_near_the_asked_share():
    city = world_plan.plan_city("Paris", 0, 2400.0, 0)
    _, truth = world_plan.census_for_city(city, 0.3, 0)
    ids = truth["cell_id"]
    blocks = pd.Series(grid.block_ids(ids, 400))
    for seed in (0, 1):
        withheld = world_plan.withheld_cells(city, ids, 0.2, seed, "blocks", 400)
        per_block = pd.Series(withheld).groupby(blocks).agg(["all", "any"])
        assert (per_block["all"] == per_block["any"]).all()  # a block is withheld whole or not at all
        assert per_block["all"].sum() >= 3
        largest = blocks.value_counts().max()  # the draw stops at the block that comes closest to the share
        assert abs(withheld.sum() - 0.2 * len(ids)) <= largest / 2
    assert not np.array_equal(world_plan.withheld_cells(city, ids, 0.2, 0, "blocks", 400),
                              world_plan.withheld_cells(city, ids, 0.2, 1, "blocks", 400))
    # random mode is the draw of worlds made before the blocks mode existed
    old = world_plan.city_rng(0, "Paris", "withhold").random(len(ids)) < 0.2
    assert np.array_equal(world_plan.withheld_cells(city, ids, 0.2, 0, "random"), old)
    assert not world_plan.withheld_cells(city, ids, 0.0, 0, "blocks", 400).any()
    with pytest.raises(errors.ConfigError, match="withhold_mode"):
        world_plan.withheld_cells(city, ids, 0.2, 0, "rings", 400)


# --- ses.world.structure: income planted in the houses' arrangement, at equal colour statistics ---------

def _house_patches(code: str, n: int = 60, px: int = 64, turn_deg: float = 1.7):
    """``n`` 200 m cells of pure ``code`` drawn with structure on, sampled at ``px`` pixels on a grid turned
    by ``turn_deg`` (Lambert-93 tiles are turned against the EPSG:3035 lattice): (uint8 [n, 3, px, px],
    arranged flags)."""
    import torch

    from urbanlens.ses import world_structure
    g = (np.arange(px) + 0.5) * world_structure.CELL_M / px - world_structure.CELL_M / 2
    a, b = np.meshgrid(g, -g)
    t = np.radians(turn_deg)
    imgs, flags = [], []
    for k in range(n):
        cx, cy = 20_000 + k % 12, 15_000 + k // 12
        x = (cx + 0.5) * world_structure.CELL_M + np.cos(t) * a - np.sin(t) * b
        y = (cy + 0.5) * world_structure.CELL_M + np.sin(t) * a + np.cos(t) * b
        rgb = world_structure.redraw_houses(np.zeros((px * px, 3), np.uint8), np.full(px * px, code),
                                            x.ravel(), y.ravel(), 1.0, seed=0)
        imgs.append(torch.from_numpy(rgb.reshape(px, px, 3).transpose(2, 0, 1).copy()))
        flags.append(bool(world_structure.arranged(cx, cy, 0)))
    return torch.stack(imgs), np.array(flags)


@pytest.mark.parametrize("code", ["11230", "11240"])
def test_structure_is_invisible_to_colour_statistics_but_not_to_arrangement(code):
    """Arranged and scattered cells of the same class: no baseline feature (colour statistics, gradients,
    random 3x3 filters) tells them apart beyond what ~300 non-constant features give by chance, while the lattice does
    (an arranged cell's image correlates with itself shifted by one lot, a scattered one's much less)."""
    from scipy import stats

    from urbanlens.core import baseline
    from urbanlens.ses import world_structure
    x, arranged = _house_patches(code)
    assert 15 < arranged.sum() < 45
    f = baseline.features(x.split(30), baseline.draw_filters(x, seed=0))
    t = stats.ttest_ind(f[arranged], f[~arranged], equal_var=False).statistic
    t = t[np.isfinite(t)]
    assert len(t) > 250 and np.abs(t).max() < 4.5, np.abs(t).max()   # null max of ~300 |t| at 58 dof: ~3.4
    lag = round(world_structure.LOTS[code][0] / world_structure.CELL_M * x.shape[-1])
    grey = x.float().mean(1).numpy()
    corr = np.array([np.corrcoef(g[:, :-lag].ravel(), g[:, lag:].ravel())[0, 1] for g in grey])
    gap = corr[arranged].mean() - corr[~arranged].mean()
    assert gap > 5 * np.hypot(corr[arranged].std() / np.sqrt(arranged.sum()),
                              corr[~arranged].std() / np.sqrt((~arranged).sum())), (gap, corr)


def test_structure_plants_income_in_arrangement(tmp_path):
    """With ses.world.structure = 1, composition no longer sets income; among cells of mostly houses,
    arranged ones earn more than scattered ones as planted; ses_truth.json records the component."""
    cfg, _ = tiny_config(tmp_path / "data", extra=["ses.world.structure=1", "ses.world.cities=[Paris]"])
    city = world_plan.plan_city("Paris", 0, float(cfg.ses.world.city_size_m), cfg.seed)
    _, truth = world_plan.census_for_city(city, float(cfg.ses.world.noise), cfg.seed, 0.0, 1.0)
    houses = truth.get("share_11230", 0.0) + truth.get("share_11240", 0.0)
    mostly = houses > 0.3
    li = np.log(truth["income"])
    assert mostly.sum() >= 6 and truth.loc[mostly, "arranged"].nunique() == 2
    assert li[mostly & truth["arranged"]].mean() - li[mostly & ~truth["arranged"]].mean() > 1.0
    record = ses_world.build_world(cfg, progress=False)
    assert record["structure"]["strength"] == 1.0 and record["structure"]["classes"] == ["11230", "11240"]
    assert record["cities"]["Paris"]["arranged_cells"] == int(truth["arranged"].sum())
    assert "structure" not in ses_world.build_world(tiny_config(tmp_path / "plain")[0], progress=False)


def test_structure_is_learnable_where_the_baseline_reads_nothing():
    """On the same 300 cells of houses (200 to fit, 100 held out), a four-layer CNN trained for a few
    epochs tells arranged from scattered cells, while the project's baseline on the same split does not."""
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from urbanlens.core import baseline
    x, arranged = _house_patches("11230", n=300)
    fit, held = np.arange(200), np.arange(200, 300)
    filters = baseline.draw_filters(x[fit], seed=0)
    f = baseline.features(x.split(50), filters)
    base = baseline.fit_predict(f[fit], arranged[fit].astype(int), f[held], 2)
    base_auc = roc_auc_score(arranged[held], base[:, 1] - base[:, 0])
    torch.manual_seed(0)
    z = x.float() / 255
    z = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True)
    block = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o),  # noqa: E731
                                             torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    net = torch.nn.Sequential(block(3, 16), block(16, 32), block(32, 48), block(48, 64),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(net.parameters(), 2e-3)
    y = torch.as_tensor(arranged.astype(int))
    for _ in range(8):
        net.train()
        for b in torch.as_tensor(fit)[torch.randperm(len(fit))].split(16):
            loss = F.cross_entropy(net(z[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        cnn = F.log_softmax(net(z[held]), 1)[:, 1].numpy()
    cnn_auc = roc_auc_score(arranged[held], cnn)
    print("held-out AUC arranged vs scattered: CNN", cnn_auc, "baseline", base_auc)
    assert cnn_auc > 0.9 and base_auc < 0.75, (cnn_auc, base_auc)


def test_house_share_turns_blocks_into_houses_and_zero_keeps_the_plan():
    """ses.world.house_share redraws that share of the blocks inside the rural edge as houses, from a random
    stream of its own: the geometry, the rural ring and every other block keep their plan; 0 is the plan."""
    plain = world_plan.plan_city("Paris", 0, 2400.0, 0)
    assert world_plan.plan_city("Paris", 0, 2400.0, 0, 0.0).landuse.equals(plain.landuse)
    more = world_plan.plan_city("Paris", 0, 2400.0, 0, 0.7).landuse
    assert more.geometry.geom_equals_exact(plain.landuse.geometry, 0).all()
    changed = more["code_2018"] != plain.landuse["code_2018"]
    assert changed.sum() > 20 and more.loc[changed, "code_2018"].isin(["11230", "11240"]).all()
    assert more["class_2018"].equals(more["code_2018"].map(world_plan.UA_CLASSES))
    rural = plain.landuse["code_2018"].isin(["21000", "31000", "23000", "12210", "12220", "12230", "50000"])
    assert not changed[rural].any()
    area = lambda lu: lu.area[lu["code_2018"].isin(["11230", "11240"])].sum() / lu.area.sum()  # noqa: E731
    assert area(more) > area(plain.landuse) + 0.2
