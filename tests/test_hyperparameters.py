"""One table drives the checks of the optimizer and of the flags: every bad value is refused by both, each
naming the setting as its user spelled it (``rho`` in XSAM(...), ``xsam_rho`` on the command line)."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser

from hf_xsam import HYPERPARAMETERS, XSAM, XSAMTrainingArguments
from hf_xsam.hyperparameters import DEFAULTS, OPTIMIZER_SETTINGS
from hf_xsam.training_args import flag_default

# Every setting of the table, with values its check must refuse. A new row without an entry fails the coverage test.
BAD_VALUES = {
    "rho": [-0.1, math.inf, math.nan, True, "0.1"],
    "rho_max": [-1.0, math.inf, math.nan, False],
    "alpha": [math.nan, math.inf, True, None],
    "alpha_max": [-0.5, math.inf, True],
    "alpha_step": [0.0, -0.1, math.nan, True],
    "ascent_steps": [0, -1, 1.5, 2.0, True, "2"],
    "probe_every": [-1, 0.5, True, None],
    "sharpness_every": [0, 1.5, True],
    "reuse": [1, "yes", None],
    "probe_search": ["exhaustive", None, 1],
    "probe_space": ["radius", None],
    "norm_eps": [0.0, -1e-12, math.nan, True],
    "probe_batches": [0, 1.5, True],
    "perturbation": ["both", None],
    "base_optim": [3, None],
}


def cases(names):
    return [(name, value) for name in names for value in BAD_VALUES[name]]


def make_args(tmp_path, **settings) -> XSAMTrainingArguments:
    return XSAMTrainingArguments(output_dir=str(tmp_path), optim="xsam", use_cpu=True, report_to="none", **settings)


def test_every_setting_has_bad_values_to_try():
    assert set(BAD_VALUES) == set(HYPERPARAMETERS)


@pytest.mark.parametrize(("name", "value"), cases(OPTIMIZER_SETTINGS))
def test_the_optimizer_refuses_a_bad_value_by_its_own_name(name, value):
    message = f"{name}={value!r} is invalid: {HYPERPARAMETERS[name].allowed}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **{name: value})


@pytest.mark.parametrize(("name", "value"), cases(HYPERPARAMETERS))
def test_the_flags_refuse_a_bad_value_by_the_flag_name(tmp_path, name, value):
    message = f"xsam_{name}={value!r} is invalid: "
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        make_args(tmp_path, **{f"xsam_{name}": value})


@pytest.mark.parametrize(("settings", "message"), [
    (dict(rho_max=0.0), "{p}rho_max=0.0 is invalid with {p}probe_every=200: every probe point would be theta_0"),
    (dict(alpha_step=5.0), "{p}alpha_step=5.0 is invalid with {p}alpha_max=2.0 and {p}probe_every=200: the probe "
                           "grid would be the single point alpha = 0"),
    (dict(alpha_max=0.0), "{p}alpha_step=0.1 is invalid with {p}alpha_max=0.0 and {p}probe_every=200"),
    (dict(reuse=True), "{p}reuse=True is invalid with {p}sharpness_every=1: every step is sharpness-aware, so there "
                       "is no step in between to carry the correction to; set {p}sharpness_every to N > 1"),
    (dict(reuse=True, sharpness_every=4, ascent_steps=3), "{p}reuse=True is invalid with {p}ascent_steps=3: the "
                                                          "correction is the part of the direction orthogonal to g_0"),
])
def test_settings_that_cannot_work_together_are_refused_by_both(tmp_path, settings, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(p=''))}"):
        XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **settings)
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(p='xsam_'))}"):
        make_args(tmp_path, **{f"xsam_{k}": v for k, v in settings.items()})
    if "reuse" in settings:
        return
    # without probing nothing is chosen, so the same values are fine (and a fixed alpha is used as given)
    opt = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, probe_every=0, **settings)
    assert not opt.probe_due
    assert make_args(tmp_path, xsam_probe_every=0, **{f"xsam_{k}": v for k, v in settings.items()}).xsam_enabled


def test_a_bad_flag_on_the_command_line_names_the_flag(tmp_path):
    parser = HfArgumentParser(XSAMTrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "--optim", "xsam", "--xsam_ascent_steps", "0"]
    with pytest.raises(ValueError, match=r"^xsam_ascent_steps=0 is invalid: must be an integer >= 1$"):
        parser.parse_args_into_dataclasses(argv)


def test_one_default_and_one_name_per_setting(tmp_path):
    """The optimizer's signature, the flags and the param groups carry the table's names and defaults."""
    signature = inspect.signature(XSAM).parameters
    for name in OPTIMIZER_SETTINGS:
        assert signature[name].default == DEFAULTS[name], name
    args = make_args(tmp_path)
    for name in HYPERPARAMETERS:
        assert getattr(args, f"xsam_{name}") == flag_default(name), name
    opt = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, **args.xsam_kwargs())
    for name in OPTIMIZER_SETTINGS:
        stored = opt.param_groups[0][f"xsam_{name}"]
        expected = 2 * args.xsam_rho if name == "rho_max" else getattr(args, f"xsam_{name}")
        assert stored == expected, name
    help_text = HfArgumentParser(XSAMTrainingArguments).format_help()
    for name in HYPERPARAMETERS:
        assert f"--xsam_{name} " in help_text, name


def test_the_optimizer_imports_without_transformers():
    """`from hf_xsam import XSAM` needs only torch; the Trainer side loads on first use of its names."""
    import subprocess
    import sys

    code = ("import sys; from hf_xsam import XSAM, HYPERPARAMETERS; assert 'transformers' not in sys.modules; "
            "import hf_xsam; hf_xsam.XSAMTrainer; assert 'transformers' in sys.modules and 'trl' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
