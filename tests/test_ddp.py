"""XSAM under DDP with 2 real gloo processes (torchrun on CPU): ranks stay identical, alpha agrees, global mode
equals one process with the double batch, with and without gradient accumulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import like_one_batch, make_args, text_data, tiny_bert

from hf_xsam import XSAMTrainer

pytestmark = pytest.mark.slow

CONFIGS = {
    # global perturbation, SGD: must equal 1 process with batch 8
    "global_sgd": dict(optim="xsam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2,
                       xsam_probe_every=2, max_steps=4, per_device_train_batch_size=4,
                       lr_scheduler_type="constant"),
    # global, accumulation 2, average_tokens_across_devices off: still 1 process with batch 8
    "global_accum": dict(optim="xsam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2,
                         xsam_probe_every=1, max_steps=3, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, lr_scheduler_type="constant",
                         average_tokens_across_devices=False),
    # global, 2 processes x accumulation 2 x batch 2, tokens averaged across devices (the default): 1 x batch 8
    "global_accum_2x2": dict(optim="xsam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2,
                             xsam_probe_every=2, max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, lr_scheduler_type="constant"),
    "sam_accum_2x2": dict(optim="sam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2, max_steps=3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          lr_scheduler_type="constant"),
    "local_sam_accum": dict(optim="sam", xsam_perturbation="local", xsam_base_optim="sgd", learning_rate=0.5,
                            xsam_rho=0.2, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            lr_scheduler_type="constant"),
    # local perturbation, AdamW, dropout, accumulation: ranks identical, alpha agrees
    "local_adamw": dict(optim="xsam", xsam_perturbation="local", xsam_rho=0.2, xsam_probe_every=2,
                        max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, dropout=0.1),
    "global_adamw": dict(optim="xsam", xsam_rho=0.2, xsam_probe_every=2, max_steps=4,
                         per_device_train_batch_size=4, gradient_accumulation_steps=2, dropout=0.1),
    # the fast search reduces each of its stages across processes: still 1 process with batch 8
    "global_sgd_fast": dict(optim="xsam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2,
                            xsam_probe_every=1, xsam_probe_search="fast", max_steps=3,
                            per_device_train_batch_size=4, lr_scheduler_type="constant"),
    # reuse: the steps between sharpness steps carry the correction, with no all-reduce beyond the gradient's
    "reuse_accum_2x2": dict(optim="xsam", xsam_base_optim="sgd", learning_rate=0.5, xsam_rho=0.2,
                            xsam_probe_every=2, xsam_sharpness_every=2, xsam_reuse=True, max_steps=5,
                            per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            lr_scheduler_type="constant"),
    # every beyond-the-paper option at once, with dropout and accumulation: ranks identical, angle agrees
    "global_options": dict(optim="xsam", xsam_rho=0.2, xsam_probe_every=2, xsam_sharpness_every=2,
                           xsam_probe_search="fast", xsam_probe_space="angle", xsam_probe_batches=2, max_steps=5,
                           per_device_train_batch_size=4, gradient_accumulation_steps=2, dropout=0.1),
}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(__file__))
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           worker, str(out), json.dumps(CONFIGS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)] for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ranks_stay_bitwise_identical_and_agree_on_alpha(ddp_results, name):
    rank0, rank1 = ddp_results[name]
    assert rank0["world_size"] == rank1["world_size"] == 2
    for key in rank0["params"]:
        assert torch.equal(rank0["params"][key], rank1["params"][key]), key
    assert rank0["alpha"] == rank1["alpha"]
    assert [p["xsam/alpha"] for p in rank0["probes"]] == [p["xsam/alpha"] for p in rank1["probes"]]
    assert len(rank0["probes"]) >= (2 if CONFIGS[name]["optim"] == "xsam" else 0)


@pytest.mark.parametrize("name", ["global_sgd", "global_accum", "global_sgd_fast", "global_accum_2x2",
                                  "sam_accum_2x2", "reuse_accum_2x2"])
def test_global_mode_equals_one_process_with_the_whole_batch(ddp_results, tmp_path, name):
    """2 processes x M micro-batches of b train like 1 process with one batch of 2*M*b."""
    config = dict(CONFIGS[name])
    config["per_device_train_batch_size"] *= 2 * config.pop("gradient_accumulation_steps", 1)
    model = like_one_batch(tiny_bert(dropout=0.0))
    trainer = XSAMTrainer(model=model, train_dataset=text_data(n=64),
                          args=make_args(tmp_path, train_sampling_strategy="sequential", **config))
    trainer.train()
    rank0 = ddp_results[name][0]
    for key, p in model.named_parameters():
        torch.testing.assert_close(rank0["params"][key], p.detach(), rtol=1e-5, atol=1e-6, msg=key)
    assert rank0["alpha"] == trainer.xsam.alpha
    single_probes = [h for h in trainer.state.log_history if "xsam/probe_losses" in h]
    for ours, theirs in zip(rank0["probes"], single_probes):
        torch.testing.assert_close(torch.tensor(ours["xsam/probe_losses"]),
                                   torch.tensor(theirs["xsam/probe_losses"]), rtol=1e-5, atol=1e-6)


def test_options_probe_on_sharpness_steps_and_agree_on_the_angle(ddp_results):
    rank0, rank1 = ddp_results["global_options"]
    assert [p["step"] for p in rank0["probes"]] == [1, 3, 5]  # sharpness-aware steps 0, 2, 4 (logged 1-based)
    assert [p["xsam/angle"] for p in rank0["probes"]] == [p["xsam/angle"] for p in rank1["probes"]]
    assert all(len(p["xsam/probe_losses"]) <= 8 for p in rank0["probes"])


@pytest.mark.parametrize(("name", "per_step"), [("sam_accum_2x2", 2), ("local_sam_accum", 0)])
def test_gradient_all_reduces_per_step(ddp_results, name, per_step):
    """global: one all-reduce per pass set (theta_0, then theta_k; k = 1), not one per micro-batch and pass;
    local: none in the passes (the directions are averaged in one bucketed all-reduce of their own)."""
    rank0 = ddp_results[name][0]
    assert rank0["steps"] == 3
    assert rank0["gradient_all_reduces"] == per_step * rank0["steps"]


def test_reuse_adds_no_all_reduce(ddp_results):
    """Sharpness steps 0, 2, 4 reduce twice (theta_0, theta_1), the steps between once, as a plain step does."""
    rank0 = ddp_results["reuse_accum_2x2"][0]
    assert rank0["steps"] == 5
    assert rank0["gradient_all_reduces"] == 2 * 3 + 1 * 2


def test_local_mode_equals_m_sharpness_written_out(ddp_results):
    """local: each micro-batch of each process ascends along its own gradient; the step averages the 4 directions."""
    from helpers import hand_written_sam

    reference = tiny_bert(dropout=0.0)
    # Accelerate deals whole batches of 2 to the processes in turn, so the 4 micro-batches of a step are
    # consecutive pairs of the sequential order, and their directions' mean does not depend on who got which
    hand_written_sam(reference, text_data(n=64), rho=0.2, lr=0.5, batch_size=8, steps=3, max_grad_norm=1.0,
                     micro_batch=2)
    rank0 = ddp_results["local_sam_accum"][0]
    for key, p in reference.named_parameters():
        torch.testing.assert_close(rank0["params"][key], p.detach(), rtol=1e-5, atol=1e-6, msg=key)


def test_local_and_global_perturbations_differ(ddp_results):
    local, global_ = ddp_results["local_adamw"][0], ddp_results["global_adamw"][0]
    diff = max((local["params"][k] - global_["params"][k]).abs().max().item() for k in local["params"])
    assert diff > 1e-6
