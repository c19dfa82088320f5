"""predict_income.py on a synthetic city whose census withholds 40 % of the cells (ses.world.withhold): the
model trained on the census cells maps the withheld cells, and its map follows their planted income; each
census cell is scored by the fold model that did not train on it, the others by the mean of all folds,
and agreement.json reports the two kinds of cells apart; the GeoTIFF's pixels are the INSPIRE cells; a
model trained on other images is refused; shards merge to the unsharded table.

One city of 2.4 km at 4 m orthophotos (about 75 census cells, 50 withheld),
income without the noise field, ResNet-18 on 64 px cells: on fewer cells the model does not learn. Stages are called in process (their one-line errors are tested elsewhere)."""
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from scipy.stats import spearmanr

from urbanlens.core.config import load_config
from urbanlens.core.errors import ConfigError
from urbanlens.core.placement import Placement
from urbanlens.ses import agreement, grid, prediction
from urbanlens.ses import world as ses_world
from script_runner import run_in_process

ROOT = Path(__file__).resolve().parents[2]
CITY = "Paris"
CONFIG = "tests/conf/ses_predict.yaml"  # one 2.4 km city, 40 % of its cells withheld at random


def _sets(root: Path, extra=()) -> list[str]:
    return [f"paths.data={root / 'data'}", f"paths.results={root / 'results'}", *extra]


def _config(root: Path):
    return load_config(ROOT / CONFIG, _sets(root))


def stage(module: str, root: Path, *args: str, extra=()) -> None:
    """Run a stage's main() in this process, as its command line would (``world``: the synthetic world)."""
    run_in_process("urbanlens.ses.world" if module == "world" else module, ROOT / CONFIG, _sets(root, extra), *args)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_world")
    for module in ("world", "generate_fr_ua_aerial_data", "efficientnet_training"):
        stage(module, root)
    stage("predict_income", root, "--city", CITY)
    out = root / "results" / "ses" / CITY / "predicted"
    return root, out, gpd.read_file(out / "cells.gpkg", layer="cells")


def test_withheld_cells_are_mapped_and_follow_the_planted_income(predicted):
    root, _, table = predicted
    truth = pd.read_csv(root / "data" / ses_world.TRUTH_CELLS)
    withheld = truth[truth["withheld"]].set_index("cell_id")
    trained = gpd.read_file(root / "results" / "ses" / "cells.gpkg", layer="cells")
    assert len(withheld) >= 20 and not set(withheld.index) & set(trained["cell_id"])  # the training never saw them
    mapped = table.set_index("cell_id").reindex(withheld.index)
    assert mapped["expected_class"].notna().mean() > 0.9  # every withheld cell with imagery is scored
    assert mapped["census_income"].isna().all()  # ... and none has a census income
    ok = mapped["expected_class"].notna()
    rho, p = spearmanr(mapped.loc[ok, "expected_class"], withheld.loc[ok, "income"], alternative="greater")
    assert rho > 0 and p < 0.01, (rho, p, int(ok.sum()))
    probs = table[prediction.PROB_COLUMNS].dropna().to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    census = table[table["census_income"].notna()]
    assert set(census["cell_id"]) <= set(trained["cell_id"]) and census["observed_class"].between(0, 4).all()


def test_census_cells_are_scored_by_the_fold_that_did_not_train_on_them(predicted):
    root, _, table = predicted
    city_dir = root / "results" / "ses" / CITY
    folds = pd.read_csv(city_dir / "folds.csv")
    tested = folds[folds["part"] == "test"].set_index("cell_id")["fold"]
    held_out = pd.concat([pd.read_csv(city_dir / f"fold_{k}" / "predictions.csv") for k in (0, 1)]).set_index("cell_id")
    census = table[table["census_income"].notna() & table["non_void"]].set_index("cell_id")
    assert len(census) >= 30 and set(census.index) <= set(tested.index)
    expected = [f"out-of-fold (fold {tested[c]})" for c in census.index]
    assert census["scored_by"].tolist() == expected  # 2 folds: each census cell trained the other fold
    columns = ["expected_class", *prediction.PROB_COLUMNS]
    np.testing.assert_allclose(census[columns].to_numpy(float), held_out.loc[census.index, columns].to_numpy(float),
                               atol=1e-4)  # the tested fold's own prediction of the cell
    assert (census["fold_spread"] == 0).all()  # one model scored each


def test_uncensused_cells_get_the_mean_of_all_folds(predicted):
    root, _, table = predicted
    others = table[table["census_income"].isna() & table["non_void"]].head(6)
    assert len(others) == 6 and (others["scored_by"] == prediction.NOT_TRAINED).all()
    ses_dir = root / "results" / "ses"
    models, _ = prediction.load_fold_models(prediction.fold_checkpoints(ses_dir / CITY), _config(root), torch.device("cpu"))
    probs = prediction.score(models, [ses_dir / p for p in others["path"]], 64, Placement("cpu"), 8)
    assert np.isfinite(probs).all() and not np.allclose(probs[0], probs[1], atol=1e-3)  # the folds differ
    np.testing.assert_allclose(others[prediction.PROB_COLUMNS].to_numpy(float), probs.mean(axis=0), atol=1e-4)
    assert (table.loc[~table["non_void"].astype(bool), "scored_by"] == prediction.VOID).all()


def test_agreement_reports_withheld_and_out_of_fold_cells_apart(predicted):
    root, out, table = predicted
    report = json.loads((out / "agreement.json").read_text())
    withheld, oof = report["withheld"], report["census_out_of_fold"]
    truth = pd.read_csv(root / "data" / ses_world.TRUTH_CELLS).query("withheld").set_index("cell_id")["income"]
    rows = table[table["cell_id"].isin(truth.index) & table["expected_class"].notna()]
    rho, p, n = agreement.spearman(rows["expected_class"], rows["cell_id"].map(truth))
    assert (withheld["n"], withheld["rho"], withheld["truth"]) == (n, pytest.approx(rho), "planted income")
    census = table[table["scored_by"].str.startswith("out-of-fold")]
    assert oof["n"] == len(census) and oof["rho"] == pytest.approx(
        agreement.spearman(census["expected_class"], census["census_income"])[0])
    assert withheld["unit"] == oof["unit"] == "200 m cells" and "out-of-fold" in oof["cells"]
    for record in (withheld, oof):  # an interval over 1 km blocks, or a note that there are too few
        interval = record["interval"]
        assert (interval is None) == ("interval_note" in record)
        if interval:
            assert interval["resampled"] == "blocks" and interval["units"] >= agreement.MIN_UNITS
            assert -1 <= interval["lo"] <= record["rho"] <= interval["hi"] <= 1
    assert sum(report["cells_by_scoring"].values()) == len(table)


def test_geotiff_pixels_are_the_inspire_cells(predicted):
    _, out, table = predicted
    with rasterio.open(out / "expected_class.tif") as src:
        assert src.crs.to_epsg() == 3035 and src.res == (200.0, 200.0)
        assert src.transform.c % 200 == 0 and src.transform.f % 200 == 0
        band = src.read(1)
        e, n, _ = zip(*[grid.parse_inspire_id(c) for c in table["cell_id"]])
        rows, cols = rasterio.transform.rowcol(src.transform, np.add(e, 100), np.add(n, 100))
        assert src.descriptions[:2] == ("expected_class", "fold_spread")
    np.testing.assert_allclose(band[rows, cols], table["expected_class"].to_numpy(np.float32), rtol=1e-6)
    assert np.isfinite(band).sum() == table["expected_class"].notna().sum()  # no pixel outside the cells
    assert (out / "figures" / "predicted_map.png").is_file() and (out / "figures" / "observed_vs_predicted.png").is_file()


def test_maps_and_tables_open_styled(predicted):
    import sqlite3

    from urbanlens.core import gis_style

    root, out, table = predicted
    for tif in ("expected_class.tif", "income_class.tif"):
        with rasterio.open(out / tif) as src:
            assert src.overviews(1) and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert (out / tif).with_suffix(".qml").is_file()
    with rasterio.open(out / "income_class.tif") as src:
        classes, cmap = src.read(1), src.colormap(1)
    known = table["expected_class"].notna()
    assert sorted(set(classes.ravel()) - {255}) == sorted(set(np.round(table["expected_class"][known]).astype(int)))
    assert len({cmap[k] for k in range(5)}) == 5 and len(gis_style.read_category_names(out / "income_class.tif")) == 5
    for gpkg, layer in ((out / "cells.gpkg", "cells"), (root / "results" / "ses" / "cells.gpkg", "cells")):
        with sqlite3.connect(gpkg) as con:
            assert con.execute("SELECT f_table_name, useAsDefault FROM layer_styles").fetchall() == [(layer, 1)]


def test_model_card_is_beside_the_city_models(predicted):
    root = predicted[0]
    city_dir = root / "results" / "ses" / CITY
    metrics = json.loads((city_dir / "metrics.json").read_text())
    card = (city_dir / "MODEL_CARD.md").read_text()
    auc = metrics["intervals"]["bootstrap"]["auc_poor_rich"]
    assert f"auc_poor_rich: {auc['value']:.3f} (95% CI {auc['lo']:.3f} to {auc['hi']:.3f})" in card
    assert f"{metrics['n_cells']} cells of {CITY}; cross-validation `{metrics['cv']}`" in card
    assert "synthetic world" in card.split("## Known limits")[1]


def test_model_of_other_images_is_refused(predicted):
    root, _, _ = predicted
    with pytest.raises(ConfigError, match=r"ses\.cell_px: model 64, images 32"):
        stage("predict_income", root, "--city", CITY, extra=["ses.cell_px=32"])


def test_shards_merge_to_the_unsharded_table(predicted):
    root, out, table = predicted
    for i in (1, 2):
        stage("predict_income", root, "--city", CITY, "--shard", f"{i}/2")
    stage("predict_income", root, "--city", CITY, "--merge", "2")  # batches differ: float32 sums to ~1e-6
    merged = gpd.read_file(out / "cells.gpkg", layer="cells")
    pd.testing.assert_frame_equal(pd.DataFrame(merged.drop(columns="geometry")),
                                  pd.DataFrame(table.drop(columns="geometry")), rtol=1e-4, atol=1e-4)
    assert merged.geometry.equals(table.geometry)


def test_scoring_plan_leaves_out_the_folds_that_trained_on_a_cell():
    trained = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 1, 0], [1, 1, 0, 1, 0]], bool)  # 3 folds, 5 cells
    trained[:, 4] = [1, 0, 0]
    needs, labels = prediction.scoring_plan(trained)
    assert labels == ["out-of-fold (fold 1)", "out-of-fold (fold 0)", prediction.NOT_TRAINED, prediction.IN_SAMPLE,
                      "out-of-fold (folds 1, 2)"]
    assert needs.T.tolist() == [[0, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1]]
    assert prediction.is_out_of_fold(labels).tolist() == [True, True, False, False, True]


def test_summarise_averages_only_the_models_that_scored_a_cell():
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 3))
    probs[0, 0] = np.nan  # cell 0: fold 1 only
    table = prediction.summarise(probs)
    np.testing.assert_allclose(table.loc[0, prediction.PROB_COLUMNS].to_numpy(float), probs[1, 0])
    np.testing.assert_allclose(table.loc[1:, prediction.PROB_COLUMNS].to_numpy(float), probs[:, 1:].mean(axis=0))
    assert table.loc[0, "fold_spread"] == 0 and (table.loc[1:, "fold_spread"] > 0).all()
    np.testing.assert_allclose(table["expected_class"], table[prediction.PROB_COLUMNS].to_numpy() @ np.arange(5))


def test_agreement_interval_resamples_blocks_and_needs_enough_of_them():
    rng = np.random.default_rng(1)
    ids = [grid.inspire_id(4_000_000 + 200 * i, 3_000_000 + 200 * j) for i in range(10) for j in range(10)]
    income = rng.lognormal(10, 0.5, len(ids))
    expected = np.log(income) + rng.normal(0, 0.3, len(ids))
    record = agreement.agreement(expected, income, ids, 1000, "some cells", "income")
    interval = record["interval"]  # 100 cells in 4 blocks of 1 km: too few for an interval
    assert interval is None and "4 blocks" in record["interval_note"] and record["n"] == 100
    record = agreement.agreement(expected, income, ids, 400, "some cells", "income")  # 25 blocks
    interval = record["interval"]
    assert interval["units"] == 25 and interval["resampled"] == "blocks" and interval["block_m"] == 400
    assert 0.5 < interval["lo"] < record["rho"] < interval["hi"] <= 1
    assert record["p_one_sided"] < 1e-10 and "100 cells" in agreement.describe(record)
