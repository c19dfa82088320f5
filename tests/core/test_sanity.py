"""Sanity checks of saliency maps: the randomised model, the rank correlation, deletion/insertion against
random orders on a model whose evidence is known, the verdict, and the land-use finding it flags."""
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from urbanlens.core import cam, sanity
from urbanlens.ses import findings, map_sanity

torch.set_num_threads(1)


def test_randomised_changes_every_weight_and_leaves_the_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    rand = sanity.randomised(model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random stream is not consumed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ours, theirs = dict(model.named_parameters()), dict(rand.named_parameters())
    assert ours.keys() == theirs.keys()
    weights = [k for k, p in ours.items() if p.dim() > 1 or k.startswith("fc.")]  # convolutions and the head
    assert len(weights) > 20 and all(not torch.equal(ours[k], theirs[k]) for k in weights)
    assert not rand.training
    again = sanity.randomised(model, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(rand.state_dict().values(), again.state_dict().values()))


def test_parameters_without_a_reset_are_redrawn():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    rand = sanity.randomised(model)
    assert not torch.equal(rand[1].w, model[1].w) and not torch.equal(rand[0].weight, model[0].weight)


def test_rank_correlations():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    b = np.stack([a[0] * 5 + 1, -a[1], np.zeros((8, 8))])
    np.testing.assert_allclose(sanity.rank_correlations(a, b), [1.0, -1.0, 0.0])  # random map constant: 0
    assert np.isnan(sanity.rank_correlations(b[2:], a[2:])[0])  # trained map constant: undefined
    dead = sanity.summarise(np.array([np.nan, np.nan]), np.full(2, 0.1), np.full(2, 0.1))
    assert not dead.passes_randomisation and "undefined" in dead.reason  # dead maps never pass
    some = sanity.summarise(np.array([np.nan, 0.2, 0.3, np.nan]), np.full(4, 0.1), np.full(4, 0.1))
    assert some.rho == pytest.approx(0.25) and some.passes_randomisation


class Quadrant(nn.Module):
    """Two logits: class 1 is the texture (pixel spread) of the top-left quadrant, class 0 its negative."""

    def forward(self, x):
        s = x[:, :, : x.shape[2] // 2, : x.shape[3] // 2].flatten(1).std(dim=1) * 8
        return torch.stack([-s, s], dim=1)


def test_faithfulness_rewards_the_map_of_the_evidence():
    """The map of the quadrant the model reads beats random orders at deletion and insertion; the map of
    the opposite quadrant loses to them."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    x[:, :, :16, :16] += torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # evidence with texture
    good = np.zeros((4, 32, 32), np.float32)
    good[:, :16, :16] = 1
    bad = good[:, ::-1, ::-1].copy()
    maps = np.stack([good, bad], axis=1).reshape(8, 32, 32)
    dg, ig = sanity.faithfulness(Quadrant(), x, maps, np.ones(8, int), seed=0)
    assert (dg[0::2] > 0.01).all() and (ig[0::2] > 0.01).all(), (dg, ig)
    assert (dg[1::2] < 0).all() and (ig[1::2] < 0).all(), (dg, ig)


def test_curves_start_at_the_image_and_end_at_the_baseline():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model = Quadrant()
    orders = torch.from_numpy(np.argsort(np.random.default_rng(0).random((2, 256)), axis=1))
    with torch.no_grad():
        full, base = torch.softmax(model(x), 1), torch.softmax(model(sanity.blurred(x)), 1)
    deleted = sanity.curves(model, x, orders, insert=False, steps=4)
    inserted = sanity.curves(model, x, orders, insert=True, steps=4)
    assert deleted.shape == (2, 5, 2)
    torch.testing.assert_close(deleted[:, 0], full)
    torch.testing.assert_close(deleted[:, -1], base)
    torch.testing.assert_close(inserted[:, 0], base)
    torch.testing.assert_close(inserted[:, -1], full)


def test_a_map_blind_to_the_weights_fails_randomisation():
    """A 'map' that is the image's own brightness (what edge detectors and guided backprop largely
    reproduce) is the same for any weights: rho 1, the check fails and says so."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blind = x.mean(1).numpy()
    rho = sanity.rank_correlations(blind, blind)
    verdict = sanity.summarise(rho, np.full(4, 0.1), np.full(4, 0.1))
    assert not verdict.passes_randomisation and not verdict.passes
    assert "model-randomisation" in verdict.reason
    # Grad-CAM of the trained-as-built model vs a re-initialised one: its maps change
    layer_maps = cam.class_activation_maps(model, model.layer4, x, 1, "gradcam")
    rand = sanity.randomised(model, 1)
    other = cam.class_activation_maps(rand, rand.layer4, x, 1, "gradcam")
    assert np.nanmedian(sanity.rank_correlations(layer_maps, other)) < 0.9


def test_verdict():
    ok = sanity.summarise(np.full(12, 0.1), np.linspace(0.01, 0.2, 12), np.full(12, 0.05))
    assert ok.passes and ok.reason == "" and ok.maps == 12 and ok.deletion_p < sanity.ALPHA
    noisy = sanity.summarise(np.full(12, 0.1), np.linspace(-0.1, 0.1, 12), np.zeros(12))
    assert not noisy.beats_random and "random pixel orders" in noisy.reason
    assert sanity.summarise(np.zeros(3), np.zeros(3), np.zeros(3)).deletion_p == 1.0
    assert list(ok.row()) == sanity.COLUMNS


def test_failed_maps_make_the_finding_not_meaningful():
    stats = pd.DataFrame({"poor_max": [1.0], "rich_max": [1.0]})
    good = findings.assess(findings.Skill(0.8, 0.7, 0.9, 40, p_value=0.001), stats)
    assert good.meaningful
    fail = sanity.summarise(np.full(8, 0.9), np.linspace(0.01, 0.2, 8), np.zeros(8))
    flagged = map_sanity.flag(good, fail)
    assert not flagged.meaningful and flagged.caveat == "ranking not meaningful: " + fail.reason
    chance = findings.assess(findings.Skill(0.55, 0.45, 0.65, 40, p_value=0.2), stats)
    assert map_sanity.flag(chance, fail).caveat == chance.caveat + "; " + fail.reason
    assert map_sanity.flag(good, None) == good
    summary = sanity.annotate(pd.DataFrame({"ua_code": ["1", "2"]}), fail)
    assert list(summary.columns) == ["ua_code", *sanity.COLUMNS]
    assert summary["maps_pass_sanity"].tolist() == [False, False]
    assert sanity.annotate(summary[["ua_code"]], None)["maps_pass_sanity"].isna().all()


@pytest.mark.parametrize("n", [0, 3, 50])
def test_sample(n):
    s = sanity.sample(10, n, seed=1)
    assert len(s) == min(n, 10) and len(set(s)) == len(s) and list(s) == sorted(s)
    assert list(sanity.sample(10, n, seed=1)) == list(s)


def test_cities_sanity_check_gives_one_value_per_patch():
    from urbanlens.cities.saliency import sanity_check

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batches = [(x[:3], [0, 1, 2]), (x[3:], [1])]
    rho, dg, ig = sanity_check(model, model.layer4, batches, "gradcam", seed=0)
    assert rho.shape == dg.shape == ig.shape == (4,) and np.isfinite([dg, ig]).all()
    assert (np.abs(rho[np.isfinite(rho)]) <= 1).all() and (np.abs(dg) <= 1).all()  # NaN: a constant trained map
    again = sanity_check(model, model.layer4, batches, "gradcam", seed=0)
    np.testing.assert_array_equal(rho, again[0])  # seeded: the same random model and orders


def test_randomised_timm_vit_keeps_its_preprocessing_and_is_checked():
    """A timm ViT: its weight matrices, class token and position embedding are re-drawn, what its weights
    expect of the input (the ``preprocess`` child and its pre-hook) is kept, and the cities' check runs on
    its token maps."""
    from urbanlens.cities.saliency import sanity_check
    from urbanlens.core import backbones

    torch.manual_seed(0)
    model = backbones.build_backbone("timm:test_vit", 3, preprocessing={"mean": [0.5] * 3, "std": [0.25] * 3}).eval()
    rand = sanity.randomised(model, seed=2)
    ours, theirs = dict(model.named_parameters()), dict(rand.named_parameters())
    redrawn = [k for k, p in ours.items() if p.dim() > 1]
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"} <= set(redrawn)
    assert all(not torch.equal(ours[k], theirs[k]) for k in redrawn)
    for name, buffer in model.preprocess.named_buffers():
        assert torch.equal(buffer, getattr(rand.preprocess, name))
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # its pre-hook still normalises the input as the weights expect
        torch.testing.assert_close(rand(x), rand.forward_head(rand.forward_features(rand.preprocess(x))))
        assert not torch.allclose(rand(x), rand.forward_head(rand.forward_features(x)))
    assert any(m is backbones.last_conv_layer(rand) for m in rand.modules())
    rho, dg, ig = sanity_check(model, backbones.last_conv_layer(model), [(x, [0, 1, 2])], "gradcampp", seed=0)
    assert rho.shape == dg.shape == ig.shape == (3,) and np.isfinite([dg, ig]).all()
    assert np.isfinite(rho).any() and (np.abs(rho[np.isfinite(rho)]) <= 1).all()
