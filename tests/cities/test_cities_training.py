"""Unit tests of the city classifier's pieces: sampling, dataset, metrics, similarity, checkpoints, figures."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from urbanlens.cities import data as cities_data
from urbanlens.cities import figures as cities_figures
from urbanlens.cities import metrics as cities_metrics
from urbanlens.cities import sampling as cities_sampling
from urbanlens.cities import similarity, training
from urbanlens.core import errors, loops, runtime
from urbanlens.core.backbones import build_backbone
from urbanlens.core.config import load_config
from urbanlens.core.placement import Placement


# ---------------------------------------------------------------- sampling
def test_balanced_sampler_draws_classes_equally():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    sampler = cities_sampling.EpochSampler(labels, balanced=True, num_samples=30000, seed=1)
    counts = np.bincount(labels[list(sampler)], minlength=3)
    assert len(sampler) == 30000
    assert np.allclose(counts / counts.sum(), 1 / 3, atol=0.02)
    # weights: inverse class size
    w = cities_sampling.balanced_weights(labels)
    assert w[0] == pytest.approx(1 / 900) and w[-1] == pytest.approx(1 / 10)


def test_unbalanced_sampler_is_a_permutation_per_epoch():
    labels = np.arange(50) % 3
    sampler = cities_sampling.EpochSampler(labels, balanced=False, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    second = list(sampler)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != second
    sampler.set_epoch(1)
    assert list(sampler) == first  # a function of (seed, epoch) only


def test_sampler_shards_partition_the_single_process_epoch():
    labels = np.array([0] * 40 + [1] * 7)
    whole = cities_sampling.EpochSampler(labels, balanced=True, num_samples=20, seed=5)
    parts = [cities_sampling.EpochSampler(labels, balanced=True, num_samples=20, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for s in [whole, *parts]:
        s.set_epoch(4)
    assert [len(p) for p in parts] == [10, 10]
    assert sorted(list(parts[0]) + list(parts[1])) == sorted(whole)


@pytest.mark.parametrize("balanced", [True, False])
def test_ranks_batches_make_up_the_single_process_batches(balanced):
    """Per-rank batch 3 of a global 6: the ranks' k-th batches hold the single-process batch k; of 21
    draws the last one is left out under 2 ranks, so the last global batch splits evenly (2 + 2)."""
    labels = np.array([0] * 15 + [1] * 6)
    whole = list(cities_sampling.EpochSampler(labels, balanced, seed=2))
    parts = [list(cities_sampling.EpochSampler(labels, balanced, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in parts] == [10, 10]
    for k in range(3):
        assert sorted(parts[0][3 * k:3 * k + 3] + parts[1][3 * k:3 * k + 3]) == sorted(whole[6 * k:6 * k + 6])
    assert len(parts[0][9:]) == len(parts[1][9:]) == 1 and sorted(parts[0][9:] + parts[1][9:]) == sorted(whole[18:20])



def test_store_batches_of_a_rank_flip_as_in_one_process():
    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    one = cities_data.train_batches(seed=1, epoch=2)(x)
    for r in range(2):
        assert torch.equal(cities_data.train_batches(1, 2, rank=r, world_size=2)(x[r::2]), one[r::2])


# ---------------------------------------------------------------- dataset
def _write_patches(root, cities=("BBB", "AAA"), per_city=3, size=20):
    rows = []
    for c_i, city in enumerate(cities):
        for k in range(per_city):
            rel = f"train/City {city} ({city})/p{k}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((size, size, 3), 60 * c_i + 10 * k, np.uint8)).save(root / rel, quality=95)
            rows.append({"path": rel, "city": f"City {city}", "iata": city, "site": "s1", "source": "img.jpg",
                         "split": "train", "y": 0, "x": k * size, "size": size})
    return pd.DataFrame(rows)


def test_split_dataset_labels_by_class_index_and_resizes(tmp_path):
    manifest = _write_patches(tmp_path)
    ds = cities_data.split_dataset(manifest, "train", tmp_path, ["AAA", "BBB"], cities_data.transforms(16, train=False))
    assert len(ds) == 6
    assert list(ds.labels) == [1, 1, 1, 0, 0, 0]  # BBB rows come first in the manifest; AAA is class 0
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    # the normalisation is ImageNet's: a uniform grey of value v maps to (v/255 - mean) / std
    raw = 0 / 255  # first BBB patch: c_i=0, k=0 -> pixel value 0 (JPEG of a flat image is near exact)
    assert x[0].mean().item() == pytest.approx((raw - 0.485) / 0.229, abs=0.05)


def test_read_image_decodes_reduced_but_never_below_the_input_size(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(tmp_path / "p.jpg", quality=95)
    assert cities_data.read_image(tmp_path / "p.jpg").shape == (3, 96, 96)
    assert cities_data.read_image(tmp_path / "p.jpg", decode_size=32).shape == (3, 48, 48)  # JPEG scale 1/2 >= 32
    assert cities_data.read_image(tmp_path / "p.jpg", decode_size=64).shape == (3, 96, 96)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(errors.DataError, match="bad.jpg: cannot read image"):
        cities_data.read_image(tmp_path / "bad.jpg")


def test_split_dataset_rejects_unknown_city_and_empty_split(tmp_path):
    manifest = _write_patches(tmp_path)
    with pytest.raises(errors.DataError, match="not among the model's classes"):
        cities_data.split_dataset(manifest, "train", tmp_path, ["AAA"])
    with pytest.raises(errors.DataError, match="no patches in split 'val'"):
        cities_data.split_dataset(manifest, "val", tmp_path, ["AAA", "BBB"])


def test_training_flips_are_random_eval_is_not():
    img = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    train, test = cities_data.transforms(8, train=True), cities_data.transforms(8, train=False)
    torch.manual_seed(0)
    outs = {tuple(train(img)[0, 0, :2].tolist()) + tuple(train(img)[0, :2, 0].tolist()) for _ in range(30)}
    assert len(outs) > 1
    assert torch.equal(test(img), test(img))


# ---------------------------------------------------------------- metrics
def test_metrics_on_known_predictions():
    classes = ["AAA", "BBB", "CCC"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    scores = np.eye(3)[pred] + 0.1 * np.eye(3)[(pred + 1) % 3]  # second choice: next class
    m = cities_metrics.classification_metrics(labels, scores, classes)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["n_patches"] == 8
    # AAA: predicted 4 times, 3 right; 4 true, 3 found
    assert m["per_city"]["AAA"]["precision"] == pytest.approx(3 / 4)
    assert m["per_city"]["AAA"]["recall"] == pytest.approx(3 / 4)
    assert m["per_city"]["BBB"]["precision"] == pytest.approx(1 / 2)
    assert m["per_city"]["BBB"]["recall"] == pytest.approx(1 / 2)
    assert m["per_city"]["CCC"]["recall"] == 1.0
    f1 = [3 / 4, 1 / 2, 1.0]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert "top5_accuracy" not in m  # 3 classes: top-5 would be 1 by construction, so it is not reported
    six_scores = np.tile(np.arange(6.0), (6, 1))
    six_scores[np.arange(6), np.arange(6)] = [-1, -1, -1, 10, 10, 10]   # true class lowest for the first three
    six = cities_metrics.classification_metrics(np.arange(6), six_scores, list("ABCDEF"))
    assert six["top5_accuracy"] == pytest.approx(3 / 6)
    sites = cities_metrics.per_site_accuracy(labels, scores.argmax(axis=1), ["AAA"] * 4 + ["BBB"] * 4,
                                             ["s1", "s1", "s2", "s2"] * 2)
    assert sum(v["support"] for v in sites.values()) == 8 and sorted(sites) == ["AAA/s1", "AAA/s2", "BBB/s1", "BBB/s2"]
    # top-2: the wrong ones (true 1 -> pred 0 then 1; true 0 -> pred 1 then 2) -> one extra hit
    assert cities_metrics.topk_accuracy(labels, scores, 2) == pytest.approx(7 / 8)


def test_confusion_frame_rows_are_true_classes():
    cm = cities_metrics.confusion_frame(np.array([0, 0, 1]), np.array([1, 1, 1]), ["AAA", "BBB"])
    assert cm.loc["AAA", "BBB"] == 2 and cm.loc["BBB", "BBB"] == 1 and cm.loc["BBB", "AAA"] == 0
    assert cm.index.name == "true" and cm.columns.name == "predicted"


# ---------------------------------------------------------------- similarity
CITIES = ["AAA", "BBB", "CCC", "DDD"]
CM = np.array([[80, 2, 15, 3],    # AAA is often taken for CCC
               [1, 90, 1, 8],
               [25, 0, 70, 5],
               [0, 4, 6, 90]])


def test_confusion_similarity_finds_the_confused_pair():
    s = similarity.confusion_similarity(CM)
    assert np.allclose(s, s.T) and np.allclose(np.diag(s), 1)
    assert s[0, 2] == pytest.approx((15 / 100 + 25 / 100) / 2)
    pairs = similarity.similar_pairs(s, CITIES, "confusion")
    assert tuple(pairs.iloc[0][["city_a", "city_b"]]) == ("AAA", "CCC")
    assert tuple(pairs.iloc[1][["city_a", "city_b"]]) == ("BBB", "DDD")


def test_embedding_similarity_uses_class_means():
    rng = np.random.default_rng(0)
    centres = np.array([[1, 0, 0], [0, 1, 0], [0.9, 0.1, 0.1], [0, 0, 1]], float)
    labels = np.repeat(np.arange(4), 50)
    emb = centres[labels] + 0.05 * rng.normal(size=(200, 3))
    s = similarity.embedding_similarity(emb, labels, 4)
    means = similarity.class_means(emb, labels, 4)
    assert s[1, 3] == pytest.approx(means[1] @ means[3] / np.linalg.norm(means[1]) / np.linalg.norm(means[3]))
    assert tuple(similarity.similar_pairs(s, CITIES, "embedding").iloc[0][["city_a", "city_b"]]) == ("AAA", "CCC")


def test_pairs_are_unique_and_sorted():
    rng = np.random.default_rng(1)
    names = ["EEE", "AAA", "DDD", "BBB", "CCC"]
    a = rng.random((5, 5))
    s = (a + a.T) / 2
    pairs = similarity.similar_pairs(s, names, "x")
    assert len(pairs) == 10
    assert (pairs["city_a"] < pairs["city_b"]).all()
    assert not pairs.duplicated(["city_a", "city_b"]).any()
    assert pairs["score"].is_monotonic_decreasing
    for a_, b_, score in pairs[["city_a", "city_b", "score"]].to_numpy():
        assert score == s[names.index(a_), names.index(b_)]


def test_similarity_table_round_trip_and_clustering_merges_twins_first():
    s = similarity.confusion_similarity(CM)
    table = similarity.similarity_table({"confusion": s, "embedding": np.eye(4)}, CITIES)
    assert list(table.columns) == ["method", "city", *CITIES] and len(table) == 8
    back = similarity.read_similarity_table(table, "confusion")
    assert np.allclose(back.to_numpy(), s) and list(back.index) == CITIES
    z = similarity.cluster(s)
    assert sorted(z[0, :2].astype(int)) == [0, 2]  # the first merge joins AAA and CCC
    assert z[0, 2] == pytest.approx(1 - s[0, 2])


# ---------------------------------------------------------------- checkpoints and resume
def _tiny_run(tmp_path, epochs, resume_after=None):
    """Train a small ResNet on random tensors for ``epochs``; optionally stop, checkpoint and resume."""
    cfg = load_config(None, ["seed=7"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 3
    data = TensorDataset(x, y)
    sampler = cities_sampling.EpochSampler(y.numpy(), balanced=True, seed=cfg.seed)
    loader = loops.make_loader(data, 8, 0, torch.device("cpu"), sampler)

    def fresh():
        runtime.seed_everything(cfg.seed)
        m = build_backbone("resnet18", 3)
        o = torch.optim.Adam(m.parameters(), lr=1e-3)
        return m, o, training.lr_schedule(o, "warmup_cosine", epochs * len(loader))

    model, opt, sched = fresh()
    done = 0
    for epoch in range(1, epochs + 1):
        if epoch == (resume_after or 0) + 1 and resume_after:
            runtime.save_checkpoint(tmp_path / "last.pt", model, cfg, opt, done, best_val_acc=0.5, classes=["a"],
                                    scheduler=sched.state_dict())
            model, opt, sched = fresh()
            torch.manual_seed(123)  # the interruption scrambles the global RNG
            done, best = training.restore(runtime.load_checkpoint(tmp_path / "last.pt"), model, opt, None, sched)
            assert (done, best) == (resume_after, 0.5)
        cities_sampling.begin_epoch(sampler, cfg.seed, epoch)
        loops.train_epoch(model, loader, loops.Optimiser(opt, sched), F.cross_entropy, Placement("cpu"))
        done = epoch
    return model, opt


def test_resume_continues_epoch_count_and_matches_uninterrupted_run(tmp_path):
    straight, opt_a = _tiny_run(tmp_path, 2)
    resumed, opt_b = _tiny_run(tmp_path, 2, resume_after=1)
    state = runtime.load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1 and "optimizer" in state and state["config"]["seed"] == 7
    assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"] < 1e-3  # the schedule went on
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), k


def test_resume_refuses_a_checkpoint_of_other_cities_or_model():
    cfg = load_config(None, ["cities.model.backbone=resnet18", "cities.model.input_size=64"])
    state = {"classes": ["AAA", "BBB"], "config": cfg.to_dict()}
    training.check_resumable(state, ["AAA", "BBB"], cfg.cities.model, "last.pt")  # compatible: no exit
    with pytest.raises(errors.CheckpointError, match="last.pt: trained on cities AAA, BBB"):
        training.check_resumable(state, ["AAA", "CCC"], cfg.cities.model, "last.pt")
    other = load_config(None, ["cities.model.backbone=resnet18", "cities.model.input_size=32"])
    with pytest.raises(errors.CheckpointError, match="cities.model.input_size=64"):
        training.check_resumable(state, ["AAA", "BBB"], other.cities.model, "last.pt")


def test_lr_schedules():
    total = 20
    f = {name: [training.lr_factor(name, k, total) for k in range(total + 1)] for name in training.SCHEDULES}
    assert f["constant"] == [1.0] * (total + 1)
    assert f["cosine"][0] == 1.0 and f["cosine"][-1] == pytest.approx(0) and f["cosine"][10] == pytest.approx(0.5)
    warm = f["warmup_cosine"]
    peak = int(training.WARMUP_SHARE * total)
    assert warm[0] == pytest.approx(0.04) and warm[peak] == pytest.approx(1.0) and warm[-1] == pytest.approx(0)
    assert np.all(np.diff(warm[: peak + 1]) > 0) and np.all(np.diff(warm[peak:]) < 0)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=0.1)
    assert training.lr_schedule(opt, "constant", total) is None
    sched = training.lr_schedule(opt, "cosine", total)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        training.lr_schedule(opt, "step", total)


def test_read_log_drops_epochs_after_the_checkpoint(tmp_path):
    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.1 * e, "val_loss": 1.0, "val_acc": 0.5,
             "lr": 1e-3, "seconds": 1.0} for e in (1, 2, 3)]
    training.write_log(rows, tmp_path / "log.csv")
    kept = training.read_log(tmp_path / "log.csv", 2)
    assert [r["epoch"] for r in kept] == [1, 2]
    assert training.read_log(tmp_path / "log.csv", 0) == []
    assert training.read_log(tmp_path / "missing.csv", 2) == []


# ---------------------------------------------------------------- figures
def test_confusion_figure_shows_counts_and_row_percentages():
    fig = cities_figures.confusion_matrix_figure(CM, CITIES)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "15\n15%" in texts and "25\n25%" in texts and "90\n90%" in texts
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == CITIES
    assert np.allclose(cities_figures.row_percentages(CM).sum(axis=1), 100)


def test_dendrogram_figure_labels_every_city():
    fig = cities_figures.dendrogram_figure(similarity.cluster(similarity.confusion_similarity(CM)), CITIES)
    assert sorted(t.get_text() for t in fig.axes[0].get_yticklabels()) == CITIES


def test_bootstrap_over_source_images_keeps_cities_and_images_whole():
    from urbanlens.cities import intervals

    labels = np.repeat([0, 0, 1, 1], 5)                   # two cities, two source images each, 5 patches each
    groups = np.repeat(["a1", "a2", "b1", "b2"], 5)
    for r in intervals.resamples(labels, groups, 50, seed=0):
        assert len(r) == 20 and set(labels[r]) == {0, 1}  # every city keeps its test data
        for g in ("a1", "a2", "b1", "b2"):                # an image comes whole, or not at all
            assert (groups[r] == g).sum() % 5 == 0


def test_intervals_cover_the_point_estimate_and_widen_with_fewer_images():
    from urbanlens.cities import intervals

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    pred = np.where(rng.random(160) < 0.8, labels, (labels + 1) % 4)
    many = np.array([f"{c}_{i // 4}" for c, i in zip(labels, range(160))])   # 10 images per city
    few = np.array([f"{c}_{i // 20}" for c, i in zip(labels, range(160))])   # 2 images per city
    acc = (pred == labels).mean()
    a = intervals.metric_intervals(labels, pred, many, ["A", "B", "C", "D"], n_boot=300)
    b = intervals.metric_intervals(labels, pred, few, ["A", "B", "C", "D"], n_boot=300)
    assert a["accuracy"][0] <= acc <= a["accuracy"][1] and a["macro_f1"][0] < a["macro_f1"][1]
    assert set(a["per_city_recall"]) == {"A", "B", "C", "D"} and a["units_per_city"]["A"] == 10
    constant = np.repeat(["one"], 160)
    c = intervals.metric_intervals(labels, pred, np.char.add(labels.astype(str), constant), ["A", "B", "C", "D"], n_boot=50)
    assert c["accuracy"][0] == c["accuracy"][1] == acc    # one image per city: nothing to resample
    assert b["units_per_city"]["A"] == 2


def test_pair_stability_is_high_for_a_planted_pair_and_low_for_noise():
    from urbanlens.cities import intervals

    rng = np.random.default_rng(1)
    classes = ["A", "B", "C", "D"]
    labels = np.repeat(np.arange(4), 30)
    groups = np.array([f"{c}_{i // 6}" for c, i in zip(labels, range(120))])
    pred = labels.copy()
    swap = rng.random(120) < 0.4                     # A and B are confused with each other, C and D never
    pred[swap & (labels == 0)] = 1
    pred[swap & (labels == 1)] = 0
    emb = rng.normal(size=(120, 8))
    emb[labels <= 1] += 3.0                          # A and B also share their embedding
    st = intervals.pair_stability(labels, pred, emb, groups, classes, k=1, n_boot=100)
    for method in ("confusion", "embedding"):
        rows = st[st["method"] == method].set_index(["city_a", "city_b"])["stability"]
        assert rows.loc[("A", "B")] > 0.95 and rows.drop(("A", "B")).sum() < 0.05


# ---------------------------------------------------------------- honest numbers: units, gain, null, validation
def test_units_are_counted_per_city_and_too_few_are_flagged():
    from urbanlens.cities import intervals

    labels = np.repeat([0, 1, 2], 12)
    groups = np.array([f"{c}_{i // k}" for c, i, k in zip(labels, range(36), [2] * 12 + [6] * 12 + [2] * 12)])
    u = intervals.units(labels, groups, ["A", "B", "C"])
    assert u["unit"] == "source images" and u["units_per_city"] == {"A": 6, "B": 2, "C": 6}
    assert u["units_total"] == 14
    assert "fewer than 5" in u["note"] and "1 of 3 cities" in u["note"]
    many = np.array([f"{c}_{i}" for c, i in zip(labels, range(36))])  # 12 images a city: no note
    assert "note" not in intervals.units(labels, many, ["A", "B", "C"])


def test_paired_gain_is_the_difference_and_its_interval_excludes_zero_only_when_it_should():
    from urbanlens.cities import intervals

    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(4), 60)
    groups = np.array([f"{c}_{i // 6}" for c, i in zip(labels, range(240))])   # 10 images a city
    good = np.where(rng.random(240) < 0.9, labels, (labels + 1) % 4)
    weak = np.where(rng.random(240) < 0.5, labels, (labels + 2) % 4)
    g = intervals.paired_gain(labels, good, weak, groups, list("ABCD"), n_boot=50, seed=0)
    assert g["accuracy"]["value"] == pytest.approx((good == labels).mean() - (weak == labels).mean())
    assert 0 < g["accuracy"]["lo"] <= g["accuracy"]["value"] <= g["accuracy"]["hi"]
    assert g["macro_f1"]["lo"] > 0
    same = intervals.paired_gain(labels, good, good, groups, list("ABCD"), n_boot=10, seed=0)
    assert same["accuracy"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}    # paired: identical models differ by 0
    twin = np.where(rng.random(240) < 0.9, labels, (labels + 1) % 4)   # as good, other errors
    t = intervals.paired_gain(labels, good, twin, groups, list("ABCD"), n_boot=50, seed=0)["accuracy"]
    assert t["lo"] < 0 < t["hi"]


def test_permutation_p_value_is_small_for_signal_and_uniform_under_noise():
    from urbanlens.cities import null

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(8), 25)
    weak = np.where(rng.random(200) < 0.3, labels, rng.integers(0, 8, 200))   # 30 % + chance: a real signal
    planted = null.accuracy_p_value(labels, weak, permutations=500, seed=0)
    assert planted["p_value"] < 0.01 and not planted["chance"] and planted["finding"].startswith("above chance")
    noise = [null.accuracy_p_value(labels, np.random.default_rng(s).integers(0, 8, 200), 200, seed=s)
             for s in range(40)]                                             # no signal: p about uniform
    ps = np.array([n["p_value"] for n in noise])
    assert all((n["finding"] == "not distinguishable from chance") == n["chance"] == (n["p_value"] > 0.05)
               for n in noise)
    assert (ps <= 0.05).mean() <= 0.15 and 0.3 < ps.mean() < 0.7 and ps.max() > 0.8
    assert null.accuracy_p_value(labels, labels, permutations=99)["p_value"] == pytest.approx(0.01)  # floor 1/(n+1)


def _site_manifest(sites_per_city=3):
    rows = []
    for iata in ("AAA", "BBB"):
        sites = [f"s{i}" for i in range(sites_per_city)]
        for site in sites:
            parts = ["train"] if site != sites[-1] else ["test", "val", "test_b"]
            for split in parts:
                for k in range(4):
                    rows.append({"path": f"{split}/{iata}/{site}__img__y0_x{k}.jpg", "city": iata, "iata": iata,
                                 "site": site, "source": f"{iata}/{site}/img.png", "split": split, "y": 0, "x": k,
                                 "size": 8})
    return pd.DataFrame(rows)


def test_site_validation_holds_out_a_train_site_and_nothing_of_the_test_site():
    from urbanlens.cities import validation

    manifest = _site_manifest(4)
    assert validation.training_splits(manifest, "paper") is manifest
    out = validation.training_splits(manifest, "site")
    for iata in ("AAA", "BBB"):
        rows = out[out["iata"] == iata]
        test_sites = set(rows.loc[rows["split"].isin(["test", "test_b"]), "site"])
        val_sites = set(rows.loc[rows["split"] == "val", "site"])
        train_sites = set(rows.loc[rows["split"] == "train", "site"])
        assert test_sites == {"s3"} and val_sites == {"s2"} and train_sites == {"s0", "s1"}
        assert not val_sites & test_sites and not val_sites & train_sites
    same = ["path", "split"]  # the test patches are those of the paper's split
    for split in ("test", "test_b"):
        assert out.loc[out["split"] == split, same].reset_index(drop=True).equals(
            manifest.loc[manifest["split"] == split, same].reset_index(drop=True))
    assert validation.store_name("val", "site") != validation.store_name("val", "paper")


def test_site_validation_refuses_a_city_with_two_sites_in_one_line():
    from urbanlens.cities import validation

    with pytest.raises(errors.DataError) as e:
        validation.training_splits(_site_manifest(2), "site")
    assert "AAA has 2 sites" in str(e.value) and "cities.split.val=paper" in str(e.value) and "\n" not in str(e.value)


def test_baseline_training_sample_is_capped_and_stratified_by_city():
    from urbanlens.cities import baseline as cities_baseline

    rows = pd.DataFrame({"iata": ["AAA"] * 900 + ["BBB"] * 100, "path": [f"p{i}" for i in range(1000)]})
    sample = cities_baseline.training_sample(rows, 200, seed=0)
    assert len(sample) == 200 and sample["iata"].value_counts().to_dict() == {"AAA": 180, "BBB": 20}
    assert sample.index.is_monotonic_increasing
    assert sample.equals(cities_baseline.training_sample(rows, 200, seed=0))
    assert cities_baseline.training_sample(rows, 5000, seed=0) is rows


def test_headline_says_chance_and_too_few_units():
    from urbanlens.cities import report

    metrics = {"accuracy": 0.2, "intervals": {"accuracy": [0.1, 0.3], "level": 0.95, "unit": "source images",
                                              "units_per_city": {"A": 2, "B": 2}, "units_total": 4,
                                              "note": "fewer than 5 source images per city"},
               "baseline": {"accuracy": 0.5, "intervals": {"accuracy": [0.4, 0.6]}},
               "gain_over_baseline": {"accuracy": {"value": -0.3, "lo": -0.4, "hi": -0.2}},
               "permutation": {"accuracy": {"p_value": 0.4, "chance": True},
                               "baseline_accuracy": {"p_value": 0.001, "chance": False}}}
    line = report.headline(metrics)
    assert "accuracy 0.200 [0.100, 0.300] vs baseline 0.500 [0.400, 0.600], gain -0.300 [-0.400, -0.200]" in line
    assert "p=0.4, not distinguishable from chance (baseline p=0.001)" in line
    assert "4 source images (2 per city): fewer than 5" in line
    assert report.with_note("title", metrics).splitlines() == [
        "title", "accuracy not distinguishable from chance; fewer than 5 source images per city"]


def test_a_training_stamp_from_before_split_val_is_the_paper_scheme_and_site_retrains():
    from urbanlens.core import runs

    cfg = load_config("configs/cities_demo.yaml")
    old = runs.make_stamp("train_classification.py", cfg, training.RUN_KEYS)
    del old["settings"]["cities.split.val"]                     # a run from before the key
    assert runs.differences(old, cfg, training.RUN_KEYS) == []
    site = load_config("configs/cities_demo.yaml", ["cities.split.val=site"])
    assert runs.differences(old, site, training.RUN_KEYS) == ["cities.split.val"]
