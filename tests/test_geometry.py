"""The plane's geometry and the probe's points, alone: pure functions on lists of tensors (geometry) and on numbers
(probe), each checked against a case worked out by hand, and the foreach path against the loop it mirrors."""

from __future__ import annotations

import math

import pytest
import torch

from hf_xsam import geometry
from hf_xsam.probe import ANGLE_MAX, alpha_at, probe_points

EPS = 1e-12


def plane_of(angle: float, length_e: float = 2.0, length_g: float = 3.0):
    """e and g_k as two tensors each (a parameter list), at ``angle`` radians from each other in the x-y plane."""
    e = [torch.tensor([length_e, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    g = [torch.tensor([length_g * math.cos(angle), length_g * math.sin(angle)], dtype=torch.float64),
         torch.zeros(3, dtype=torch.float64)]
    return e, g


@pytest.mark.parametrize("angle", [1e-3, 0.3, 1.2, 2.9])
@pytest.mark.parametrize("foreach", [True, False])
def test_plane_gives_the_norms_the_angle_and_the_chord(angle, foreach):
    e, g = plane_of(angle)
    out = [torch.empty_like(t) for t in e]
    norms, psi = geometry.plane(e, g, out, EPS, foreach)
    torch.testing.assert_close(norms, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert psi.item() == pytest.approx(angle, rel=1e-9)  # float64; near pi asin loses digits (documented)
    # w = ||g_k|| (v0 - v1)
    expected = torch.tensor([3.0 - 3.0 * math.cos(angle), -3.0 * math.sin(angle)], dtype=torch.float64)
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.7])
def test_slerp_coefficients_give_the_unit_vector_at_alpha_psi(alpha):
    psi = torch.tensor(0.8, dtype=torch.float64)
    norms = torch.tensor([2.0, 3.0], dtype=torch.float64)
    a0, a1 = geometry.slerp_coefficients(alpha, psi, norms, EPS).tolist()
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(0.8), math.sin(0.8)])
    v = a0 * v0 + a1 * v1
    torch.testing.assert_close(v, torch.tensor([math.cos(alpha * 0.8), math.sin(alpha * 0.8)]))
    rotated = geometry.rotation_coefficients(alpha * 0.8, psi, norms, EPS)
    torch.testing.assert_close(rotated, torch.tensor([a0, a1], dtype=torch.float64))


@pytest.mark.parametrize(("psi", "norms"), [(0.0, [2.0, 3.0]), (math.pi, [2.0, 3.0]), (0.5, [0.0, 3.0])])
def test_a_degenerate_plane_gives_v1(psi, norms):
    coefficients = geometry.slerp_coefficients(0.5, torch.tensor(psi, dtype=torch.float64),
                                               torch.tensor(norms, dtype=torch.float64), EPS)
    assert coefficients.tolist() == [0.0, 1.0]


def random_lists(seed: int, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5,), (2, 3), (4,)]
    return [[torch.randn(shape, generator=g) for shape in shapes] for _ in range(n)]


def test_every_step_of_the_geometry_foreach_equals_the_loop():
    results = {}
    for foreach in (True, False):
        params, theta_0, grads = random_lists(0)
        scale = torch.tensor(0.3)
        geometry.ascend(params, grads, scale, foreach)
        e = geometry.displacement(params, theta_0, in_place=False, foreach=foreach)
        out = [torch.empty_like(t) for t in e]
        norms, psi = geometry.plane(e, grads, out, EPS, foreach)
        geometry.set_point(params, theta_0, e, grads, 0.4, -0.2, foreach)
        a = geometry.slerp_coefficients(0.6, psi, norms, EPS)
        geometry.direction(out, grads, a, foreach)
        geometry.copy(params, theta_0, foreach)
        results[foreach] = [*params, *grads, *out, norms, psi]
    for x, y in zip(results[True], results[False]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_direction_is_a0_w_plus_a0_plus_a1_g():
    _, w, grads = random_lists(1)
    expected = [0.25 * wi + (0.25 + 0.5) * gi for wi, gi in zip(w, grads)]
    geometry.direction(w, grads, torch.tensor([0.25, 0.5]), foreach=True)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_norms_accumulate_in_float32_for_half_tensors():
    tensors = [torch.full((4,), 300.0, dtype=torch.float16)]  # 300^2 * 4 overflows float16's 65504
    assert geometry.global_norm(tensors, foreach=True).item() == pytest.approx(600.0)
    assert geometry.global_norm(tensors, foreach=True).dtype == torch.float32


def test_probe_points_in_both_spaces():
    alphas = probe_points("alpha", 0.5, 2.0)
    assert alphas == [0.0, 0.5, 1.0, 1.5, 2.0]
    angles = probe_points("angle", 0.5, 2.0)
    assert len(angles) == 5 and angles[0] == 0.0 and angles[-1] == ANGLE_MAX
    assert alpha_at("alpha", 1.5, psi=0.3) == 1.5
    assert alpha_at("angle", 0.6, psi=0.3) == pytest.approx(2.0)
    assert alpha_at("angle", 0.6, psi=0.0) == 1.0  # a degenerate plane: v1 whatever the angle
