"""`XSAMMixin`: the training step of any `transformers.Trainer` subclass, running XSAM's passes; `XSAMTrainer` is
the mixin on `Trainer` itself."""

from __future__ import annotations

import collections
import contextlib
import math
import os

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_xsam.bookkeeping import bookkeeping_kept
from hf_xsam.distributed import all_reduce_mean, trainer_no_sync
from hf_xsam.hyperparameters import HYPERPARAMETERS, PREFIX
from hf_xsam.passes import sharpness_passes
from hf_xsam.replay import RNGState
from hf_xsam.types import MicroBatch
from hf_xsam.xsam import XSAM

# torch.compile modes that record CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


class XSAMMixin:
    """XSAM (Chen & Zhou, ICLR 2026) in any Trainer, when ``args.optim`` is ``"xsam"`` or ``"sam"``.

    Example::

        class MyTrainer(XSAMMixin, SFTTrainer):  # the mixin first
            pass

        args = MyConfig(output_dir="out", optim="xsam", xsam_rho=0.05)  # MyConfig(XSAMArgumentsMixin, SFTConfig)
        trainer = MyTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.train()

    Every micro-batch's theta_0 pass is the Trainer's own `training_step` (context-parallel inputs, the optimizer's
    train mode, cache clearing, loss scaling and backward as upstream does them); its loss is the one reported.
    What follows depends on ``--xsam_perturbation``:

    * ``global`` (default): the step's batch is every micro-batch of the accumulation window on every process.
      Non-final micro-batches run only their theta_0 pass (under the Trainer's ``no_sync``), keeping their inputs
      and random-number state; the final one then runs, for every micro-batch of the step, the passes at the
      ascent point(s) and the probe, each replaying that micro-batch's dropout masks. One gradient all-reduce per
      pass set: k + 1 per optimizer step. N processes x M micro-batches of b train like 1 process x 1 batch of
      N*M*b.
    * ``local``: each micro-batch on each process ascends along its own gradient (m-sharpness with m = the
      micro-batch); the directions are summed over the window and averaged over processes in one all-reduce.

    Loss weighting: every pass scales a micro-batch's loss exactly as the Trainer's own step does (the model's
    or ``compute_loss_func``'s normalisation by ``num_items_in_batch``, else the division by the accumulation
    steps; ``loss_is_scaled_for_ga`` decides, as upstream). So ``--xsam_rho 0`` is the plain Trainer bitwise, and
    the step's batch trains like one large batch exactly when the plain Trainer's accumulation does. A model
    whose forward takes ``**kwargs`` but ignores ``num_items_in_batch`` (``BertForSequenceClassification``) sums
    the micro-batches' mean losses under the plain Trainer and here alike: set ``loss_is_scaled_for_ga = False``
    on the trainer class (or ``model.accepts_loss_kwargs = False``) to have both divide by the steps.

    Logged (with the training loss): ``xsam/alpha``, ``xsam/psi`` (mean angle between v0 and v1, radians),
    ``xsam/ascent_loss`` (mean loss at the ascent point), ``xsam/probe_loss_max`` (largest loss of the latest
    probe since the last log), with ``--xsam_reuse`` ``xsam/correction`` (mean ||c'||: the size of the correction
    the steps in between add, relative to their gradient). Each probe also appends ``{"step", "xsam/probe_alphas",
    "xsam/probe_losses", "xsam/alpha"}`` to ``state.log_history`` (saved in ``trainer_state.json``).

    With any other ``args.optim`` the class is exactly its Trainer base.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._xsam_start_run()

    def _xsam_start_run(self) -> None:
        """Forget what an earlier run left: its logs, its unfinished accumulation window (an out-of-memory error
        may strike mid-window), the micro-batches kept for the probe."""
        self._xsam_logs: dict[str, list] = {"psi": [], "ascent_loss": [], "correction": [], "probe_loss_max": []}
        self._xsam_window: list[MicroBatch] = []  # this step's micro-batches so far (global mode)
        # micro-batches trained on before, for a probe averaged over xsam_probe_batches of them (validated >= 1)
        keep = self.args.xsam_probe_batches - 1 if self._xsam_enabled else 0
        self._xsam_recent: collections.deque = collections.deque(maxlen=max(keep, 0))

    # ------------------------------------------------------------------ set-up
    @property
    def _xsam_enabled(self) -> bool:
        return getattr(self.args, "xsam_enabled", False)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial=None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """`Trainer.train`, after the checks that only training needs (so a trainer built for evaluation or
        prediction alone is never refused)."""
        if self._xsam_enabled:
            self._check_xsam_trainable()
        elif _find_xsam(self.optimizer) is not None:
            optim = getattr(self.args.optim, "value", self.args.optim)  # TrainingArguments holds an enum
            raise ValueError(
                f"optimizers=(XSAM(...), ...) was given with optim={optim!r}: the trainer runs XSAM's "
                "passes only with optim='xsam' or 'sam' (otherwise XSAM.step() would be a plain base-optimizer "
                "step). Set optim='xsam', or pass the base optimizer itself."
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def _inner_training_loop(
        self,
        batch_size: int | None = None,
        args: TrainingArguments | None = None,
        resume_from_checkpoint: str | None = None,
        trial=None,
        ignore_keys_for_eval: list[str] | None = None,
    ):
        """`Trainer._inner_training_loop`, from a clean window: every training run passes through here (`train()`
        again, each retry of ``auto_find_batch_size``), and a method rather than a callback leaves the callback
        list exactly `Trainer`'s."""
        self._xsam_start_run()
        return super()._inner_training_loop(batch_size=batch_size, args=args,
                                            resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                            ignore_keys_for_eval=ignore_keys_for_eval)

    def _check_xsam_trainable(self) -> None:
        optim = self.args.optim
        self.args._validate_xsam(optim)  # again: a hyperparameter search may have set the flags since
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"optim={optim!r} cannot run under DeepSpeed: its engine steps the optimizer inside backward, so "
                "XSAM cannot restore the weights between passes. Use DDP (accelerate launch --multi_gpu) instead."
            )
        if self.is_fsdp_enabled and not getattr(self.accelerator, "is_fsdp2", False):
            raise ValueError(
                f"optim={optim!r} needs FSDP2 (fsdp_version: 2 in the Accelerate config, or --fsdp_config with "
                "\"fsdp_version\": 2): FSDP1 flattens the parameters, so XSAM cannot keep theta_0 per parameter or "
                "reduce its norms per shard. FSDP2, DDP and a model sharded at load time work."
            )
        if self.args.torch_compile and self.args.torch_compile_mode in CUDA_GRAPH_MODES:
            raise ValueError(
                f"torch_compile_mode={self.args.torch_compile_mode!r} cannot be combined with optim={optim!r}: its "
                "CUDA graphs replay the random offsets and buffers they captured, while XSAM rewinds the generator "
                "and moves the weights between the passes of a step (not verified on a GPU, so refused rather than "
                "risked). Use the default mode or 'max-autotune-no-cudagraphs'."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"optim={optim!r} does not support torch.nn.DataParallel (n_gpu={self.args.n_gpu} in one process): "
                "launch one process per GPU with `accelerate launch` or `torchrun` instead."
            )
        custom_loss = self.compute_loss_func is not None or type(self).compute_loss is not Trainer.compute_loss
        # Trainer reads the label names off the model's forward signature (args.label_names overrides them).
        if not (custom_loss or self.label_names or self.can_return_loss):
            name = type(self.accelerator.unwrap_model(self.model)).__name__
            raise ValueError(
                f"optim={optim!r} needs a loss, but {name}.forward takes no labels and no compute_loss or "
                "compute_loss_func was given. Use a model with a task head (e.g. AutoModelForSequenceClassification), "
                "set --label_names, or pass compute_loss_func."
            )

    def create_optimizer(self, model=None):
        """The base optimizer exactly as Trainer builds it for ``--xsam_base_optim`` (or from ``optimizers`` /
        ``optimizer_cls_and_kwargs`` when given), wrapped in XSAM. An XSAM already there is kept as it is, however
        Accelerate wrapped it: ``train()`` called again, and each retry of ``auto_find_batch_size``, come back here."""
        if not self._xsam_enabled:
            return super().create_optimizer(model)
        if _find_xsam(self.optimizer) is not None:
            return self.optimizer
        if self.optimizer is None:
            requested = self.args.optim
            self.args.optim = self.args.xsam_base_optim  # build the base exactly as Trainer would
            try:
                super().create_optimizer(model)
            finally:
                self.args.optim = requested
        if _find_xsam(self.optimizer) is None:  # the base (or an optimizer the user passed): wrap it
            self.optimizer = XSAM(None, self.optimizer, **self.args.xsam_kwargs())
        return self.optimizer

    @property
    def xsam(self) -> XSAM:
        """The XSAM optimizer under Accelerate's wrapper."""
        opt = _find_xsam(self.optimizer)
        if opt is None:
            raise RuntimeError("trainer.xsam: the optimizer is not an XSAM (is args.optim 'xsam' or 'sam'?)")
        return opt

    # ------------------------------------------------------------------ the training step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if not self._xsam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.xsam_perturbation == "local":
            return self._xsam_local_step(model, inputs, num_items_in_batch)
        batch, loss = self._xsam_theta_0_pass(model, inputs, num_items_in_batch)
        self._xsam_window.append(batch)
        if self.accelerator.sync_gradients:  # the step's last micro-batch: the other passes, for all of them
            window, self._xsam_window = self._xsam_window, []

            def sync(last: bool):  # one all-reduce per pass set, on its last micro-batch (DDP)
                return contextlib.nullcontext() if last else trainer_no_sync(self, model)

            info = sharpness_passes(self.xsam, window, probe_extra=list(self._xsam_recent), sync=sync)
            self._record(info)
            self._xsam_recent.extend(window)
        return loss

    def _xsam_local_step(self, model: nn.Module, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """m-sharpness: this micro-batch's passes on its own gradient, its direction added to the window's."""
        xsam = self.xsam
        params = [p for group in xsam.param_groups for p in group["params"]]
        # Earlier micro-batches' directions wait aside while this one computes its own: moved, not copied,
        # unless DDP hands out gradients that are views of its buckets (the next backward would overwrite them).
        copy = getattr(model, "gradient_as_bucket_view", False)
        accumulated = [None if p.grad is None else (p.grad.clone() if copy else p.grad) for p in params]
        for p in params:
            p.grad = None

        def no_sync(last: bool = True):
            return trainer_no_sync(self, model)

        first = not self._xsam_window  # the probe, when due, runs on the step's first micro-batch
        with no_sync():
            batch, loss = self._xsam_theta_0_pass(model, inputs, num_items_in_batch)
        info = sharpness_passes(xsam, [batch], probe=xsam.probe_due and first, probe_extra=list(self._xsam_recent),
                                sync=no_sync)
        self._record(info)
        self._xsam_recent.append(batch)
        self._xsam_window.append(batch)

        for p, previous in zip(params, accumulated):
            if previous is not None:
                if p.grad is not None:
                    previous.add_(p.grad)
                p.grad = previous
        if self.accelerator.sync_gradients:
            self._xsam_window = []
            if self.accelerator.num_processes > 1:
                all_reduce_mean([p.grad for p in params if p.grad is not None])
        return loss

    def _xsam_theta_0_pass(self, model: nn.Module, inputs: dict, num_items_in_batch):
        """The Trainer's own training step on this micro-batch, untouched; returns it as a replayable `MicroBatch`
        and the loss the Trainer logs. Every replay scales its loss as that step did (``num_items_in_batch``, the
        division by the accumulation steps), so XSAM's passes weigh micro-batches and tokens exactly as the plain
        Trainer does, whatever the model, the loss or the trainer class."""
        rng = RNGState.capture(self.xsam.devices)
        upstream_step = super().training_step
        loss = upstream_step(model, inputs, num_items_in_batch)

        def run(backward: bool) -> torch.Tensor:  # a replay: compute_loss's bookkeeping stays as theta_0 left it
            with bookkeeping_kept(self):
                if backward:
                    return upstream_step(model, inputs, num_items_in_batch)
                return self._xsam_forward_loss(model, inputs, num_items_in_batch)

        return MicroBatch(run=run, rng=rng), loss

    def _xsam_forward_loss(self, model: nn.Module, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """The loss `Trainer.training_step` would back-propagate, without the backward (the probe's points)."""
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items_in_batch)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(
                f"XSAM needs a scalar loss, but compute_loss returned {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}: does the model get labels?"
            )
        # the scaling for accumulation, decided as Trainer.training_step decides it
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        return loss if scaled else loss / self.current_gradient_accumulation_steps

    # ------------------------------------------------------------------ logging and model card
    def _record(self, passes) -> None:
        info = passes.direction
        if info is None:  # not a sharpness-aware step
            return
        if info.psi is not None:
            self._xsam_logs["psi"].append(info.psi.detach())
        if passes.ascent_loss is not None:
            self._xsam_logs["ascent_loss"].append(passes.ascent_loss)
        if info.correction is not None:
            self._xsam_logs["correction"].append(info.correction.detach())
        if info.probe_losses is not None:
            finite = [v for v in info.probe_losses if math.isfinite(v)]
            self._xsam_logs["probe_loss_max"] = [max(finite)] if finite else []
            self.state.log_history.append({
                "step": self.state.global_step + 1,  # the step it belongs to, counted as the logs count
                "xsam/probe_alphas": info.probe_alphas,
                "xsam/probe_losses": info.probe_losses,
                "xsam/alpha": info.alpha,
                **({"xsam/angle": self.xsam.angle} if self.xsam.angle is not None else {}),
            })

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._xsam_enabled and "loss" in logs and self.optimizer is not None:
            logs["xsam/alpha"] = self.xsam.alpha
            if self.xsam.angle is not None:
                logs["xsam/angle"] = self.xsam.angle
            for key in ("psi", "ascent_loss", "correction"):
                values = self._xsam_logs[key]
                if values:  # one host sync per logging step; nanmean: an fp16 overflow step gives NaN
                    mean = torch.stack(values).float().nanmean().item()
                    if math.isfinite(mean):
                        logs[f"xsam/{key}"] = round(mean, 6)
                self._xsam_logs[key] = []
            if self._xsam_logs["probe_loss_max"]:
                logs["xsam/probe_loss_max"] = round(self._xsam_logs["probe_loss_max"][0], 6)
                self._xsam_logs["probe_loss_max"] = []
        super().log(logs, start_time)

    def create_model_card(self, *args, tags: str | list[str] | None = None, **kwargs) -> None:
        super().create_model_card(*args, tags=tags, **kwargs)
        if self._xsam_enabled and self.is_world_process_zero():
            self._add_xsam_to_card()

    def _add_xsam_to_card(self) -> None:
        """Tag the card ``xsam`` and the method, and append the settings table. Done on the written card, after
        the Trainer (and PEFT, which rewrites an adapter's card with its own tags) are through with it."""
        from huggingface_hub import ModelCard

        path = os.path.join(self.args.output_dir, "README.md")
        card = ModelCard.load(path)
        tags = list(card.data.tags or [])
        for tag in ("xsam", self.args.optim):  # "xsam" once, then "sam" for --optim sam
            if tag not in tags:
                tags.append(tag)
        card.data.tags = tags
        method = "SAM (alpha fixed at 1)" if self.args.optim == "sam" else "XSAM"
        # the flags' values, with what --optim sam fixes (alpha 1, no probe) as it ran
        settings = {name: getattr(self.args, PREFIX + name) for name in HYPERPARAMETERS} | self.args.xsam_kwargs()
        if settings["rho_max"] is None:
            settings["rho_max"] = f"{2 * settings['rho']} (2 * rho)"
        rows = [("method", method), *settings.items()]
        if self.optimizer is not None:
            rows.append(("final alpha", self.xsam.alpha))
        lines = [
            "",
            "## Sharpness-aware training",
            "",
            "Trained with hf_xsam: XSAM, eXplicit Sharpness-Aware "
            "Minimization (Chen & Zhou, ICLR 2026).",
            "",
            "| setting (flag `--xsam_<setting>`) | value |",
            "| --- | --- |",
            *[f"| {k} | {v} |" for k, v in rows],
            "",
        ]
        card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines)
        card.save(path)


def _find_xsam(optimizer) -> XSAM | None:
    """The XSAM under any wrappers (Accelerate's `AcceleratedOptimizer`), or None."""
    while optimizer is not None and not isinstance(optimizer, XSAM):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class XSAMTrainer(XSAMMixin, Trainer):
    """`Trainer` with XSAM when ``args.optim`` is ``"xsam"`` or ``"sam"`` (see `XSAMMixin`); with any other
    ``args.optim`` it is exactly `Trainer`.

    Example::

        args = XSAMTrainingArguments(output_dir="out", optim="xsam", xsam_rho=0.05)
        trainer = XSAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.train()
    """
