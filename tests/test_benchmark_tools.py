"""The plotting commands documented in the README run on a real XSAMTrainer run's state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
