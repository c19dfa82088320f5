"""Spatial and city folds: blocks go whole to one fold, the buffer keeps training away from test cells,
classes stay balanced as far as blocks allow, and the paper's stratified folds are unchanged."""
import numpy as np
import pandas as pd
import pytest

from urbanlens.core import config
from urbanlens.core.errors import ConfigError, DataError
from urbanlens.ses import folds, grid, metrics, spatial_folds, zonal


def square_city(n=15, x0=3_700_000, y0=2_800_000, seed=0):
    """n x n cells of 200 m, incomes rising to the east (so neighbours share quintiles), their labels."""
    ex, ny = np.meshgrid(x0 + 200 * np.arange(n), y0 + 200 * np.arange(n))
    ids = [grid.inspire_id(e, y) for e, y in zip(ex.ravel(), ny.ravel())]
    income = ex.ravel() + np.random.default_rng(seed).normal(0, 300, n * n)
    return np.array(ids, dtype=object), pd.qcut(income, 5, labels=False).astype(int)


def test_blocks_are_whole_and_parts_disjoint():
    ids, labels = square_city()
    splits, blocks = spatial_folds.spatial_folds(ids, labels, 3, 0.25, 1000, 0, seed=1)
    assert len(np.unique(blocks)) == 9  # 3 km square, 1 km blocks (on the grid: origin is a multiple of 1 km)
    tested = np.concatenate([s["test"] for s in splits])
    assert sorted(tested) == list(range(len(ids)))  # every cell is tested once
    for s in splits:
        parts = [set(s[p]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert len(s["val"]) > 0 and len(parts[0] | parts[1] | parts[2]) == len(ids)  # no buffer: all used
        assert set(blocks[s["test"]]).isdisjoint(blocks[np.r_[s["train"], s["val"]]])
        inside = set(blocks[s["test"]])  # a test block is tested whole
        assert not inside & set(blocks[np.setdiff1d(np.arange(len(ids)), s["test"])])


def test_buffer_keeps_training_away_from_test_cells():
    ids, labels = square_city()
    splits, _ = spatial_folds.spatial_folds(ids, labels, 3, 0.25, 1000, 400, seed=1)
    xy = spatial_folds.cell_origins(ids)
    for s in splits:
        test = xy[s["test"]]
        for part in ("train", "val"):
            gap = np.abs(xy[s[part]][:, None, :] - test[None]).max(-1).min(1) - 200  # edge to edge
            assert (gap > 400).all(), part
        dropped = len(ids) - sum(len(s[p]) for p in ("train", "val", "test"))
        assert dropped > 0
        near = np.abs(xy[:, None, :] - test[None]).max(-1).min(1) - 200
        kept = np.zeros(len(ids), bool)
        kept[np.concatenate([s["train"], s["val"]])] = True
        assert (kept == ((near > 400) & ~np.isin(np.arange(len(ids)), s["test"]))).all()  # only those dropped


def test_folds_balanced_over_quintiles_as_blocks_allow():
    """Incomes rise to the east, so a block holds one or two quintiles; the greedy assignment still
    gives each fold every quintile, far closer to its share than putting block columns in folds."""
    ids, labels = square_city(n=20)
    fold = spatial_folds.assign_blocks(spatial_folds.block_ids(ids, 1000), labels, 2, seed=0)
    counts = np.array([np.bincount(labels[fold == k], minlength=5) for k in range(2)])
    target = np.bincount(labels, minlength=5) / 2
    assert (counts > 0).all()
    assert np.abs(counts - target).max() <= 0.35 * target.max(), counts
    again = spatial_folds.assign_blocks(spatial_folds.block_ids(ids, 1000), labels, 2, seed=0)
    np.testing.assert_array_equal(fold, again)


def test_stratified_folds_unchanged_and_csv_names_scheme():
    ids, labels = square_city()
    tc = config.load_config("configs/ses.yaml").ses.train
    splits, blocks = spatial_folds.make_splits(tc, 3, ids, labels, None, "Paris", "t")
    ref = folds.stratified_folds(labels, tc.folds, tc.val_share, 3)
    for a, b in zip(splits, ref):
        for p in ("train", "val", "test"):
            np.testing.assert_array_equal(a[p], b[p])
    frame = folds.folds_frame(ids, splits, tc.cv, blocks)
    assert set(frame["scheme"]) == {"stratified"} and list(frame.columns) == ["fold", "cell_id", "part", "scheme", "block"]
    tc = config.load_config("configs/ses_demo.yaml").ses.train
    assert tc.cv == "spatial"
    splits, blocks = spatial_folds.make_splits(tc, 3, ids, labels, None, "Paris", "t")
    frame = folds.folds_frame(ids, splits, tc.cv, blocks)
    assert frame.groupby("cell_id")["block"].nunique().max() == 1 and frame["block"].str.startswith("E").all()


def test_leave_city_out():
    a, la = square_city(n=6)
    b, lb = square_city(n=6, x0=3_800_000)
    cities = np.array(["A"] * len(a) + ["B"] * len(b), dtype=object)
    s = spatial_folds.leave_city_out(cities, np.r_[la, lb], "B", 0.25, 0)
    assert set(cities[s["test"]]) == {"B"} and set(cities[np.r_[s["train"], s["val"]]]) == {"A"}
    with pytest.raises(DataError, match="at least 2 cities"):
        spatial_folds.leave_city_out(cities[: len(a)], la, "A", 0.25, 0)


def test_cv_choice_checked_at_load():
    with pytest.raises(ConfigError, match="stratified, spatial, city"):
        config.load_config("configs/ses.yaml", ["ses.train.cv=random"])


def test_intervals_hold_the_estimate():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 30)
    lp = np.log(np.eye(5)[np.clip(y + rng.integers(-1, 2, len(y)), 0, 4)] * 0.8 + 0.04)
    ids = [f"CRS3035RES200mN{2_800_000 + 200 * (i // 15)}E{3_700_000 + 200 * (i % 15)}" for i in range(len(y))]
    units = metrics.bootstrap_units(ids, "blocks", 1000.0)
    two = [{"auc_poor_rich": 0.8, "kappa_quadratic": 0.6, "spearman": 0.7},
           {"auc_poor_rich": 0.9, "kappa_quadratic": 0.7, "spearman": 0.8}]
    iv = metrics.intervals(two, y, lp, units, "blocks", 1000.0)
    assert (iv["unit"], iv["units"], iv["block_m"]) == ("blocks", len(set(units)), 1000.0) and iv["units"] == 6
    assert "note" not in iv and "cell_bootstrap" not in iv
    # two folds: no interval over folds (a t-interval would be [-1.28, 2.82]-like), the values and why
    f = iv["over_folds"]
    assert f["values"]["auc_poor_rich"] == [0.8, 0.9] and "fewer than 5 folds" in f["note"] and "lo" not in f
    for k, b in iv["bootstrap"].items():
        assert b["lo"] <= b["value"] <= b["hi"] and b["hi"] - b["lo"] > 0, k
    # from five folds an interval, clipped to the metric's range
    wide = [{"auc_poor_rich": v, "kappa_quadratic": v, "spearman": v} for v in (0.2, 0.99, 0.5, 1.0, 0.1)]
    f5 = metrics.intervals(wide, y, lp, units, "blocks", 1000.0)["over_folds"]["auc_poor_rich"]
    assert 0.0 <= f5["lo"] < f5["mean"] < f5["hi"] <= 1.0 and f5["hi"] == 1.0


def test_landuse_interval_resamples_cells():
    """Pieces of one cell share its map: with many pieces a cell, the cell bootstrap interval is wider
    than a t-interval over pieces, which counts every piece as independent."""
    rng = np.random.default_rng(0)
    cell_level = rng.normal(0, 1, 20)
    stats = pd.DataFrame({"ua_code": "A", "ua_class": "a", "area": 1.0, "cell_id": np.repeat(np.arange(20), 10),
                          "poor_score": np.repeat(cell_level, 10) + rng.normal(0, 0.01, 200),
                          "rich_score": np.repeat(cell_level, 10)})
    row = zonal.landuse_summary(stats).iloc[0]
    _, lo, hi = zonal.mean_interval(stats["poor_score"])
    assert row["poor_score_lo"] < row["poor_score_mean"] < row["poor_score_hi"]
    assert row["poor_score_hi"] - row["poor_score_lo"] > 2 * (hi - lo)
