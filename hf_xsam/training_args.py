"""`--optim xsam|sam` and the `--xsam_*` flags: `XSAMArgumentsMixin` for any TrainingArguments subclass, and
`XSAMTrainingArguments`, the mixin on `TrainingArguments` itself.

The flags are generated from the settings table in `hf_xsam.hyperparameters`, so the optimizer, the flags and the
param groups share one name (``--xsam_probe_every`` is ``XSAM(probe_every=...)`` and ``group["xsam_probe_every"]``)
and one check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from hf_xsam.hyperparameters import HYPERPARAMETERS, OPTIMIZER_SETTINGS, PREFIX, validate

XSAM_OPTIMS = ("xsam", "sam")

# Base optimizers XSAM cannot drive: they step inside backward (LOMO, AdaLomo, the layer-wise GaLore/APOLLO
# variants), so the weights move before the ascent's gradient is even complete.
UNSUPPORTED_BASE_OPTIMS = {
    OptimizerNames.LOMO: "LOMO updates the weights inside backward",
    OptimizerNames.ADALOMO: "AdaLomo updates the weights inside backward",
    OptimizerNames.GALORE_ADAMW_LAYERWISE: "layer-wise GaLore steps inside backward",
    OptimizerNames.GALORE_ADAMW_8BIT_LAYERWISE: "layer-wise GaLore steps inside backward",
    OptimizerNames.GALORE_ADAFACTOR_LAYERWISE: "layer-wise GaLore steps inside backward",
    OptimizerNames.APOLLO_ADAMW_LAYERWISE: "layer-wise APOLLO steps inside backward",
}


class _XSAMArgumentsMethods:
    """What the generated dataclass mixin does besides holding the flags."""

    def __post_init__(self):
        requested = self.optim.value if isinstance(self.optim, OptimizerNames) else str(self.optim)
        if requested not in XSAM_OPTIMS:
            super().__post_init__()
            return
        self._validate_xsam(requested)
        # TrainingArguments validates `optim` against its enum; let it check the base optimizer instead.
        self.optim = self.xsam_base_optim
        super().__post_init__()
        self.optim = requested

    @property
    def xsam_enabled(self) -> bool:
        return self.optim in XSAM_OPTIMS

    def xsam_kwargs(self) -> dict:
        """Keyword arguments for `hf_xsam.XSAM` (besides the base optimizer): every optimizer setting, with
        ``--optim sam`` fixing alpha at 1 and never probing."""
        kwargs = {name: getattr(self, PREFIX + name) for name in OPTIMIZER_SETTINGS}
        if self.optim == "sam":
            kwargs.update(alpha=1.0, probe_every=0)
        return kwargs

    def _validate_xsam(self, optim: str) -> None:
        validate({name: getattr(self, PREFIX + name) for name in HYPERPARAMETERS}, prefix=PREFIX)
        if self.xsam_reuse and self.xsam_perturbation == "local":
            raise ValueError(
                "xsam_reuse=True is invalid with xsam_perturbation='local': each micro-batch's sharpness step would "
                "carry its own correction; reuse needs the step's whole batch, xsam_perturbation='global'")
        if optim == "sam" and self.xsam_alpha != 1.0:
            raise ValueError(f"xsam_alpha={self.xsam_alpha!r} is invalid with optim='sam': SAM fixes alpha at 1 "
                             "(its own direction); use --optim xsam to change it")
        base = self.xsam_base_optim
        allowed = "a built-in optimizer name such as adamw_torch, adamw_torch_fused, sgd, adafactor"
        if base in XSAM_OPTIMS:
            raise ValueError(f"xsam_base_optim={base!r} is invalid: XSAM cannot wrap itself; use {allowed}")
        try:
            base_name = OptimizerNames(base)
        except ValueError:
            raise ValueError(f"xsam_base_optim={base!r} is invalid: must be {allowed}") from None
        if base_name in UNSUPPORTED_BASE_OPTIMS:
            raise ValueError(f"xsam_base_optim={base!r} is invalid: {UNSUPPORTED_BASE_OPTIMS[base_name]}, which "
                             f"XSAM cannot wrap; use {allowed}")
        if self.deepspeed:
            raise ValueError(
                f"deepspeed={self.deepspeed!r} cannot be combined with optim={optim!r}: DeepSpeed runs the optimizer "
                "step inside its engine, so XSAM cannot restore the weights between passes. Use DDP "
                "(accelerate launch --multi_gpu) instead."
            )


def flag_default(name: str):
    """The default of ``--xsam_<name>``: the table's (its Trainer default where it has one), or the running
    Transformers' own where the table says so (the base optimizer: ``TrainingArguments.default_optim``,
    ``adamw_torch_fused`` in Transformers 5 with torch >= 2.8)."""
    h = HYPERPARAMETERS[name]
    if h.default_from_trainer is not None:
        return getattr(TrainingArguments, h.default_from_trainer)
    return h.default if h.trainer_default is None else h.trainer_default


def _flag(name: str):
    h = HYPERPARAMETERS[name]
    metadata = {"help": f"XSAM: {h.help}".replace("%", "%%")}
    if h.choices:
        metadata["choices"] = list(h.choices)
    return PREFIX + name, h.type, field(default=flag_default(name), metadata=metadata)


def _docstring() -> str:
    rows = [f"        {PREFIX}{name} ({flag_default(name)!r}): {h.help}" for name, h in HYPERPARAMETERS.items()]
    return "\n".join([
        "Dataclass mixin: `--optim xsam|sam` and the `--xsam_*` flags for any `TrainingArguments` subclass.",
        "",
        "Example::",
        "",
        "    @dataclass",
        "    class MyConfig(XSAMArgumentsMixin, SFTConfig):",
        "        pass",
        "",
        "    (args,) = HfArgumentParser(MyConfig).parse_args_into_dataclasses(['--output_dir', 'out', '--optim', "
        "'xsam'])",
        "",
        "Parameters:",
        "    optim: 'xsam' (XSAM, alpha probed), 'sam' (plain SAM: alpha fixed at 1, no probe), or any built-in name,",
        "        with which the trainer behaves exactly like its base class.",
        *rows,
        "",
        "The settings' checks are those of `hf_xsam.XSAM` (one table: `hf_xsam.hyperparameters`). Method: "
        "Chen & Zhou, ICLR 2026; docs/algorithm.md.",
    ])


XSAMArgumentsMixin = make_dataclass(
    "XSAMArgumentsMixin",
    [
        ("optim", str, field(
            default=TrainingArguments.default_optim,
            metadata={"help": "The optimizer: 'xsam' (XSAM, alpha probed), 'sam' (plain SAM), or any built-in name "
                      "(see transformers' OptimizerNames), with which the trainer behaves exactly like its base."},
        )),
        *(_flag(name) for name in HYPERPARAMETERS),
    ],
    bases=(_XSAMArgumentsMethods,),
)
XSAMArgumentsMixin.__module__ = __name__
XSAMArgumentsMixin.__doc__ = _docstring()


@dataclass
class XSAMTrainingArguments(XSAMArgumentsMixin, TrainingArguments):
    """`TrainingArguments` plus `--optim xsam|sam` and the `--xsam_*` flags (see `XSAMArgumentsMixin`).

    Example::

        parser = HfArgumentParser(XSAMTrainingArguments)
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--optim", "xsam", "--xsam_rho", "0.1"])
    """
