"""Custom training loops keep the guarantees with no extra argument: a plain DDP loop with `XSAM.step(closure)`
and Accelerate's loop shape with `accelerator.accumulate` and `xsam.backward` keep every rank's weights and alpha
identical; accumulation trains like one batch; an fp16 overflow in a replayed pass skips the step on every rank."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "custom_loop_worker.py")
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "accelerate_loop.py")


def launch(tmp_path, name: str, processes: int, *args: str) -> list[dict]:
    out = str(tmp_path / name)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    proc = subprocess.run([*prefix, WORKER, out, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.rank{r}") for r in range(processes)]


def assert_ranks_identical(ranks: list[dict]) -> None:
    first = ranks[0]
    for other in ranks[1:]:
        assert len(first["weights"]) == len(other["weights"])
        for a, b in zip(first["weights"], other["weights"]):
            assert torch.equal(a, b)
        assert first["alphas"] == other["alphas"]


def test_plain_ddp_loop_keeps_ranks_identical(tmp_path):
    ranks = launch(tmp_path, "ddp", 2, "ddp")
    assert_ranks_identical(ranks)
    assert len(ranks[0]["alphas"]) == 3  # steps 0, 2, 4 probed, each rank on its own data, one alpha for all
    assert not torch.equal(ranks[0]["weights"][0], ranks[0]["weights"][-1])


def test_accelerate_loop_with_accumulation_trains_like_one_batch(tmp_path):
    """2 processes x accumulation 2 x batch 2 (the theta_0 passes under Accelerate's no_sync, the rest on the
    last micro-batch) against 1 process x 1 batch of 8."""
    split = launch(tmp_path, "split", 2, "accelerate", "2", "2")
    whole = launch(tmp_path, "whole", 1, "accelerate", "1", "8")
    assert_ranks_identical(split)
    assert len(split[0]["weights"]) == len(whole[0]["weights"]) == 6
    for a, b in zip(split[0]["weights"], whole[0]["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert split[0]["alphas"] == whole[0]["alphas"] and len(whole[0]["alphas"]) == 3


def test_accelerate_fp16_overflow_in_a_replayed_pass_skips_the_step_everywhere(tmp_path):
    # step 0 (probed): 2 theta_0 + 2 ascent + 21 x 2 probe forwards = 46; step 1: theta_0 a, b = 47, 48, then the
    # replay of a at theta_k = 49, overflowing on rank 0 only
    ranks = launch(tmp_path, "fp16", 2, "accelerate", "2", "2", "49")
    assert_ranks_identical(ranks)
    rank0 = ranks[0]
    assert rank0["skipped"] == [False, True, False, False, False, False]
    assert torch.equal(rank0["weights"][1], rank0["weights"][0])  # theta_0 kept, bitwise
    assert rank0["scales"][:2] == [256.0, 128.0]
    assert rank0["steps"] == 5  # the skipped step is not an optimizer step
    assert all(torch.isfinite(w).all() for w in rank0["weights"])
    assert not torch.equal(rank0["weights"][1], rank0["weights"][-1])  # training went on


def test_accelerate_example_runs_under_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", EXAMPLE, "--cpu",
           "--tiny", "--train_examples", "64", "--eval_examples", "32", "--batch_size", "4",
           "--gradient_accumulation_steps", "2", "--probe_every", "2", "--output_dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    import json

    results = [json.loads((tmp_path / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["processes"] == 2
    assert results[0]["steps"] == 4  # 64 examples / (2 processes x 2 micro-batches x 4)
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
    assert results[0]["alphas"] == results[1]["alphas"] and len(results[0]["alphas"]) == 2
    assert proc.stdout.count("| processes |") == 1  # printed by the main process only
