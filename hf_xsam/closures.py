"""The closure contract of `XSAM.step` and `XSAM.backward`: a closure becomes a replayable `MicroBatch`.

``closure()`` computes the loss on one fixed batch, calls ``loss.backward()`` and returns the loss. A closure that
also takes ``backward=False`` (and then skips the backward) lets the probe pay forward passes only; a standard
PyTorch closure works too, but each probe point then pays a backward whose gradients are thrown away (warned once
per optimizer).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch

from hf_xsam.replay import RNGState
from hf_xsam.types import MicroBatch

Closure = Callable[..., torch.Tensor]


def closure_batch(closure: Closure, rng: RNGState, optimizer) -> MicroBatch:
    """``closure`` as a micro-batch whose theta_0 pass has run (``rng`` captured before it). Its replays: with
    ``backward``, the closure as it is; without, the loss alone (see the module's docstring)."""

    def run(backward: bool) -> torch.Tensor:
        if backward:
            with torch.enable_grad():
                return closure()
        return _forward_only(closure, optimizer)

    return MicroBatch(run=run, rng=rng)


def _forward_only(closure: Closure, optimizer) -> torch.Tensor:
    """The closure's loss at a probe point. A closure without ``backward`` runs its backward anyway: into fresh
    gradients, thrown away, so that g_k (still needed for the next points) is left alone."""
    if takes_backward(closure):
        return closure(backward=False)
    if not optimizer._warned_plain_closure:
        warnings.warn(
            "XSAM.step(closure): the closure takes no `backward` argument, so each of the probe's points runs "
            "a backward pass it does not need. Write it as `def closure(backward=True): loss = ...; "
            "if backward: loss.backward(); return loss` to probe with forward passes only.",
            stacklevel=5,
        )
        optimizer._warned_plain_closure = True
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad():
            return closure().detach()
    finally:
        for p, grad in zip(params, kept):
            p.grad = grad


def takes_backward(closure: Closure) -> bool:
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: assume the standard contract
        return False
    return any(p.name == "backward" or p.kind is p.VAR_KEYWORD for p in parameters)
