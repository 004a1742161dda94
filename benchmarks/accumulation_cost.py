"""Seconds per optimizer step at one batch split three ways (accumulation x micro-batch): AdamW vs SAM vs XSAM.

    python benchmarks/accumulation_cost.py --model minilm --rounds 3 --steps 2     # CPU, real MiniLM, batch 16

Every configuration gets its own XSAMTrainer, driven as Trainer's loop drives it: M calls of `training_step` (the
last one flagged as the step's end) and one `optimizer.step`. With global perturbation XSAM's theta_0 passes run
as the micro-batches come and the other passes run for all of them on the last, so its cost should follow the
split as AdamW's does. XSAM probes only on its warm-up step here (the default interval), so the timed steps are
plain XSAM steps; `harness.interleave` times them (torch.utils.benchmark.Timer, rounds that interleave the
configurations) and the table quotes medians.
"""

from __future__ import annotations

import argparse

import harness
from cost import build

from hf_xsam import XSAMTrainer, XSAMTrainingArguments
from hf_xsam.training_args import flag_default  # the Trainer's default: what XSAM wraps by default

OPTIMS = {"adamw": dict(optim=flag_default("base_optim")), "sam": dict(optim="sam"), "xsam": dict(optim="xsam")}
SPLITS = ((1, 16), (2, 8), (4, 4))


def make_trainer(optim: str, accumulation: int, model, device: str) -> XSAMTrainer:
    args = XSAMTrainingArguments(output_dir="/tmp/hf_xsam_accumulation_cost", report_to="none",
                                 use_cpu=device == "cpu", learning_rate=5e-5, max_steps=10_000,
                                 gradient_accumulation_steps=accumulation, **OPTIMS[optim])
    trainer = XSAMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = accumulation
    return trainer


def one_step(trainer: XSAMTrainer, micro_batches: list[dict]) -> None:
    state = trainer.accelerator.gradient_state
    for i, batch in enumerate(micro_batches):
        state._set_sync_gradients(i == len(micro_batches) - 1)  # as Trainer's loop flags the step's end
        trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["minilm", "vit"], default="minilm")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2,
                        help="timed steps per configuration per round (the Timer warms up with 2 more)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    harness.require_positive(args, "rounds", "steps")

    trainers, batches = {}, {}
    for accumulation, micro in SPLITS:
        for optim in OPTIMS:
            model, batch = build(args.model, 16, args.seq_len, args.device)
            batches[accumulation] = [{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}
                                     for i in range(accumulation)]
            trainers[optim, accumulation] = make_trainer(optim, accumulation, model, args.device)
            one_step(trainers[optim, accumulation], batches[accumulation])  # warm-up (xsam: its step-0 probe)
    steps = {key: (lambda t=trainer, b=batches[key[1]]: one_step(t, b)) for key, trainer in trainers.items()}
    measured = harness.interleave(steps, args.rounds, args.steps)
    median = {key: m.median for key, m in measured.items()}

    print(f"model={args.model} device={args.device} batch 16 seq={args.seq_len} rounds={args.rounds}x{args.steps}, "
          "medians of s/step")
    columns = [("split", 8, ""), ("adamw", 8, ".3f"), ("sam", 8, ".3f"), ("xsam", 8, ".3f"), ("sam/adamw", 11, ".3f"),
               ("xsam/sam", 10, ".3f")]
    rows = []
    for accumulation, micro in SPLITS:
        a, s, x = (median[optim, accumulation] for optim in OPTIMS)
        rows.append((f"{accumulation} x {micro}", a, s, x, s / a, x / s))
    print(harness.fixed_table(columns, rows))
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "median_s": {f"{o}_{m}": v for (o, m), v in median.items()},
                                       "raw": {f"{o}_{m}": v.times for (o, m), v in measured.items()}})


if __name__ == "__main__":
    main()
