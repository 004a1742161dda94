"""XSAM's settings, in one table: name, default, check and help.

`XSAM(...)` takes the optimizer's settings by these names; `XSAMTrainingArguments` takes every setting as
``--xsam_<name>``, and the optimizer's param groups store them under the same ``xsam_<name>`` keys. Both validate
through `validate`, so a bad value gets the same message, naming the setting as the user spelled it.
Adding a setting means adding a row here (and, for the optimizer, an argument of `XSAM.__init__`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PROBE_SEARCHES = ("grid", "fast")
PROBE_SPACES = ("alpha", "angle")
PERTURBATIONS = ("global", "local")
PREFIX = "xsam_"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Hyperparameter:
    """One setting. ``check`` says whether a value is allowed, ``allowed`` says so in words for the error.
    ``trainer_default`` is the flag's default where it differs from the optimizer's; ``default_from_trainer``
    instead names the attribute of Transformers' ``TrainingArguments`` that holds the flag's default (read by
    `hf_xsam.training_args.flag_default`: this module never imports transformers). ``optimizer`` is False for
    settings only the Trainer reads (how micro-batches and processes share the work)."""

    name: str
    type: Any
    default: Any
    check: Callable[[Any], bool]
    allowed: str
    help: str
    trainer_default: Any = None
    optimizer: bool = True
    choices: tuple[str, ...] | None = None  # for string settings: the allowed values (the flag's choices too)
    default_from_trainer: str | None = None


HYPERPARAMETERS: dict[str, Hyperparameter] = {h.name: h for h in (
    Hyperparameter(
        "rho", float, 0.05, lambda x: _number(x) and x >= 0, "must be a finite number >= 0",
        "total ascent length (0 = exactly the base optimizer).",
        trainer_default=0.02),  # the best XSAM radius of the README's MiniLM sweep
    Hyperparameter(
        "rho_max", float | None, None, lambda x: x is None or (_number(x) and x >= 0),
        "must be a finite number >= 0, or None for 2 * rho", "radius of the probe points (default: 2 * rho)."),
    Hyperparameter(
        "alpha", float, 1.0, _number, "must be a finite number",
        "the initial alpha, or the fixed one when probe_every is 0 (1 = SAM's direction, 0 = the ascent's)."),
    Hyperparameter(
        "alpha_max", float, 2.0, lambda x: _number(x) and x >= 0, "must be a finite number >= 0",
        "top of the probe grid."),
    Hyperparameter(
        "alpha_step", float, 0.1, lambda x: _number(x) and x > 0, "must be a finite number > 0",
        "spacing of the probe grid (the paper's delta; 21 points by default)."),
    Hyperparameter(
        "ascent_steps", int, 1, lambda x: _integer(x) and x >= 1, "must be an integer >= 1",
        "number of ascent steps k, each of length rho / k."),
    Hyperparameter(
        "probe_every", int, 200, lambda x: _integer(x) and x >= 0, "must be an integer >= 0 (0 = never probe)",
        "re-choose alpha by probing every N optimizer steps (the first step probes); 0 = never, alpha stays "
        "at its initial value."),
    Hyperparameter(
        "sharpness_every", int, 1, lambda x: _integer(x) and x >= 1, "must be an integer >= 1",
        "a sharpness-aware step every N optimizer steps, plain base-optimizer steps (one pass) in between."),
    Hyperparameter(
        "reuse", bool, False, lambda x: isinstance(x, bool), "must be True or False",
        "with sharpness_every N > 1, the N - 1 steps between sharpness steps carry the last one's correction "
        "(its direction's part orthogonal to g_0, grown to each step's gradient norm) instead of being plain; "
        "with alpha fixed at 1 this is LookSAM. Needs ascent_steps 1."),
    Hyperparameter(
        "probe_search", str, "grid", lambda x: x in PROBE_SEARCHES, f"must be one of {', '.join(PROBE_SEARCHES)}",
        "'grid' evaluates every probe point (the paper); 'fast' at most 8 (coarse grid, midpoints, parabola).",
        choices=PROBE_SEARCHES),
    Hyperparameter(
        "probe_space", str, "alpha", lambda x: x in PROBE_SPACES, f"must be one of {', '.join(PROBE_SPACES)}",
        "'alpha' probes alpha in [0, alpha_max] (the paper); 'angle' probes rotation angles from v0 over "
        "[0, 90 degrees] and holds the chosen angle between probes.",
        choices=PROBE_SPACES),
    Hyperparameter(
        "norm_eps", float, 1e-12, lambda x: _number(x) and x > 0, "must be a finite number > 0",
        "added to every norm (accumulated in float32); the base optimizer's own eps is separate."),
    Hyperparameter(
        "probe_batches", int, 1, lambda x: _integer(x) and x >= 1, "must be an integer >= 1",
        "each probe loss is the mean over this many micro-batches: this one and those trained on just before.",
        optimizer=False),
    Hyperparameter(
        "perturbation", str, "global", lambda x: x in PERTURBATIONS, f"must be one of {', '.join(PERTURBATIONS)}",
        "'global': the ascent and the probe see the step's whole batch, every micro-batch of the accumulation "
        "window on every process (N processes x M micro-batches of b == 1 x 1 batch of N*M*b); 'local': each "
        "micro-batch on each process ascends along its own gradient (m-sharpness).",
        optimizer=False, choices=PERTURBATIONS),
    Hyperparameter(
        "base_optim", str, None, lambda x: isinstance(x, str), "must be a built-in optimizer name",
        "the built-in optimizer XSAM wraps, configured by the usual flags and --optim_args; by default the "
        "Trainer's own default optimizer (TrainingArguments.default_optim), so that --optim xsam --xsam_rho 0 "
        "runs what the plain Trainer runs.",
        optimizer=False, default_from_trainer="default_optim"),  # None here: the flag reads the Trainer's
)}

OPTIMIZER_SETTINGS = tuple(name for name, h in HYPERPARAMETERS.items() if h.optimizer)
DEFAULTS = {name: h.default for name, h in HYPERPARAMETERS.items()}


def validate(values: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError for the first bad value, naming it as ``prefix + name`` (``xsam_rho`` for the flags,
    ``rho`` for the optimizer). ``values`` maps bare names to values; names absent from it are not checked.

    Beyond each value's own range it refuses probes that cannot choose: with probing on, a zero probe radius
    (every point is theta_0) or a grid of one point (alpha_step > alpha_max) would pick alpha = 0 every time.
    """
    for name, value in values.items():
        h = HYPERPARAMETERS[name]
        if not h.check(value):
            raise ValueError(f"{prefix}{name}={value!r} is invalid: {h.allowed}")
    if values.get("reuse"):
        _check_reuse(values, prefix)
    probing = values.get("probe_every", 0) > 0 and values.get("rho", 0) > 0
    if not probing:
        return
    every = f"{prefix}probe_every={values['probe_every']}"
    rho_max = values.get("rho_max")
    if rho_max == 0:
        raise ValueError(
            f"{prefix}rho_max={rho_max!r} is invalid with {every}: every probe point would be theta_0 and the probe "
            f"would always pick alpha = 0; must be > 0 (or set {prefix}probe_every=0 to hold alpha fixed)")
    step, top = values.get("alpha_step", DEFAULTS["alpha_step"]), values.get("alpha_max", DEFAULTS["alpha_max"])
    if step > top:
        raise ValueError(
            f"{prefix}alpha_step={step!r} is invalid with {prefix}alpha_max={top!r} and {every}: the probe grid "
            f"would be the single point alpha = 0; must be <= {prefix}alpha_max (or set {prefix}probe_every=0)")


def _check_reuse(values: Mapping[str, Any], prefix: str) -> None:
    """reuse carries a correction over the plain steps between sharpness steps: there must be some, and the
    correction is split off along g_0, which is the ascent direction v0 only for one ascent step."""
    every, steps = values.get("sharpness_every", 1), values.get("ascent_steps", 1)
    if every == 1:
        raise ValueError(
            f"{prefix}reuse=True is invalid with {prefix}sharpness_every=1: every step is sharpness-aware, so there "
            f"is no step in between to carry the correction to; set {prefix}sharpness_every to N > 1 (e.g. 4)")
    if steps != 1:
        raise ValueError(
            f"{prefix}reuse=True is invalid with {prefix}ascent_steps={steps!r}: the correction is the part of the "
            f"direction orthogonal to g_0, which is the ascent direction only for one ascent step; must be 1")
