"""Seconds per optimizer step at one batch split three ways (accumulation x micro-batch): AdamW vs SAM vs XSAM.

    python benchmarks/accumulation_cost.py --model minilm --rounds 3 --steps 2     # CPU, real MiniLM, batch 16

Every configuration gets its own XSAMTrainer, driven as Trainer's loop drives it: M calls of `training_step` (the
last one flagged as the step's end) and one `optimizer.step`. With global perturbation XSAM's theta_0 passes run
as the micro-batches come and the other passes run for all of them on the last, so its cost should follow the
split as AdamW's does. XSAM probes only on its warm-up step here (the default interval), so the timed steps are
plain XSAM steps; rounds interleave the configurations and the table quotes medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from cost import build

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

OPTIMS = {"adamw": dict(optim="adamw_torch"), "sam": dict(optim="sam"), "xsam": dict(optim="xsam")}
SPLITS = ((1, 16), (2, 8), (4, 4))


def make_trainer(optim: str, accumulation: int, model, device: str) -> XSAMTrainer:
    args = XSAMTrainingArguments(output_dir="/tmp/hf_xsam_accumulation_cost", report_to="none",
                                 use_cpu=device == "cpu", learning_rate=5e-5, max_steps=10_000,
                                 gradient_accumulation_steps=accumulation, **OPTIMS[optim])
    trainer = XSAMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = accumulation
    return trainer


def one_step(trainer: XSAMTrainer, micro_batches: list[dict]) -> float:
    start = time.perf_counter()
    state = trainer.accelerator.gradient_state
    for i, batch in enumerate(micro_batches):
        state._set_sync_gradients(i == len(micro_batches) - 1)  # as Trainer's loop flags the step's end
        trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "vit"], default="minilm")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration per round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        raise ValueError(f"--rounds={args.rounds} --steps={args.steps} are invalid: both must be >= 1")

    trainers, batches = {}, {}
    for accumulation, micro in SPLITS:
        for optim in OPTIMS:
            model, batch = build(args.model, 16, args.seq_len, args.device)
            batches[accumulation] = [{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
                                     for i in range(accumulation)]
            trainers[optim, accumulation] = make_trainer(optim, accumulation, model, args.device)
            one_step(trainers[optim, accumulation], batches[accumulation])  # warm-up (xsam: its step-0 probe)
    times = {key: [] for key in trainers}
    for _ in range(args.rounds):
        for (optim, accumulation), trainer in trainers.items():
            for _ in range(args.steps):
                times[optim, accumulation].append(one_step(trainer, batches[accumulation]))
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"model={args.model} device={args.device} batch 16 seq={args.seq_len} rounds={args.rounds}x{args.steps}, "
          "medians of s/step")
    print(f"{'split':<8}{'adamw':>8}{'sam':>8}{'xsam':>8}{'sam/adamw':>11}{'xsam/sam':>10}")
    for accumulation, micro in SPLITS:
        a, s, x = (median[optim, accumulation] for optim in OPTIMS)
        print(f"{accumulation} x {micro:<4}{a:>8.3f}{s:>8.3f}{x:>8.3f}{s / a:>11.3f}{x / s:>10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": {f"{o}_{m}": v for (o, m), v in median.items()},
                       "raw": {f"{o}_{m}": v for (o, m), v in times.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
