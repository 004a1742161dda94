"""The candidate corrections of XSAM's cheap mode (issue 32), for benchmarks/carried_correction.py.

A sharpness step with ``reuse`` keeps c' = gain (d - (d . v0) v0) / ||g_0|| for the steps in between
(`hf_xsam.reuse.carry`); with one ascent step d - (d . v0) v0 is a1 times SAM's part (a1 = sin(alpha* psi) /
sin(psi)), so a rule is the gain, a function of the direction's coefficients a = (a0, a1):

- ``landed``: 1, XSAM's own part, a1 times SAM's (hf_xsam before issue 32);
- ``capped``: 1 / max(|a1|, 1), SAM's part at most, less when alpha* < 1 (`hf_xsam.reuse.carried_gain`, the
  library's);
- ``unit``: 1 / a1, SAM's part always (LookSAM's correction between XSAM's sharpness steps; none when a1 <= 0).

`install` puts a rule in place of the library's in this process, `installed` for the length of a ``with`` block.
A run of an example in a subprocess takes its rule from this module's command line,
``python benchmarks/carried_rules.py RULE examples/text_classification.py ...`` (`noise_study.example_runner`'s
``launcher``).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys

import torch

from hf_xsam import reuse


def _landed(a: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(a[1])


def _unit(a: torch.Tensor) -> torch.Tensor:
    positive = a[1] > 0
    return torch.where(positive, 1.0 / torch.where(positive, a[1], torch.ones_like(a[1])), torch.zeros_like(a[1]))


RULES = {"landed": _landed, "capped": reuse.carried_gain, "unit": _unit}


def install(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is invalid: must be one of {', '.join(RULES)}")
    reuse.carried_gain = RULES[rule]


@contextlib.contextmanager
def installed(rule: str):
    before = reuse.carried_gain
    install(rule)
    try:
        yield
    finally:
        reuse.carried_gain = before


if __name__ == "__main__":  # RULE SCRIPT [ARGS...]: run SCRIPT as __main__ under RULE
    install(sys.argv[1])
    sys.argv = sys.argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as if SCRIPT had been run itself
    runpy.run_path(sys.argv[0], run_name="__main__")
