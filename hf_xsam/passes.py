"""The passes of one XSAM step over the micro-batches of its batch, written once.

Every caller drives a step through `sharpness_passes`: `XSAM.step(closure)` (one micro-batch), `XSAM.backward`
(custom loops with gradient accumulation), `XSAMTrainer` (global and local perturbation) and the benchmarks.

The caller runs each micro-batch's theta_0 pass itself, when that micro-batch comes (a trainer must: the
micro-batches of an accumulation window arrive one call at a time), and records it as a `MicroBatch`. Once the
theta_0 gradients of the whole batch sit in ``.grad``, `sharpness_passes` runs the rest: the ascent steps (each
followed by a pass over every micro-batch, replaying its random numbers), the probe when due, and the direction,
leaving d in ``.grad`` and the weights at theta_0. The caller then lets the base optimizer step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from hf_xsam.replay import RNGState, replayed_pass
from hf_xsam.types import MicroBatch, PassesInfo


def _no_context(last: bool):
    return contextlib.nullcontext()


def sharpness_passes(
    opt,
    batches: Sequence[MicroBatch],
    *,
    probe: bool | None = None,
    probe_extra: Sequence[MicroBatch] = (),
    sync: Callable[[bool], contextlib.AbstractContextManager] = _no_context,
    reduce_losses: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PassesInfo:
    """Run the rest of a sharpness-aware step over ``batches``, whose theta_0 passes have run.

    opt: the `XSAM` optimizer; nothing happens unless ``opt.sharpness_due``.
    probe: probe on this step (default ``opt.probe_due``). The probe's loss at each point is the sum of the
        micro-batches' shares, i.e. the step's loss there; ``probe_extra`` adds micro-batches trained on before
        (``probe_batches``) with the shares they had in their own steps, and the sum is rescaled to one step's.
    sync: ``sync(last)`` is entered around each backward; ``last`` is True for the last micro-batch of a pass set,
        so a DDP caller can all-reduce once per pass set (``no_sync`` on the others).
    reduce_losses: reduces the probe's losses across processes (`XSAM` defaults to a mean over the default
        process group when one is running).

    On return the weights are theta_0 (bitwise), ``.grad`` holds the direction d, and the random generators are
    as the last theta_0 pass left them.
    """
    info = PassesInfo()
    if not opt.sharpness_due or not batches:
        if batches and opt.correction_due:  # a step between sharpness steps carries the last one's correction
            opt.apply_correction()
        return info
    rng_after = RNGState.capture(opt.devices)

    def pass_set(backward: bool, micro_batches: Sequence[MicroBatch]) -> torch.Tensor:
        total = None
        for i, batch in enumerate(micro_batches):
            batch.rng.restore()
            with replayed_pass(), sync(i == len(micro_batches) - 1):
                share = batch.run(backward).detach().float().reshape(())
            total = share if total is None else total + share
        return total

    probe_fn = None
    if opt.probe_due if probe is None else probe:
        def probe_fn() -> torch.Tensor:
            total = pass_set(False, batches)
            if probe_extra:  # rescaled so the probe's losses read on the step's scale
                total = (total + pass_set(False, probe_extra)) * (len(batches) / (len(batches) + len(probe_extra)))
            return total

    try:
        for _ in range(opt.ascent_steps):
            opt.ascent_step()
            opt.zero_grad(set_to_none=True)
            info.ascent_loss = pass_set(True, batches)
        info.direction = opt.set_direction(probe_fn, reduce_losses)
    except BaseException:  # e.g. out of memory in a replay: leave the weights at theta_0 for whoever retries
        opt.discard_step()
        raise
    finally:
        rng_after.restore()
    return info
