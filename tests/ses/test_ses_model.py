"""The SES model: binomial head, quintile labels, metrics, model shape, image loading, a tiny training run."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from urbanlens.core import backbones, config, errors
from urbanlens.core.placement import Placement
from urbanlens.ses import data as ses_data
from urbanlens.ses import fitting
from urbanlens.ses import folds as ses_folds
from urbanlens.ses import metrics as ses_metrics
from urbanlens.ses import model as ses_model


def small_cfg(**overrides):
    sets = [f"{k}={v}" for k, v in overrides.items()]
    return config.load_config(None, ["ses.model.pretrained=false", "ses.model.input_size=32", *sets])


# ----------------------------------------------------------------------------------------- binomial head

def test_binomial_head_is_a_distribution_matching_the_binomial_pmf():
    logit = torch.tensor([-30.0, -3.0, -0.4, 0.0, 0.7, 2.5, 30.0])
    lp = ses_model.binomial_log_probs(logit)
    assert lp.shape == (7, 5)
    assert torch.isfinite(lp).all()
    np.testing.assert_allclose(lp.exp().sum(1).numpy(), 1.0, atol=1e-6)
    p = torch.sigmoid(logit.double()).numpy()
    expected = stats.binom.pmf(np.arange(5)[None, :], 4, p[:, None])
    np.testing.assert_allclose(lp.exp().double().numpy(), expected, atol=1e-6)
    # a column logit [B, 1] gives the same as [B]
    torch.testing.assert_close(ses_model.binomial_log_probs(logit[:, None]), lp)


def test_binomial_head_gradients_are_finite_at_extreme_logits():
    logit = torch.tensor([-80.0, 80.0], requires_grad=True)
    loss = torch.nn.functional.nll_loss(ses_model.binomial_log_probs(logit), torch.tensor([4, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logit.grad).all()
    # the wrong extreme is pushed toward the right side
    assert logit.grad[0] < 0 < logit.grad[1]


def test_expected_class_is_four_p_for_the_binomial():
    logit = torch.tensor([-1.0, 0.0, 2.0])
    ec = ses_model.expected_class(ses_model.binomial_log_probs(logit).numpy())
    np.testing.assert_allclose(ec, 4 * torch.sigmoid(logit).numpy(), rtol=1e-5)


# ----------------------------------------------------------------------------------------- quintiles

def test_quintiles_have_equal_counts_and_follow_income_order():
    rng = np.random.default_rng(1)
    income = rng.lognormal(10, 0.5, size=103)
    q = ses_data.income_quintiles(income)
    counts = np.bincount(q, minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    order = np.argsort(income)
    assert np.all(np.diff(q[order]) >= 0)  # richer never gets a lower class
    assert q[np.argmin(income)] == 0 and q[np.argmax(income)] == 4


def test_quintiles_keep_ties_together_and_survive_heavy_ties():
    income = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 5], dtype=float)
    q = ses_data.income_quintiles(income)
    assert len(set(q[:6])) == 1  # equal incomes share a class
    assert np.all(np.diff(q) >= 0)
    assert q[-1] == 4 and q[0] < q[-1]
    assert np.all(ses_data.income_quintiles(np.full(7, 3.0)) == ses_data.income_quintiles(np.full(7, 3.0))[0])
    with pytest.raises(ValueError):
        ses_data.income_quintiles([1.0, np.nan, 2.0])


def test_quintile_edges_separate_classes():
    income = np.arange(20, dtype=float)
    q = ses_data.income_quintiles(income)
    edges = ses_data.quintile_edges(income, q)
    assert edges == [3.0, 7.0, 11.0, 15.0]


def test_stratified_folds_are_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(5), 12)
    folds = ses_folds.stratified_folds(labels, 2, 0.25, seed=3)
    assert len(folds) == 2
    tests = np.concatenate([f["test"] for f in folds])
    assert sorted(tests) == list(range(60))
    for f in folds:
        parts = [set(f["train"]), set(f["val"]), set(f["test"])]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert len(parts[0] | parts[1] | parts[2]) == 60
        assert np.all(np.bincount(labels[f["test"]], minlength=5) == 6)
        assert np.all(np.bincount(labels[f["val"]], minlength=5) >= 1)
    again = ses_folds.stratified_folds(labels, 2, 0.25, seed=3)
    assert all(np.array_equal(a["val"], b["val"]) for a, b in zip(folds, again))
    with pytest.raises(errors.DataError):
        ses_folds.stratified_folds(np.array([0, 1, 2, 3, 4, 4]), 2, 0.25, seed=0)


# ----------------------------------------------------------------------------------------- metrics

def _log_onehot(classes, eps=1e-4):
    p = np.full((len(classes), 5), eps)
    p[np.arange(len(classes)), classes] = 1 - 4 * eps
    return np.log(p)


def test_metrics_of_perfect_predictions():
    y = np.array([0, 1, 2, 3, 4] * 4)
    m = ses_metrics.ses_metrics(y, _log_onehot(y))
    assert m["accuracy"] == 1 and m["macro_f1"] == 1
    assert m["kappa_quadratic"] == pytest.approx(1.0)
    assert m["auc_poor_rich"] == 1.0
    assert m["spearman"] == pytest.approx(1.0)
    assert np.array_equal(m["confusion_matrix"], np.diag([4] * 5))
    assert "q5 richest" in m["classification_report"]
    assert set(ses_metrics.scalar_metrics(m)) == {"n", *ses_metrics.METRICS}


def test_metrics_of_reversed_and_partly_wrong_predictions():
    y = np.array([0, 1, 2, 3, 4] * 4)
    m = ses_metrics.ses_metrics(y, _log_onehot(4 - y))
    assert m["accuracy"] == pytest.approx(0.2)  # only the middle class is right
    assert m["auc_poor_rich"] == 0.0 and m["spearman"] == pytest.approx(-1.0)
    assert m["kappa_quadratic"] == pytest.approx(-1.0)
    # binomial outputs: the rich cell with logit 0 scores below the poor cell with logit 0.5 -> 1 of 16
    yb = np.array([0, 0, 0, 0, 4, 4, 4, 4])
    lp = ses_model.binomial_log_probs(torch.tensor([-3.0, -2.0, -1.0, 0.5, 0.0, 1.0, 2.0, 3.0])).numpy()
    assert ses_metrics.ses_metrics(yb, lp)["auc_poor_rich"] == pytest.approx(15 / 16)


def test_metrics_auc_is_nan_without_both_extremes():
    y = np.array([1, 2, 3, 4])
    m = ses_metrics.ses_metrics(y, _log_onehot(y))
    assert math.isnan(m["auc_poor_rich"]) and m["accuracy"] == 1


def test_summarize_folds_and_predictions_frame():
    s = ses_metrics.summarize_folds([{k: 0.6 for k in ses_metrics.METRICS}, {k: 0.8 for k in ses_metrics.METRICS}], [1.2, 0.9])
    assert s["best_fold"] == 1
    assert s["mean"]["auc_poor_rich"] == pytest.approx(0.7)
    assert s["std"]["auc_poor_rich"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    lp = ses_model.binomial_log_probs(torch.tensor([-2.0, 3.0])).numpy()
    df = ses_metrics.predictions_frame(["a", "b"], 1, [0, 4], lp)
    assert list(df.columns) == ["cell_id", "fold", "true_class", "pred_class", "expected_class",
                                "p_0", "p_1", "p_2", "p_3", "p_4"]
    assert df["pred_class"].tolist() == [0, 4]
    np.testing.assert_allclose(df[[f"p_{k}" for k in range(5)]].sum(axis=1), 1, atol=1e-6)


# ----------------------------------------------------------------------------------------- model, images

def test_ses_model_outputs_log_probs_and_exposes_last_conv_layer():
    model = ses_model.build_ses_model(small_cfg()).eval()
    assert model.fc.in_features == 1280 and model.fc.out_features == 1
    assert backbones.last_conv_layer(model) is model.features[-1]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out.exp().sum(1).numpy(), 1, atol=1e-5)


def test_resnet_backbone_and_offline_pretrained_error(tmp_path, monkeypatch):
    model = ses_model.build_ses_model(small_cfg(**{"ses.model.backbone": "resnet18"})).eval()
    assert backbones.last_conv_layer(model) is model.features[-1]
    assert model.fc.in_features == 512
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("URBANLENS_OFFLINE", "1")  # no download attempt from a test
    with pytest.raises(backbones.WeightsUnavailable, match="ses.model.weights_path"):
        ses_model.build_ses_model(small_cfg(**{"ses.model.pretrained": "true"}))


def test_load_cell_image_resizes_and_min_max_scales(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(40, 200, size=(20, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "c.png")
    x = ses_data.load_cell_image(tmp_path / "c.png", 20)
    assert x.shape == (3, 20, 20) and x.dtype == torch.float32
    assert x.min() == 0 and x.max() == 1
    expected = (arr.astype(float) - arr.min()) / (arr.max() - arr.min())
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert ses_data.load_cell_image(tmp_path / "c.png", 12).shape == (3, 12, 12)
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(tmp_path / "flat.png")
    assert ses_data.load_cell_image(tmp_path / "flat.png", 8).abs().sum() == 0
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(errors.DataError, match="bad.png"):
        ses_data.load_cell_image(tmp_path / "bad.png", 8)


def test_random_flips_only_flip_or_rotate():
    x = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).view(64, 3, 4, 4)
    y = ses_data.random_flips(x, torch.Generator().manual_seed(0))
    flips = [lambda a: a, lambda a: a.flip(-1), lambda a: a.flip(-2), lambda a: a.flip(-1).flip(-2)]
    seen = {next(i for i, f in enumerate(flips) if torch.equal(b, f(a))) for a, b in zip(x, y)}
    assert seen == {0, 1, 2, 3}
    dihedral = flips + [lambda a, f=f: f(a).transpose(-1, -2) for f in flips]
    y = ses_data.random_flips(x, torch.Generator().manual_seed(0), rotate=True)
    seen = {next(i for i, f in enumerate(dihedral) if torch.equal(b, f(a))) for a, b in zip(x, y)}
    assert len(seen) == 8  # all rotations and reflections of the square occur


@pytest.mark.parametrize("rotate", [False, True])
def test_a_ranks_share_flips_as_in_one_process(rotate):
    """Rank r of 2 holds every other image of the global batch (loops.RankShare): each image gets the flips
    it gets in one process, batch after batch (the generator moves alike on every rank)."""
    x = torch.arange(10 * 3 * 4 * 4, dtype=torch.float32).view(10, 3, 4, 4)
    whole, parts = torch.Generator().manual_seed(3), [torch.Generator().manual_seed(3) for _ in range(2)]
    for _ in range(2):
        one = ses_data.random_flips(x, whole, rotate)
        for r in range(2):
            assert torch.equal(ses_data.random_flips(x[r::2], parts[r], rotate, share=(r, 2)), one[r::2])
    assert not torch.equal(one, x)


def test_recompute_bn_stats_gives_the_training_set_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Dropout(0.5))
    model[1].running_mean.fill_(5.0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 3, 6, 6) * 3 + 1, torch.zeros(40, dtype=torch.long))
    fitting.recompute_bn_stats(model, torch.utils.data.DataLoader(data, batch_size=40), Placement("cpu"))
    with torch.no_grad():
        z = model[0](data.tensors[0])
    torch.testing.assert_close(model[1].running_mean, z.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert model[1].momentum == 0.1 and model.training  # settings restored


# ----------------------------------------------------------------------------------------- training

def _fake_cells(root, n_per_class=12, px=24, seed=0):
    """Cell PNGs whose class is planted in brightness and stripe frequency."""
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for k in range(5):
        for i in range(n_per_class):
            yy, xx = np.mgrid[0:px, 0:px]
            stripes = np.sin(xx * (0.3 + 0.5 * k) + rng.uniform(0, 6)) * 40
            img = 60 + 30 * k + stripes[..., None] + rng.normal(0, 8, (px, px, 3))
            img[0, 0] = 0  # a fixed dark pixel keeps the min-max scaling from erasing brightness
            f = root / f"c{k}_{i}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f)
            files.append(f)
            labels.append(k)
    return files, np.array(labels)


def test_tiny_training_run_beats_chance(tmp_path):
    torch.manual_seed(0)
    files, labels = _fake_cells(tmp_path)
    cfg = small_cfg(**{"ses.model.input_size": 24, "ses.model.backbone": "resnet18", "ses.train.epochs": 6,
                       "ses.train.batch_size": 12, "ses.train.lr": 0.003, "ses.train.restarts": 1,
                       "ses.train.early_stop_patience": 4})
    data = ses_data.CellDataset(files, labels, 24, cache=True)
    split = ses_folds.stratified_folds(labels, 2, 0.25, seed=0)[0]
    model = ses_model.build_ses_model(cfg)
    rows = []
    fit = fitting.fit(model, data.subset(split["train"]), data.subset(split["val"]), cfg.ses.train,
                      Placement("cpu", cfg.ses.train.amp, True), seed=0, progress=rows.append)
    assert rows == fit.log and 1 <= len(rows) <= 12
    assert {r["run"] for r in rows} <= {0, 1}
    assert fit.best_val_loss == min(r["val_loss"] for r in rows)
    lp = fitting.predict(model, data.subset(split["test"]), Placement("cpu", "auto", True))
    m = ses_metrics.ses_metrics(labels[split["test"]], lp)
    assert m["auc_poor_rich"] > 0.8
    assert m["spearman"] > 0.5


# ----------------------------------------------------------------------------------------- the stage

def test_training_stage_writes_folds_summary_and_resumes(tmp_path):
    import json

    import geopandas as gpd
    import pandas as pd
    from script_runner import python, run as run_command, set_args
    from shapely.geometry import box

    ses_dir = tmp_path / "results" / "ses"
    (ses_dir / "img").mkdir(parents=True)
    files, labels = _fake_cells(ses_dir / "img", n_per_class=6, px=16)
    rng = np.random.default_rng(0)
    rows = [{"cell_id": f"CRS3035RES200mN{2800000 + 200 * i}E3700000", "city": "Lyon",
             "income": 1000.0 * k + rng.uniform(0, 900), "path": str(f.relative_to(ses_dir)), "non_void": True,
             "geometry": box(3700000, 2800000 + 200 * i, 3700200, 2800200 + 200 * i)}
            for i, (f, k) in enumerate(zip(files, labels))]
    rows.append({**rows[0], "cell_id": "void", "non_void": False})
    gpd.GeoDataFrame(rows, crs="EPSG:3035").to_file(ses_dir / "cells.gpkg", layer="cells")

    sets = [f"paths.results={tmp_path / 'results'}", "ses.cities=[Lyon]", "ses.model.backbone=resnet18",
            "ses.model.pretrained=false", "ses.model.input_size=16", "ses.train.epochs=2",
            "ses.train.restarts=0", "ses.train.batch_size=8", "workers=0"]

    def run(*extra):
        return run_command(python("efficientnet_training.py", "--config", "configs/ses_demo.yaml", *set_args([*sets, *extra])),
                           env={"OMP_NUM_THREADS": "1"}, quiet=True, timeout=300)

    proc = run()
    assert proc.returncode == 0, proc.stderr[-2000:]
    city = ses_dir / "Lyon"
    for k in (0, 1):
        for name in ("best.pt", "metrics.json", "classification_report.txt", "confusion_matrix.csv",
                     "confusion_matrix.png", "train_log.csv", "predictions.csv"):
            assert (city / f"fold_{k}" / name).is_file(), name
    summary = json.loads((city / "metrics.json").read_text())
    losses = [f["val_loss"] for f in summary["per_fold"]]
    assert summary["best_fold"] == int(np.argmin(losses)) and summary["n_cells"] == 30
    assert set(summary["mean"]) == set(ses_metrics.METRICS) == set(summary["std"])
    preds = pd.read_csv(city / "predictions.csv")
    assert sorted(preds["cell_id"]) == sorted(r["cell_id"] for r in rows[:-1])  # every non-void cell once
    assert preds.groupby("fold").size().tolist() == [15, 15]
    model, ckpt = ses_model.load_ses_model(city / f"fold_{summary['best_fold']}" / "best.pt")
    assert ckpt["fold"] == summary["best_fold"] and len(ckpt["quintile_edges"]) == 4
    assert isinstance(model, ses_model.SESModel)
    assert "Lyon" in proc.stdout and "AUC" in proc.stdout

    # a re-run skips finished folds; another training config is refused unless overwrite=true
    stamp = (city / "fold_0" / "best.pt").stat().st_mtime_ns
    assert run().returncode == 0
    assert (city / "fold_0" / "best.pt").stat().st_mtime_ns == stamp
    proc = run("ses.train.lr=0.01")
    assert proc.returncode != 0 and "overwrite=true" in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
