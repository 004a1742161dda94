"""XSAM on FSDP2-sharded parameters in a plain loop, run by tests/test_fsdp.py under torchrun (2 gloo processes):

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR

Each rank trains on its half of every global batch of 8 with `XSAM.step(closure)` and no extra argument. Saved per
rank and configuration: the full weights after every step, the alphas, theta_0's bytes on this rank; and a run
resumed from a sharded (torch.distributed.checkpoint) checkpoint taken halfway.

Then XSAMTrainer on a tiny BERT that Transformers shards at load time (`from_pretrained(distributed_config=
DistributedConfig(fsdp_size=2))`), 2 processes x 2 micro-batches of 2: its full weights and probes.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from fsdp_reference import CONFIGS, STEPS, batch, closure_steps, make_model, make_optimizer  # noqa: E402


def sharded_model() -> nn.Module:
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def train(model, opt, steps, rank, world, record) -> None:
    def half(step):  # this rank's half of the global batch
        x, y = batch(step)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        return x[rows], y[rows]

    closure_steps(model, opt, half, steps, record,
                  lambda m: torch.cat([p.full_tensor().flatten() for p in m.parameters()]))


def main() -> None:
    dist.init_process_group("gloo")
    rank, world, out = dist.get_rank(), dist.get_world_size(), sys.argv[1]
    torch.set_num_threads(1)
    for name, settings in CONFIGS.items():
        model = sharded_model()
        opt = make_optimizer(model, settings)
        record = {"weights": [], "alphas": []}
        train(model, opt, range(STEPS // 2), rank, world, record)
        state = dict(zip(("model", "optim"), get_state_dict(model, opt)))
        dcp.save(state, checkpoint_id=os.path.join(out, f"{name}_ckpt"))
        train(model, opt, range(STEPS // 2, STEPS), rank, world, record)
        record["theta_0_bytes"] = sum(t.numel() * t.element_size() for t in opt._theta_0.values())
        record["sharded"] = bool(opt._groups)

        resumed_model = sharded_model()
        resumed_opt = make_optimizer(resumed_model, settings)
        state = dict(zip(("model", "optim"), get_state_dict(resumed_model, resumed_opt)))
        dcp.load(state, checkpoint_id=os.path.join(out, f"{name}_ckpt"))
        set_state_dict(resumed_model, resumed_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        resumed = {"weights": [], "alphas": []}
        train(resumed_model, resumed_opt, range(STEPS // 2, STEPS), rank, world, resumed)
        record["resumed_weights"], record["resumed_alphas"] = resumed["weights"], resumed["alphas"]
        record["resumed_step_count"] = resumed_opt.step_count
        torch.save(record, os.path.join(out, f"{name}.rank{rank}.pt"))
    for optim in ("xsam", "sam"):
        trainer_run(out, optim, rank)
    dist.destroy_process_group()


def trainer_run(out: str, optim: str, rank: int) -> None:
    from helpers import like_one_batch, make_args, text_data, tiny_bert
    from transformers import BertForSequenceClassification, DistributedConfig

    from hf_xsam import XSAMTrainer

    folder = os.path.join(out, "tiny_bert")
    if rank == 0:
        tiny_bert(dropout=0.0).save_pretrained(folder)
    dist.barrier()
    model = like_one_batch(
        BertForSequenceClassification.from_pretrained(folder, distributed_config=DistributedConfig(fsdp_size=2)))
    trainer = XSAMTrainer(model=model, train_dataset=text_data(n=64), args=make_args(
        os.path.join(out, f"trainer_{optim}"), optim=optim, xsam_rho=0.1, xsam_probe_every=2, xsam_base_optim="sgd",
        learning_rate=0.5, max_steps=3, train_sampling_strategy="sequential", per_device_train_batch_size=2,
        gradient_accumulation_steps=2))
    trainer.train()
    torch.save({"weights": torch.cat([p.full_tensor().flatten() for p in trainer.model.parameters()]),
                "sharded": bool(trainer.xsam._groups) or optim == "sam",
                "probes": [h for h in trainer.state.log_history if "xsam/probe_losses" in h]},
               os.path.join(out, f"trainer_{optim}.rank{rank}.pt"))


if __name__ == "__main__":
    main()
