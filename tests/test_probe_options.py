"""Beyond the paper: the fast probe search, the angle probe space, sharpness steps every N steps (core), with
forward passes counted by a hook."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import GRID, counting, make_closure, mlp_batch, mlp_loss, small_net
from reference import flat_grads, flatten, geometry, slerp
from torch import nn

from hf_xsam import XSAM
from hf_xsam.probe import ANGLE_MAX, fast_search, grid_search

pytestmark = pytest.mark.usefixtures("seeded")



def searched(values: list[float], search=fast_search) -> tuple[dict[int, float], list[list[int]]]:
    """Run a search over a fixed list of losses; also return the index lists of its stages."""
    stages = []

    def evaluate(indices):
        stages.append(list(indices))
        return [values[i] for i in indices]

    return search(len(values), evaluate), stages


def best_of(found: dict[int, float]) -> int:
    return max(sorted(found), key=lambda i: (found[i], -i))


# ---------------------------------------------------------------------- the fast search on known curves
@pytest.mark.parametrize("peak", range(21))
def test_fast_search_finds_the_peak_of_a_parabola_in_8_points(peak):
    values = [-(i - peak) ** 2 for i in range(21)]
    found, stages = searched(values)
    assert best_of(found) == peak
    assert len(found) <= 8 and len(stages) <= 3
    assert sum(len(s) for s in stages) == len(found)  # no point is evaluated twice
    assert stages[0] == [0, 5, 10, 15, 20]


@pytest.mark.parametrize("peak", [x / 10 for x in range(0, 201, 7)])
def test_fast_search_lands_within_one_point_on_a_skewed_hump(peak):
    # a smooth, asymmetric single-peaked curve with its maximum between grid points
    values = [math.exp(-((i - peak) / 6) ** 2) + 0.02 * i for i in range(21)]
    grid_best = max(range(21), key=lambda i: (values[i], -i))
    found, _ = searched(values)
    assert abs(best_of(found) - grid_best) <= 1 and len(found) <= 8


def test_fast_search_on_a_rising_curve_ends_at_the_edge():
    found, stages = searched([0.1 * i for i in range(21)])
    assert best_of(found) == 20 and 19 in found and len(found) == 7  # 5 + one midpoint + the edge's neighbour
    found, _ = searched([-0.1 * i for i in range(21)])
    assert best_of(found) == 0 and 1 in found


def test_fast_search_skips_non_finite_losses():
    values = [-(i - 12) ** 2 for i in range(21)]
    values[10] = float("nan")
    found, _ = searched(values)
    assert best_of({i: v for i, v in found.items() if math.isfinite(v)}) == 12


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_fast_search_on_short_grids_evaluates_every_point_once(n):
    values = [math.sin(i) for i in range(n)]
    found, stages = searched(values)
    flat = [i for s in stages for i in s]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(n))
    if n <= 5:
        assert sorted(found) == list(range(n))


def test_grid_search_is_one_stage_over_every_point():
    found, stages = searched([float(i % 7) for i in range(21)], grid_search)
    assert stages == [list(range(21))] and best_of(found) == 6


# ---------------------------------------------------------------------- the fast search inside XSAM
def probe_once(search: str, space: str = "alpha", rho: float = 0.5, rho_max: float = 0.8):
    model, batch = small_net(), mlp_batch(torch.Generator().manual_seed(1))
    count = counting(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=rho, rho_max=rho_max, probe_every=1,
               probe_search=search, probe_space=space, lr=0.1)
    mlp_loss(model, batch).backward()
    opt.ascent_step()
    opt.zero_grad()
    mlp_loss(model, batch).backward()
    count[0] = 0
    info = opt.set_direction(lambda: mlp_loss(model, batch))
    return opt, info, count[0]


def test_fast_probe_runs_at_most_8_forwards_and_agrees_with_the_grid():
    grid_opt, grid_info, grid_forwards = probe_once("grid")
    fast_opt, fast_info, fast_forwards = probe_once("fast")
    assert grid_forwards == 21 and grid_info.probe_alphas == GRID
    assert fast_forwards == len(fast_info.probe_losses) <= 8
    # the same points give the same losses, bitwise: the fast search evaluates a subset of the grid
    by_alpha = dict(zip(grid_info.probe_alphas, grid_info.probe_losses))
    assert all(by_alpha[a] == loss for a, loss in zip(fast_info.probe_alphas, fast_info.probe_losses))
    assert abs(fast_opt.alpha - grid_opt.alpha) <= 0.1 + 1e-9


def test_step_with_fast_probe_counts_forwards():
    model, batch = small_net(), mlp_batch(torch.Generator().manual_seed(1))
    count, probes = counting(model), [0]
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.5, probe_every=2, probe_search="fast", lr=0.1)
    closure = make_closure(model, mlp_loss, batch, probes)
    for _ in range(4):
        opt.step(closure)
    assert 2 <= probes[0] <= 16  # two probes (steps 0 and 2), at most 8 forwards each
    assert count[0] == 4 * 2 + probes[0]


# ---------------------------------------------------------------------- the angle space
class Plane(nn.Module):
    """loss(w) = w_x + w_x w_y + 5 w_y^2 on w in R^2, from w = 0: the ascent goes along x (v0 = e_x), the
    gradient there is rotated by only psi = atan(0.1) ~ 0.1 rad, but on the circle of radius 0.2 the loss
    peaks about 1 rad from v0, far past the alpha grid's last point (2 psi ~ 0.2 rad)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self):
        x, y = self.w
        return x + x * y + 5 * y**2


def probe_plane(space: str):
    model = Plane()
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_max=0.2, probe_every=1,
               probe_space=space, lr=0.0)
    model().backward()
    opt.ascent_step()
    opt.zero_grad()
    model().backward()
    info = opt.set_direction(lambda: model())
    return opt, info


def test_angle_space_finds_the_maximum_past_the_alpha_grid():
    alpha_opt, alpha_info = probe_plane("alpha")
    angle_opt, angle_info = probe_plane("angle")
    psi = math.atan(0.1)
    assert alpha_opt.alpha == 2.0 and alpha_opt.angle is None  # clipped at the grid's edge
    assert angle_info.psi.item() == pytest.approx(psi, rel=1e-7)  # psi from the chord: accurate at any angle
    # 21 angles over [0, pi/2]; on the circle the loss is 0.2 cos + 0.02 sin 2phi + 0.2 sin^2 phi
    angles = [ANGLE_MAX * i / 20 for i in range(21)]
    on_circle = [0.2 * math.cos(a) + 0.02 * math.sin(2 * a) + 0.2 * math.sin(a) ** 2 for a in angles]
    best = max(range(21), key=lambda i: on_circle[i])
    assert 0.7 < angles[best] < 1.2  # far past the alpha grid's reach of 2 psi ~ 0.2 rad
    assert angle_opt.angle == pytest.approx(angles[best]) and angle_opt.alpha == pytest.approx(angles[best] / psi)
    assert angle_info.probe_alphas == pytest.approx([a / psi for a in angles])
    assert angle_info.probe_losses == pytest.approx(on_circle, rel=1e-6)  # probe losses are kept in float32
    assert max(angle_info.probe_losses) > max(alpha_info.probe_losses) * 1.25


def test_angle_space_holds_the_angle_not_alpha():
    model, batches = small_net(), [mlp_batch(torch.Generator().manual_seed(s)) for s in range(3)]
    params = list(model.parameters())
    opt = XSAM(params, torch.optim.SGD, rho=0.5, probe_every=10, probe_space="angle", lr=0.1)
    assert opt.angle is None
    for step, batch in enumerate(batches):
        mlp_loss(model, batch).backward()
        theta_0 = flatten(params)
        opt.ascent_step()
        opt.zero_grad()
        mlp_loss(model, batch).backward()
        g_k, theta_k = flat_grads(params), flatten(params)
        info = opt.set_direction((lambda b=batch: mlp_loss(model, b)) if opt.probe_due else None)
        held = opt.angle
        assert held is not None and 0.0 <= held <= ANGLE_MAX
        v0, v1, psi, degenerate = geometry(theta_k - theta_0, g_k)
        assert not degenerate and info.psi.item() == pytest.approx(psi, abs=1e-6)
        # the direction sits at the held angle from v0, in this step's plane: alpha = angle / psi of this step
        expected = g_k.norm() * slerp(v0, v1, psi, held / psi)
        torch.testing.assert_close(flat_grads(params), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(flatten(params), theta_0)
        opt.step()
        if step == 0:
            chosen = held
    assert opt.angle == chosen  # one probe (step 0) in three steps


def test_angle_survives_state_dict():
    opt, _ = probe_plane("angle")
    state = copy.deepcopy(opt.state_dict())
    fresh = XSAM(Plane().parameters(), torch.optim.SGD, rho=0.1, rho_max=0.2, probe_every=1,
                 probe_space="angle", lr=0.0)
    fresh.load_state_dict(state)
    assert fresh.angle == opt.angle and fresh.alpha == opt.alpha


# ---------------------------------------------------------------------- sharpness-aware steps every N steps
def test_interval_alternates_sam_and_plain_steps_bitwise():
    batches = [mlp_batch(torch.Generator().manual_seed(s)) for s in range(6)]
    model = small_net()
    ref = copy.deepcopy(model)
    count = counting(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.3, sharpness_every=3, probe_every=0, lr=0.1)
    # the reference: SAM on steps 0 and 3, a plain SGD step otherwise (SGD without momentum keeps no state)
    ref_sam = XSAM(ref.parameters(), torch.optim.SGD, rho=0.3, probe_every=0, lr=0.1)
    ref_sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step, batch in enumerate(batches):
        assert opt.sharpness_due == (step % 3 == 0)
        opt.step(make_closure(model, mlp_loss, batch))
        if step % 3 == 0:
            ref_sam.step(make_closure(ref, mlp_loss, batch))
        else:
            ref_sgd.zero_grad()
            mlp_loss(ref, batch).backward()
            ref_sgd.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q), step
    assert count[0] == 2 * 2 + 4 * 1  # two passes on the 2 sharpness steps, one on the 4 plain ones


@pytest.mark.parametrize(("interval", "every", "probed"), [
    (1, 4, [0, 4, 8, 12]),
    (3, 4, [0, 6, 9, 12]),  # the first sharpness-aware step at or after 0, 4, 8, 12
    (2, 4, [0, 4, 8, 12]),
    (5, 2, [0, 5, 10]),  # probes more often than sharpness steps: every sharpness step probes
])
def test_probes_fall_on_sharpness_steps(interval, every, probed):
    model, batch = small_net(), mlp_batch(torch.Generator().manual_seed(1))
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.3, sharpness_every=interval, probe_every=every, lr=0.1)
    seen = []
    for step in range(13):
        if opt.probe_due:
            seen.append(step)
        opt.step(make_closure(model, mlp_loss, batch))
    assert seen == probed


@pytest.mark.parametrize(("name", "value", "message"), [
    ("sharpness_every", 0, r"sharpness_every=0 is invalid: must be an integer >= 1"),
    ("sharpness_every", 1.5, r"sharpness_every=1.5 is invalid: must be an integer >= 1"),
    ("probe_search", "golden", r"probe_search='golden' is invalid: must be one of grid, fast"),
    ("probe_space", "sphere", r"probe_space='sphere' is invalid: must be one of alpha, angle"),
])
def test_bad_options_raise_value_error(name, value, message):
    with pytest.raises(ValueError, match=message):
        XSAM(small_net().parameters(), torch.optim.SGD, lr=0.1, **{name: value})


# ---------------------------------------------------------------------- the same options through XSAMTrainer
def counted_training(tmp_path, **overrides):
    from helpers import params_of, tiny_bert, train

    model = tiny_bert()
    count = counting(model)
    before = params_of(model)
    trainer = train(model, tmp_path, **overrides)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    probes = [h for h in trainer.state.log_history if "xsam/probe_losses" in h]
    return trainer, count[0], probes


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_interval_runs_one_pass_on_plain_steps(tmp_path, accumulation):
    trainer, forwards, probes = counted_training(tmp_path, optim="sam", xsam_sharpness_every=2, max_steps=4,
                                                 gradient_accumulation_steps=accumulation)
    assert forwards == accumulation * (2 + 1 + 2 + 1) and probes == []
    psi_logged = [h for h in trainer.state.log_history if "xsam/ascent_loss" in h]
    assert [h["step"] for h in psi_logged] == [1, 3]  # only sharpness-aware steps have an ascent point


def test_trainer_fast_probe_counts_forwards(tmp_path):
    _, forwards, probes = counted_training(tmp_path, optim="xsam", xsam_probe_search="fast",
                                           xsam_probe_every=2, max_steps=4)
    assert [h["step"] for h in probes] == [1, 3]
    sizes = [len(h["xsam/probe_losses"]) for h in probes]
    assert all(5 <= n <= 8 for n in sizes) and forwards == 4 * 2 + sum(sizes)
    assert all(set(h["xsam/probe_alphas"]) <= set(GRID) for h in probes)


def test_trainer_probe_averages_over_recent_micro_batches(tmp_path):
    _, forwards, probes = counted_training(tmp_path / "three", optim="xsam", xsam_probe_batches=3,
                                           xsam_probe_every=2, max_steps=5)
    # probes on steps 0, 2, 4: the first has no earlier batch, the others average this one and the 2 before
    assert forwards == 5 * 2 + 21 * (1 + 3 + 3)
    _, _, single = counted_training(tmp_path / "one", optim="xsam", xsam_probe_every=2, max_steps=5)
    assert probes[0]["xsam/probe_losses"] == single[0]["xsam/probe_losses"]  # one batch: the same probe
    assert probes[1]["xsam/probe_losses"] != single[1]["xsam/probe_losses"]


def test_trainer_angle_space_logs_the_angle(tmp_path):
    trainer, forwards, probes = counted_training(tmp_path, optim="xsam", xsam_probe_space="angle",
                                                 xsam_probe_every=3, max_steps=4)
    assert forwards == 4 * 2 + 2 * 21 and len(probes) == 2
    for probe in probes:
        assert 0.0 <= probe["xsam/angle"] <= ANGLE_MAX and len(probe["xsam/probe_alphas"]) == 21
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["xsam/angle"] == trainer.xsam.angle for h in logged[-1:])
    assert trainer.xsam.angle == probes[-1]["xsam/angle"]
