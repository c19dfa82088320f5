"""Batch norm synchronised over DDP ranks (urbanlens.core.sync_bn): the layers it replaces keep their
parameters, buffers and state_dict keys, and outside a process group of two or more ranks a shared layer
is plain batch norm. Its statistics over two ranks: tests/reliability/test_ddp_equals_single.py."""
import torch
from torch import nn

from urbanlens.core import backbones, placement, sync_bn


def test_synchronise_replaces_every_batch_norm_and_keeps_its_parameters():
    model = backbones.build_backbone("resnet18", 3)
    params, keys = {n: p for n, p in model.named_parameters()}, list(model.state_dict())
    assert not sync_bn.uses_shared_stats(model)
    assert sync_bn.synchronise(model, torch.device("cpu")) is model
    assert sync_bn.uses_shared_stats(model) and isinstance(model.bn1, sync_bn.SharedBatchNorm)
    assert all(p is params[n] for n, p in model.named_parameters())  # an optimizer made before still steps them
    assert list(model.state_dict()) == keys  # checkpoints load into the plain model
    plain = backbones.build_backbone("resnet18", 3)
    plain.load_state_dict(model.state_dict())


def test_outside_a_process_group_it_is_plain_batch_norm():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    shared = sync_bn.synchronise(nn.Sequential(plain), torch.device("cpu"))[0]
    reference = nn.BatchNorm2d(4, momentum=None)
    reference.load_state_dict(plain.state_dict())
    for _ in range(2):
        x = 3 * torch.randn(5, 4, 3, 3) + 1
        assert torch.equal(shared(x), reference(x))
    assert torch.equal(shared.running_var, reference.running_var) and int(shared.num_batches_tracked) == 2
    shared.eval(), reference.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(shared(x), reference(x))


def test_one_process_models_are_not_wrapped_nor_converted():
    model = backbones.build_backbone("resnet18", 3)
    assert placement.wrap_distributed(model, torch.device("cpu")) is model
    assert isinstance(model.bn1, nn.BatchNorm2d) and not sync_bn.uses_shared_stats(model)
