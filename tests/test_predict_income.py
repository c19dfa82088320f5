"""predict_income.py on a synthetic city whose census withholds 40 % of the cells (france.withhold): the
model trained on the census cells maps the withheld cells, and its map follows their planted income; the
GeoTIFF's pixels are the INSPIRE cells; a model trained on other images is refused; shards merge to the
unsharded table.

One city of 2.4 km at 4 m orthophotos (about 75 census cells, 50 withheld),
income without the noise field, ResNet-18 on 64 px cells: on fewer cells the model does not learn. Stages are called in process (their one-line errors are tested elsewhere)."""
import importlib
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from scipy.stats import spearmanr

from urbanlens.core.errors import ConfigError
from urbanlens.ses import grid, prediction
from urbanlens.ses import world as ses_world

ROOT = Path(__file__).resolve().parents[1]
CITY = "Paris"
SETTINGS = ["france.cities=[Paris]", "ses.cities=[Paris]", "france.city_size_m=2400", "france.resolution_m=4.0",
            "france.withhold=0.4", "france.noise=0.0", "ses_model.backbone=resnet18", "ses_model.input_size=64",
            "ses_train.cv=stratified", "ses_train.epochs=8", "ses_train.checkpoint_every=100", "workers=0",
            "device=cpu"]


def stage(module: str, root: Path, *args: str, extra=()) -> None:
    """Run a stage's main() in this process, as its command line would."""
    sets = [f"paths.data={root / 'data'}", f"paths.results={root / 'results'}", *SETTINGS, *extra]
    argv = [module, "--config", str(ROOT / "configs" / "ses_demo.yaml"), *args,
            *[a for s in sets for a in ("--set", s)]]
    old = sys.argv
    sys.argv = argv
    try:
        mod = ses_world if module == "world" else importlib.import_module(module)
        mod.main()
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_world")
    sys.path.insert(0, str(ROOT))  # the top-level scripts
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
