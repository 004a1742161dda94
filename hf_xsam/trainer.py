"""`XSAMTrainer`: a `transformers.Trainer` whose training step runs XSAM's sharpness-aware passes."""

from __future__ import annotations

import collections
import contextlib
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer

from hf_xsam.hyperparameters import HYPERPARAMETERS, PREFIX
from hf_xsam.replay import RNGState, frozen_running_stats
from hf_xsam.training_args import XSAMTrainingArguments
from hf_xsam.xsam import XSAM


class XSAMTrainer(Trainer):
    """`Trainer` with XSAM (Chen & Zhou, ICLR 2026) when ``args.optim`` is ``"xsam"`` or ``"sam"``.

    Example::

        args = XSAMTrainingArguments(output_dir="out", optim="xsam", xsam_rho=0.05)
        trainer = XSAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.train()

    Per micro-batch, `training_step` runs: the theta_0 forward/backward (its loss is the one reported), the
    ascent step(s) each followed by a forward/backward, the alpha probe when due (forward passes only, on the
    first micro-batch of a due optimizer step), then leaves the XSAM direction in ``.grad`` added to what
    earlier micro-batches accumulated, with the weights back at theta_0. Every pass of a micro-batch sees the
    same dropout masks; only the theta_0 pass updates BatchNorm running statistics. Clipping, the scheduler,
    checkpoints and logging are the Trainer's own and act on the final direction.

    Loss scaling is explicit: each pass uses the micro-batch's mean loss (``num_items_in_batch`` is not
    forwarded, so models that ignore it, e.g. BERT classification, and ``average_tokens_across_devices`` cannot
    change the scale) divided by the number of micro-batches in the step. With SGD the update is the mean of
    the micro-batches' XSAM directions.

    Logged (with the training loss): ``xsam/alpha``, ``xsam/psi`` (mean angle between v0 and v1, radians),
    ``xsam/ascent_loss`` (mean loss at the ascent point), ``xsam/probe_loss_max`` (largest loss of the latest
    probe since the last log). Each probe also appends ``{"step", "xsam/probe_alphas", "xsam/probe_losses",
    "xsam/alpha"}`` to ``state.log_history`` (saved in ``trainer_state.json``).

    With any other ``args.optim`` this class is exactly `Trainer`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._xsam_logs: dict[str, list] = {"psi": [], "ascent_loss": [], "probe_loss_max": []}
        self._xsam_probed_at: int | None = None
        # the micro-batches before this one, for a probe averaged over xsam_probe_batches (validated >= 1)
        keep = self.args.xsam_probe_batches - 1 if self._xsam_enabled else 0
        self._xsam_recent: collections.deque = collections.deque(maxlen=keep)
        if self._xsam_enabled:
            self._check_xsam_compatible()

    # ------------------------------------------------------------------ set-up
    @property
    def _xsam_enabled(self) -> bool:
        return isinstance(self.args, XSAMTrainingArguments) and self.args.xsam_enabled

    def _check_xsam_compatible(self) -> None:
        optim = self.args.optim
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"optim={optim!r} cannot run under DeepSpeed: its engine steps the optimizer inside backward, so "
                "XSAM cannot restore the weights between passes. Use DDP (accelerate launch --multi_gpu) instead."
            )
        if self.is_fsdp_enabled:
            raise ValueError(
                f"optim={optim!r} does not support FSDP yet: each process holds a shard of the weights, so XSAM's "
                "norms and angles would be per shard. Use DDP (accelerate launch --multi_gpu) instead."
            )
        if self.args.torch_compile:
            raise ValueError(
                f"optim={optim!r} does not support torch_compile=True yet: compiled dropout does not replay when XSAM "
                "restores the random number generator (measured on torch 2.13: the probe's masks differ from the "
                "theta_0 pass), so the probe would measure dropout noise. Train without --torch_compile."
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
        if not self._xsam_enabled:
            return super().create_optimizer(model)
        if self.optimizer is None:
            requested = self.args.optim
            self.args.optim = self.args.xsam_base_optim  # build the base exactly as Trainer would
            try:
                super().create_optimizer(model)
            finally:
                self.args.optim = requested
        if not isinstance(self.optimizer, XSAM):
            self.optimizer = XSAM(None, self.optimizer, **self.args.xsam_kwargs())
        return self.optimizer

    @property
    def xsam(self) -> XSAM:
        """The XSAM optimizer under Accelerate's wrapper."""
        opt = self.optimizer
        while not isinstance(opt, XSAM):
            if not hasattr(opt, "optimizer"):
                raise RuntimeError("XSAMTrainer.xsam: the optimizer is not an XSAM (is args.optim 'xsam' or 'sam'?)")
            opt = opt.optimizer
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
        model.train()
        self.xsam.train()  # a schedule-free base optimizer must be in train mode for its step
        inputs = self._prepare_inputs(inputs)
        params = [p for group in self.xsam.param_groups for p in group["params"]]
        ddp = model if isinstance(model, DistributedDataParallel) else None
        # Earlier micro-batches' directions wait aside while this one computes its own: moved, not copied,
        # unless DDP hands out gradients that are views of its buckets (the next backward would overwrite them).
        copy = ddp is not None and ddp.gradient_as_bucket_view
        accumulated = [None if p.grad is None else (p.grad.clone() if copy else p.grad) for p in params]
        for p in params:
            p.grad = None

        global_mode = self.args.xsam_perturbation == "global"
        with _gradient_sync(ddp, global_mode):
            loss = self._xsam_micro_batch(model, inputs, 1.0 / self.current_gradient_accumulation_steps)

        for p, previous in zip(params, accumulated):
            if previous is not None:
                if p.grad is not None:
                    previous.add_(p.grad)
                p.grad = previous
        if ddp is not None and not global_mode and self.accelerator.sync_gradients:
            _all_reduce_mean([p.grad for p in params if p.grad is not None])
        return loss * (1.0 / self.current_gradient_accumulation_steps)

    def _xsam_micro_batch(self, model: nn.Module, inputs: dict, scale: float) -> torch.Tensor:
        """theta_0 pass, ascent passes, probe when due; leaves this micro-batch's direction in .grad."""
        xsam = self.xsam
        devices = {p.device for group in xsam.param_groups for p in group["params"]}
        rng_start = RNGState.capture(devices)
        loss = self._xsam_pass(model, inputs, scale)
        if not xsam.sharpness_due:  # rho = 0, or a plain step between sharpness-aware ones (xsam_sharpness_every)
            self._remember(inputs)
            return loss
        rng_after = RNGState.capture(devices)
        ascent_loss = None
        for _ in range(xsam.ascent_steps):
            xsam.ascent_step()
            xsam.zero_grad(set_to_none=True)
            rng_start.restore()
            with frozen_running_stats():
                ascent_loss = self._xsam_pass(model, inputs, scale)

        probe_fn = None
        if xsam.probe_due and self._xsam_probed_at != xsam.step_count:
            self._xsam_probed_at = xsam.step_count  # probe on the step's first micro-batch only
            batches = [inputs, *reversed(self._xsam_recent)]  # this one, then those trained on just before

            def probe_fn():
                rng_start.restore()  # every point sees the same masks (per batch, in the same order)
                with frozen_running_stats(), self.compute_loss_context_manager():
                    return torch.stack([self._loss(model, batch) for batch in batches]).mean()

        reduce = None
        if self.accelerator.num_processes > 1:
            def reduce(losses):
                return self.accelerator.reduce(losses, reduction="mean")

        info = xsam.set_direction(probe_fn, reduce)
        rng_after.restore()
        self._record(info, ascent_loss)
        self._remember(inputs)
        return loss

    def _remember(self, inputs: dict) -> None:
        """Keep the latest micro-batches for a probe averaged over several (xsam_probe_batches > 1)."""
        if self._xsam_recent.maxlen:
            self._xsam_recent.append(inputs)

    def _loss(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The micro-batch's mean loss (num_items_in_batch deliberately not forwarded; see the class docstring)."""
        loss = self.compute_loss(model, dict(inputs), num_items_in_batch=None)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(
                f"XSAM needs a scalar loss, but compute_loss returned {type(loss).__name__}"
                f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}: does the model get labels?"
            )
        return loss.reshape(())

    def _xsam_pass(self, model: nn.Module, inputs: dict, scale: float) -> torch.Tensor:
        with self.compute_loss_context_manager():
            loss = self._loss(model, inputs)
        self.accelerator.backward(loss * scale)
        return loss.detach()

    # ------------------------------------------------------------------ logging and model card
    def _record(self, info, ascent_loss) -> None:
        if info.psi is not None:
            self._xsam_logs["psi"].append(info.psi.detach())
        if ascent_loss is not None:
            self._xsam_logs["ascent_loss"].append(ascent_loss)
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
            for key in ("psi", "ascent_loss"):
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
        if self._xsam_enabled:
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            for tag in ("xsam", self.args.optim):
                if tag not in tags:
                    tags.append(tag)
        super().create_model_card(*args, tags=tags, **kwargs)
        if self._xsam_enabled and self.is_world_process_zero():
            self._append_xsam_card_section()

    def _append_xsam_card_section(self) -> None:
        path = os.path.join(self.args.output_dir, "README.md")
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
        with open(path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines))


@contextlib.contextmanager
def _gradient_sync(ddp: DistributedDataParallel | None, enabled: bool):
    """Force DDP's gradient all-reduce on (global perturbation) or off (local) for the passes inside, whatever
    the Trainer's accumulation context says; restored on exit."""
    if ddp is None:
        yield
        return
    previous = ddp.require_backward_grad_sync
    ddp.require_backward_grad_sync = enabled
    try:
        yield
    finally:
        ddp.require_backward_grad_sync = previous


def _all_reduce_mean(tensors: list[torch.Tensor], bucket_bytes: int = 25 * 2**20) -> None:
    """Average tensors across processes in place: flattened into ~25 MiB buckets, one all-reduce each."""
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, t in enumerate(tensors):
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= bucket_bytes or i == len(tensors) - 1:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            for t_out, t_in in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                t_out.copy_(t_in)
            bucket, size = [], 0
