"""Compiled training: XSAM and SAM on a `torch.compile`d model, in a plain loop (`XSAM.step(closure)`,
`XSAM.backward`) and through the Trainer's ``--torch_compile``.

Every pass of a step sees the theta_0 pass's dropout masks, BatchNorm statistics move at theta_0 only, nothing
recompiles after warm-up (dynamo's own counters), a compiled run equals the eager one, and nothing stays installed
between passes. CPU inductor (gcc) compiles these tiny models in seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import make_args, params_of, text_data, tiny_bert
from torch import nn
from torch._dynamo.utils import counters
from transformers import Trainer, TrainerCallback

from hf_xsam import XSAM, XSAMTrainer
from hf_xsam.replay import RNGState

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def eager_random():
    """Compiled dropout draws the eager masks (inductor's own generator differs from eager's), so that a compiled
    run can be compared with an eager one of the same configuration."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        yield


def graphs() -> tuple[int, int]:
    """(frames dynamo compiled, graphs it captured) so far: both grow on every compilation and recompilation."""
    return counters["frames"]["total"], counters["stats"]["unique_graphs"]


def mlp(seed: int = 0, dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).train()


def mlp_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def loop(model, compiled: bool, steps: int = 6, micro_batches: int = 1, on_step=None, **settings):
    """XSAM with SGD over ``steps`` steps of ``micro_batches`` micro-batches each (`step(closure)` for one,
    `backward` otherwise). Returns the optimizer and the probes' alphas."""
    run = torch.compile(model) if compiled else model
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
               **{"rho": 0.5, "alpha": 0.5, "probe_every": 2, **settings})
    alphas = []
    batches = mlp_batches(steps * micro_batches)
    for step in range(steps):
        for i in range(micro_batches):
            def closure(backward=True, x=batches[step * micro_batches + i][0], y=batches[step * micro_batches + i][1]):
                loss = nn.functional.cross_entropy(run(x), y) / micro_batches
                if backward:
                    loss.backward()
                return loss

            if micro_batches == 1:
                opt.step(closure)
            else:
                opt.backward(closure, last=i == micro_batches - 1)
        if micro_batches > 1:
            opt.step()
            opt.zero_grad()
        info = opt.last_step_info.direction
        if info is not None and info.probe_losses is not None:
            alphas.append((info.alpha, info.probe_losses))
        if on_step is not None:
            on_step(step)
    return opt, alphas


# ---------------------------------------------------------------------- a plain loop on torch.compile(model)
@pytest.mark.parametrize(("micro_batches", "settings"), [(1, {}), (2, {}), (2, dict(sharpness_every=2, reuse=True))],
                         ids=["one", "two", "two_reuse"])
def test_batchnorm_statistics_move_at_theta_0_only_and_nothing_recompiles(micro_batches, settings):
    model = mlp()
    seen = {}
    _, alphas = loop(model, compiled=True, steps=8, micro_batches=micro_batches,
                     on_step=lambda step: seen.__setitem__(step, graphs()), **settings)
    bn = model[1]
    assert bn.num_batches_tracked.item() == 8 * micro_batches  # one update per theta_0 pass, none per replay
    # warm-up compiles the training graph and the probe's forward-only graph in the first step; then nothing
    assert seen[0] == seen[7] and seen[0][1] <= 3, seen
    assert len(alphas) == 4  # steps 0, 2, 4, 6 probed, on the compiled graphs
    assert not nn.modules.module._has_any_global_hook()  # nothing stays installed between passes


def test_a_compiled_loop_equals_the_eager_loop(eager_random):
    """With inductor drawing eager's dropout masks, a compiled run is the eager run up to the rounding of fused
    kernels: inductor reorders float32 sums (matmuls, BatchNorm's batch statistics), ~1e-7 relative per operation,
    which 8 steps of SGD with momentum grow to ~1e-5 at most here; rtol 1e-4 leaves a margin of ten. The probes
    pick the same alphas: the premise, forced below, is that the best probe loss leads the runner-up by far more
    than the two runs' losses differ."""
    eager_model = mlp()  # seeds the generator: both runs draw the same masks from here
    _, eager_alphas = loop(eager_model, compiled=False, steps=8)
    compiled_model = mlp()
    _, compiled_alphas = loop(compiled_model, compiled=True, steps=8)
    for (name, p), q in zip(eager_model.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-4, atol=1e-6, msg=name)
    assert len(eager_alphas) == len(compiled_alphas) == 4
    assert_same_choices(eager_alphas, compiled_alphas)


def assert_same_choices(eager: list[tuple[float, list[float]]], compiled: list[tuple[float, list[float]]]) -> None:
    """The same alpha at every probe, where the best loss leads the runner-up by more than ten times the largest
    difference between the two runs' probe losses (checked: that is the premise, not hoped for)."""
    assert len(eager) == len(compiled)
    for (alpha_e, losses_e), (alpha_c, losses_c) in zip(eager, compiled):
        runner_up, best = sorted(losses_e)[-2:]
        difference = max(abs(a - b) for a, b in zip(losses_e, losses_c))
        assert best - runner_up > 10 * difference, (losses_e, losses_c)
        assert alpha_e == alpha_c


def test_compiled_replays_see_the_theta_0_dropout_masks():
    """loss = <dropout(x) @ w>: the gradient is the masked input whatever w is, so g_k equals g_0 (psi = 0 up to
    the rounding of theta_k - theta_0) exactly when the ascent pass drew the theta_0 pass's mask; with a fresh mask
    (half the units dropped) psi would be near 1 rad. Inductor's own generator, not eager's."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64))
    dropout = torch.compile(nn.Dropout(0.5))
    opt = XSAM([w], torch.optim.SGD, rho=0.5, alpha=0.5, probe_every=0, lr=0.1)
    x = torch.randn(8, 64)
    for _ in range(3):
        opt.step(lambda backward=True: _linear_loss(dropout, x, w, backward))
        assert opt.last_step_info.direction.psi.item() < 1e-3


def _linear_loss(dropout, x, w, backward):
    loss = (dropout(x) @ w).sum()
    if backward:
        loss.backward()
    return loss


def test_the_probes_forward_only_graph_draws_the_training_graphs_masks():
    """The probe runs the compiled model without autograd, a graph of its own: from the same generator state it
    must draw the masks the training graph drew, or the probe would measure dropout noise."""
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 1)).train())
    x = torch.randn(8, 16)
    for _ in range(3):
        rng = RNGState.capture()
        trained = model(x)
        rng.restore()
        with torch.no_grad():
            assert torch.equal(model(x), trained.detach())


# ---------------------------------------------------------------------- the Trainer's --torch_compile
class Graphs(TrainerCallback):
    """Dynamo's counts after each optimizer step."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(graphs())


def compiled_run(tmp_path, trainer_cls=XSAMTrainer, dropout=0.1, backend="inductor", **overrides):
    """``backend="aot_eager"`` runs dynamo and AOT autograd without inductor's code generation: the same graphs,
    guards and recompilations, in seconds rather than a minute of C++ compilation on 2 cores."""
    torch._dynamo.reset()
    record = Graphs()
    settings = dict(torch_compile=True, torch_compile_backend=backend, max_steps=6, gradient_accumulation_steps=2,
                    **overrides)
    trainer = trainer_cls(model=tiny_bert(dropout=dropout), args=make_args(tmp_path, **settings),
                          train_dataset=text_data(n=48), callbacks=[record])
    trainer.train()
    return trainer, record.after_step


def test_torch_compile_with_rho_zero_is_the_compiled_trainer(tmp_path):
    plain, _ = compiled_run(tmp_path / "plain", trainer_cls=Trainer, backend="aot_eager")  # the default optimizer
    ours, _ = compiled_run(tmp_path / "ours", optim="xsam", xsam_rho=0.0, backend="aot_eager")
    a, b = params_of(plain.model), params_of(ours.model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [h.get("loss") for h in plain.state.log_history] == [h.get("loss") for h in ours.state.log_history]


@pytest.mark.parametrize(("optim", "backend", "reuse"), [("xsam", "inductor", False), ("sam", "aot_eager", False),
                                                    ("xsam", "aot_eager", True)])
def test_torch_compile_trains_like_eager_without_recompiling(tmp_path, optim, backend, reuse, eager_random):
    """XSAMTrainer with --torch_compile, dropout and accumulation: after the first step (warm-up: the training and
    the probe's graphs) no step compiles anything; and the run equals the eager one (tolerance as for the loop).
    With reuse the steps between sharpness steps run the training graph alone."""
    settings = dict(optim=optim, xsam_rho=0.1, xsam_probe_every=2)
    if reuse:
        settings.update(xsam_sharpness_every=2, xsam_reuse=True)
    compiled, after_step = compiled_run(tmp_path / "compiled", backend=backend, **settings)
    assert len(after_step) == 6 and after_step[0] == after_step[-1], after_step
    eager = XSAMTrainer(model=tiny_bert(dropout=0.1), train_dataset=text_data(n=48),
                        args=make_args(tmp_path / "eager", max_steps=6, gradient_accumulation_steps=2, **settings))
    eager.train()
    for name, p in params_of(eager.model).items():
        torch.testing.assert_close(params_of(compiled.model)[name], p, rtol=1e-4, atol=1e-6, msg=name)
    probes = [[(h["xsam/alpha"], h["xsam/probe_losses"]) for h in t.state.log_history if "xsam/probe_losses" in h]
              for t in (eager, compiled)]
    assert len(probes[0]) == (3 if optim == "xsam" else 0)
    assert_same_choices(*probes)
    initial = params_of(tiny_bert(dropout=0.1))
    assert any(not torch.equal(initial[n], p) for n, p in params_of(compiled.model).items())


def test_cuda_graph_modes_are_refused_at_train(tmp_path):
    trainer = XSAMTrainer(model=tiny_bert(), train_dataset=text_data(),
                          args=make_args(tmp_path, optim="xsam", torch_compile_mode="reduce-overhead"))
    with pytest.raises(ValueError, match=r"torch_compile_mode='reduce-overhead' cannot be combined with "
                                         r"optim='xsam': its CUDA graphs"):
        trainer.train()
