"""The training core both pipelines share (urbanlens.core.loops): what mixed precision means on a device,
loaders, the step and epoch, evaluation and prediction against hand-written loops, DDP wrap and unwrap."""
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from urbanlens.core import backbones, loops, placement, runtime
from urbanlens.core.errors import ConfigError
from urbanlens.core.placement import Placement

CPU = torch.device("cpu")
PLACE = Placement(CPU)  # float32, NCHW, one process


class Tiny(nn.Module):
    """conv -> pooled features -> ``fc`` (a torchvision-like classifier head, for the embeddings)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def data(n: int = 21, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


# ------------------------------------------------------------------ mixed precision and placement
def test_mixed_precision_is_float16_on_cuda_only_and_only_when_asked():
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert placement.autocast_dtype(cuda, True) == torch.float16
    assert placement.autocast_dtype(cuda, False) is None
    assert placement.autocast_dtype(CPU, True) is None
    assert not placement.grad_scaler(CPU, True).is_enabled()
    with placement.autocast(CPU, True):  # off on CPU: full float32 even where CPU autocast would use bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_channels_last_only_on_cuda():
    x = torch.randn(2, 3, 4, 4)
    assert placement.batch_to_device(x, CPU, channels_last=True).is_contiguous()  # NCHW kept on CPU
    model = placement.to_device(tiny(), CPU, channels_last=True)
    assert model.conv.weight.is_contiguous()


# ------------------------------------------------------------------ loaders
def test_a_seeded_loader_has_its_own_generator_and_an_unseeded_one_draws_from_the_global_rng():
    ds = data()
    order = lambda loader: torch.cat([y for _, y in loader]).tolist()  # noqa: E731
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = order(loops.make_loader(ds, 4, 0, CPU, shuffle=True, seed=5))
    assert torch.equal(torch.get_rng_state(), state)  # untouched, so a fit's other draws do not move
    assert a == order(loops.make_loader(ds, 4, 0, CPU, shuffle=True, seed=5))
    assert a != order(loops.make_loader(ds, 4, 0, CPU, shuffle=True, seed=6))
    assert sorted(a) == sorted(ds.tensors[1].tolist())
    order(loops.make_loader(ds, 4, 0, CPU))
    assert not torch.equal(torch.get_rng_state(), state)  # as a plain DataLoader: worker seeds drawn globally
    assert [len(y) for _, y in loops.make_loader(ds, 4, 0, CPU)] == [4] * 5 + [1]  # the last batch kept
    with pytest.raises(ValueError):
        loops.make_loader(ds, 4, 0, CPU, sampler=range(3), distributed=True)


def test_shards_cover_every_item_once():
    ds = data(10)
    parts = [list(loops.shard(ds, r, 3).indices) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert loops.shard(ds, 0, 1) is ds


# ------------------------------------------------------------------ evaluation and prediction
def test_evaluate_equals_a_hand_loop():
    ds, model = data(), tiny()
    x, y = ds.tensors
    with torch.no_grad():
        logits = model(x)
    for loss_fn, out in ((F.cross_entropy, logits), (F.nll_loss, F.log_softmax(logits, 1))):
        net = model if loss_fn is F.cross_entropy else nn.Sequential(model, nn.LogSoftmax(1))
        got = loops.evaluate(net, loops.make_loader(ds, 4, 0, CPU), loss_fn, PLACE, desc=None)
        assert got["n"] == len(y)
        assert got["loss"] == pytest.approx(loss_fn(out, y).item(), rel=1e-6)
        assert got["acc"] == pytest.approx((out.argmax(1) == y).float().mean().item())
    assert not model.training


def test_predict_keeps_the_order_and_gives_the_penultimate_embeddings():
    ds, model = data(), tiny()
    x, y = ds.tensors
    with torch.no_grad():
        emb = torch.relu(model.conv(x)).mean((2, 3))
        logits = model(x)
    loader = loops.make_loader(ds, 5, 0, CPU)
    out, labels = loops.predict(model, loader, PLACE, desc=None)
    assert torch.allclose(torch.from_numpy(out), logits, atol=1e-6) and (labels == y.numpy()).all()
    lo, em, labels = loops.predict(model, loader, PLACE, embeddings=True, desc=None)
    assert torch.allclose(torch.from_numpy(lo), logits, atol=1e-6)
    assert torch.allclose(torch.from_numpy(em), emb, atol=1e-6) and (labels == y.numpy()).all()
    with pytest.raises(ValueError):
        loops.predict(model, [], PLACE, desc=None)


# ------------------------------------------------------------------ training
def test_the_step_lowers_the_loss_on_a_toy_batch():
    x, y = data(8).tensors
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first, _ = loops.train_step(model, loops.Optimiser(opt), x, y, F.cross_entropy, PLACE)
    for _ in range(30):
        last, hits = loops.train_step(model, loops.Optimiser(opt), x, y, F.cross_entropy, PLACE)
    assert last < 0.5 * first and hits > len(y) // 2


def test_a_disabled_scaler_steps_as_no_scaler():
    x, y = data(8).tensors
    models = [tiny(), tiny()]
    opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in models]
    for _ in range(3):
        loops.train_step(models[0], loops.Optimiser(opts[0]), x, y, F.cross_entropy, PLACE)
        loops.train_step(models[1], loops.Optimiser(opts[1], None, placement.grad_scaler(CPU, True)), x, y, F.cross_entropy,
                         PLACE)
    for a, b in zip(*(m.state_dict().values() for m in models)):
        assert torch.equal(a, b)


def test_an_epoch_is_the_steps_of_its_batches():
    ds = data(9)
    batches = list(DataLoader(ds, batch_size=4))  # sizes 4, 4, 1
    model, ref = tiny(), tiny()
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda step: 0.5 ** step)
    seen = []
    flip = lambda x: seen.append(len(x)) or x.flip(-1)  # noqa: E731
    got = loops.train_epoch(model, batches, loops.Optimiser(opt, sched), F.cross_entropy, PLACE, augment=flip,
                            min_batch=2, desc=None)
    assert seen == [4, 4] and got["n"] == 8  # the lone last sample is skipped, the others augmented
    loss_sum = correct = 0.0
    for x, y in batches[:2]:
        loss, hits = loops.train_step(ref, loops.Optimiser(ref_opt), x.flip(-1), y, F.cross_entropy, PLACE)
        ref_sched.step()
        loss_sum, correct = loss_sum + loss * len(y), correct + hits
    assert got["loss"] == loss_sum / 8 and got["acc"] == correct / 8
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 0.1 * 0.25
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    assert model.training


def test_rank_share_of_one_process_is_the_shuffled_loaders_order():
    """The order a distributed loader splits is the one a seeded shuffled loader takes in one process
    (so single-process runs keep their order), and every seed its own."""
    ds = data(13)
    order = torch.cat([y for _, y in loops.make_loader(ds, 4, 0, CPU, shuffle=True, seed=9)]).tolist()
    labels = ds.tensors[1]
    assert labels[list(loops.RankShare(13, True, 9))].tolist() == order
    assert list(loops.RankShare(13, True, 9)) != list(loops.RankShare(13, True, 10))
    assert list(loops.RankShare(5, False, 9)) == [0, 1, 2, 3, 4]


def test_rank_shares_make_up_each_global_batch():
    """Global batch 4 over 2 ranks (per-rank 2): the ranks' k-th batches together are global batch k; of
    13 items the 13th is left out, so the last global batch splits 2 + 2."""
    whole = loops.RankShare(13, True, 1, 0, 2).global_order().tolist()
    parts = [list(loops.RankShare(13, True, 1, r, 2)) for r in range(2)]
    assert len(whole) == 12 and [len(p) for p in parts] == [6, 6]
    assert whole == loops.shuffled_order(13, 1).tolist()[:12]
    for k in range(3):
        assert sorted(parts[0][2 * k:2 * k + 2] + parts[1][2 * k:2 * k + 2]) == sorted(whole[4 * k:4 * k + 4])


# ------------------------------------------------------------------ DDP
@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_unwrap_finds_the_model_inside_ddp(one_rank_group, tmp_path):
    model = backbones.build_backbone("resnet18", 3)
    wrapped = placement.wrap_distributed(model, CPU)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
    assert placement.unwrap(wrapped) is model and placement.unwrap(model) is model
    assert backbones.last_conv_layer(wrapped) is model.layer4
    runtime.save_checkpoint(tmp_path / "m.pt", wrapped, {"seed": 0})
    assert runtime.load_checkpoint(tmp_path / "m.pt")["model"].keys() == model.state_dict().keys()
    ds = data(6)  # one rank: the sums over ranks are this rank's
    got = loops.evaluate(wrapped, loops.make_loader(ds, 4, 0, CPU, distributed=True), F.cross_entropy,
                         PLACE, desc=None)
    assert got["n"] == 6


def test_unwrap_of_data_parallel_and_plain_models():
    model = tiny()
    assert placement.unwrap(nn.DataParallel(model)) is model
    assert placement.wrap_distributed(model, CPU) is model  # no process group: the model itself


def test_a_gpu_index_the_machine_lacks_is_a_device_error(monkeypatch):
    from urbanlens.core.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as far as select_device can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"device 'cuda:1' but this machine has 1 CUDA GPU"):
        placement.select_device("cuda:1")


def test_rank_batch_splits_the_global_batch_or_names_the_key():
    assert [loops.rank_batch(12, w, "ses.train.batch_size") for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert loops.rank_batch(7, 1, "cities.train.batch_size") == 7  # one process: the batch as configured
    with pytest.raises(ConfigError, match=r"ses.train.batch_size: the global batch of 10 does not split evenly over 4 "
                                          r"processes; set ses.train.batch_size to a multiple of 4 \(e.g. 8\)"):
        loops.rank_batch(10, 4, "ses.train.batch_size")
