"""XSAM on FSDP2-sharded parameters (fully_shard, 2 gloo processes, a plain loop with no extra argument): equal to
one unsharded process on the same global batch, ranks agree on alpha, theta_0 is sharded, and a run resumed from a
sharded checkpoint equals the uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from fsdp_reference import CONFIGS, STEPS, batch, closure_steps, make_model, make_optimizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = [*CONFIGS, "trainer_xsam", "trainer_sam"]
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in (0, 1)] for name in names}


def one_process(settings: dict) -> dict:
    model = make_model()
    opt = make_optimizer(model, settings)
    record = {"weights": [], "alphas": []}
    closure_steps(model, opt, batch, range(STEPS), record,
                  lambda m: torch.cat([p.detach().flatten() for p in m.parameters()]))
    record["theta_0_bytes"] = sum(t.numel() * t.element_size() for t in opt._theta_0.values())
    return record


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_equals_one_process_with_the_global_batch(fsdp_results, name):
    rank0, rank1 = fsdp_results[name]
    reference = one_process(CONFIGS[name])
    assert rank0["sharded"] and rank1["sharded"]
    assert rank0["alphas"] == rank1["alphas"] == reference["alphas"]
    if CONFIGS[name]["probe_every"]:
        assert len(reference["alphas"]) >= 3 and set(reference["alphas"]) != {CONFIGS[name].get("alpha", 1.0)}
    for ours, theirs, single in zip(rank0["weights"], rank1["weights"], reference["weights"]):
        assert torch.equal(ours, theirs)
        torch.testing.assert_close(ours, single, rtol=1e-5, atol=1e-6)
    assert not torch.equal(reference["weights"][0], reference["weights"][-1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_theta_0_is_sharded_like_the_parameters(fsdp_results, name):
    reference = one_process(CONFIGS[name])
    for rank in fsdp_results[name]:
        assert rank["theta_0_bytes"] * 2 == reference["theta_0_bytes"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(fsdp_results, name):
    for rank in fsdp_results[name]:
        assert rank["resumed_step_count"] == STEPS
        probes_after = len(rank["resumed_alphas"])  # the probes of steps 3-5
        assert rank["resumed_alphas"] == rank["alphas"][len(rank["alphas"]) - probes_after:]
        assert probes_after == {"xsam": 1, "xsam_fast": 3, "sam": 0, "xsam_reuse": 1, "sam_reuse": 0}[name]
        for resumed, uninterrupted in zip(rank["resumed_weights"], rank["weights"][STEPS // 2:]):
            assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("optim", ["xsam", "sam"])
def test_trainer_on_a_model_sharded_at_load_equals_one_process(fsdp_results, tmp_path, optim):
    """XSAMTrainer on a model Transformers sharded at load time (FSDP2, 2 processes x 2 micro-batches of 2) trains
    like one unsharded process with batches of 8: the replays reshard the root after probe forwards, and hold back
    the reduction with the Trainer's own FSDP2 switch."""
    from helpers import like_one_batch, make_args, text_data, tiny_bert

    from hf_xsam import XSAMTrainer

    rank0, rank1 = fsdp_results[f"trainer_{optim}"]
    trainer = XSAMTrainer(model=like_one_batch(tiny_bert(dropout=0.0)), train_dataset=text_data(n=64), args=make_args(
        tmp_path, optim=optim, xsam_rho=0.1, xsam_probe_every=2, xsam_base_optim="sgd", learning_rate=0.5,
        max_steps=3, train_sampling_strategy="sequential", per_device_train_batch_size=8))
    trainer.train()
    single = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert torch.equal(rank0["weights"], rank1["weights"])
    torch.testing.assert_close(rank0["weights"], single, rtol=1e-5, atol=1e-6)
    probes = [h for h in trainer.state.log_history if "xsam/probe_losses" in h]
    assert [p["xsam/alpha"] for p in rank0["probes"]] == [p["xsam/alpha"] for p in probes]
    assert len(probes) == (2 if optim == "xsam" else 0)
    for ours, theirs in zip(rank0["probes"], probes):
        torch.testing.assert_close(torch.tensor(ours["xsam/probe_losses"]), torch.tensor(theirs["xsam/probe_losses"]),
                                   rtol=1e-5, atol=1e-6)
