"""What a step without a probe costs beyond SAM: a fixed number of dispatched operations whatever the number of
parameter tensors, no host sync, no parameter-sized temporary; and the angle psi it measures is accurate at small
angles, where an arccos of a float32 cosine is not. Counted with benchmarks/op_count.py, on CPU: the counts are
of dispatched operations, not of time, so they hold on any machine."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_xsam import XSAM

pytestmark = pytest.mark.usefixtures("seeded")

ROOT = Path(__file__).resolve().parent.parent


def load_op_count():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # for the harness it imports, as when run as a script
    spec = importlib.util.spec_from_file_location("op_count", ROOT / "benchmarks" / "op_count.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


op_count = load_op_count()


@pytest.fixture(scope="module")
def counts() -> dict[tuple[str, int], dict]:
    """(config, number of parameter tensors) -> the benchmark's row, for ~10 and ~130 tensors."""
    rows = [op_count.count(XSAM, config, layers) for layers in op_count.SIZES.values() for config in op_count.CONFIGS]
    return {(row["config"], row["tensors"]): row for row in rows}


def test_xsam_costs_a_fixed_number_of_operations_over_sam(counts):
    extra = {n: counts["xsam", n]["ops"] - counts["sam", n]["ops"] for n in (10, 130)}
    assert all(0 < ops <= 60 for ops in extra.values()), extra
    assert abs(extra[10] - extra[130]) <= 2, extra  # the geometry does not loop over the tensors
    # SAM itself is the base step plus one more forward and backward: it grows with the model, XSAM's extra does not
    assert counts["sam", 130]["ops"] - counts["sam", 10]["ops"] > 100 * abs(extra[10] - extra[130])


def test_no_host_sync_without_a_probe_and_two_with_one(counts):
    for n in (10, 130):
        assert [counts[config, n]["syncs"] for config in ("adamw", "sam", "xsam")] == [0, 0, 0]
        assert counts["xsam_probe", n]["syncs"] == 2  # the plane's geometry, then all the probe's losses at once


def test_reuse_costs_a_fixed_number_of_operations_and_no_host_sync(counts):
    """A step between sharpness steps carrying the correction is the plain step plus one norm and three
    multi-tensor operations (a handful of ops in all); a sharpness step that keeps it is XSAM's plus a fixed number;
    neither grows with the tensors or syncs."""
    between = {n: counts["reuse_between", n]["ops"] - counts["plain_between", n]["ops"] for n in (10, 130)}
    sharp = {n: counts["reuse_sharp", n]["ops"] - counts["xsam", n]["ops"] for n in (10, 130)}
    assert all(0 < ops <= 12 for ops in between.values()), between
    assert all(0 < ops <= 40 for ops in sharp.values()), sharp
    assert between[10] == between[130] and sharp[10] == sharp[130], (between, sharp)
    # the plain step in between is the base step (one pass fewer than SAM): reuse keeps it that way
    assert counts["plain_between", 130]["ops"] - counts["adamw", 130]["ops"] == between_overhead(counts, 130)
    for n in (10, 130):
        assert [counts[config, n]["syncs"] for config in ("plain_between", "reuse_between", "reuse_sharp")] == [0] * 3


def between_overhead(counts, n) -> int:
    """What XSAM's wrapping adds to a plain base step (the step counter): the same at either size."""
    return counts["plain_between", 10]["ops"] - counts["adamw", 10]["ops"]


class NewTensors(TorchDispatchMode):
    """Records the shape of every tensor an operation allocates (outputs that are not one of its inputs)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.shapes.append((func.overloadpacket.__name__, tuple(t.shape)))
        return out


@pytest.mark.parametrize(("alpha", "reuse"), [(0.5, False), (2.0, False), (0.5, True), (1.0, True), (2.0, True)])
@pytest.mark.parametrize("foreach", [True, False])
def test_a_step_without_a_probe_allocates_no_parameter_sized_temporary(alpha, foreach, reuse):
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(5)])  # 10 tensors, the smallest of 32 elements
    x = torch.randn(4, 32)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=alpha, probe_every=0, foreach=foreach, lr=0.1,
               sharpness_every=2 if reuse else 1, reuse=reuse)
    model(x).square().mean().backward()
    opt.ascent_step()
    opt.zero_grad()
    model(x).square().mean().backward()
    recorder = NewTensors()
    with recorder:
        info = opt.set_direction()
    assert info.psi is not None and recorder.shapes  # the geometry ran
    # a few scalars per tensor (the per-tensor norms, stacked), nothing the size of a parameter
    largest = max(math.prod(shape) for _, shape in recorder.shapes)
    assert largest <= 2 * 10 < min(p.numel() for p in model.parameters()), recorder.shapes
    if reuse:  # and the step in between, carrying the correction
        opt.step()
        opt.zero_grad()
        model(x).square().mean().backward()
        assert opt.correction_due
        recorder = NewTensors()
        with recorder:
            opt.apply_correction()
        assert max(math.prod(shape) for _, shape in recorder.shapes) <= 2 * 10, recorder.shapes


def plane_at_angle(psi: float, seed: int, foreach: bool):
    """XSAM after one ascent step from theta_0 = 0 (so theta_k - theta_0 is exact in float32), with g_k at angle
    ~psi from it, over three tensors. Returns the optimizer and psi between the float32 vectors, in float64."""
    generator = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(64, 32), (32,), (1000,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    opt = XSAM(params, torch.optim.SGD, rho=0.05, alpha=0.5, probe_every=0, foreach=foreach, lr=0.1)
    opt.ascent_step()
    e = torch.cat([p.detach().reshape(-1) for p in params]).double()
    v0 = e / e.norm()
    u = torch.randn(e.numel(), generator=generator, dtype=torch.float64)
    u = u - (u @ v0) * v0
    g_k = 3.0 * (math.cos(psi) * v0 + math.sin(psi) * u / u.norm())
    for p, g in zip(params, g_k.split([p.numel() for p in params])):
        p.grad = g.view_as(p).float()
    g32 = torch.cat([p.grad.reshape(-1) for p in params]).double()
    true_psi = 2 * torch.asin((v0 - g32 / g32.norm()).norm() / 2).item()  # float64: exact to ~1e-16 / psi
    return opt, true_psi


@pytest.mark.parametrize("psi, rtol", [(2e-4, 1e-3), (1e-3, 1e-4)])
@pytest.mark.parametrize("foreach", [True, False])
def test_psi_is_accurate_at_small_angles(psi, rtol, foreach):
    """psi = 2 asin(||v0 - v1|| / 2) keeps float32's resolution at small angles (measured: relative errors of
    4e-6 at 2e-4 rad and 7e-7 at 1e-3 rad); arccos<v0, v1> cannot: the float32 cosines nearest 1 are 1 and
    1 - 2^-24, whose arccos are 0 and 3.5e-4, so 2e-4 rad comes out at least 70% off, whatever the CPU."""
    cosines = torch.tensor([math.cos(2e-4)], dtype=torch.float32)
    assert abs(torch.acos(cosines).item() - 2e-4) > 0.7 * 2e-4  # the old form's floor, for comparison
    for seed in range(3):
        opt, true_psi = plane_at_angle(psi, seed, foreach)
        info = opt.set_direction()
        assert info.psi.dtype == torch.float32
        assert info.psi.item() == pytest.approx(true_psi, rel=rtol)
