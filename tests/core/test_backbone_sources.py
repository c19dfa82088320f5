"""Backbone keys beyond torchvision's names: timm models and torchgeo weights, resolved offline, with what
their weights expect of their input applied inside the model and carried by its checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from urbanlens.cities.classifier import classifier_from_checkpoint
from urbanlens.core import backbones, preprocess, runtime, weights_source
from urbanlens.core.backbone_table import IMAGENET_MEAN, IMAGENET_STD
from urbanlens.core.config import load_config
from urbanlens.core.errors import ConfigError


def test_a_torchgeo_weight_resolves_offline_to_its_url_transforms_and_bands():
    fmow = weights_source.parse("torchgeo:ResNet50_Weights.FMOW_RGB_GASSL", "ses.model.backbone")
    assert (fmow.kind, fmow.arch) == ("torchgeo", "resnet50")
    assert fmow.url.startswith("https://") and fmow.url.endswith(".pth")
    pre = weights_source.torchgeo_preprocessing(fmow.weight, None)  # /255, then ImageNet's: ImageNet's of 0-1
    assert pre.mean == pytest.approx(IMAGENET_MEAN) and pre.std == pytest.approx(IMAGENET_STD)
    assert pre.weights_size == 224 and pre.bands == ("R", "G", "B") and pre.units == "8-bit"
    s2 = weights_source.torchgeo_preprocessing(weights_source.torchgeo_weight("ResNet50_Weights.SENTINEL2_RGB_MOCO"), None)
    assert s2.bands == ("B4", "B3", "B2") and s2.order == (0, 1, 2) and s2.units == "reflectance x 10000"
    assert s2.mean == pytest.approx((0, 0, 0)) and s2.std == pytest.approx((1, 1, 1))


def test_weights_of_other_bands_and_models_that_are_no_classifier_are_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        weights_source.parse("torchgeo:ResNet50_Weights.SENTINEL2_ALL_MOCO", "cities.model.backbone")
    msg = str(e.value)
    assert "cities.model.backbone" in msg and "13 bands" in msg and "B8" in msg and "\n" not in msg
    assert "torchgeo:ResNet50_Weights.SENTINEL2_RGB_MOCO" in msg  # an RGB weight to choose instead
    with pytest.raises(ConfigError, match="not a classification backbone"):
        weights_source.parse("torchgeo:Unet_Weights.OAM_RGB_RESNET50_TCD")
    with pytest.raises(ConfigError, match="no such torchgeo weight.*FMOW_RGB_GASSL"):
        weights_source.parse("torchgeo:ResNet50_Weights.FMOW")
    with pytest.raises(ConfigError, match="timm has no model"):
        weights_source.parse("timm:resnet_fifty")
    with pytest.raises(ConfigError, match="timm:NAME or torchgeo:Enum.MEMBER"):
        weights_source.parse("tim:resnet50")


def test_band_names_give_the_channel_order():
    assert weights_source._rgb_order(("B02", "B03", "B04")) == (2, 1, 0)  # blue first
    assert weights_source._rgb_order(("red", "green", "blue")) == (0, 1, 2)
    assert weights_source._rgb_order(("B8", "B4", "B3")) is None  # near infrared: not our images


def test_the_config_takes_the_new_forms_and_refuses_half_written_ones(tmp_path):
    cfg = load_config(None, ["cities.model.backbone=timm:convnext_tiny",
                             "ses.model.backbone=torchgeo:Swin_V2_B_Weights.NAIP_RGB_MI_SATLAS"])
    assert cfg.cities.model.backbone == "timm:convnext_tiny"
    for bad in ("timm:", "torchgeo:ResNet50_Weights", "convnext_tiny"):
        with pytest.raises(ConfigError, match="cities.model.backbone"):
            load_config(None, [f"cities.model.backbone={bad}"])


def test_preprocess_maps_imagenet_input_to_the_weights_own_exactly():
    record = preprocess.Preprocessing(mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3), order=(2, 1, 0), size=40)
    x01 = torch.rand(2, 3, 32, 32)
    fed = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    want = (x01[:, [2, 1, 0]] - torch.tensor(record.mean).view(1, 3, 1, 1)) / torch.tensor(record.std).view(1, 3, 1, 1)
    want = F.interpolate(want, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(preprocess.Preprocess(record)(fed), want, atol=1e-5)
    assert preprocess.Preprocessing().is_imagenet() and not record.is_imagenet()


def test_torchvision_models_are_built_as_before():
    model = backbones.build_backbone("resnet18", 3)
    assert not hasattr(model, "preprocess") and not any(k.startswith("preprocess") for k in model.state_dict())
    assert preprocess.of(model).is_imagenet()


@pytest.mark.parametrize("spec", ["timm:test_vit", "torchgeo:ResNet18_Weights.SENTINEL2_RGB_MOCO"])
def test_a_checkpoint_carries_the_preprocessing_and_rebuilds_the_same_model(spec, tmp_path):
    torch.manual_seed(0)
    model = backbones.build_backbone(spec, 4).eval()
    record = preprocess.of(model)
    assert not record.is_imagenet() and hasattr(model, "preprocess")
    cfg = load_config(None, [f"cities.model.backbone={spec}", "cities.model.input_size=64"])
    path = runtime.save_checkpoint(tmp_path / "best.pt", model, cfg, epoch=1, classes=["a", "b", "c", "d"])
    state = runtime.load_checkpoint(path)
    assert preprocess.Preprocessing.from_dict(state["preprocessing"]) == record
    again, trained, classes = classifier_from_checkpoint(state, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(again.eval()(x), model(x), atol=1e-6)
    assert preprocess.of(again) == record and trained["backbone"] == spec and classes == ["a", "b", "c", "d"]


def test_the_ses_model_applies_the_preprocessing_once(tmp_path):
    from urbanlens.ses.model import build_ses_model, check_backbone, load_ses_model

    cfg = load_config(None, ["ses.model.backbone=timm:test_vit", "ses.model.pretrained=false"])
    torch.manual_seed(0)
    model = build_ses_model(cfg).eval()
    assert hasattr(model, "preprocess") and not hasattr(model.features, "preprocess")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        inner = model.fc(model.features(model.preprocess(x))).squeeze(1)
        assert torch.allclose(model.logit(x), inner, atol=1e-6) and torch.allclose(model(x), model.forward(x))
    path = runtime.save_checkpoint(tmp_path / "best.pt", model, cfg, epoch=1)
    again, ckpt = load_ses_model(path)
    with torch.no_grad():
        assert torch.allclose(again(x), model(x), atol=1e-6)
    other = load_config(None, ["ses.model.backbone=efficientnet_b0"])
    with pytest.raises(ConfigError, match="ses.model.backbone=timm:test_vit"):
        check_backbone(ckpt, other, path)


def test_a_backbone_written_without_its_prefix_is_told_the_prefix():
    with pytest.raises(ConfigError, match="'timm:convnext_tiny'"):
        load_config(None, ["ses.model.backbone=convnext_tiny"])
    with pytest.raises(ConfigError, match="'torchgeo:ResNet50_Weights.FMOW_RGB_GASSL'"):
        load_config(None, ["cities.model.backbone=ResNet50_Weights.FMOW_RGB_GASSL"])
