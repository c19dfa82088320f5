"""Class-activation maps: Grad-CAM/Grad-CAM++ against pytorch-grad-cam, Relevance-CAM on hand-built cases,
guided backprop against manual computations, and models left exactly as they were."""
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from urbanlens.cities.figures import saliency_figure
from urbanlens.cities.saliency import masked_image, sample_patches
from urbanlens.core import cam

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=6).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def _hooks_left(model: nn.Module) -> list[str]:
    found = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            found.append(f"{name}: hook")
        if "forward" in vars(m) or hasattr(m, "canonizer_sum"):
            found.append(f"{name}: patched forward")
    return found


# ---------------------------------------------------------------- Grad-CAM, Grad-CAM++ vs pytorch-grad-cam
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_maps_equal_pytorch_grad_cam(resnet, images, method):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    targets = [0, 4, 2]
    reference = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method]
    with reference(resnet, [resnet.layer4]) as ref:
        theirs = ref(images, targets=[ClassifierOutputTarget(t) for t in targets])
        acts = ref.activations_and_grads.activations[0].numpy()
        grads = ref.activations_and_grads.gradients[0].numpy()
        theirs_low = np.maximum(ref.get_cam_image(images, resnet.layer4, None, acts, grads), 0)
    for p in resnet.parameters():  # the reference accumulates parameter gradients; we must not
        p.grad = None

    ours_low = cam.raw_maps(resnet, resnet.layer4, images, targets, method).numpy()
    assert ours_low.shape == (3, 3, 3)
    assert ours_low.max() > 0
    np.testing.assert_allclose(ours_low, theirs_low, rtol=1e-5, atol=1e-6 * theirs_low.max())

    # Full maps: theirs is min-max at low resolution, resized by OpenCV, min-max again; ours upsamples
    # then min-max once. Min-max commutes with bilinear resizing, so the two must agree.
    ours = cam.class_activation_maps(resnet, resnet.layer4, images, targets, method)
    assert ours.shape == theirs.shape == (3, 96, 96) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_layer_hooks_capture_activations_and_gradients():
    torch.manual_seed(0)
    conv, fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 2)
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    x = torch.randn(2, 2, 5, 5)
    with cam.LayerHooks(model, conv) as hooks:
        out = model(x)
        torch.autograd.grad(out[:, 1].sum(), hooks.output)
    np.testing.assert_allclose(hooks.activations, conv(x).detach(), rtol=1e-6)
    # d out[:, 1] / d A[c, i, j] = fc.weight[1, c] / (h * w)
    expected = (fc.weight[1].detach() / 25)[None, :, None, None].expand(2, 3, 5, 5)
    np.testing.assert_allclose(hooks.gradients, expected, rtol=1e-6)
    assert not conv._forward_hooks


def test_batch_is_explained_image_by_image(resnet, images):
    together = cam.class_activation_maps(resnet, resnet.layer4, images, [1, 2, 3], "gradcam")
    alone = cam.class_activation_maps(resnet, resnet.layer4, images[1:2], 2, "gradcam")
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    assert np.allclose(together.reshape(3, -1).min(1), 0) and np.allclose(together.reshape(3, -1).max(1), 1)


def test_unknown_method_is_refused(resnet, images):
    with pytest.raises(ValueError, match="gradcampp"):
        cam.class_activation_maps(resnet, resnet.layer4, images, 0, "scorecam")


# ---------------------------------------------------------------- Relevance-CAM
def test_relevancecam_on_resnet(resnet, images):
    maps = {t: cam.relevancecam(resnet, resnet.layer4, images, [t] * 3) for t in (0, 5)}
    for m in maps.values():
        assert m.shape == (3, 3, 3) and (m >= 0).all() and (m.flatten(1).max(1).values > 0).any()
    assert not torch.allclose(maps[0], maps[5])
    full = cam.class_activation_maps(resnet, resnet.layer4, images, [0, 5, 1], "relevancecam")
    assert full.shape == (3, 96, 96) and full.min() >= 0 and full.max() <= 1

    # On the last block of a ResNet (global average pooling, then the linear layer), the epsilon and
    # proportional rules give each channel the relevance mean(A_c) * W[t, c]: the CAM of Zhou et al.
    acts, _ = cam.activations_and_gradients(resnet, resnet.layer4, images, [0] * 3)
    weights = acts.mean(dim=(2, 3)) * resnet.fc.weight[0].detach()
    expected = torch.relu(torch.einsum("bc,bchw->bhw", weights, acts))
    torch.testing.assert_close(maps[0], expected, rtol=1e-2, atol=1e-3 * float(expected.max()))


class _OneChannelPerClass(nn.Module):
    """Channels = ReLU(red, green, blue); class 0 reads only the red channel, class 1 only the green one."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.eye(3)[:, :, None, None])
            self.features[0].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.5, 0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_relevancecam_follows_the_channel_that_drives_the_target():
    model = _OneChannelPerClass().eval()
    x = torch.zeros(1, 3, 12, 12)
    x[0, 0, :4, :4] = 1.0  # red square top-left
    x[0, 1, 8:, 8:] = 0.7  # green square bottom-right
    x[0, 2] = 0.5          # blue everywhere, read by no class
    red, green = torch.zeros(12, 12, dtype=torch.bool), torch.zeros(12, 12, dtype=torch.bool)
    red[:4, :4], green[8:, 8:] = True, True
    for target, inside in ((0, red), (1, green)):
        m = cam.relevancecam(model, model.features, x, [target])[0]
        assert m.shape == (12, 12)
        assert (m[inside] > 0).all()
        assert torch.allclose(m[~inside], torch.zeros(()), atol=1e-6 * float(m.max()))
    assert not _hooks_left(model)


# ---------------------------------------------------------------- guided backprop
def _tiny(act: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 1), act, nn.Flatten(), nn.Linear(12, 2)).eval()


def _manual_guided(model, x, targets, local_derivative):
    w1, b1 = model[0].weight.detach()[:, :, 0, 0], model[0].bias.detach()
    z = torch.einsum("oc,bchw->bohw", w1, x) + b1[None, :, None, None]
    g_h = model[3].weight.detach()[targets].reshape(len(targets), 3, 2, 2)
    guided = g_h * local_derivative(z) * ((z > 0) & (g_h > 0))
    plain = g_h * local_derivative(z)
    to_pixels = lambda g: torch.einsum("oc,bohw->bchw", w1, g).abs().amax(dim=1).numpy()  # noqa: E731
    return to_pixels(guided), to_pixels(plain)


def _silu_derivative(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


@pytest.mark.parametrize("act, derivative", [
    (nn.ReLU(inplace=True), lambda z: (z > 0).float()),
    (nn.SiLU(inplace=True), _silu_derivative),
])
def test_guided_backprop_rule_by_hand(act, derivative):
    model = _tiny(act)
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    targets = [0, 1, 1, 0]
    expected, plain = _manual_guided(model, x, torch.tensor(targets), derivative)
    got = cam.guided_backprop(model, x, targets)
    assert got.shape == (4, 2, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expected, plain)  # the guidance really changed something
    assert isinstance(model[1], type(act)) and not _hooks_left(model)


def test_guided_gradcam_is_clipped_product(resnet, images):
    targets = [0, 1, 2]
    got = cam.guided_gradcam(resnet, resnet.layer4, images, targets, clip_percentile=95.0)
    assert got.shape == (3, 96, 96) and got.dtype == np.float32
    assert got.min() >= 0 and np.allclose(got.reshape(3, -1).max(1), 1)
    share_at_top = (got.reshape(3, -1) >= 1 - 1e-6).mean(1)
    assert np.all(share_at_top >= 0.04) and np.all(share_at_top <= 0.07)  # about 5 % clipped
    low = cam.raw_maps(resnet, resnet.layer4, images, targets, "gradcam")
    product = cam.upsample(low, (96, 96)).numpy() * cam.guided_backprop(resnet, images, targets)
    q = np.percentile(product.reshape(3, -1), 95.0, axis=1)[:, None, None]
    np.testing.assert_allclose(got, np.minimum(product, q) / q, atol=1e-5)


def test_clip_scale_handles_empty_maps():
    maps = np.stack([np.zeros((4, 4)), np.arange(16.0).reshape(4, 4)])
    out = cam.clip_scale(maps, 50.0)
    assert (out[0] == 0).all()
    assert out[1].max() == 1 and out[1, 0, 0] == 0 and out[1, 0, 1] == pytest.approx(1 / 7.5)


# ---------------------------------------------------------------- models are left as they were
def test_every_method_restores_resnet(resnet, images):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    modules = [type(m) for m in resnet.modules()]
    resnet.train()
    for method in cam.METHODS:
        cam.class_activation_maps(resnet, resnet.layer4, images[:1], 3, method)
    cam.guided_gradcam(resnet, resnet.layer4, images[:1], 3)
    assert resnet.training  # the flag it had; maps themselves are computed in eval mode
    resnet.eval()
    after = resnet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in resnet.modules()] == modules
    assert not _hooks_left(resnet)
    assert all(p.grad is None for p in resnet.parameters())


def test_guided_gradcam_on_efficientnet_leaves_it_unchanged():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
    maps = cam.guided_gradcam(model, model.features[-1], x, [0, 4])
    assert maps.shape == (2, 64, 64) and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0
    alone = np.concatenate([cam.guided_gradcam(model, model.features[-1], x[i:i + 1], t) for i, t in ((0, 0), (1, 4))])
    np.testing.assert_allclose(maps, alone, rtol=0, atol=1e-5)  # a batch of cells = the cells one at a time
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert not _hooks_left(model) and all(p.grad is None for p in model.parameters())
    assert sum(isinstance(m, nn.SiLU) for m in model.modules()) > 10


# ---------------------------------------------------------------- figure helpers
def test_masked_image_keeps_pixels_above_threshold():
    image = np.full((4, 4, 3), 200, np.uint8)
    heat = np.array([[0, 1, 2, 3]] * 4, dtype=np.float32)  # normalised: 0, 1/3, 2/3, 1
    out = masked_image(image, heat, 0.5)
    assert (out[:, :2] == 0).all() and (out[:, 2:] == 200).all()
    fig = saliency_figure(image, heat[:2, :2], 0.5, title="AAA")  # a map at another resolution is resized
    assert len(fig.axes) == 4  # three panels and the colour bar
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_sample_patches_per_city_and_seeded():
    manifest = pd.DataFrame({
        "path": [f"test/{c}/{i:02d}.jpg" for c in ("AAA", "BBB") for i in range(12)] + ["val/AAA/x.jpg"],
        "iata": ["AAA"] * 12 + ["BBB"] * 12 + ["AAA"],
        "split": ["test"] * 24 + ["val"],
    })
    first = sample_patches(manifest, "test", 5, seed=7)
    again = sample_patches(manifest.sample(frac=1, random_state=1), "test", 5, seed=7)
    assert first["iata"].value_counts().to_dict() == {"AAA": 5, "BBB": 5}
    assert first["path"].tolist() == again["path"].tolist()
    assert not first["path"].str.startswith("val").any()
    assert sample_patches(manifest, "test", 5, seed=8)["path"].tolist() != first["path"].tolist()
    assert len(sample_patches(manifest, "val", 5, seed=7)) == 1
