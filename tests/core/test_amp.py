"""Mixed precision as configured (auto | bf16 | fp16 | off): what each choice means on a device, old
boolean configs and run stamps, NHWC under CPU bfloat16, both pipelines' training steps and the maps of
the SES study under CPU bfloat16."""
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from urbanlens.core import backbones, cam, config, loops, placement, runs
from urbanlens.core.placement import Placement
from urbanlens.core.errors import ConfigError
from urbanlens.ses import maps as ses_maps
from urbanlens.ses import model as ses_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU

torch.set_num_threads(1)


# ------------------------------------------------------------------ the choices
@pytest.mark.parametrize("amp, cpu, cuda", [("auto", None, torch.float16), ("bf16", torch.bfloat16, torch.bfloat16),
                                            ("off", None, None), (True, None, torch.float16), (False, None, None)])
def test_each_choice_means_one_dtype_per_device(amp, cpu, cuda):
    assert placement.autocast_dtype(CPU, amp) is cpu
    assert placement.autocast_dtype(CUDA, amp) is cuda
    assert placement.grad_scaler(CPU, amp).is_enabled() is False  # bfloat16 needs no loss scaling


def test_fp16_is_cuda_only_and_refused_on_cpu_in_one_line_naming_bf16():
    assert placement.autocast_dtype(CUDA, "fp16") is torch.float16
    with pytest.raises(ConfigError, match="bf16") as e:
        placement.grad_scaler(CPU, "fp16")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="auto, bf16, fp16, off"):
        placement.autocast_dtype(CPU, "fp32")


def test_cpu_bf16_autocast_runs_in_bfloat16():
    with placement.autocast(CPU, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with placement.autocast(CPU, "auto"):  # auto on CPU: full float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_config_takes_the_choices_and_reads_old_booleans(tmp_path):
    cfg = config.load_config(None, ["cities.train.amp=bf16", "ses.train.amp=false", "ses.cams.amp=off"])
    assert (cfg.cities.train.amp, cfg.ses.train.amp, cfg.ses.cams.amp) == ("bf16", "off", "off")
    old = tmp_path / "old.yaml"
    old.write_text("cities:\n  train:\n    amp: true\nses:\n  train:\n    amp: false\n")
    cfg = config.load_config(old)
    assert (cfg.cities.train.amp, cfg.ses.train.amp) == ("auto", "off")
    defaults = config.load_config(None)
    assert (defaults.cities.train.amp, defaults.ses.train.amp, defaults.ses.cams.amp) == ("auto", "auto", "off")
    with pytest.raises(ConfigError, match="'cities.train.amp' must be one of auto, bf16, fp16, off"):
        config.load_config(None, ["cities.train.amp=fp32"])


def test_a_stamp_with_an_old_boolean_or_without_cams_amp_is_the_same_run():
    cfg = config.load_config(None)
    stamp = runs.make_stamp("train_classification.py", cfg, ["cities.train"])
    stamp["settings"]["cities.train.amp"] = True  # written before amp had choices
    assert runs.differences(stamp, cfg, ["cities.train"]) == []
    stamp["settings"]["cities.train.amp"] = False
    assert runs.differences(stamp, cfg, ["cities.train"]) == ["cities.train.amp"]
    maps_stamp = runs.make_stamp("gradcaming_urban_areas.py", cfg, ses_maps.RUN_KEYS)
    del maps_stamp["settings"]["ses.cams.amp"]  # written before ses.cams.amp existed: float32 maps
    assert runs.differences(maps_stamp, cfg, ses_maps.RUN_KEYS) == []
    bf16 = config.load_config(None, ["ses.cams.amp=bf16"])
    assert runs.differences(maps_stamp, bf16, ses_maps.RUN_KEYS) == ["ses.cams.amp"]  # the maps are redone


def test_channels_last_applies_on_cpu_under_autocast_only():
    x = torch.randn(2, 3, 4, 4)
    assert placement.batch_to_device(x, CPU, True, "bf16").is_contiguous(memory_format=torch.channels_last)
    assert placement.batch_to_device(x, CPU, True, "off").is_contiguous()
    assert placement.batch_to_device(x, CPU, False, "bf16").is_contiguous()
    conv = placement.to_device(nn.Conv2d(3, 4, 3), CPU, True, "bf16")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert placement.uses_channels_last(CUDA, True, "off")


# ------------------------------------------------------------------ training steps under CPU bfloat16
def _train_on_one_batch(model, x, y, loss_fn, steps: int, lr: float) -> tuple[list[float], set]:
    """``steps`` of ``loops.train_step`` (bf16, NHWC) on one batch; the losses and the dtypes the first
    convolution's outputs had."""
    model = placement.to_device(model, CPU, True, "bf16")
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    dtypes = set()
    conv.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = placement.grad_scaler(CPU, "bf16")
    losses = [loops.train_step(model, loops.Optimiser(opt, None, scaler), x, y, loss_fn, Placement(CPU, "bf16", True))[0]
              for _ in range(steps)]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    return losses, dtypes


def test_city_classifier_step_learns_under_cpu_bf16():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 4
    losses, dtypes = _train_on_one_batch(torchvision.models.resnet18(num_classes=4), x, y, F.cross_entropy, 12, 1e-3)
    assert dtypes == {torch.bfloat16}
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


def test_ses_model_step_learns_under_cpu_bf16():
    torch.manual_seed(0)
    cfg = config.load_config(None, ["ses.model.pretrained=false", "ses.model.input_size=32", "ses.model.dropout=0",
                                    "ses.model.stochastic_depth=0"])
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 3, 32, 32, generator=g), torch.arange(10) % 5
    losses, dtypes = _train_on_one_batch(ses_model.build_ses_model(cfg), x, y, F.nll_loss, 12, 3e-3)
    assert dtypes == {torch.bfloat16}
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]


# ------------------------------------------------------------------ maps under CPU bfloat16
def test_guided_gradcam_under_cpu_bf16_agrees_with_float32():
    """The tolerance bf16 maps hold against float32 ones (EfficientNet-B0, 96 px, [0, 1]-scaled maps):
    correlation > 0.99 per map, mean absolute difference < 0.01, 99 % of pixels within 0.1. Single pixels
    near a guidance threshold or the clip value can differ by much more (up to ~0.6 seen), so no bound is
    put on the largest difference."""
    cfg = config.load_config(None, ["ses.model.pretrained=false", "ses.model.input_size=96"])
    torch.manual_seed(1)
    model = ses_model.build_ses_model(cfg).eval()
    layer = backbones.last_conv_layer(model)
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(11))
    targets = [0, 4, 0, 4]
    fp32 = cam.guided_gradcam(model, layer, x, targets)
    model = placement.to_device(model, CPU, True, "bf16")
    bf16 = cam.guided_gradcam(model, layer, placement.batch_to_device(x, CPU, True, "bf16"), targets, amp="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape and 0 <= bf16.min() and bf16.max() <= 1
    assert all(a.std() > 0 for a in fp32)
    assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(fp32, bf16)) > 0.99
    diff = np.abs(fp32 - bf16)
    assert diff.mean() < 0.01
    assert np.percentile(diff, 99) < 0.1
    assert diff.max() > 0  # the bf16 maps were computed in bf16, not silently in float32
