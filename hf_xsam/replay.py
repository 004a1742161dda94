"""Make every pass of one XSAM step see the same batch the same way.

XSAM evaluates one minibatch several times (theta_0, the ascent points, the probe points). Two things
must not differ between those passes, or the method measures noise instead of the loss landscape:
the random numbers (dropout masks) and BatchNorm's running statistics, which only the theta_0 pass
may update (docs/algorithm.md, "Every pass sees the same batch").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class RNGState:
    """A snapshot of the CPU generator and the CUDA generators of ``devices``; ``restore()`` rewinds to it.

    Example::

        rng = RNGState.capture()
        a = torch.rand(3)
        rng.restore()
        assert torch.equal(a, torch.rand(3))
    """

    def __init__(self, cpu: torch.Tensor, cuda: dict[int, torch.Tensor]):
        self.cpu = cpu
        self.cuda = cuda

    @classmethod
    def capture(cls, devices: Iterable[torch.device] = ()) -> RNGState:
        cuda_indices = sorted({d.index if d.index is not None else torch.cuda.current_device()
                               for d in devices if d.type == "cuda"})
        return cls(torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in cuda_indices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)


@contextlib.contextmanager
def replayed_pass() -> Iterator[None]:
    """The context of every pass XSAM replays (ascent points, probe points). Inside, every BatchNorm layer that
    runs in training mode normalises with the batch statistics, as usual, but leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` untouched. On exit, every FSDP2 module that ran is resharded:
    a forward without backward (a probe) leaves the root's gathered weights in place, and the next pass would
    reuse them instead of gathering the shards XSAM has moved.

    The modules are found as they run (a global forward pre-hook), so no model needs to be named: a closure that
    calls any module, however it reaches it, is covered.
    """
    # track_running_stats=False in training mode is exactly "use batch stats, update nothing" in
    # _BatchNorm.forward; momentum=0 would still bump num_batches_tracked and turn NaN stats into NaN buffers.
    toggled: set[nn.Module] = set()
    sharded: list[nn.Module] = []
    fsdp_module = _fsdp_module_type()

    def seen(module: nn.Module, args) -> None:
        bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if bn and module.training and module.track_running_stats:
            module.track_running_stats = False
            toggled.add(module)
        if fsdp_module is not None and isinstance(module, fsdp_module) and module not in sharded:
            sharded.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(seen)
    try:
        yield
    finally:
        handle.remove()
        for module in toggled:
            module.track_running_stats = True
        for module in sharded:
            module.reshard()


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule
