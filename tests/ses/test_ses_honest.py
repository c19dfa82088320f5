"""Honest SES numbers: a bootstrap of spatial blocks, a permutation null of the AUC, the baseline on
exactly the CNN's folds, and the metrics.json entries built from them."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from urbanlens.core import baseline
from urbanlens.ses import baselines, findings, folds, metrics, results, spatial_folds, zonal


def _ids(n_side: int, x0: int = 3_700_000, y0: int = 2_800_000) -> list[str]:
    """INSPIRE ids of an n_side x n_side square of 200 m cells."""
    return [f"CRS3035RES200mN{y0 + 200 * r}E{x0 + 200 * c}" for r in range(n_side) for c in range(n_side)]


def _log_probs(y, signal: float, rng) -> np.ndarray:
    """Binomial class distributions whose success probability follows y with ``signal`` (0: noise)."""
    from math import comb

    s = np.clip(0.5 + signal * (np.asarray(y) / 4 - 0.5) + rng.normal(0, 0.15, len(y)), 0.01, 0.99)
    p = np.stack([comb(4, k) * s ** k * (1 - s) ** (4 - k) for k in range(5)], 1)
    return np.log(p)


def test_fast_scores_equal_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(3, 120))
        y, lp = rng.integers(0, 5, n), np.log(rng.dirichlet(np.ones(5), n))
        full = metrics.ses_metrics(y, lp)
        assert np.allclose(metrics.interval_scores(y, lp), [full[k] for k in metrics.INTERVAL_METRICS],
                           atol=1e-12, equal_nan=True)


def test_block_units_are_named_and_counted():
    ids = _ids(10)                                    # 2 km square: 4 blocks of 1 km, 100 cells
    blocks = metrics.bootstrap_units(ids, "blocks", 1000.0)
    assert len(set(blocks)) == 4 and pd.Series(blocks).value_counts().eq(25).all()
    assert len(set(metrics.bootstrap_units(ids, "cells", 1000.0))) == 100
    draws = metrics.bootstrap_draws(blocks, 50, seed=1)
    assert all(len(d) % 25 == 0 and len(d) == 100 for d in draws)          # whole blocks, as many as there are
    for d in draws:                                                        # a drawn block comes whole
        drawn = pd.Series(blocks[d]).value_counts()
        assert (drawn % 25 == 0).all()
    frame = metrics.interval_frame("blocks", 4, 1000.0)
    assert frame["units"] == 4 and frame["block_m"] == 1000.0 and "fewer than 5" in frame["note"]
    assert "note" not in metrics.interval_frame("cells", 100, None) and metrics.interval_frame("cells", 100, 1000.0)["block_m"] is None


def test_block_bootstrap_is_wider_than_cells_when_blocks_share_their_error_and_stays_in_range():
    rng = np.random.default_rng(0)
    ids = _ids(30)                                    # 900 cells, 36 blocks of 1 km
    blocks = metrics.bootstrap_units(ids, "blocks", 1000.0)
    y = rng.integers(0, 5, len(ids))
    names, inv = np.unique(blocks, return_inverse=True)
    shift = rng.normal(0, 1.5, len(names))[inv]      # a whole block read too rich or too poor
    lp = _log_probs(np.clip(y + shift, 0, 4), 0.8, rng)
    width = {}
    for unit in ("blocks", "cells"):
        units = metrics.bootstrap_units(ids, unit, 1000.0)
        b = metrics.paired_bootstrap(y, {"m": lp}, metrics.bootstrap_draws(units, 200, 0))["m"]
        for k, (lo_r, hi_r) in metrics.RANGES.items():
            assert lo_r <= b[k]["lo"] <= b[k]["value"] <= b[k]["hi"] <= hi_r, (unit, k)
        width[unit] = b["auc_poor_rich"]["hi"] - b["auc_poor_rich"]["lo"]
    assert width["blocks"] > 1.3 * width["cells"]
    # a near-perfect AUC: the percentile interval cannot pass 1 (a normal interval would)
    perfect = _log_probs(y, 1.6, np.random.default_rng(1))
    b = metrics.paired_bootstrap(y, {"m": perfect}, metrics.bootstrap_draws(blocks, 200, 0))["m"]["auc_poor_rich"]
    assert b["value"] > 0.97 and b["hi"] <= 1.0


def test_paired_gain_is_the_difference_on_the_same_resamples():
    rng = np.random.default_rng(2)
    ids = _ids(20)
    y = rng.integers(0, 5, len(ids))
    good, weak = _log_probs(y, 0.5, rng), _log_probs(y, 0.25, rng)
    draws = metrics.bootstrap_draws(metrics.bootstrap_units(ids, "blocks", 1000.0), 200, 0)
    b = metrics.paired_bootstrap(y, {"cnn": good, "baseline": weak}, draws)
    g = b["gain"]["auc_poor_rich"]
    assert g["value"] == pytest.approx(b["cnn"]["auc_poor_rich"]["value"] - b["baseline"]["auc_poor_rich"]["value"])
    assert 0 < g["lo"] < g["value"] < g["hi"]
    # paired: the gain's interval is narrower than the two unpaired intervals would suggest
    assert g["hi"] - g["lo"] < (b["cnn"]["auc_poor_rich"]["hi"] - b["cnn"]["auc_poor_rich"]["lo"]) + \
        (b["baseline"]["auc_poor_rich"]["hi"] - b["baseline"]["auc_poor_rich"]["lo"])
    same = metrics.paired_bootstrap(y, {"cnn": good, "baseline": good}, draws)["gain"]
    assert all(v["value"] == v["lo"] == v["hi"] == 0 for v in same.values())


def test_permutation_p_planted_signal_and_noise():
    y = np.repeat(np.arange(5), 20)
    planted = [metrics.permutation_p(y, _log_probs(y, 0.6, np.random.default_rng(s)), 500, s) for s in range(10)]
    assert max(planted) < 0.01
    noise = np.array([metrics.permutation_p(y, _log_probs(y, 0.0, np.random.default_rng(100 + s)), 200, s)
                      for s in range(300)])
    assert stats.kstest(noise, "uniform").pvalue > 0.01           # roughly uniform over many seeds
    assert 0.02 < np.mean(noise <= 0.05) < 0.09
    assert metrics.permutation_entry(0.2)["chance"] and "not distinguishable from chance" in metrics.permutation_entry(0.2)["note"]
    assert metrics.permutation_entry(0.01) == {"p_value": 0.01, "chance": False}


def test_baseline_never_sees_a_test_cell(monkeypatch):
    """Image i is filled with value i, so whatever reaches the baseline names its cells."""
    n = 60
    images = torch.arange(n, dtype=torch.float32).div(255).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    labels = np.arange(n) % 5
    splits = folds.stratified_folds(labels, 3, 0.25, seed=4)
    seen = []
    draw = baseline.draw_filters

    def spy_draw(x, *a, seed=0, **k):
        seen.append(("filters", set(torch.round(x[:, 0, 0, 0] * 255).long().tolist()), seed))
        return draw(x, *a, n_filters=4, seed=seed, **k)

    def spy_fit(x_train, y_train, x_test, classes, seed=0):
        seen.append(("fit", set(np.round(x_train[:, 0] * 255).astype(int).tolist()), seed))
        seen.append(("test", set(np.round(x_test[:, 0] * 255).astype(int).tolist()), seed))
        return np.log(np.full((len(x_test), classes), 1 / classes))  # the wiring, not the fit, is tested here

    monkeypatch.setattr(baseline, "draw_filters", spy_draw)
    monkeypatch.setattr(baseline, "fit_predict", spy_fit)
    seeds = [folds.fold_seed(0, "Paris", k) for k in range(3)]
    ids = np.array([f"c{i:03d}" for i in range(n)], dtype=object)
    preds = baselines.held_out_predictions(images, ids, labels, splits, seeds)
    for k, split in enumerate(splits):
        fit_cells = set(split["train"]) | set(split["val"])
        assert seen[3 * k] == ("filters", fit_cells, seeds[k])
        assert seen[3 * k + 1] == ("fit", fit_cells, seeds[k])
        assert seen[3 * k + 2] == ("test", set(split["test"]), seeds[k])
        assert not fit_cells & set(split["test"])
    # pooled as the CNN's: each cell once, from the fold that held it out, in predictions.csv's columns
    assert list(preds["cell_id"]) == sorted(ids) and preds.columns.tolist() == metrics.predictions_frame(
        ids[:1], 0, labels[:1], np.zeros((1, 5))).columns.tolist()
    held = {c: k for k, s in enumerate(splits) for c in ids[s["test"]]}
    assert all(held[c] == f for c, f in zip(preds["cell_id"], preds["fold"]))


def _preds(ids, y, lp, fold):
    return metrics.predictions_frame(ids, 0, y, lp).assign(fold=fold)


def test_comparison_entries_of_metrics_json():
    rng = np.random.default_rng(3)
    ids = np.array(_ids(14), dtype=object)            # 196 cells, 9 blocks (some partial)
    y = rng.integers(0, 5, len(ids))
    fold = np.arange(len(ids)) % 2
    cnn, base = _preds(ids, y, _log_probs(y, 0.9, rng), fold), _preds(ids, y, _log_probs(y, 0.0, rng), fold)
    per_fold = results._per_fold(cnn)
    out = results.comparison(cnn, per_fold, base.sample(frac=1, random_state=0), "blocks", 1000.0, seed=0,
                             resamples=200)
    iv = out["intervals"]
    assert (iv["unit"], iv["units"], iv["block_m"], iv["resamples"]) == ("blocks", 9, 1000.0, 200)
    assert set(iv["bootstrap"]) == set(metrics.INTERVAL_METRICS) and "note" not in iv
    assert set(out["baseline"]["intervals"]["bootstrap"]) == set(metrics.INTERVAL_METRICS)
    assert out["baseline"]["name"] == baseline.NAME and "auc_poor_rich" in out["baseline"]["pooled"]
    g = out["gain_over_baseline"]["auc_poor_rich"]
    assert set(g) == {"value", "lo", "hi"} and g["lo"] > 0
    perm = out["permutation"]
    assert perm["permutations"] == metrics.PERMUTATIONS
    assert not perm["auc_poor_rich"]["chance"] and perm["auc_poor_rich"]["p_value"] < 0.01
    assert set(perm["baseline_auc_poor_rich"]) >= {"p_value", "chance"}
    line = results.closing_line({**out, "baseline": out["baseline"]})
    assert "baseline" in line and "gain" in line and "9 blocks of 1000 m" in line and "permutation p" in line
    off = results.comparison(cnn, per_fold, None, "cells", None, resamples=50)
    assert off["baseline"] == {"name": None, "reason": "ses.baseline=false"} and "gain_over_baseline" not in off
    assert off["intervals"]["unit"] == "cells" and off["intervals"]["units"] == len(ids)
    at_chance = results.comparison(base, per_fold, None, "blocks", 1000.0, resamples=50)
    if at_chance["permutation"]["auc_poor_rich"]["chance"]:
        assert "not distinguishable from chance" in results.closing_line(at_chance)


def test_finding_resamples_blocks_and_says_chance():
    rng = np.random.default_rng(5)
    ids = np.array(_ids(14), dtype=object)
    y = np.arange(len(ids)) % 5
    stats_ = pd.DataFrame({"ua_code": ["1"], "ua_class": ["a"], "area": [1.0], "poor_score": [0.1],
                           "rich_score": [0.2], "poor_max": [0.5], "rich_max": [0.5]})
    skilled = _preds(ids, y, _log_probs(y, 0.4, rng), 0)
    f = findings.city_finding(skilled, stats_, unit="blocks", block_m=1000.0)
    assert f.meaningful and f.unit == "blocks" and f.units == 9 and f.p_value < 0.01 and 0 <= f.lo < f.hi <= 1
    noise = _preds(ids, y, _log_probs(y, 0.0, np.random.default_rng(6)), 0)
    n = findings.city_finding(noise, stats_, unit="blocks", block_m=1000.0)
    if n.p_value > 0.05:
        assert not n.meaningful and "not distinguishable from chance" in n.caveat
    few = findings.city_finding(skilled.iloc[:50], stats_, unit="blocks", block_m=1000.0)
    assert few.units < 5 and "fewer than 5" in findings.describe(few)


def test_landuse_interval_resamples_blocks():
    """Cells of one block share its level: resampling blocks gives a wider interval than cells."""
    rng = np.random.default_rng(0)
    ids = np.array(_ids(20), dtype=object)            # 400 cells, 16 blocks
    level = rng.normal(0, 1, 16)[np.unique(spatial_folds.block_ids(ids, 1000.0), return_inverse=True)[1]]
    stats_ = pd.DataFrame({"ua_code": "A", "ua_class": "a", "area": 1.0, "cell_id": ids,
                           "poor_score": level + rng.normal(0, 0.1, len(ids)), "rich_score": level})
    by = {u: zonal.landuse_summary(stats_, unit=u, block_m=1000.0).iloc[0] for u in ("blocks", "cells")}
    w = {u: r["poor_score_hi"] - r["poor_score_lo"] for u, r in by.items()}
    assert w["blocks"] > 2 * w["cells"] and by["blocks"]["poor_score_mean"] == by["cells"]["poor_score_mean"]
