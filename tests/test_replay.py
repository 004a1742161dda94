"""RNGState and replayed_pass: every pass of an XSAM step sees the batch the way the first pass did."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_xsam.replay import RNGState, replayed_pass

pytestmark = pytest.mark.usefixtures("seeded")


def test_rng_state_reproduces_random_numbers():
    rng = RNGState.capture()
    a, b = torch.rand(5), torch.randn(3, 3)
    rng.restore()
    assert torch.equal(a, torch.rand(5)) and torch.equal(b, torch.randn(3, 3))
    rng.restore()  # a snapshot can be replayed any number of times
    assert torch.equal(a, torch.rand(5))
    assert not torch.equal(a, torch.rand(5))  # and the generator moves on afterwards


def test_rng_state_reproduces_dropout_masks():
    dropout = nn.Dropout(0.5)
    x = torch.ones(64)
    rng = RNGState.capture([torch.device("cpu")])
    first = dropout(x)
    after = RNGState.capture()
    rng.restore()
    assert torch.equal(first, dropout(x))
    assert torch.equal(after.cpu, torch.get_rng_state())  # the replay ends where the first pass ended
    assert rng.cuda == {}  # CPU devices only: no CUDA generator captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_reproduces_cuda_dropout_masks():
    device = torch.device("cuda")
    dropout = nn.Dropout(0.5)
    x = torch.ones(4096, device=device)
    rng = RNGState.capture([device, torch.device("cpu")])
    assert list(rng.cuda) == [torch.cuda.current_device()]
    first, cpu_first = dropout(x), torch.rand(4)
    rng.restore()
    assert torch.equal(first, dropout(x)) and torch.equal(cpu_first, torch.rand(4))
    assert not torch.equal(first, dropout(x))


def test_rng_state_snapshot_is_a_copy():
    rng = RNGState.capture()
    expected = rng.cpu.clone()
    torch.rand(10)
    assert torch.equal(rng.cpu, expected)


def bn_model(momentum=0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6, momentum=momentum),
    )
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(3):
            model(torch.randn(8, 2, 6, 6))
    return model


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average, driven by num_batches_tracked
def test_replayed_pass_normalise_as_usual_and_update_nothing(momentum):
    model = bn_model(momentum)
    reference = copy.deepcopy(model)
    before = buffers(model)
    x = torch.randn(8, 2, 6, 6)

    with replayed_pass():
        out = model(x)
        out.sum().backward()
    expected = reference(x)  # plain training mode: batch statistics, and the buffers move

    assert torch.equal(out, expected)
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert not torch.equal(reference[1].running_mean, before["1.running_mean"])
    assert reference[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() + 1

    # afterwards the layers track again
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model(x)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    assert model[5].num_batches_tracked.item() == before["5.num_batches_tracked"].item() + 1


def test_replayed_pass_leaves_eval_mode_and_untracked_layers_alone():
    model = bn_model().eval()
    untracked = nn.BatchNorm1d(6, track_running_stats=False)
    x = torch.randn(8, 2, 6, 6)
    expected = model(x)
    with replayed_pass():
        assert torch.equal(model(x), expected)  # eval mode still normalises with the running statistics
        untracked(torch.randn(4, 6))
    assert untracked.track_running_stats is False
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def test_replayed_pass_restores_the_statistics_and_unhooks_after_an_exception():
    model = bn_model()
    before = buffers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with replayed_pass():
            model(torch.randn(8, 2, 6, 6))
            assert nn.modules.module._has_any_global_hook()  # the pass's own hook, for the pass alone
            raise RuntimeError("boom")
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert not nn.modules.module._has_any_global_hook()


def test_replayed_pass_finds_layers_it_was_not_told_about_and_unhooks_on_exit():
    """No model is named: a layer reached any way (here through a plain function) is frozen while it runs, and
    after the block the hook is gone, so the statistics move again."""
    model = bn_model()
    before = buffers(model)
    x = torch.randn(8, 2, 6, 6)

    def loss_of(inputs):
        return model(inputs).sum()

    with replayed_pass() as value:
        loss_of(x).backward()
    assert value is None
    for name, buffer in buffers(model).items():
        assert torch.equal(buffer, before[name]), name
    model(x)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    assert model[1].num_batches_tracked.item() == before["1.num_batches_tracked"].item() + 1
