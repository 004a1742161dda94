"""Make every pass of one XSAM step see the same batch the same way.

XSAM evaluates one minibatch several times (theta_0, the ascent points, the probe points). Two things
must not differ between those passes, or the method measures noise instead of the loss landscape:
the random numbers (dropout masks) and BatchNorm's running statistics, which only the theta_0 pass
may update (docs/algorithm.md, "Every pass sees the same batch").
"""

from __future__ import annotations

import contextlib
import warnings
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
    runs in training mode normalises with the batch statistics, as usual; on exit its ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are copied back as they were, so only the theta_0 pass updates
    them. Also on exit, every FSDP2 module that ran is resharded: a forward without backward (a probe) leaves the
    root's gathered weights in place, and the next pass would reuse them instead of gathering the shards XSAM has
    moved.

    The modules are found as they run, by a global forward pre-hook installed for the pass alone (so a closure
    that calls any module, however it reaches it, is covered, and nothing stays installed between passes). A
    compiled module (``torch.compile(model)``, as the Trainer's ``--torch_compile`` makes it) is taken whole when
    it is called, and the hook steps aside until its compiled forward returns: dynamo never traces the hook, no
    guard fails, nothing recompiles, and the statistics are put back by copies rather than by a flag that a
    compiled graph would not read.
    """
    frozen = _FrozenStatistics()
    seen: list[nn.Module] = []
    hook = _DiscoveryHook(frozen, seen)
    with warnings.catch_warnings():
        # our hook is the "global hook" torch.compile warns about; it never fires inside the compiled forward
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")
        hook.install()
        try:
            yield
        finally:
            hook.remove()
            frozen.restore()
            _reshard(seen)


class _FrozenStatistics:
    """The running statistics of BatchNorm layers in training mode, copied before they run and put back after."""

    def __init__(self):
        self.saved: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, module: nn.Module) -> None:
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
                and module not in self.saved):
            buffers = [module.running_mean, module.running_var, module.num_batches_tracked]
            self.saved[module] = [(b, b.clone()) for b in buffers if b is not None]

    def restore(self) -> None:
        with torch.no_grad():
            for pairs in self.saved.values():
                for buffer, kept in pairs:
                    buffer.copy_(kept)


class _DiscoveryHook:
    """A global forward pre-hook that records each module as it runs (for its statistics and resharding). On a
    compiled module it records the whole compiled model and removes itself until that module's forward returns."""

    def __init__(self, frozen: _FrozenStatistics, seen: list[nn.Module]):
        self.frozen, self.seen, self.handle = frozen, seen, None
        self.compiled = _compiled_module_type()

    def install(self) -> None:
        self.handle = nn.modules.module.register_module_forward_pre_hook(self)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __call__(self, module: nn.Module, args) -> None:
        if self.compiled is not None and isinstance(module, self.compiled):
            for inner in module.modules():
                self._record(inner)
            self.remove()  # the compiled forward runs with no global hook, as when it was compiled

            def reinstall(*_) -> None:
                back.remove()
                self.install()

            back = module.register_forward_hook(reinstall, always_call=True)  # run eagerly, around the graph
            return
        self._record(module)

    def _record(self, module: nn.Module) -> None:
        self.frozen.add(module)
        if module not in self.seen:
            self.seen.append(module)


def _reshard(modules: list[nn.Module]) -> None:
    fsdp_module = _fsdp_module_type()
    if fsdp_module is None:
        return
    for module in modules:
        if isinstance(module, fsdp_module):
            module.reshard()


def _compiled_module_type():
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return None
    return OptimizedModule


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return None
    return FSDPModule
