"""urbanlens.core.frozen: freezing all but the head, the head standing for the whole model in what is saved
and loaded, the shards of the ranks gathered in dataset order, and the embeddings cache (reused while its
stamp matches, computed again when the backbone or its weights change, never vouched for by a stale stamp)."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from urbanlens.core import frozen, loops, runtime
from urbanlens.core.backbones import head
from urbanlens.core.config import load_config
from urbanlens.core.errors import ConfigError
from urbanlens.core.placement import Placement

CPU = Placement(torch.device("cpu"))


class Small(nn.Module):
    """A model of one's own: a convolution, batch norm, pooling and its final layer ``fc``."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def small_model(seed=0):
    runtime.seed_everything(seed)
    return Small()


def test_a_head_trained_through_head_only_leaves_the_backbone_as_built():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = head(model)
    frozen.freeze(model, layer)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    net = frozen.HeadOnly(model, layer)
    assert list(net.state_dict()) == list(model.state_dict())  # checkpoints through it are the whole model's
    data = frozen.Embeddings(torch.randn(12, 8), torch.arange(12) % 3)
    opt = loops.Optimiser(torch.optim.Adam(model.parameters(), lr=0.1))  # every parameter, as the trainer builds it
    loops.train_epoch(net, loops.make_loader(data, 4, 0, CPU.device), opt, F.cross_entropy, CPU, min_batch=2,
                      desc=None)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != k.startswith("fc."), k  # the head moved, nothing else did
    assert not model.training  # batch norm kept its statistics: the backbone never ran in training mode
    net.load_state_dict(before)
    assert torch.equal(model.fc.weight, before["fc.weight"])


def test_weights_digest_follows_the_backbone_not_the_head():
    a, b, c = small_model(0), small_model(0), small_model(1)
    with torch.no_grad():
        b.fc.weight.add_(1.0)
    assert frozen.weights_digest(a, head(a)) == frozen.weights_digest(b, head(b))
    assert frozen.weights_digest(a, head(a)) != frozen.weights_digest(c, head(c))


@pytest.mark.parametrize("n,world", [(7, 2), (10, 3), (2, 4)])
def test_gather_puts_the_ranks_shards_back_in_dataset_order(monkeypatch, n, world):
    rows = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    shards = [rows[list(loops.shard(range(n), r, world))] for r in range(world)]

    def all_gather_object(out, part):  # what torch.distributed hands every rank
        out[:] = shards

    monkeypatch.setattr(frozen.dist, "all_gather_object", all_gather_object)
    np.testing.assert_array_equal(frozen.gather(shards[1], world), rows)


def test_the_cache_is_reused_until_the_backbone_changes(tmp_path, capsys):
    path, calls = tmp_path / "embeddings" / "embeddings.pt", []
    keys = ("cities.model",)

    def compute():
        calls.append(1)
        return {"train": np.full((3, 2), len(calls), np.float32), "train_labels": np.arange(3)}

    cfg = load_config(None)
    first, changes = frozen.cached(path, "train_classification.py", cfg, keys, {}, {"backbone_sha256": "a"}, compute, CPU)
    assert changes == ["no embeddings.pt yet"] and len(calls) == 1 and frozen.stamp_path(path).is_file()
    again, changes = frozen.cached(path, "train_classification.py", cfg, keys, {}, {"backbone_sha256": "a"}, compute, CPU)
    assert changes == [] and len(calls) == 1
    np.testing.assert_array_equal(again["train"], first["train"])
    other = load_config(None, ["cities.model.backbone=resnet18"])
    _, changes = frozen.cached(path, "train_classification.py", other, keys, {}, {"backbone_sha256": "a"}, compute, CPU)
    assert changes == ["cities.model.backbone"] and len(calls) == 2
    _, changes = frozen.cached(path, "train_classification.py", other, keys, {}, {"backbone_sha256": "b"}, compute, CPU)
    assert changes == ["backbone_sha256"] and len(calls) == 3
    path.write_bytes(b"not a torch file")  # damaged under a matching stamp: computed again, not trusted
    fresh, changes = frozen.cached(path, "train_classification.py", other, keys, {}, {"backbone_sha256": "b"}, compute,
                                   CPU)
    assert changes == ["embeddings.pt unreadable"] and len(calls) == 4 and (fresh["train"] == 4).all()


def test_freeze_is_a_config_choice_with_the_old_behaviour_as_default():
    cfg = load_config(None)
    assert cfg.cities.train.freeze == "none" and cfg.ses.train.freeze == "none"
    assert frozen.frozen(load_config(None, ["ses.train.freeze=backbone"]).ses.train.freeze)
    with pytest.raises(ConfigError, match="cities.train.freeze"):
        load_config(None, ["cities.train.freeze=head"])
