"""``reuse``: the steps between sharpness steps carry the last one's correction (hf_xsam/reuse.py), against the
naive reference (tests/reference.py), and its invariants in the optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import BASES, MLP, TASKS, make_closure
from test_xsam import assert_changed, assert_states_close, train_reference, train_xsam

from hf_xsam import XSAM, XSAMTrainer, reuse
from hf_xsam.passes import sharpness_passes

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("alpha, probe", [(0.5, False), (1.0, False), (0.5, True)], ids=["xsam", "looksam", "probed"])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("task_name", ["mlp", "bert"])
def test_matches_reference(task_name, base_name, alpha, probe):
    task, steps = TASKS[task_name], 40
    base, base_kwargs = BASES[base_name], task.base_kwargs[base_name]
    kwargs = dict(rho=task.rho, alpha=alpha, probe_every=8 if probe else 0, sharpness_every=4, reuse=True)
    batches = task.batches(steps)
    initial = {name: p.detach().clone() for name, p in task.build().named_parameters()}
    model, opt, losses, alphas = train_xsam(task, batches, base, base_kwargs, **kwargs)
    ref_model, ref, ref_losses, ref_alphas, _ = train_reference(task, batches, base, base_kwargs, **kwargs)
    assert_states_close(model, ref_model, rtol=1e-4, atol=1e-5)
    assert_changed(model, initial)
    assert alphas == ref_alphas
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-5)
    assert ref.correction.norm() > 1e-3  # the steps in between did carry something


def test_reuse_changes_only_the_steps_in_between():
    """With reuse the sharpness steps take the same direction as without (to rounding), the plain steps not."""
    batches = MLP.batches(8)
    kwargs = dict(rho=MLP.rho, alpha=0.5, probe_every=0, sharpness_every=4)
    grads = {}
    for reused in (False, True):
        model = MLP.build()
        opt = XSAM(model.parameters(), torch.optim.SGD, reuse=reused, lr=0.0, **kwargs)  # lr 0: one point
        grads[reused] = []
        for batch in batches:
            opt.step(make_closure(model, MLP.loss, batch))
            grads[reused].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    for step, (plain, carried) in enumerate(zip(grads[False], grads[True])):
        if step % 4 == 0:
            torch.testing.assert_close(carried, plain, rtol=1e-5, atol=1e-6)
        else:
            assert (carried - plain).norm() > 1e-2 * plain.norm(), step


@pytest.mark.parametrize("foreach", [True, False])
def test_correction_is_orthogonal_to_g_0_and_scaled_by_its_norm(foreach):
    """After a sharpness step the buffer holds c' = (d - (d . v0) v0) / ||g_0||: orthogonal to g_0, and the
    weights are theta_0 bitwise."""
    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=MLP.rho, alpha=0.7, probe_every=0, sharpness_every=2,
               reuse=True, foreach=foreach, lr=0.1)
    batch = MLP.batches(1)[0]
    closure = make_closure(model, MLP.loss, batch)
    theta_0 = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    closure()
    g_0 = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    sharpness_passes(opt, [_replayable(closure)])
    d = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    kept = torch.cat([opt._theta_0[p].reshape(-1) for p in model.parameters()])
    for p, before in zip(model.parameters(), theta_0):
        assert torch.equal(p, before)
    expected = (d - torch.dot(d, g_0) / g_0.norm() ** 2 * g_0) / g_0.norm()
    torch.testing.assert_close(kept, expected, rtol=1e-4, atol=1e-6)
    assert abs(torch.dot(kept, g_0)) < 1e-5 * kept.norm() * g_0.norm()
    assert kept.norm() > 1e-2


def _kept_after_one_sharpness_step(alpha: float, foreach: bool = True):
    """(kept c', d, the step's DirectionInfo) after one sharpness step from the same weights and batch."""
    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=MLP.rho, alpha=alpha, probe_every=0, sharpness_every=2,
               reuse=True, foreach=foreach, lr=0.1)
    closure = make_closure(model, MLP.loss, MLP.batches(1)[0])
    opt.zero_grad()
    closure()
    info = sharpness_passes(opt, [_replayable(closure)]).direction
    d = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    return torch.cat([opt._theta_0[p].reshape(-1) for p in model.parameters()]), d, info


@pytest.mark.parametrize("foreach", [True, False])
def test_the_carried_correction_is_sams_part_at_most(foreach):
    """With one ascent step XSAM's kept part is a1 = sin(alpha psi) / sin(psi) times SAM's. It is carried at gain
    1 / max(a1, 1): at alpha 1.6 (a1 > 1) exactly SAM's (alpha 1) correction, although d differs; at alpha 0.5
    (a1 < 1) a1 times it, unamplified."""
    sam, d_sam, info = _kept_after_one_sharpness_step(1.0, foreach)
    psi = info.psi
    for alpha in (1.6, 0.5):
        kept, d, _ = _kept_after_one_sharpness_step(alpha, foreach)
        a1 = (torch.sin(alpha * psi) / torch.sin(psi)).item()
        assert (a1 > 1.2) if alpha > 1 else (a1 < 0.8)
        assert (d - d_sam).norm() > 1e-2 * d_sam.norm()
        torch.testing.assert_close(kept, sam * min(a1, 1.0), rtol=1e-4, atol=1e-6)
    assert sam.norm() > 1e-2


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.6])
def test_the_logged_correction_is_the_kept_norm(alpha):
    """DirectionInfo.correction (the Trainer's xsam/correction) is ||c'||, from the plane's scalars."""
    kept, _, info = _kept_after_one_sharpness_step(alpha)
    torch.testing.assert_close(info.correction, kept.norm(), rtol=1e-4, atol=1e-7)
    assert info.correction > 1e-2


def _replayable(closure):
    from hf_xsam.replay import RNGState
    from hf_xsam.types import MicroBatch

    return MicroBatch(run=lambda backward: closure(backward), rng=RNGState.capture({torch.device("cpu")}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("foreach", [True, False])
def test_swap_exchanges_every_bit(dtype, foreach):
    a = [torch.randn(5, dtype=dtype) * 1e30 if dtype != torch.bfloat16 else torch.randn(5, dtype=dtype),
         torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)]
    b = [torch.randn(5, dtype=dtype), torch.tensor([1.0, -float("inf"), 0.0], dtype=dtype)]
    a0, b0 = [t.clone() for t in a], [t.clone() for t in b]
    reuse.swap(a, b, foreach)
    for x, y in zip(a + b, b0 + a0):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


@pytest.mark.parametrize("t", [0.0, 1e-9, -1e-9, 0.3, -0.3, 1.0, -1.0, 7.5, -7.5])
@pytest.mark.parametrize("foreach", [True, False])
def test_kept_axpy(t, foreach):
    x = [torch.randn(7, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    y = [torch.randn(7, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)]
    x0, y0 = [v.clone() for v in x], [v.clone() for v in y]
    reuse.kept_axpy(y, x, torch.tensor(t, dtype=torch.float64), foreach)
    for xi, x0i, yi, y0i in zip(x, x0, y, y0):
        torch.testing.assert_close(xi, x0i, rtol=1e-14, atol=0)
        torch.testing.assert_close(yi, y0i + t * x0i, rtol=1e-14, atol=1e-14)


def test_foreach_matches_the_loop():
    batches = MLP.batches(12)
    results = []
    for foreach in (True, False):
        model = MLP.build()
        opt = XSAM(model.parameters(), torch.optim.AdamW, rho=MLP.rho, alpha=0.5, probe_every=4, sharpness_every=3,
                   reuse=True, foreach=foreach, lr=1e-2)
        for batch in batches:
            opt.step(make_closure(model, MLP.loss, batch))
        results.append(model)
    assert_states_close(*results, rtol=1e-6, atol=1e-7)


def test_state_dict_between_sharpness_steps_resumes_bitwise():
    """A checkpoint taken between two sharpness steps carries the correction: the resumed run equals the
    uninterrupted one bitwise."""
    batches = MLP.batches(11)
    kwargs = dict(rho=MLP.rho, alpha=0.5, probe_every=4, sharpness_every=4, reuse=True, lr=1e-2)

    def run(model, opt, part):
        for batch in part:
            opt.step(make_closure(model, MLP.loss, batch))

    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.AdamW, **kwargs)
    run(model, opt, batches[:6])  # step 6: two steps after the sharpness step at 4
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    run(model, opt, batches[6:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all("xsam_correction" in s for s in saved["opt"]["state"].values())
    resumed = MLP.build()
    resumed.load_state_dict(saved["model"])
    opt2 = XSAM(resumed.parameters(), torch.optim.AdamW, **kwargs)
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])  # the model's dropout
    assert opt2.correction_due
    run(resumed, opt2, batches[6:])
    for x, y in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


def test_no_new_buffer_and_no_correction_without_reuse():
    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.AdamW, rho=MLP.rho, probe_every=0, sharpness_every=2, lr=1e-2)
    for batch in MLP.batches(3):
        opt.step(make_closure(model, MLP.loss, batch))
    assert not opt.correction_due
    assert all("xsam_correction" not in s for s in opt.state_dict()["state"].values())
    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.AdamW, rho=MLP.rho, probe_every=0, sharpness_every=2, reuse=True,
               lr=1e-2)
    for batch in MLP.batches(3):
        opt.step(make_closure(model, MLP.loss, batch))
    assert opt.correction_due
    params = list(model.parameters())
    assert len(opt._theta_0) == len(params)
    for p in params:  # the state's correction is the theta_0 buffer itself, not a copy
        assert opt.state[p]["xsam_correction"].data_ptr() == opt._theta_0[p].data_ptr()


def test_rho_zero_with_reuse_is_the_base_optimizer():
    batches = MLP.batches(6)
    models = []
    for reused in (False, True):
        model = MLP.build()
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.0, sharpness_every=3, reuse=reused, lr=0.1)
        for batch in batches:
            opt.step(make_closure(model, MLP.loss, batch))
        models.append(model)
    base = MLP.build()
    sgd = torch.optim.SGD(base.parameters(), lr=0.1)
    for batch in batches:
        sgd.zero_grad()
        MLP.loss(base, batch).backward()
        sgd.step()
    for a, b, c in zip(*(m.parameters() for m in models), base.parameters()):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.parametrize("kwargs, message", [
    (dict(reuse=True), r"reuse=True is invalid with sharpness_every=1: every step is sharpness-aware"),
    (dict(reuse=True, sharpness_every=4, ascent_steps=2), r"reuse=True is invalid with ascent_steps=2"),
    (dict(reuse=1, sharpness_every=4), r"reuse=1 is invalid: must be True or False"),
])
def test_bad_reuse_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XSAM(MLP.build().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


# ---------------------------------------------------------------------- the Trainer
REUSE = dict(optim="xsam", xsam_rho=0.2, xsam_probe_every=2, xsam_sharpness_every=2, xsam_reuse=True)


def test_trainer_accumulation_4_x_2_trains_like_one_batch_of_8(tmp_path):
    """The correction is split off and carried on the step's whole batch: micro-batches do not change it."""
    from helpers import like_one_batch, text_data, tiny_bert, train
    from test_accumulation import SGD, assert_same_run

    data = text_data(n=48)
    settings = dict(SGD, **REUSE, max_steps=5)
    split = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "split", data, per_device_train_batch_size=2,
                  gradient_accumulation_steps=4, **settings)
    whole = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "whole", data, per_device_train_batch_size=8,
                  **settings)
    assert_same_run(split, whole)
    plain = train(like_one_batch(tiny_bert(dropout=0.0)), tmp_path / "plain", data, per_device_train_batch_size=8,
                  **{**settings, "xsam_reuse": False})
    assert max_change(plain, whole) > 1e-4  # the steps in between did carry a correction


def max_change(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_trainer_clips_the_corrected_direction_like_a_custom_loop(tmp_path):
    """The Trainer clips what the base optimizer steps along, on the steps in between as on full steps: the same
    run as a loop of xsam.backward, clip_grad_norm_, step."""
    from helpers import text_data, tiny_bert, train
    from test_accumulation import SGD

    data, clip = text_data(n=48), 0.05
    trainer = train(tiny_bert(dropout=0.0), tmp_path, data, per_device_train_batch_size=8, max_steps=5,
                    logging_steps=1, **{**SGD, "max_grad_norm": clip}, **REUSE)
    model = tiny_bert(dropout=0.0)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.2, probe_every=2, sharpness_every=2, reuse=True, lr=0.5)
    for step in range(5):
        batch = {k: torch.stack([torch.as_tensor(row[k]) for row in data[8 * step: 8 * step + 8]]) for k in data[0]}

        def closure(backward=True, batch=batch):
            loss = model(**batch).loss
            if backward:
                loss.backward()
            return loss

        opt.zero_grad()
        opt.backward(closure)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 5 and min(norms) > clip  # every step was clipped
    # xsam/correction: logged on the sharpness steps (1, 3, 5 as the logs count), which leave the correction
    logged = {h["step"]: h.get("xsam/correction") for h in trainer.state.log_history if "loss" in h}
    assert [step for step, value in logged.items() if value is not None] == [1, 3, 5]
    assert all(0 < logged[step] < 10 for step in (1, 3, 5))


def test_fp16_scaler_an_overflow_between_sharpness_steps_keeps_the_correction(tmp_path):
    """Forwards: step 0 (sharpness) 0-1, step 1 (in between) 2, step 2 (sharpness) 3-4, ...; an overflow in forward
    2 skips step 1: the correction stays bitwise, and the retried step is again one in between."""
    from test_mixed_precision import run, same

    corrections = []

    def snapshot(trainer):
        corrections.append([t.clone() for t in trainer.xsam._theta_0.values()])

    trainer, _, snap = run(tmp_path, overflow_at=[2], max_steps=5, xsam_sharpness_every=2, xsam_reuse=True,
                           on_step=snapshot)
    assert snap.skipped == [False, True, False, False, False]
    assert same(snap.params[1], snap.params[0])
    assert same(corrections[1], corrections[0])  # the skipped step left the correction as it was
    assert trainer.model.calls == 2 + 1 + 1 + 2 + 1  # the retry of step 1 took one forward, then step 2 two
    assert trainer.xsam.step_count == 4
    assert all(torch.isfinite(p).all() for p in snap.params[-1])


def test_fp16_scaler_an_overflow_in_a_sharpness_step_is_retried_as_one(tmp_path):
    """An overflow in step 2's ascent pass skips it; the retry is a sharpness step again (its correction replaces
    whatever the skipped one left), and training goes on finite."""
    from test_mixed_precision import run

    trainer, _, snap = run(tmp_path, overflow_at=[4], max_steps=5, xsam_sharpness_every=2, xsam_reuse=True)
    assert snap.skipped == [False, False, True, False, False]
    assert trainer.model.calls == 2 + 1 + 2 + 2 + 1
    assert all(torch.isfinite(t).all() for t in trainer.xsam._theta_0.values())
    assert all(torch.isfinite(p).all() for p in snap.params[-1])


def test_fp16_scaled_run_equals_the_unscaled_run_with_reuse(tmp_path):
    """The correction is free of the loss scale."""
    from helpers import make_args, text_data
    from test_mixed_precision import OverflowingClassifier, run

    settings = dict(max_steps=5, xsam_sharpness_every=2, xsam_reuse=True)
    _, _, scaled = run(tmp_path / "a", overflow_at=[], **settings)
    plain = OverflowingClassifier()
    XSAMTrainer(model=plain, train_dataset=text_data(), args=make_args(
        tmp_path / "b", optim="xsam", xsam_rho=0.2, xsam_alpha=0.5, xsam_probe_every=0, xsam_base_optim="sgd",
        learning_rate=0.5, max_grad_norm=0.0, **settings)).train()
    for a, b in zip(scaled.params[-1], plain.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_weights_train_with_reuse():
    from helpers import build_mlp, mlp_loss

    model = build_mlp(dtype=torch.bfloat16)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, probe_every=2, sharpness_every=3,
               reuse=True, lr=0.05, momentum=0.9)
    losses = [opt.step(make_closure(model, mlp_loss, batch)).item() for batch in MLP.batches(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    kept = list(opt._theta_0.values())
    assert all(b.dtype == torch.bfloat16 and torch.isfinite(b).all() for b in kept)
    assert sum(b.float().norm() ** 2 for b in kept) > 1e-4  # a correction is carried
    assert_changed(model, initial)


def test_trainer_resumes_bitwise_from_a_checkpoint_between_sharpness_steps(tmp_path):
    """checkpoint-3 falls after sharpness step 2 and before 4: resume_from_checkpoint brings the correction back
    with optimizer.pt, and steps 3-5 equal the uninterrupted run's bitwise."""
    from helpers import params_of, text_data, tiny_bert, train

    settings = dict(REUSE, xsam_base_optim="sgd", learning_rate=0.5, train_sampling_strategy="sequential",
                    per_device_train_batch_size=8, max_steps=6)
    whole = train(tiny_bert(dropout=0.1), tmp_path / "whole", text_data(n=48), **settings)
    first = train(tiny_bert(dropout=0.1), tmp_path / "split", text_data(n=48), save_strategy="steps", save_steps=3,
                  **settings)
    saved = torch.load(tmp_path / "split" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert all("xsam_correction" in s for s in saved["state"].values())
    resumed = XSAMTrainer(model=tiny_bert(dropout=0.1), train_dataset=text_data(n=48), args=first.args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "split" / "checkpoint-3"))
    assert resumed.xsam.step_count == 6
    a, b = params_of(whole.model), params_of(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
