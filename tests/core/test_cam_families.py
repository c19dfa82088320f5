"""CAMs on every backbone family: a ViT's patch tokens and a ConvNeXt's maps against pytorch-grad-cam,
Swin's channels-last maps (timm and torchvision) locating a planted signal, guided Grad-CAM on
transformers and ConvNeXt, the layer's grid for the coarse-map check, and Relevance-CAM refused where no
canonizer fits. Tiny random-init models, nothing downloaded."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from urbanlens.core import backbones, cam, schema
from urbanlens.core.errors import ConfigError

torch.set_num_threads(1)

TARGETS = [0, 3]


def _build(name: str, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return backbones.build_backbone(name, classes).eval()


@pytest.fixture(scope="module")
def vit():
    return _build("timm:test_vit")  # any input size: 96 px is a 6 x 6 patch grid after the class token


@pytest.fixture(scope="module")
def vit_fixed():
    return _build("timm:vit_tiny_patch16_224")  # fixed 224 px: its preprocessing resizes 96 px inputs


@pytest.fixture(scope="module")
def convnext():
    return _build("timm:test_convnext")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def _no_hooks_or_grads(model: nn.Module) -> bool:
    hooked = [n for n, m in model.named_modules() if m._forward_hooks or m._backward_hooks or m._backward_pre_hooks]
    return not hooked and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- the layer's output as feature maps
def test_tokens_drop_the_prefix_and_fill_the_grid_row_by_row():
    b, c, h, w = 2, 5, 2, 3
    maps = torch.randn(b, c, h, w)
    tokens = torch.cat([torch.full((b, 2, c), 99.0), maps.flatten(2).transpose(1, 2)], dim=1)  # 2 prefix tokens
    torch.testing.assert_close(cam.as_feature_maps(tokens, "tokens", prefix=2, grid=(h, w)), maps, rtol=0, atol=0)
    square = torch.randn(b, c, 3, 3)
    tokens = torch.cat([torch.zeros(b, 1, c), square.flatten(2).transpose(1, 2)], dim=1)
    # the embedding's grid is of another size (a ViT of dynamic size fed smaller images): the square one
    torch.testing.assert_close(cam.as_feature_maps(tokens, "tokens", 1, grid=(10, 10)), square, rtol=0, atol=0)
    torch.testing.assert_close(cam.as_feature_maps(maps.permute(0, 2, 3, 1), "nhwc"), maps, rtol=0, atol=0)
    assert cam.as_feature_maps(maps, "nchw") is maps
    with pytest.raises(ValueError, match="no square grid"):
        cam.as_feature_maps(torch.zeros(1, 1 + 6, 4), "tokens", 1)


def test_layer_hooks_give_feature_maps_of_every_family(vit, convnext, images):
    for model, channels, side in ((vit, 64, 6), (convnext, 64, 3)):
        acts, grads = cam.activations_and_gradients(model, backbones.last_conv_layer(model), images, TARGETS)
        assert acts.shape == grads.shape == (2, channels, side, side)
        assert grads.abs().sum() > 0


# ---------------------------------------------------------------- Grad-CAM, Grad-CAM++ vs pytorch-grad-cam
def _vit_reshape(model: nn.Module):
    """pytorch-grad-cam's reshape_transform for ViTs: drop the prefix tokens, lay the rest on a square grid."""
    prefix = backbones.prefix_tokens(model)

    def reshape(t):
        t = t[:, prefix:]
        side = int(round(t.shape[1] ** 0.5))
        return t.reshape(t.shape[0], side, side, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


@pytest.mark.parametrize("model_name", ["vit", "vit_fixed", "convnext"])
@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_maps_equal_pytorch_grad_cam(request, model_name, method, images):
    """As tests/core/test_cam.py does for ResNet: equal low-resolution maps (before their ReLU'd min-max)
    and equal full maps (theirs: min-max, OpenCV resize, min-max; ours: bilinear resize, min-max)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(model_name)
    layer = backbones.last_conv_layer(model)
    reshape = _vit_reshape(model) if backbones.cam_layout(model) == "tokens" else None
    reference = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus}[method]
    with reference(model, [layer], reshape_transform=reshape) as ref:
        theirs = ref(images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
        acts = ref.activations_and_grads.activations[0].numpy()
        grads = ref.activations_and_grads.gradients[0].numpy()
        theirs_low = np.maximum(ref.get_cam_image(images, layer, None, acts, grads), 0)
    for p in model.parameters():  # the reference accumulates parameter gradients; we must not
        p.grad = None

    ours_low = cam.raw_maps(model, layer, images, TARGETS, method).numpy()
    side = {"vit": 6, "vit_fixed": 14, "convnext": 3}[model_name]  # the fixed-size ViT sees 224 px: 14 x 14
    assert ours_low.shape == theirs_low.shape == (2, side, side)
    assert (ours_low.reshape(2, -1).max(1) > 0).all()
    np.testing.assert_allclose(ours_low, theirs_low, rtol=1e-4, atol=1e-5 * theirs_low.max())
    ours = cam.class_activation_maps(model, layer, images, TARGETS, method)
    assert ours.shape == theirs.shape == (2, 96, 96)  # upsampled to the input's size, not the ViT's own
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert _no_hooks_or_grads(model)


# ---------------------------------------------------------------- Swin: channels-last maps locate a planted signal
def _planted(size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Grey images with a high-contrast random texture in the top-right quadrant (a map laid out
    transposed would put it bottom-left), and that quadrant's mask."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, size, size, generator=g) * 0.05
    half = size // 2
    x[:, :, :half, half:] = torch.randn(2, 3, half, half, generator=g) * 1.5
    mask = np.zeros((size, size), bool)
    mask[:half, half:] = True
    return x, mask


def _read_the_signal(model: nn.Module, head: nn.Linear, x: torch.Tensor, mask: np.ndarray) -> None:
    """Set class 1 of ``head`` (fed the mean of the CAM layer's maps, its norm removed) to read the
    texture: the part of its quadrant's mean features orthogonal to the background's mean features, so the
    target's evidence lies in that quadrant alone."""
    with torch.no_grad(), cam.LayerHooks(model, backbones.last_conv_layer(model)) as hooks:
        model(x)
    acts = hooks.activations.mean(0)                                    # [C, h, w]
    cells = torch.from_numpy(mask[:: mask.shape[0] // acts.shape[1], :: mask.shape[1] // acts.shape[2]]
                             [: acts.shape[1], : acts.shape[2]].copy())
    signal, background = acts[:, cells].mean(1), acts[:, ~cells].mean(1)
    v = signal - (signal @ background) / (background @ background) * background
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[1] = v / v.norm()


@pytest.mark.parametrize("name, size, side", [
    ("timm:swin_tiny_patch4_window7_224", 128, 7),  # resized to its own 224 px inside: 7 x 7
    ("torchgeo:Swin_V2_T_Weights.SENTINEL2_SI_RGB_SATLAS", 128, 4),  # torchvision's swin_v2_t, any size
])
def test_swin_maps_locate_a_planted_signal(name, size, side):
    model = _build(name)
    assert backbones.cam_layout(model) == "nhwc"
    model.norm = nn.Identity()  # the head then reads the CAM layer's own features, pooled
    x, mask = _planted(size)
    _read_the_signal(model, backbones.head(model), x, mask)
    layer = backbones.last_conv_layer(model)
    low = cam.raw_maps(model, layer, x, 1, "gradcam")
    assert low.shape == (2, side, side)
    maps = cam.class_activation_maps(model, layer, x, 1, "gradcam")
    assert maps.shape == (2, size, size)
    for m in maps:
        inside, outside = m[mask].mean(), m[~mask].mean()
        assert inside > 3 * outside, (inside, outside)
        assert mask.flat[m.argmax()]
    plusplus = cam.class_activation_maps(model, layer, x, 1, "gradcampp")
    assert plusplus.shape == (2, size, size) and (plusplus[:, mask].mean(1) > plusplus[:, ~mask].mean(1)).all()
    assert _no_hooks_or_grads(model)


# ---------------------------------------------------------------- guided Grad-CAM
@pytest.mark.parametrize("model_name", ["vit", "convnext"])
def test_guided_gradcam_runs_on_transformers_and_convnext(request, model_name, images):
    model = request.getfixturevalue(model_name)
    layer = backbones.last_conv_layer(model)
    with torch.no_grad():
        before = model(images)
    maps = cam.guided_gradcam(model, layer, images, TARGETS)
    assert maps.shape == (2, 96, 96) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.reshape(2, -1).max(1), 1)
    low = cam.upsample(cam.raw_maps(model, layer, images, TARGETS, "gradcam"), (96, 96)).numpy()
    product = low * cam.guided_backprop(model, images, TARGETS)
    q = np.percentile(product.reshape(2, -1), 99.0, axis=1)[:, None, None]
    np.testing.assert_allclose(maps, np.minimum(product, q) / q, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(images), before)
    assert _no_hooks_or_grads(model)


# ---------------------------------------------------------------- the CAM layer's grid, for the coarse-map check
def test_feature_grid_asks_the_model(vit, vit_fixed, convnext):
    resnet = torchvision.models.resnet18(num_classes=2)
    assert cam.feature_grid(resnet, resnet.layer4, 96) == (3, 3)
    assert cam.feature_grid(convnext, backbones.last_conv_layer(convnext), 48) == (1, 1)
    assert cam.feature_grid(vit, backbones.last_conv_layer(vit), 96) == (6, 6)
    assert cam.feature_grid(vit_fixed, backbones.last_conv_layer(vit_fixed), 48) == (14, 14)  # its own 224 px
    assert not vit_fixed.training
    grid = cam.feature_grid(vit_fixed, backbones.last_conv_layer(vit_fixed), 48)
    assert schema.cam_map_problem("cities.model.input_size", 48, grid=grid) is None
    line = schema.cam_map_problem("cities.model.input_size", 48, "cities.patch.size", grid=(1, 1))
    assert "'cities.model.input_size' is 48" in line and "1 x 1" in line and "at least 64" in line


# ---------------------------------------------------------------- Relevance-CAM where a canonizer fits, else refused
def test_relevancecam_is_refused_with_the_methods_that_work(vit, convnext, images):
    for model, family in ((vit, "timm_vit"), (convnext, "timm_convnext")):
        assert cam.working_methods(model) == ("gradcam", "gradcampp")
        with pytest.raises(ConfigError) as e:
            cam.check_method(model, "relevancecam")
        message = str(e.value)
        assert message.startswith("cities.saliency.method: 'relevancecam'")
        assert f"the {family} family" in message and "choose one of gradcam, gradcampp" in message
        with pytest.raises(ConfigError, match=family):  # also when called directly, before any pass
            cam.class_activation_maps(model, backbones.last_conv_layer(model), images, 0, "relevancecam")
        assert _no_hooks_or_grads(model)
    resnet = torchvision.models.resnet18(num_classes=2)
    assert cam.working_methods(resnet) == cam.METHODS
    cam.check_method(resnet, "relevancecam")
    with pytest.raises(ConfigError, match="unknown CAM method 'scorecam'; choose one of gradcam"):
        cam.check_method(resnet, "scorecam", "cities.saliency.method")
