"""XSAM against the naive reference of docs/algorithm.md (tests/reference.py), and its invariants."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import BASES, GRID, MLP, TASKS, build_mlp, make_closure, mlp_batch, mlp_loss, small_net
from reference import (
    ReferenceSAM,
    ReferenceXSAM,
    argmax_first,
    flat_grads,
    flatten,
    geometry,
    probe_grid,
    slerp,
    write_params,
)
from torch import nn

from hf_xsam import XSAM
from hf_xsam.geometry import SIN_PSI_MIN

pytestmark = pytest.mark.usefixtures("seeded")



def assert_states_equal(a: nn.Module, b: nn.Module) -> None:
    """Parameters and buffers (BatchNorm statistics included) bitwise equal."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def assert_states_close(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(x, y), name


def assert_changed(model: nn.Module, initial: dict) -> None:
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, initial[name]), f"{name} did not train"


def train_xsam(task, batches, base, base_kwargs, counter=None, **xsam_kwargs):
    """The implementation, driven by step(closure): returns the model, optimizer, losses and alphas."""
    model = task.build()
    opt = XSAM(None, base(model.parameters(), **base_kwargs), **xsam_kwargs)
    torch.manual_seed(1)
    losses, alphas = [], []
    for batch in batches:
        losses.append(opt.step(make_closure(model, task.loss, batch, counter)).item())
        alphas.append(opt.alpha)
    return model, opt, losses, alphas


def train_reference(task, batches, base, base_kwargs, **xsam_kwargs):
    model = task.build()
    ref = ReferenceXSAM(base(model.parameters(), **base_kwargs), **xsam_kwargs)
    torch.manual_seed(1)
    losses, alphas, psis = [], [], []
    for batch in batches:
        losses.append(ref.step(lambda batch=batch: task.loss(model, batch), model=model).item())
        alphas.append(ref.alpha)
        psis.append(ref.last_psi)
    return model, ref, losses, alphas, psis


# ---------------------------------------------------------------------- the reference, over many steps
@pytest.mark.parametrize("probe", [False, True], ids=["fixed_alpha", "probed_alpha"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
@pytest.mark.parametrize("task_name", ["mlp", "bert"])
def test_matches_reference(task_name, base_name, k, probe):
    task, steps = TASKS[task_name], 50
    base, base_kwargs = BASES[base_name], task.base_kwargs[base_name]
    xsam_kwargs = dict(rho=task.rho, alpha=0.5, ascent_steps=k, probe_every=5 if probe else 0)
    batches = task.batches(steps)
    initial = {name: p.detach().clone() for name, p in task.build().named_parameters()}

    model, opt, losses, alphas = train_xsam(task, batches, base, base_kwargs, **xsam_kwargs)
    ref_model, ref, ref_losses, ref_alphas, psis = train_reference(task, batches, base, base_kwargs, **xsam_kwargs)

    assert_states_close(model, ref_model)  # BatchNorm statistics included
    assert_changed(model, initial)
    assert alphas == ref_alphas
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert opt.step_count == steps
    assert min(psis) > 0.1  # the plane is far from degenerate: the test exercises the slerp, not the fallback
    if probe:
        assert len(set(alphas)) > 1  # the probe did move alpha
    else:
        assert set(alphas) == {0.5}


def test_multi_step_sam_matches_reference():
    """alpha = 1 with k = 3 ascent steps is multi-step SAM: the reference's slerp at alpha = 1 is v1."""
    batches = MLP.batches(20)
    kwargs = dict(rho=MLP.rho, alpha=1.0, ascent_steps=3, probe_every=0)
    model, _, _, _ = train_xsam(MLP, batches, torch.optim.SGD, MLP.base_kwargs["sgd"], **kwargs)
    ref_model, *_ = train_reference(MLP, batches, torch.optim.SGD, MLP.base_kwargs["sgd"], **kwargs)
    assert_states_close(model, ref_model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_matches_reference_on_cuda(base_name):
    """The same comparison on a GPU: dropout masks come from the CUDA generator, which must be replayed too."""
    device = torch.device("cuda")
    batches = [{key: value.to(device) for key, value in batch.items()} for batch in MLP.batches(30)]
    base, base_kwargs = BASES[base_name], MLP.base_kwargs[base_name]
    kwargs = dict(rho=MLP.rho, alpha=0.5, ascent_steps=2, probe_every=5)
    models, alphas = [], []
    for implementation in ("xsam", "reference"):
        model = MLP.build().to(device)
        if implementation == "xsam":
            opt = XSAM(model.parameters(), base, **kwargs, **base_kwargs)
        else:
            opt = ReferenceXSAM(base(model.parameters(), **base_kwargs), **kwargs)
        torch.manual_seed(1)
        trajectory = []
        for batch in batches:
            if implementation == "xsam":
                opt.step(make_closure(model, mlp_loss, batch))
            else:
                opt.step(lambda batch=batch, model=model: mlp_loss(model, batch), model=model)
            trajectory.append(opt.alpha)
        models.append(model)
        alphas.append(trajectory)
    assert alphas[0] == alphas[1] and len(set(alphas[0])) > 1
    assert_states_close(*models)


# ---------------------------------------------------------------------- invariants over equivalent runs
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_alpha_one_is_sam(base_name):
    """alpha = 1 without probing is SAM, bitwise (BatchNorm and Dropout in the model)."""
    base, base_kwargs = BASES[base_name], MLP.base_kwargs[base_name]
    batches = MLP.batches(20)
    initial = {name: p.detach().clone() for name, p in MLP.build().named_parameters()}
    model, _, losses, _ = train_xsam(MLP, batches, base, base_kwargs, rho=0.1, alpha=1.0, probe_every=0)

    sam_model = MLP.build()
    sam = ReferenceSAM(base(sam_model.parameters(), **base_kwargs), rho=0.1)
    torch.manual_seed(1)
    sam_losses = [sam.step(lambda b=b: mlp_loss(sam_model, b), model=sam_model).item() for b in batches]

    assert_states_equal(model, sam_model)
    assert losses == sam_losses
    assert_changed(model, initial)


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_rho_zero_is_the_base_optimizer(base_name):
    """rho = 0 is the base optimizer, bitwise: one pass per step, no probe, the same random numbers."""
    base, base_kwargs = BASES[base_name], MLP.base_kwargs[base_name]
    batches = MLP.batches(10)
    counter = [0]
    model, _, losses, alphas = train_xsam(MLP, batches, base, base_kwargs, counter=counter, rho=0.0, alpha=0.5,
                                          probe_every=1)
    rng_xsam = torch.get_rng_state()

    bare_model = MLP.build()
    bare = base(bare_model.parameters(), **base_kwargs)
    torch.manual_seed(1)
    bare_losses = []
    for batch in batches:
        bare.zero_grad(set_to_none=True)
        loss = mlp_loss(bare_model, batch)
        loss.backward()
        bare.step()
        bare_losses.append(loss.item())

    assert_states_equal(model, bare_model)
    assert losses == bare_losses
    assert torch.equal(rng_xsam, torch.get_rng_state())
    assert counter == [0] and set(alphas) == {0.5}


def test_rng_and_batchnorm_as_after_one_pass():
    """After a step the generator is where one forward pass leaves it, and only that pass moved BatchNorm."""
    model, batch = build_mlp(), mlp_batch(torch.Generator().manual_seed(3))
    twin = copy.deepcopy(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, ascent_steps=2, probe_every=1,
               lr=0.0)
    torch.manual_seed(7)
    loss = opt.step(make_closure(model, mlp_loss, batch))
    rng_after_step = torch.get_rng_state()
    torch.manual_seed(7)
    twin_loss = mlp_loss(twin, batch)
    assert torch.equal(rng_after_step, torch.get_rng_state())
    assert loss.item() == twin_loss.item()
    assert_states_equal(model, twin)  # lr = 0: the weights stay, the statistics moved once


@pytest.mark.parametrize("probe", [False, True])
def test_rng_after_a_step_with_uneven_random_draws(probe):
    """A closure whose passes draw different amounts of randomness (here: only the backward passes draw):
    after the step the generator is still where the theta_0 pass left it."""
    w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    opt = XSAM([w], torch.optim.SGD, rho=0.3, alpha=0.5, probe_every=int(probe), lr=0.1)

    def closure(backward=True):
        loss = (w * torch.tensor([1.0, 2.0, -1.0])).pow(2).sum()
        if backward:
            loss = loss + 0 * torch.rand(3).sum()
            loss.backward()
        return loss

    torch.manual_seed(7)
    opt.step(closure)
    after_step = torch.get_rng_state()
    torch.manual_seed(7)
    torch.rand(3)
    assert torch.equal(after_step, torch.get_rng_state())


@pytest.mark.parametrize("k", [1, 2])
def test_parameter_unused_at_an_ascent_point(k):
    """A parameter with a gradient at theta_0 and none further on (routed away) has a zero gradient there."""

    def loss_of(w, a):
        loss = -w.sum()
        if w.sum() > 0:  # true at theta_0; the first ascent step (d loss/dw = -1) pushes w below 0
            loss = loss + 0.1 * (a * a).sum()
        return loss

    def make():
        return nn.Parameter(torch.tensor([0.5, 0.5])), nn.Parameter(torch.tensor([1.0, -2.0]))

    w, a = make()
    opt = XSAM([w, a], torch.optim.SGD, rho=2.0, alpha=0.5, ascent_steps=k, probe_every=0, lr=0.1)
    opt.step(make_closure(None, lambda _, __: loss_of(w, a), None))
    ref_w, ref_a = make()
    ReferenceXSAM(torch.optim.SGD([ref_w, ref_a], lr=0.1), rho=2.0, alpha=0.5, ascent_steps=k).step(
        lambda: loss_of(ref_w, ref_a))
    torch.testing.assert_close(w.detach(), ref_w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.detach(), ref_a.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(a.detach(), torch.tensor([1.0, -2.0]))  # d moved it along theta_k - theta_0


@pytest.mark.parametrize("calls_zero_grad", [False, True])
def test_a_standard_closure_gives_the_same_steps_and_warns_once(calls_zero_grad):
    """``def closure(): loss = ...; loss.backward(); return loss`` (no ``backward`` argument, maybe zeroing the
    gradients itself, as PyTorch's closure examples do): the probe runs it with gradients and throws them away, so
    the run equals the one with the forward-only closure, at the price of a backward per probe point."""
    batches = MLP.batches(4)

    def run(standard: bool):
        model = small_net()
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.3, alpha=0.5, probe_every=2, lr=0.1)
        alphas = []
        for batch in batches:
            if standard:
                def closure(batch=batch):
                    if calls_zero_grad:
                        opt.zero_grad()
                    loss = mlp_loss(model, batch)
                    loss.backward()
                    return loss
            else:
                closure = make_closure(model, mlp_loss, batch)
            opt.step(closure)
            alphas.append(opt.alpha)
        return model, alphas

    model, alphas = run(standard=False)
    with pytest.warns(UserWarning, match=r"takes no `backward` argument") as caught:
        standard_model, standard_alphas = run(standard=True)
    assert len([w for w in caught if "backward" in str(w.message)]) == 1  # two probes, one warning
    assert standard_alphas == alphas and len(set(alphas)) > 1
    for p, q in zip(model.parameters(), standard_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- the probe and the pieces API
@pytest.mark.parametrize("k", [1, 2])
def test_probe_picks_the_largest_loss(k):
    model, batch = small_net(), mlp_batch(torch.Generator().manual_seed(1))
    params = list(model.parameters())
    rho, rho_max = 0.5, 0.8
    opt = XSAM(params, torch.optim.SGD, rho=rho, rho_max=rho_max, ascent_steps=k, probe_every=3, lr=0.1)
    assert opt.probe_due and opt.probe_grid() == GRID

    theta_0 = flatten(params)
    mlp_loss(model, batch).backward()
    for _ in range(k):
        opt.ascent_step()
        opt.zero_grad()
        mlp_loss(model, batch).backward()
    g_k, theta_k = flat_grads(params), flatten(params)

    recorded, points = [], []

    def probe_fn():
        loss = mlp_loss(model, batch)
        recorded.append(loss.item())
        points.append(flatten(params))
        return loss

    info = opt.set_direction(probe_fn)
    assert torch.equal(flatten(params), theta_0)  # restored bitwise

    assert info.probe_losses == recorded and len(recorded) == len(GRID)
    best = argmax_first(recorded)
    assert opt.alpha == info.alpha == GRID[best]
    assert recorded[best] == max(recorded) > min(recorded)

    # every probe point and its loss, from the spec's formulas
    v0, v1, psi, degenerate = geometry(theta_k - theta_0, g_k)
    assert not degenerate
    assert info.psi.item() == pytest.approx(psi, abs=1e-5)
    check = copy.deepcopy(model)
    check_params = list(check.parameters())
    for alpha, point, loss in zip(GRID, points, recorded):
        expected = theta_0 + rho_max * slerp(v0, v1, psi, alpha)
        torch.testing.assert_close(point, expected, rtol=1e-5, atol=1e-6)
        write_params(check_params, expected)
        with torch.no_grad():
            assert loss == pytest.approx(mlp_loss(check, batch).item(), rel=1e-5, abs=1e-6)

    # .grad now holds d = ||g_k|| v(alpha*); the base step applies it at theta_0
    d = g_k.norm() * slerp(v0, v1, psi, opt.alpha)
    torch.testing.assert_close(flat_grads(params), d, rtol=1e-5, atol=1e-6)
    opt.step()
    torch.testing.assert_close(flatten(params), theta_0 - 0.1 * d, rtol=1e-5, atol=1e-6)
    assert opt.step_count == 1 and not opt.probe_due


def test_probe_ties_take_the_smaller_alpha_and_skip_non_finite_losses():
    def probe_with(values):
        w = nn.Parameter(torch.tensor([1.0, 2.0]))
        opt = XSAM([w], torch.optim.SGD, rho=0.1, alpha=0.5, probe_every=1, lr=0.1)
        (w * torch.tensor([1.0, -1.0])).pow(2).sum().backward()
        opt.ascent_step()
        w.grad = torch.tensor([0.5, 3.0])  # any g_k off the ascent direction: a proper plane
        losses = iter(values)
        info = opt.set_direction(lambda: torch.tensor(next(losses)))
        return opt.alpha, info.probe_losses

    assert probe_with([1.0] * 21)[0] == 0.0
    assert probe_with([0.0, 1.0, 3.0, 3.0] + [2.0] * 17)[0] == 0.2
    alpha, losses = probe_with([float("nan"), 1.0] + [0.5] * 18 + [float("inf")])
    assert alpha == 0.1 and math.isnan(losses[0])
    assert probe_with([float("nan")] * 21)[0] == 0.5  # nothing finite to choose from: alpha stays


@pytest.mark.parametrize("alpha, probe", [(1.0, False), (0.5, False), (0.5, True), (2.0, True)])
@pytest.mark.parametrize("foreach", [True, False])
def test_set_direction_restores_theta_0_bitwise(alpha, probe, foreach):
    model, batch = build_mlp(), mlp_batch(torch.Generator().manual_seed(2))
    model.eval()  # BatchNorm on running statistics, no dropout: every pass is a plain function of the weights
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=alpha, ascent_steps=3,
               probe_every=1 if probe else 0, foreach=foreach, lr=0.1)
    theta_0 = [p.detach().clone() for p in model.parameters()]
    mlp_loss(model, batch).backward()
    for _ in range(3):
        opt.ascent_step()
        assert not all(torch.equal(p, t) for p, t in zip(model.parameters(), theta_0))
        opt.zero_grad()
        mlp_loss(model, batch).backward()
    info = opt.set_direction((lambda: mlp_loss(model, batch)) if probe else None)
    for p, t in zip(model.parameters(), theta_0):
        assert torch.equal(p, t)
    assert (info.probe_losses is not None) == probe
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_foreach_matches_the_loop(base_name):
    batches = MLP.batches(12)
    kwargs = dict(rho=MLP.rho, alpha=0.5, ascent_steps=2, probe_every=4)
    base, base_kwargs = BASES[base_name], MLP.base_kwargs[base_name]
    fast, _, _, fast_alphas = train_xsam(MLP, batches, base, base_kwargs, foreach=True, **kwargs)
    loop, _, _, loop_alphas = train_xsam(MLP, batches, base, base_kwargs, foreach=False, **kwargs)
    assert fast_alphas == loop_alphas
    assert_states_equal(fast, loop)  # on CPU the foreach kernels run the same per-tensor arithmetic


# ---------------------------------------------------------------------- degenerate planes: v0 = +-v1, zero norms
def linear_problem(w0, loss_of_w, alpha=0.5, interval=1, foreach=True, rho=0.5):
    w = nn.Parameter(torch.tensor(w0))
    opt = XSAM([w], torch.optim.SGD, rho=rho, alpha=alpha, probe_every=interval, foreach=foreach, lr=0.1)
    counter = [0]

    def closure(backward=True):
        loss = loss_of_w(w)
        if backward:
            loss.backward()
        else:
            counter[0] += 1
        return loss

    return w, opt, closure, counter


def sgd_step(w0, grad, lr=0.1):
    p = nn.Parameter(torch.tensor(w0))
    p.grad = grad.clone()
    torch.optim.SGD([p], lr=lr).step()
    return p.detach()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("foreach", [True, False])
def test_parallel_gradients_fall_back_to_g_k(alpha, foreach):
    """A linear loss has g_k = g_0, so v0 = v1 exactly (these numbers are exact in float32): psi = 0."""
    c = torch.ones(4)
    w0 = [1.0, 2.0, 3.0, 4.0]
    w, opt, closure, counter = linear_problem(w0, lambda w: (w * c).sum(), alpha=alpha, foreach=foreach)
    opt.step(closure)
    assert torch.equal(w.detach(), sgd_step(w0, c))  # d = g_k = c
    assert opt.alpha == alpha and counter == [0]  # the probe found no plane: nothing evaluated, alpha kept

    ref_w = nn.Parameter(torch.tensor(w0))
    ref = ReferenceXSAM(torch.optim.SGD([ref_w], lr=0.1), rho=0.5, alpha=alpha, probe_every=1)
    ref.step(lambda: (ref_w * c).sum())
    assert torch.equal(w.detach(), ref_w.detach()) and ref.last_probe_losses is None


@pytest.mark.parametrize("foreach", [True, False])
def test_opposite_gradients_fall_back_to_g_k(foreach):
    """-|w.c| with the ascent crossing w.c = 0: g_1 = -g_0, so v1 = -v0 (psi = pi, sin(psi) ~ 0)."""
    c = torch.ones(4)
    w0 = [0.25] * 4  # w.c = 1; ascent of length 2 along -c/2 lands on w = -0.75, w.c = -3
    w, opt, closure, counter = linear_problem(w0, lambda w: -(w * c).sum().abs(), rho=2.0, foreach=foreach)
    opt.step(closure)
    assert torch.equal(w.detach(), sgd_step(w0, c))  # d = g_k = +c
    assert opt.alpha == 0.5 and counter == [0]


def test_handcrafted_opposite_gradient_through_the_pieces():
    # exact in float32: ||g_0|| = 2, the ascent adds 0.25 everywhere, g_k = -2 (theta_k - theta_0)
    w = nn.Parameter(torch.tensor([0.5, -1.5, 2.0, 1.0]))
    opt = XSAM([w], torch.optim.SGD, rho=0.5, alpha=0.5, probe_every=1, lr=0.1)
    w0 = w.detach().clone()
    w.grad = torch.ones(4)
    opt.ascent_step()
    w.grad = -2.0 * (w.detach() - w0)
    g_k = w.grad.clone()
    info = opt.set_direction(lambda: pytest.fail("a degenerate plane must not be probed"))
    assert torch.equal(w.detach(), w0) and torch.equal(w.grad, g_k)
    assert info.probe_losses is None and opt.alpha == 0.5
    assert math.sin(info.psi.item()) < SIN_PSI_MIN


def test_chord_rounding_above_two_is_clamped(monkeypatch):
    """g_k = -3 (theta_k - theta_0): v1 = -v0, so ||v0 - v1|| is 2 mathematically, and float32 rounding can put the
    computed value just above 2. The case is forced here, not hoped for: the norm of the chord is inflated by 1e-6,
    so ||v0 - v1|| / 2 exceeds 1 by construction. Unclamped, psi = 2 asin(||v0 - v1|| / 2) would be NaN and so would
    the whole direction."""
    from hf_xsam import geometry

    generator = torch.Generator().manual_seed(1)
    w = nn.Parameter(torch.randn(7, generator=generator))
    opt = XSAM([w], torch.optim.SGD, rho=0.3, alpha=0.5, probe_every=1, lr=0.1)
    w0 = w.detach().clone()
    w.grad = torch.randn(7, generator=generator)
    opt.ascent_step()
    e = w.detach() - w0
    w.grad = -3.0 * e
    g_k = w.grad.clone()
    true_norm = geometry.global_norm
    seen = []

    def inflated_norm(tensors, foreach, groups=()):  # set_direction's one call: the norm of ||g_k|| (v0 - v1)
        value = true_norm(tensors, foreach, groups) * (1 + 1e-6)
        seen.append(value)
        return value

    monkeypatch.setattr(geometry, "global_norm", inflated_norm)
    info = opt.set_direction(lambda: pytest.fail("a degenerate plane must not be probed"))
    assert len(seen) == 1 and (seen[0] / g_k.norm()).item() > 2.0  # the premise, forced
    assert info.psi.item() == pytest.approx(math.pi, abs=1e-6)
    assert torch.equal(w.grad, g_k) and torch.equal(w.detach(), w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_gradient_gives_finite_unchanged_weights(dtype):
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    w = nn.Parameter(w0.clone())
    opt = XSAM([w], torch.optim.SGD, rho=0.05, alpha=0.5, probe_every=1, lr=0.1, momentum=0.9)
    closure = make_closure(None, lambda _, __: (w.float() * 0).sum(), None)
    for _ in range(3):
        opt.step(closure)
    assert torch.isfinite(w).all() and torch.equal(w.detach(), w0)
    assert opt.alpha == 0.5


def test_bf16_mlp_trains():
    model = build_mlp(dtype=torch.bfloat16)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, ascent_steps=2, probe_every=2,
               lr=0.05, momentum=0.9)
    losses = [opt.step(make_closure(model, mlp_loss, batch)).item() for batch in MLP.batches(6)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(b.dtype == torch.bfloat16 for b in opt._theta_0.values())
    assert_changed(model, initial)


# ---------------------------------------------------------------------- memory
class PartlyTrained(nn.Module):
    """A frozen weight, a trained bias next to it, and a layer the forward never uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 8)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))


def tensors_held(opt: XSAM, skip=("base_optimizer", "state", "param_groups")) -> list[torch.Tensor]:
    """Every tensor reachable from the optimizer's own attributes, parameters (dict keys) excluded."""
    found = []

    def walk(obj, depth):
        if isinstance(obj, nn.Parameter):
            return
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif depth < 5 and isinstance(obj, dict):
            for value in obj.values():
                walk(value, depth + 1)
        elif depth < 5 and isinstance(obj, (list, tuple, set)):
            for value in obj:
                walk(value, depth + 1)

    for name, value in vars(opt).items():
        if name not in skip:
            walk(value, 0)
    return found


@pytest.mark.parametrize("foreach", [True, False])
def test_one_persistent_buffer_per_trained_parameter(foreach):
    model = PartlyTrained()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, ascent_steps=2, probe_every=2,
               foreach=foreach, lr=0.1, momentum=0.9)
    loss = lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"])  # noqa: E731
    for batch in MLP.batches(5):
        opt.step(make_closure(model, loss, batch))

    trained = [model.frozen.bias, model.head.weight, model.head.bias]
    assert set(map(id, opt._theta_0)) == set(map(id, trained))
    for p in trained:
        buffer = opt._theta_0[p]
        assert buffer.shape == p.shape and buffer.dtype == p.dtype and buffer.data_ptr() != p.data_ptr()
        assert not torch.equal(p, before[name_of(model, p)])
    held = tensors_held(opt)
    assert sorted(map(id, held)) == sorted(id(b) for b in opt._theta_0.values())  # nothing else, e.g. no e, v0, v1
    held_bytes = sum(t.numel() * t.element_size() for t in held)
    assert held_bytes == 4 * sum(p.numel() for p in trained)  # 4 bytes per trained float32 parameter

    # beyond theta_0, only what the base optimizer itself keeps: SGD's momentum, for the trained parameters only
    assert set(map(id, opt.state)) == set(map(id, trained))
    assert all(set(opt.state[p]) == {"momentum_buffer"} for p in trained)
    assert opt.state is opt.base_optimizer.state

    for name in ("frozen.weight", "unused.weight", "unused.bias"):
        p = model.get_parameter(name)
        assert torch.equal(p, before[name]) and p.grad is None and p not in opt._theta_0


def name_of(model, param):
    return next(name for name, p in model.named_parameters() if p is param)


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("base_name", ["sgd", "adamw"])
def test_state_dict_round_trip_equals_an_uninterrupted_run(base_name):
    base, base_kwargs = BASES[base_name], MLP.base_kwargs[base_name]
    kwargs = dict(rho=MLP.rho, alpha=0.5, ascent_steps=2, probe_every=3)
    n, m = 4, 5
    batches = MLP.batches(n + m)

    # uninterrupted
    counter = [0]
    probes = []
    model = MLP.build()
    opt = XSAM(None, base(model.parameters(), **base_kwargs), **kwargs)
    torch.manual_seed(1)
    alphas = []
    for batch in batches:
        before = counter[0]
        opt.step(make_closure(model, mlp_loss, batch, counter))
        probes.append(counter[0] - before)
        alphas.append(opt.alpha)
    assert probes == [21, 0, 0, 21, 0, 0, 21, 0, 0]  # steps 0, 3, 6

    # n steps, checkpoint through bytes
    first = MLP.build()
    opt_first = XSAM(None, base(first.parameters(), **base_kwargs), **kwargs)
    torch.manual_seed(1)
    for batch in batches[:n]:
        opt_first.step(make_closure(first, mlp_loss, batch))
    buffer = io.BytesIO()
    torch.save({"opt": opt_first.state_dict(), "model": first.state_dict(), "rng": torch.get_rng_state()}, buffer)
    saved_alpha = opt_first.alpha
    buffer.seek(0)
    checkpoint = torch.load(buffer)

    # a fresh process: other weights, the constructor's alpha, step 0, until the checkpoint is loaded
    resumed = build_mlp(seed=123)
    opt_resumed = XSAM(None, base(resumed.parameters(), **base_kwargs), **kwargs)
    resumed.load_state_dict(checkpoint["model"])
    opt_resumed.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    assert opt_resumed.step_count == n and opt_resumed.alpha == saved_alpha == alphas[n - 1]
    assert opt_resumed.param_groups is opt_resumed.base_optimizer.param_groups
    assert opt_resumed.state is opt_resumed.base_optimizer.state
    counter_resumed = [0]
    resumed_probes = []
    for batch in batches[n:]:
        before = counter_resumed[0]
        opt_resumed.step(make_closure(resumed, mlp_loss, batch, counter_resumed))
        resumed_probes.append(counter_resumed[0] - before)

    assert resumed_probes == probes[n:]
    assert opt_resumed.alpha == opt.alpha and opt_resumed.step_count == n + m
    assert_states_equal(resumed, model)
    for p, q in zip(resumed.parameters(), model.parameters()):
        for key, value in opt.state[q].items():
            assert torch.equal(opt_resumed.state[p][key], value), key


@pytest.mark.parametrize(
    "base_name, keys", [("sgd", {"momentum_buffer"}), ("adamw", {"step", "exp_avg", "exp_avg_sq"})]
)
def test_state_dict_carries_the_base_state_and_the_counters(base_name, keys):
    model = MLP.build()
    opt = XSAM(model.parameters(), BASES[base_name], rho=0.3, alpha=0.5, probe_every=2,
               **MLP.base_kwargs[base_name])
    for batch in MLP.batches(3):
        opt.step(make_closure(model, mlp_loss, batch))
    state = opt.state_dict()
    params = list(model.parameters())
    assert len(state["state"]) == len(params)
    for i, p in enumerate(params):
        assert set(state["state"][i]) == keys
        for key in keys:
            assert torch.equal(state["state"][i][key], opt.base_optimizer.state[p][key])
    group = state["param_groups"][0]
    assert group["xsam_step"] == 3 and group["xsam_alpha"] == opt.alpha and group["xsam_rho"] == 0.3
    assert group["lr"] == MLP.base_kwargs[base_name]["lr"]


def test_loading_a_plain_base_state_dict_keeps_xsam_settings():
    model = MLP.build()
    plain = torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.02, momentum=0.9)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.3, alpha=0.5, lr=0.1, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.02 and opt.rho == 0.3 and opt.alpha == 0.5 and opt.step_count == 0
    opt.step(make_closure(model, mlp_loss, MLP.batches(1)[0]))
    assert opt.step_count == 1


# ---------------------------------------------------------------------- param groups and schedulers
def test_add_param_group_joins_the_global_norm():
    torch.manual_seed(0)
    first, second = nn.Linear(8, 16), nn.Linear(16, 3)
    model = nn.Sequential(first, nn.Tanh(), second)
    ref_model = copy.deepcopy(model)
    opt = XSAM(first.parameters(), torch.optim.SGD, rho=0.5, alpha=0.5, ascent_steps=2, probe_every=2,
               lr=0.1)
    opt.add_param_group({"params": second.parameters(), "lr": 0.02})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    xsam_keys = {key for key in opt.param_groups[0] if key.startswith("xsam_")}
    assert len(xsam_keys) == 14
    assert all(opt.param_groups[1][key] == opt.param_groups[0][key] for key in xsam_keys)

    ref = ReferenceXSAM(torch.optim.SGD([{"params": ref_model[0].parameters()},
                                         {"params": ref_model[2].parameters(), "lr": 0.02}], lr=0.1),
                        rho=0.5, alpha=0.5, ascent_steps=2, probe_every=2)
    for batch in MLP.batches(6):
        opt.step(make_closure(model, mlp_loss, batch))
        ref.step(lambda batch=batch: mlp_loss(ref_model, batch))
    assert opt.alpha == ref.alpha
    assert_states_close(model, ref_model)
    assert len(opt._theta_0) == 4


def test_add_param_group_refuses_a_per_group_xsam_setting():
    opt = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match=r"xsam_rho.*0\.3"):
        opt.add_param_group({"params": nn.Linear(2, 2).parameters(), "xsam_rho": 0.3})
    assert len(opt.param_groups) == 1


def test_lr_scheduler_drives_the_base_optimizer():
    batches = MLP.batches(4)
    model = MLP.build()
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=1.0, probe_every=0, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    torch.manual_seed(1)
    for batch in batches:
        opt.step(make_closure(model, mlp_loss, batch))
        scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.1 * 0.5**4
    assert scheduler.get_last_lr() == [0.1 * 0.5**4]

    # the same run with SAM and the lr set by hand: the scheduler's lr reached the base's step
    sam_model = MLP.build()
    sam = ReferenceSAM(torch.optim.SGD(sam_model.parameters(), lr=0.1), rho=0.1)
    torch.manual_seed(1)
    for i, batch in enumerate(batches):
        sam.base.param_groups[0]["lr"] = 0.1 * 0.5**i
        sam.step(lambda batch=batch: mlp_loss(sam_model, batch), model=sam_model)
    assert_states_equal(model, sam_model)


# ---------------------------------------------------------------------- the probe grid
@pytest.mark.parametrize(
    "alpha_step, alpha_max, grid",
    [(0.1, 2.0, GRID), (0.25, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]), (0.3, 1.0, [0.0, 0.3, 0.6, 0.9]), (0.5, 0.0, [0.0])],
)
def test_probe_grid(alpha_step, alpha_max, grid):
    opt = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, alpha_step=alpha_step, alpha_max=alpha_max,
               probe_every=0, lr=0.1)
    assert opt.probe_grid() == grid == probe_grid(alpha_step, alpha_max)


def test_probe_schedule_and_rho_max_default():
    opt = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=0.15, probe_every=3, lr=0.1)
    assert opt.param_groups[0]["xsam_rho_max"] == 0.3
    due = []
    for _ in range(7):
        due.append(opt.probe_due)
        opt.step()
    assert due == [True, False, False, True, False, False, True]
    assert not XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, rho=0.1, probe_every=0, lr=0.1).probe_due
    default = XSAM(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    assert default.param_groups[0]["xsam_probe_every"] == 200 and default.probe_due  # the first step probes


# ---------------------------------------------------------------------- argument validation
def params():
    return nn.Linear(2, 2).parameters()


def sgd(**kwargs):
    return torch.optim.SGD(params(), lr=0.1, **kwargs)


def not_an_optimizer(params, lr):
    return None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rho=-0.1), r"rho=-0\.1 is invalid: must be a finite number >= 0"),
        (dict(rho=math.inf), r"rho=inf is invalid"),
        (dict(rho=math.nan), r"rho=nan is invalid"),
        (dict(rho=True), r"rho=True is invalid"),
        (dict(rho_max=-1.0), r"rho_max=-1\.0 is invalid: must be a finite number >= 0"),
        (dict(rho_max=math.inf), r"rho_max=inf is invalid"),
        (dict(rho_max=math.nan), r"rho_max=nan is invalid"),
        (dict(alpha=math.nan), r"alpha=nan is invalid: must be a finite number"),
        (dict(alpha_step=0.0), r"alpha_step=0\.0 is invalid: must be a finite number > 0"),
        (dict(alpha_step=-0.1), r"alpha_step=-0\.1 is invalid"),
        (dict(alpha_max=-0.5), r"alpha_max=-0\.5 is invalid: must be a finite number >= 0"),
        (dict(ascent_steps=0), r"ascent_steps=0 is invalid: must be an integer >= 1"),
        (dict(ascent_steps=1.5), r"ascent_steps=1\.5 is invalid: must be an integer >= 1"),
        (dict(ascent_steps=2.0), r"ascent_steps=2\.0 is invalid"),
        (dict(ascent_steps=True), r"ascent_steps=True is invalid"),
        (dict(probe_every=-1), r"probe_every=-1 is invalid: must be an integer >= 0"),
        (dict(probe_every=0.5), r"probe_every=0\.5 is invalid"),
        (dict(norm_eps=0.0), r"norm_eps=0\.0 is invalid: must be a finite number > 0"),
        (dict(norm_eps=-1e-12), r"norm_eps=-1e-12 is invalid"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XSAM(params(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: XSAM(params(), "sgd", lr=0.1), r"base_optimizer='sgd' is invalid: must be a torch\.optim\.Optimizer"),
        (lambda: XSAM(params(), not_an_optimizer, lr=0.1), r"base_optimizer=<function not_an_optimizer"),
        (lambda: XSAM(params(), nn.Linear, lr=0.1), r"base_optimizer=<class 'torch\.nn\.modules\.linear\.Linear'>"),
        (lambda: XSAM(None, XSAM(params(), torch.optim.SGD, lr=0.1)), r"base_optimizer=XSAM\(\.\.\.\) is invalid"),
        (lambda: XSAM(params(), XSAM, lr=0.1), r"base_optimizer=XSAM is invalid"),
        (lambda: XSAM(params(), sgd()), r"base_optimizer is an optimizer instance: pass params=None"),
        (lambda: XSAM(None, sgd(), lr=0.1), r"base_optimizer is an optimizer instance: .*no optimizer kwargs"),
        (lambda: XSAM(None, torch.optim.SGD, lr=0.1), r"params=None is invalid when base_optimizer is a class"),
        (lambda: XSAM([{"params": params(), "xsam_rho": 0.2}], torch.optim.SGD, lr=0.1), r"xsam_rho.*0\.2"),
        (lambda: XSAM(None, torch.optim.SGD([{"params": params(), "xsam_alpha": 0.7}], lr=0.1)), r"xsam_alpha.*0\.7"),
    ],
)
def test_invalid_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_eps_goes_to_the_base_optimizer_and_norm_eps_to_xsam():
    opt = XSAM(params(), torch.optim.AdamW, lr=0.1, eps=1e-6, norm_eps=1e-9)
    assert opt.base_optimizer.param_groups[0]["eps"] == 1e-6
    assert opt.param_groups[0]["xsam_norm_eps"] == 1e-9
