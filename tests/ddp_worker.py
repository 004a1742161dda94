"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: trains tiny BERTs with XSAMTrainer on CPU (gloo)
and saves each rank's final weights, alpha and probe history, one file per configuration and rank.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT_DIR CONFIGS_JSON
"""

import json
import os
import sys
import time

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, os.path.dirname(__file__))
from helpers import like_one_batch, make_args, text_data, tiny_bert  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_xsam import XSAMTrainer  # noqa: E402


class StepTimer(TrainerCallback):
    """Times each optimizer step and counts DDP's gradient all-reduces (a comm hook on the wrapped model)."""

    def __init__(self):
        self.times, self._start = [], None
        self.trainer, self.gradient_all_reduces = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        ddp = self.trainer.model_wrapped
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            def count(state, bucket):
                self.gradient_all_reduces += bucket.is_last()  # one per backward that syncs, however many buckets
                return default_hooks.allreduce_hook(state, bucket)

            ddp.register_comm_hook(None, count)

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def run(name: str, config: dict, out_dir: str) -> None:
    config = dict(config)
    dropout = config.pop("dropout", 0.0)
    model = like_one_batch(tiny_bert(dropout=dropout))  # so 2 processes can equal 1 with the whole batch
    timer = StepTimer()
    trainer = XSAMTrainer(model=model, train_dataset=text_data(n=64),
                          args=make_args(os.path.join(out_dir, name), train_sampling_strategy="sequential",
                                         **config),
                          callbacks=[timer])
    timer.trainer = trainer
    trainer.train()
    rank = trainer.args.process_index
    probes = [h for h in trainer.state.log_history if "xsam/probe_losses" in h]
    torch.save({"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "alpha": trainer.xsam.alpha if trainer.args.xsam_enabled else None,
                "probes": probes, "world_size": trainer.args.world_size, "step_times": timer.times,
                "gradient_all_reduces": timer.gradient_all_reduces, "steps": trainer.state.global_step},
               os.path.join(out_dir, f"{name}.rank{rank}.pt"))


def main() -> None:
    out_dir, configs = sys.argv[1], json.loads(sys.argv[2])
    for name, config in configs.items():
        run(name, config, out_dir)
    if torch.distributed.is_initialized():  # left to the interpreter's exit, gloo's threads can abort a process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
