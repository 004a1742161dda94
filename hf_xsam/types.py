"""The records that the pass driver (`hf_xsam.passes`) and the optimizer (`hf_xsam.xsam`) hand each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_xsam.replay import RNGState


@dataclass
class MicroBatch:
    """One micro-batch of a step, replayable.

    run: ``run(backward)`` returns the micro-batch's share of the step's loss, scaled as its theta_0 pass was
        (e.g. the mean loss over the number of micro-batches, or the Trainer's own scaling), so that the shares of
        all micro-batches on all processes add up to the step's loss as the gradients all-reduce; with
        ``backward=True`` it also back-propagates that share, adding to ``.grad``.
    rng: the random generators as they were before its theta_0 pass (its dropout masks).
    """

    run: Callable[[bool], torch.Tensor]
    rng: RNGState


@dataclass
class DirectionInfo:
    """What `XSAM.set_direction` measured on this step (for logging).

    psi: angle between v0 and v1 in radians, a 0-dim tensor on the parameters' device (reading it syncs);
        None when it was not computed (alpha = 1 without a probe is plain SAM and skips the geometry).
    alpha: the alpha the direction was built with (after the probe, if one ran); in the angle space, the alpha
        that the held angle gave at the latest probe.
    probe_losses: the loss at each evaluated probe point, in increasing alpha, or None when no probe ran.
    probe_alphas: the alpha of each of those points (the grid's, a subset of it for the fast search, or
        angle / psi in the angle space).
    correction: with ``reuse``, ||c'||, the norm of the correction this step leaves to the steps in between relative
        to their gradient (they descend along g + ||g|| c'), a 0-dim tensor on the device; None otherwise.
    """

    psi: torch.Tensor | None
    alpha: float
    probe_losses: list[float] | None = None
    probe_alphas: list[float] | None = None
    correction: torch.Tensor | None = None


@dataclass
class PassesInfo:
    """What one step's passes measured: the loss at the (last) ascent point, summed over the micro-batches as the
    step's loss is, and what `XSAM.set_direction` returned (None when the step was not sharpness-aware)."""

    ascent_loss: torch.Tensor | None = None
    direction: DirectionInfo | None = None
