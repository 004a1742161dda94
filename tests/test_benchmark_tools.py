"""The benchmark tools: the plotting commands documented in the README (on a real XSAMTrainer run's state) and
the shared harness of benchmarks/ (interleaved timing, tables)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_bert, train

ROOT = Path(__file__).resolve().parent.parent


def test_plot_training_draws_alpha_psi_and_losses(tmp_path):
    trainer = train(tiny_bert(), tmp_path, optim="xsam", xsam_rho=0.3, xsam_probe_every=2, max_steps=4)
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    out = tmp_path / "training.png"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_training.py"),
                             str(tmp_path / "trainer_state.json"), "--out", str(out)],
                            capture_output=True, text=True, check=True)
    assert "(2 probes)" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_training_refuses_a_run_without_xsam(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text('{"log_history": [{"loss": 1.0, "step": 1}]}')
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plot_training.py"), str(state)],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "has no xsam/* entries" in result.stderr


def _harness():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness

    return harness


def test_interleave_times_the_configurations_round_robin_and_returns_one_median_each():
    harness = _harness()
    calls = []
    fns = {"b": lambda: calls.append("b"), "a": lambda: calls.append("a"), ("c", 2): lambda: calls.append("c")}
    measured = harness.interleave(fns, rounds=3, number={"b": 1, "a": 4, ("c", 2): 2})
    assert list(measured) == ["b", "a", ("c", 2)]  # the order of fns
    runs = [(key, len(list(group))) for key, group in itertools.groupby(calls)]
    assert [key for key, _ in runs] == ["b", "a", "c"] * 3  # each round times every configuration once, in order
    warmup = {n - {"b": 1, "a": 4, "c": 2}[key] for key, n in runs}
    assert len(warmup) == 1 and warmup.pop() >= 0  # every block: the Timer's fixed warm-up, then `number` calls
    for m in measured.values():
        assert len(m.times) == 3  # one mean per round
        assert isinstance(m.median, float) and min(m.times) <= m.median <= max(m.times)


def test_interleave_refuses_zero_rounds():
    harness = _harness()
    with pytest.raises(ValueError, match="rounds=0 is invalid"):
        harness.interleave({"a": lambda: None}, rounds=0)


def test_fixed_table_aligns_formats_and_leaves_short_rows_unpadded():
    harness = _harness()
    columns = [("config", 8, ""), ("s/step", 8, ".3f"), ("vs sam", 7, "+.2f")]
    text = harness.fixed_table(columns, [("adamw", 0.5, -0.5), ("sam", 1.25, 0.0), ("xsam", 2)])
    assert text == ("config    s/step vs sam\n"
                    "adamw      0.500  -0.50\n"
                    "sam        1.250  +0.00\n"
                    "xsam       2.000")
    assert harness.fixed_table([("a", 3, ""), ("b", 4, "d")], [("x", 7)], sep=" ") == "a      b\nx      7"


def test_markdown_table():
    harness = _harness()
    assert harness.markdown_table(["rho", "test"], [["0.05", "0.9500"], ["0.5", "0.4400"]]) == (
        "| rho | test |\n|---|---|\n| 0.05 | 0.9500 |\n| 0.5 | 0.4400 |")


def _cost_args(**overrides):
    import argparse

    harness = _harness()  # also puts benchmarks/ on the path, for cost
    parser = argparse.ArgumentParser()
    harness.add_model_flags(parser, rounds=1, steps=1)
    args = parser.parse_args([f"--{k}={v}" for k, v in overrides.items()])
    args.base_optim, args.probe_every = None, 200
    return args


@pytest.mark.parametrize("name, alpha, geometry", [("xsam", 1.5, True), ("xsam_sam_path", 1.0, False)])
def test_cost_times_xsam_between_probes_with_the_plane_geometry(name, alpha, geometry):
    """The timed copy of XSAM never probes and holds --alpha, so its steps take the plane geometry (psi is
    measured); the row xsam_sam_path holds alpha = 1, SAM's path, which skips it."""
    args = _cost_args()
    import cost
    import torch

    trainer = cost.make_trainer(name, tiny_bert(), args, between_probes=True)
    batch = {"input_ids": torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(0)),
             "labels": torch.tensor([0, 1, 2, 0])}
    for _ in range(2):
        cost.one_step(trainer, batch)
    assert trainer.optimizer.alpha == alpha
    assert len(trainer._xsam_logs["psi"]) == (2 if geometry else 0)
    assert trainer._xsam_logs["probe_loss_max"] == []  # no probe


def test_cost_refuses_an_alpha_that_is_not_finite():
    harness = _harness()
    with pytest.raises(ValueError, match=r"--alpha=nan is invalid: must be a finite number"):
        harness.check_model_flags(_cost_args(alpha="nan"))
