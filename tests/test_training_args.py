"""XSAMTrainingArguments from a command line, their validation, and the settings XSAMTrainer refuses."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_args, text_data, tiny_bert
from transformers import HfArgumentParser, TrainingArguments

from hf_xsam import HYPERPARAMETERS, XSAMArgumentsMixin, XSAMTrainer, XSAMTrainingArguments

FLAGS = [f"xsam_{name}" for name in HYPERPARAMETERS]


def parse(*argv: str) -> XSAMTrainingArguments:
    (args,) = HfArgumentParser(XSAMTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--use_cpu", "--report_to", "none", *argv]
    )
    return args


def test_flags_parsed_from_a_command_line():
    args = parse("--optim", "xsam", "--xsam_rho", "0.1", "--xsam_rho_max", "0.3", "--xsam_alpha", "0.5",
                 "--xsam_alpha_max", "1.5", "--xsam_alpha_step", "0.25", "--xsam_ascent_steps", "3",
                 "--xsam_probe_every", "7", "--xsam_base_optim", "sgd", "--optim_args", "momentum=0.9",
                 "--xsam_sharpness_every", "2", "--xsam_probe_search", "fast", "--xsam_probe_space", "angle",
                 "--xsam_probe_batches", "4")
    assert args.optim == "xsam"
    assert args.xsam_kwargs() == dict(rho=0.1, rho_max=0.3, alpha=0.5, alpha_max=1.5, alpha_step=0.25,
                                      ascent_steps=3, probe_every=7, sharpness_every=2, reuse=False,
                                      probe_search="fast", probe_space="angle", norm_eps=1e-12)
    assert args.xsam_probe_batches == 4
    assert args.xsam_base_optim == "sgd"


def test_sam_fixes_alpha_and_never_probes():
    args = parse("--optim", "sam", "--xsam_probe_every", "5")
    assert args.optim == "sam"
    assert args.xsam_kwargs()["alpha"] == 1.0
    assert args.xsam_kwargs()["probe_every"] == 0


def test_builtin_optim_names_still_parse():
    assert parse("--optim", "sgd").optim == "sgd"
    assert parse("--optim", "adamw_torch").xsam_enabled is False


def test_the_base_optimizer_defaults_to_the_trainers_own():
    """Read from the running Transformers (adamw_torch_fused in Transformers 5 with torch >= 2.8), not copied: the
    parsed flag, its --help and the dataclass docstring say the same."""
    assert parse("--optim", "xsam", "--xsam_rho", "0").xsam_base_optim == TrainingArguments.default_optim
    assert parse().optim == TrainingArguments.default_optim
    help_text = " ".join(HfArgumentParser(XSAMTrainingArguments).format_help().split())
    flag_help = re.search(r"--xsam-base-optim XSAM_BASE_OPTIM (.*?)\(default: (\S+)\)", help_text)
    assert flag_help.group(2) == TrainingArguments.default_optim
    assert f"xsam_base_optim ({TrainingArguments.default_optim!r}): " in XSAMArgumentsMixin.__doc__


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        HfArgumentParser(XSAMTrainingArguments).parse_args_into_dataclasses(["--help"])
    text = capsys.readouterr().out
    for flag in FLAGS:
        assert f"--{flag}" in text
    assert "re-choose alpha by probing" in text  # the help of the settings table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--xsam_rho", "-0.1"], r"xsam_rho=-0.1 is invalid: must be a finite number >= 0"),
        (["--xsam_rho", "inf"], r"xsam_rho=inf is invalid"),
        (["--xsam_rho_max", "-1"], r"xsam_rho_max=-1.0 is invalid"),
        (["--xsam_alpha", "nan"], r"xsam_alpha=nan is invalid: must be a finite number"),
        (["--xsam_alpha_max", "-0.5"], r"xsam_alpha_max=-0.5 is invalid: must be a finite number >= 0"),
        (["--xsam_alpha_step", "0"], r"xsam_alpha_step=0.0 is invalid: must be a finite number > 0"),
        (["--xsam_ascent_steps", "0"], r"xsam_ascent_steps=0 is invalid: must be an integer >= 1"),
        (["--xsam_probe_every", "-2"], r"xsam_probe_every=-2 is invalid: must be an integer >= 0"),
        (["--xsam_sharpness_every", "0"], r"xsam_sharpness_every=0 is invalid: must be an integer >= 1"),
        (["--xsam_probe_batches", "0"], r"xsam_probe_batches=0 is invalid: must be an integer >= 1"),
        (["--xsam_reuse"], r"xsam_reuse=True is invalid with xsam_sharpness_every=1"),
        (["--xsam_reuse", "--xsam_sharpness_every", "4", "--xsam_perturbation", "local"],
         r"xsam_reuse=True is invalid with xsam_perturbation='local': each micro-batch's sharpness step"),
        (["--xsam_base_optim", "xsam"], r"xsam_base_optim='xsam' is invalid: XSAM cannot wrap itself"),
        (["--xsam_base_optim", "adamw_nope"], r"xsam_base_optim='adamw_nope' is invalid: must be a built-in"),
        (["--xsam_base_optim", "lomo"], r"xsam_base_optim='lomo' is invalid: LOMO updates the weights inside"),
        (["--xsam_base_optim", "galore_adamw_layerwise"], r"layer-wise GaLore steps inside backward"),
        (["--xsam_base_optim", "apollo_adamw_layerwise"], r"layer-wise APOLLO steps inside backward"),
    ],
)
def test_bad_xsam_flags_raise_value_error(argv, message):
    with pytest.raises(ValueError, match=message):
        parse("--optim", "xsam", *argv)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("xsam_probe_search", "exhaustive", r"xsam_probe_search='exhaustive' is invalid: must be one of grid, fast"),
    ("xsam_probe_space", "radius", r"xsam_probe_space='radius' is invalid: must be one of alpha, angle"),
])
def test_bad_probe_choices_raise_value_error(tmp_path, field, value, message):
    # on a command line argparse refuses them (choices); built in code they reach our check
    with pytest.raises(ValueError, match=message):
        XSAMTrainingArguments(output_dir=str(tmp_path), optim="xsam", use_cpu=True, **{field: value})


def test_reuse_flag_parses_and_reaches_the_optimizer():
    args = parse("--optim", "sam", "--xsam_reuse", "--xsam_sharpness_every", "4")
    assert args.xsam_reuse is True
    assert args.xsam_kwargs()["reuse"] is True and args.xsam_kwargs()["sharpness_every"] == 4
    assert parse("--optim", "xsam").xsam_reuse is False


def test_sam_with_another_alpha_is_rejected():
    with pytest.raises(ValueError, match=r"xsam_alpha=0.5 is invalid with optim='sam': SAM fixes alpha at 1"):
        parse("--optim", "sam", "--xsam_alpha", "0.5")


def test_unknown_optim_keeps_transformers_error():
    with pytest.raises(ValueError, match="not_an_optimizer"):
        parse("--optim", "not_an_optimizer")


def test_deepspeed_is_refused_before_anything_runs(tmp_path):
    config = tmp_path / "ds.json"
    config.write_text("{}")
    message = r"deepspeed=.*cannot be combined with optim='xsam'.*Use DDP \(accelerate launch --multi_gpu\)"
    with pytest.raises(ValueError, match=message):
        parse("--optim", "xsam", "--deepspeed", str(config))


def test_non_scalar_loss_fails_as_under_the_plain_trainer(tmp_path):
    """The theta_0 pass is the Trainer's own step, so a per-example loss fails there exactly as it does without XSAM
    (the refusals of what only training needs, a model without a loss or torch_compile, are in
    test_trainer_contract.py)."""
    class PerExampleLoss(XSAMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).logits.sum(-1)

    errors = []
    for optim in ("adamw_torch", "xsam"):
        trainer = PerExampleLoss(model=tiny_bert(), args=make_args(tmp_path / optim, optim=optim),
                                 train_dataset=text_data())
        with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs") as error:
            trainer.train()
        errors.append(str(error.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(("force", "message"), [
    ("fsdp1", r"optim='xsam' needs FSDP2 \(fsdp_version: 2 in the Accelerate config"),
    ("data_parallel", r"optim='xsam' does not support torch.nn.DataParallel \(n_gpu=2 in one process\)"),
])
def test_fsdp1_and_data_parallel_are_refused_at_train(tmp_path, force, message):
    """Neither exists on this CPU machine: the trainer is told it runs under them, as it would read its set-up."""
    model = tiny_bert()
    trainer = XSAMTrainer(model=model, args=make_args(tmp_path, optim="xsam"), train_dataset=text_data())
    if force == "fsdp1":
        trainer.is_fsdp_enabled = True  # and Accelerate reports no FSDP2 plugin
    else:
        trainer.args._n_gpu = 2
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
