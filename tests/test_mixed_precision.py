"""XSAM under a GradScaler (fp16's path), driven on CPU with torch.amp.GradScaler("cpu") and injected overflows:
an inf/NaN in any pass leaves the weights at theta_0, skips the step, lowers the scale, and training goes on."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_args, text_data
from torch import nn
from transformers import TrainerCallback

from hf_xsam import XSAMTrainer

INIT_SCALE = 1024.0


class OverflowingClassifier(nn.Module):
    """A small classifier whose forward number i (counted over the run) returns an infinite loss if i is listed."""

    def __init__(self, overflow_at=()):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 16)
        self.head = nn.Linear(16, 3)
        self.overflow_at = set(overflow_at)
        self.calls = 0

    def forward(self, input_ids, labels=None):
        logits = self.head(self.embed(input_ids).mean(1))
        if self.calls in self.overflow_at:
            logits = logits * float("inf")
        self.calls += 1
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class ScaledXSAMTrainer(XSAMTrainer):
    """Accelerate's fp16 path (scaler.scale(loss).backward(), scaler.step, scaler.update) with a CPU scaler."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)


class Snapshots(TrainerCallback):
    def __init__(self, trainer_ref, on_step=None):
        self.trainer_ref, self.params, self.scales, self.skipped = trainer_ref, [], [], []
        self.on_step = on_step  # called with the trainer after each step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainer = self.trainer_ref[0]
        self.params.append([p.detach().clone() for p in model.parameters()])
        self.scales.append(trainer.accelerator.scaler.get_scale())
        self.skipped.append(trainer.accelerator.optimizer_step_was_skipped)
        if self.on_step is not None:
            self.on_step(trainer)


def run(tmp_path, overflow_at, trainer_cls=ScaledXSAMTrainer, on_step=None, **overrides):
    model = OverflowingClassifier(overflow_at)
    initial = [p.detach().clone() for p in model.parameters()]
    ref = []
    snapshots = Snapshots(ref, on_step)
    settings = dict(optim="xsam", xsam_rho=0.2, xsam_alpha=0.5, xsam_probe_every=0, xsam_base_optim="sgd",
                    learning_rate=0.5, max_steps=4, max_grad_norm=0.0)
    settings.update(overrides)
    trainer = trainer_cls(model=model, args=make_args(tmp_path, **settings), train_dataset=text_data(),
                          callbacks=[snapshots])
    ref.append(trainer)
    trainer.train()
    return trainer, initial, snapshots


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(("overflow_at", "where"), [(2, "theta_0 pass"), (3, "ascent pass")])
def test_overflow_in_a_pass_keeps_theta_0_skips_the_step_and_training_goes_on(tmp_path, overflow_at, where):
    # 2 forwards per step (theta_0, one ascent): forward 2 and 3 belong to step 1
    trainer, initial, snap = run(tmp_path, overflow_at=[overflow_at])
    assert snap.skipped == [False, True, False, False], where
    assert same(snap.params[1], snap.params[0])  # weights left at theta_0 of step 1, bitwise
    assert not same(snap.params[0], initial) and not same(snap.params[2], snap.params[1])
    assert snap.scales == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2, INIT_SCALE / 2]
    assert all(torch.isfinite(p).all() for p in snap.params[-1])
    assert trainer.xsam.step_count == 3  # the skipped step is not an optimizer step


def test_scaled_run_without_overflow_equals_the_unscaled_run(tmp_path):
    # d is linear in the loss scale and the scaler divides it back out: same weights within float rounding
    _, _, scaled = run(tmp_path / "a", overflow_at=[])
    plain = OverflowingClassifier()
    XSAMTrainer(model=plain, train_dataset=text_data(),
                args=make_args(tmp_path / "b", optim="xsam", xsam_rho=0.2, xsam_alpha=0.5,
                               xsam_probe_every=0, xsam_base_optim="sgd", learning_rate=0.5, max_steps=4,
                               max_grad_norm=0.0)).train()
    for a, b in zip(scaled.params[-1], plain.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert scaled.skipped == [False] * 4


def test_overflow_at_a_probe_point_is_ignored_by_the_argmax(tmp_path):
    # step 0: theta_0 (0), ascent (1), then 21 probe forwards (2..22); overflow at the probe of alpha = 0.3
    trainer, _, snap = run(tmp_path, overflow_at=[2 + 3], xsam_probe_every=10)
    probe = next(h for h in trainer.state.log_history if "xsam/probe_losses" in h)
    losses = probe["xsam/probe_losses"]
    assert math.isinf(losses[3]) or math.isnan(losses[3])
    finite = [v if math.isfinite(v) else -math.inf for v in losses]
    assert probe["xsam/alpha"] == probe["xsam/probe_alphas"][finite.index(max(finite))]
    assert snap.skipped == [False] * 4  # the probe computes no gradient: nothing to skip
    assert all(torch.isfinite(p).all() for p in snap.params[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Trainer's own fp16=True path needs CUDA")
@pytest.mark.parametrize("overflow_at", [2, 3])
def test_gpu_fp16_trainer_overflow_keeps_theta_0_and_skips_the_step(tmp_path, overflow_at):
    trainer, initial, snap = run(tmp_path, overflow_at=[overflow_at], trainer_cls=XSAMTrainer, use_cpu=False,
                                 fp16=True)
    assert trainer.accelerator.scaler is not None
    assert snap.skipped == [False, True, False, False]
    assert same(snap.params[1], snap.params[0])
    assert not same(snap.params[2], snap.params[1])
    assert snap.scales[1] == snap.scales[0] / 2 and snap.scales[3] == snap.scales[1]
    assert all(torch.isfinite(p).all() for p in snap.params[-1])
