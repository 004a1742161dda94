"""Compiled training: seconds per optimizer step of AdamW, SAM and XSAM, eager vs `torch.compile`, side by side;
and what the library costs a forward that is not XSAM's.

    python benchmarks/compile_cost.py --model minilm --rounds 3 --steps 3          # CPU, real MiniLM weights
    python benchmarks/compile_cost.py --model vit --device cuda --bf16 --rounds 5 --steps 10   # the GPU recipe

Each configuration is an XSAMTrainer driven step by step through `training_step` + `optimizer.step` (as
benchmarks/cost.py does), with the Trainer's own model, or with ``torch.compile`` of it (what ``--torch_compile``
runs). Warm-up (the compilation of the training graph) happens before the timing; XSAM is timed between probes,
holding ``--alpha`` as benchmarks/cost.py's timed steps do. Timed with
`harness.interleave`, rounds that interleave the six configurations; the table quotes medians.

The second table answers "does importing hf_xsam and taking a step tax forwards elsewhere?": a no-grad forward of
the same model, timed in fresh processes that never import hf_xsam ("plain") and that import it and take one XSAM
step first ("after a step"), alternating, ``--forward_rounds`` of each. The replay's hook exists only inside XSAM's
passes, so the two should be equal within noise.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import harness
import torch

OPTIMS = ("adamw", "sam", "xsam")


def measure_steps(args) -> dict:
    import cost

    fns = {}
    for optim in OPTIMS:
        for compiled in (False, True):
            model, batch = cost.build(args.model, args.batch_size, args.seq_len, args.device)
            trainer = cost.make_trainer(optim, model, args, between_probes=True)
            run = torch.compile(trainer.model) if compiled else trainer.model

            def step(t=trainer, m=run, b=batch) -> None:
                with t.accelerator.autocast():
                    t.training_step(m, dict(b))
                t.optimizer.step()
                t.model.zero_grad(set_to_none=True)

            step()  # warm-up: compiles the training graph; xsam probes here (its forward-only graph)
            step()
            fns[(optim, "compiled" if compiled else "eager")] = step
    return harness.interleave(fns, args.rounds, args.steps)


def forward_child(args) -> None:
    """The "after a step" child: prints the median seconds of a no-grad forward once hf_xsam is imported and one
    XSAM step (with its probe) has run on the model."""
    import cost  # imports hf_xsam

    model, batch = cost.build(args.model, args.batch_size, args.seq_len, "cpu")
    trainer = cost.make_trainer("xsam_every_step", model, args)
    cost.one_step(trainer, batch)
    model.eval()  # as the plain child's freshly loaded model: the same (no) dropout in both
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    print(harness.interleave({"forward": forward}, 1, args.steps)["forward"].median)


def forward_child_plain(args) -> None:
    """The "plain" child: the same model and batch, built without hf_xsam anywhere in the process."""
    from transformers import AutoModelForSequenceClassification

    g = torch.Generator().manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(harness.minilm_dir(), num_labels=3, dtype=torch.float32)
    model.eval()
    inputs = {"input_ids": torch.randint(1000, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g),
              "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long)}
    assert "hf_xsam" not in sys.modules

    def forward() -> None:
        with torch.no_grad():
            model(**inputs)

    print(harness.interleave({"forward": forward}, 1, args.steps)["forward"].median)


def measure_forwards(args) -> dict[str, list[float]]:
    times = {"plain": [], "after a step": []}
    for _ in range(args.forward_rounds):
        for name, mode in (("plain", "plain"), ("after a step", "after")):
            cmd = [sys.executable, __file__, "--model", "minilm", "--batch_size", str(args.batch_size),
                   "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--_forward", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[name].append(float(out.strip().splitlines()[-1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_flags(parser, rounds=3, steps=3)
    parser.add_argument("--forward_rounds", type=int, default=3,
                        help="fresh processes per side for the forward table (0: skip it; MiniLM on CPU only)")
    parser.add_argument("--no_steps", action="store_true", help="skip the step table (the forward table only)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--_forward", choices=["plain", "after"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._forward:
        args.device, args.bf16 = "cpu", False
        return forward_child_plain(args) if args._forward == "plain" else forward_child(args)
    harness.check_model_flags(args)
    torch.manual_seed(0)

    print(f"model={args.model} device={args.device} bf16={args.bf16} batch={args.batch_size} seq={args.seq_len} "
          f"rounds={args.rounds}x{args.steps} alpha between probes={args.alpha:g} torch={torch.__version__}")
    med = {}
    if not args.no_steps:
        med = {key: m.median for key, m in measure_steps(args).items()}
        columns = [("optim", 8, ""), ("eager s", 10, ".3f"), ("compiled s", 12, ".3f"),
                   ("compiled/eager", 16, ".3f"), ("vs adamw (compiled)", 21, ".3f")]
        rows = [[optim, med[optim, "eager"], med[optim, "compiled"], med[optim, "compiled"] / med[optim, "eager"],
                 med[optim, "compiled"] / med["adamw", "compiled"]] for optim in OPTIMS]
        print(harness.fixed_table(columns, rows))

    forwards = {}
    if args.forward_rounds and args.model == "minilm" and args.device == "cpu":
        forwards = measure_forwards(args)
        plain, after = (statistics.median(forwards[k]) for k in ("plain", "after a step"))
        print(f"\nno-grad forward, median of {args.forward_rounds} fresh processes each")
        print(harness.fixed_table([("process", 14, ""), ("s/forward", 11, ".4f"), ("vs plain", 10, ".3f")],
                                  [["plain", plain, 1.0], ["after a step", after, after / plain]]))
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "median_s": {f"{k[0]}_{k[1]}": v for k, v in med.items()},
                                       "forward_s": forwards})


if __name__ == "__main__":
    main()
