"""The shared simple baseline: its features read colour and local texture, and its classifier learns
what they carry from the training part only."""
import numpy as np
import torch

from urbanlens.core import baseline


def _images(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, side, side, generator=g) * 255).to(torch.uint8)


def test_features_shape_and_order():
    x = _images(12, 40, 0)
    f = baseline.draw_filters(x, n_filters=16, seed=1)
    feats = baseline.features(x.split(5), f)
    assert feats.shape == (12, 3 * 10 + 2 + 2 * 16)
    assert np.allclose(feats[7], baseline.features([x[7:8]], f)[0], atol=1e-5)  # per image, batch-independent
    assert np.isfinite(feats).all()


def test_filters_follow_the_seed_and_are_unit_norm():
    x = _images(8, 32, 0)
    a, ta = baseline.draw_filters(x, n_filters=8, seed=3)
    b, _ = baseline.draw_filters(x, n_filters=8, seed=3)
    c, _ = baseline.draw_filters(x, n_filters=8, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.flatten(1).norm(dim=1), torch.ones(8), atol=1e-5)
    assert (ta > 0).all()


def test_learns_colour_and_texture_but_not_noise():
    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 2, n)
    x = _images(n, 32, 1)
    x[y == 1, 0] = (x[y == 1, 0].float() * 0.7 + 60).to(torch.uint8)          # colour: red brighter
    smooth = torch.nn.functional.avg_pool2d(x[:, 1:2].float(), 5, 1, 2).to(torch.uint8)
    t = rng.integers(0, 2, n)
    x[t == 1, 1:2] = smooth[t == 1]                                            # texture: green smoothed
    f = baseline.draw_filters(x[:200], n_filters=32)
    feats = baseline.features(x.split(64), f)
    for label in (y, t):
        lp = baseline.fit_predict(feats[:200], label[:200], feats[200:], 2)
        assert (lp.argmax(1) == label[200:]).mean() > 0.9
    noise = rng.integers(0, 2, n)
    lp = baseline.fit_predict(feats[:200], noise[:200], feats[200:], 2)
    assert abs((lp.argmax(1) == noise[200:]).mean() - 0.5) < 0.2
    assert np.allclose(np.exp(lp).sum(1), 1)


def test_a_class_missing_from_training_gets_no_probability():
    x = np.random.default_rng(0).normal(size=(30, 4))
    y = np.array([0, 1, 3] * 10)
    lp = baseline.fit_predict(x, y, x[:5], 5)
    assert np.isneginf(lp[:, [2, 4]]).all() and np.allclose(np.exp(lp).sum(1), 1)
    assert (baseline.fit_predict(x, np.zeros(30), x[:3], 5).argmax(1) == 0).all()
