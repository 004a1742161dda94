"""`XSAMTrainingArguments`: `TrainingArguments` that also take `--optim xsam`, `--optim sam` and `--xsam_*` flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

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


@dataclass
class XSAMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus XSAM's settings (Chen & Zhou, ICLR 2026; see shared/XSAM.md).

    Example::

        parser = HfArgumentParser(XSAMTrainingArguments)
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--optim", "xsam", "--xsam_rho", "0.1"])

    Parameters (besides every `TrainingArguments` field):
        optim ("adamw_torch_fused" on torch >= 2.8): `"xsam"` (XSAM, alpha probed), `"sam"` (plain SAM: alpha
            fixed at 1, no probe), or any built-in name, with which `XSAMTrainer` is exactly `Trainer`.
        xsam_rho (0.02): total ascent length (the best XSAM radius of the README's MiniLM sweep).
        xsam_rho_max (None = 2 * xsam_rho): radius of the probe points.
        xsam_alpha (1.0): the initial alpha (1 = SAM's direction); with `--optim sam` it must stay 1.
        xsam_alpha_max (2.0): top of the probe grid.
        xsam_alpha_step (0.1): spacing of the probe grid.
        xsam_ascent_steps (1): number of ascent steps (k).
        xsam_alpha_update_steps (200): optimizer steps between probes (the first step always probes);
            0 never probes and alpha stays at `xsam_alpha`. Ignored by `--optim sam`.
        xsam_base_optim ("adamw_torch"): the built-in optimizer XSAM wraps; its settings come from the usual
            flags (`--learning_rate`, `--weight_decay`, `--adam_beta1`, ..., `--optim_args`).
        xsam_perturbation ("global"): with several processes, `"global"` ascends along the gradient averaged over
            all processes (an all-reduce per pass; N processes with batch b train like 1 process with batch N*b),
            `"local"` lets each process ascend along its own gradient (per-device m-sharpness; no all-reduce in
            the sharpness passes, one all-reduce of the final directions per optimizer step).
        xsam_interval (1): a sharpness-aware step every N optimizer steps, a plain base-optimizer step (one
            forward/backward) in between, as MosaicML Composer's SAM `interval`.
        xsam_probe_search ("grid"): "grid" evaluates all probe points (the paper: 21 forwards by default);
            "fast" at most 8 (5 evenly spaced, 2 midpoints around the best, a parabolic refinement).
        xsam_probe_space ("alpha"): "alpha" probes alpha in [0, xsam_alpha_max] (the paper); "angle" probes
            rotation angles from v0 evenly over [0, 90 degrees], so the search cannot clip at alpha_max when
            psi is small, and holds the chosen angle between probes.
        xsam_probe_batches (1): the probe's loss at each point is the mean over this many micro-batches: the
            one being trained on and the ones trained on just before it (a steadier alpha, at that many times
            the probe's forward passes).
    """

    optim: str = field(
        default=TrainingArguments.default_optim,
        metadata={
            "help": "The optimizer: 'xsam' (XSAM, alpha probed), 'sam' (plain SAM), or any built-in name "
            "(see transformers' OptimizerNames), with which XSAMTrainer behaves exactly like Trainer."
        },
    )
    xsam_rho: float = field(default=0.02, metadata={"help": "XSAM/SAM: total ascent length rho (0 = base optimizer)."})
    xsam_rho_max: float | None = field(
        default=None, metadata={"help": "XSAM: radius of the alpha probe points (default: 2 * xsam_rho)."}
    )
    xsam_alpha: float = field(
        default=1.0,
        metadata={"help": "XSAM: initial alpha, or the fixed one when xsam_alpha_update_steps is 0 (1 = SAM)."},
    )
    xsam_alpha_max: float = field(default=2.0, metadata={"help": "XSAM: top of the alpha probe grid."})
    xsam_alpha_step: float = field(default=0.1, metadata={"help": "XSAM: spacing of the alpha probe grid."})
    xsam_ascent_steps: int = field(default=1, metadata={"help": "XSAM/SAM: number of ascent steps k."})
    xsam_alpha_update_steps: int = field(
        default=200,
        metadata={
            "help": "XSAM: optimizer steps between alpha probes (the first step probes); 0 = never probe, "
            "alpha stays at xsam_alpha."
        },
    )
    xsam_base_optim: str = field(
        default="adamw_torch",
        metadata={"help": "XSAM/SAM: the built-in optimizer to wrap (its kwargs from --optim_args as usual)."},
    )

    xsam_perturbation: str = field(
        default="global",
        metadata={
            "help": "XSAM/SAM with several processes: 'global' ascends along the all-reduced gradient (N processes "
            "with batch b == 1 process with batch N*b), 'local' along each process's own gradient (per-device "
            "m-sharpness, fewer all-reduces).",
            "choices": ["global", "local"],
        },
    )

    xsam_interval: int = field(
        default=1,
        metadata={"help": "XSAM/SAM: a sharpness-aware step every N optimizer steps, plain base-optimizer steps "
                  "in between (Composer's SAM interval)."},
    )
    xsam_probe_search: str = field(
        default="grid",
        metadata={
            "help": "XSAM: 'grid' evaluates every probe point (the paper); 'fast' at most 8 (coarse grid, "
            "midpoints, parabolic refinement).",
            "choices": ["grid", "fast"],
        },
    )
    xsam_probe_space: str = field(
        default="alpha",
        metadata={
            "help": "XSAM: 'alpha' probes alpha in [0, xsam_alpha_max] (the paper); 'angle' probes rotation angles "
            "from v0 over [0, 90 degrees] and holds the chosen angle, so the search does not clip when psi is small.",
            "choices": ["alpha", "angle"],
        },
    )
    xsam_probe_batches: int = field(
        default=1,
        metadata={"help": "XSAM: average each probe loss over this many micro-batches (this one and those trained "
                  "on just before it)."},
    )

    def __post_init__(self):
        requested = self.optim.value if isinstance(self.optim, OptimizerNames) else str(self.optim)
        if requested in XSAM_OPTIMS:
            self._validate_xsam(requested)
            # TrainingArguments validates `optim` against its enum; let it check the base optimizer instead.
            self.optim = self.xsam_base_optim
            super().__post_init__()
            self.optim = requested
        else:
            super().__post_init__()

    @property
    def xsam_enabled(self) -> bool:
        return self.optim in XSAM_OPTIMS

    def xsam_kwargs(self) -> dict:
        """Keyword arguments for `hf_xsam.XSAM` (besides the base optimizer)."""
        sam = self.optim == "sam"
        return dict(
            rho=self.xsam_rho,
            rho_max=self.xsam_rho_max,
            alpha=1.0 if sam else self.xsam_alpha,
            alpha_max=self.xsam_alpha_max,
            alpha_step=self.xsam_alpha_step,
            ascent_steps=self.xsam_ascent_steps,
            alpha_update_interval=0 if sam else self.xsam_alpha_update_steps,
            interval=self.xsam_interval,
            probe_search=self.xsam_probe_search,
            probe_space=self.xsam_probe_space,
        )

    def _validate_xsam(self, optim: str) -> None:
        def bad(name, allowed):
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        def finite(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (finite(self.xsam_rho) and self.xsam_rho >= 0):
            raise bad("xsam_rho", "must be a finite number >= 0")
        if self.xsam_rho_max is not None and not (finite(self.xsam_rho_max) and self.xsam_rho_max >= 0):
            raise bad("xsam_rho_max", "must be a finite number >= 0, or unset for 2 * xsam_rho")
        if not finite(self.xsam_alpha):
            raise bad("xsam_alpha", "must be a finite number")
        if optim == "sam" and self.xsam_alpha != 1.0:
            raise bad("xsam_alpha", "--optim sam fixes alpha at 1 (SAM's direction); use --optim xsam to change it")
        if not (finite(self.xsam_alpha_max) and self.xsam_alpha_max >= 0):
            raise bad("xsam_alpha_max", "must be a finite number >= 0")
        if not (finite(self.xsam_alpha_step) and self.xsam_alpha_step > 0):
            raise bad("xsam_alpha_step", "must be a finite number > 0")
        if not (isinstance(self.xsam_ascent_steps, int) and self.xsam_ascent_steps >= 1):
            raise bad("xsam_ascent_steps", "must be an integer >= 1")
        if not (isinstance(self.xsam_alpha_update_steps, int) and self.xsam_alpha_update_steps >= 0):
            raise bad("xsam_alpha_update_steps", "must be an integer >= 0 (0 = never probe)")
        if not (isinstance(self.xsam_interval, int) and self.xsam_interval >= 1):
            raise bad("xsam_interval", "must be an integer >= 1 (1 = every step sharpness-aware)")
        if self.xsam_probe_search not in ("grid", "fast"):
            raise bad("xsam_probe_search", "must be 'grid' or 'fast'")
        if self.xsam_probe_space not in ("alpha", "angle"):
            raise bad("xsam_probe_space", "must be 'alpha' or 'angle'")
        if not (isinstance(self.xsam_probe_batches, int) and self.xsam_probe_batches >= 1):
            raise bad("xsam_probe_batches", "must be an integer >= 1")
        if self.xsam_perturbation not in ("global", "local"):
            raise bad("xsam_perturbation", "must be 'global' or 'local'")
        base = self.xsam_base_optim
        allowed = "a built-in optimizer name such as adamw_torch, adamw_torch_fused, sgd, adafactor"
        if base in XSAM_OPTIMS:
            raise bad("xsam_base_optim", f"XSAM cannot wrap itself; use {allowed}")
        try:
            base_name = OptimizerNames(base)
        except ValueError:
            raise bad("xsam_base_optim", f"must be {allowed}") from None
        if base_name in UNSUPPORTED_BASE_OPTIMS:
            raise bad("xsam_base_optim", f"{UNSUPPORTED_BASE_OPTIMS[base_name]}, which XSAM cannot wrap; "
                      f"use {allowed}")
        if self.deepspeed:
            raise ValueError(
                f"deepspeed={self.deepspeed!r} cannot be combined with optim={optim!r}: DeepSpeed runs the optimizer "
                "step inside its engine, so XSAM cannot restore the weights between passes. Use DDP "
                "(accelerate launch --multi_gpu) instead."
            )
