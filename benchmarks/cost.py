"""Seconds per optimizer step and peak memory: AdamW vs SAM vs XSAM, measured side by side.

    python benchmarks/cost.py --model minilm --rounds 5 --steps 4          # CPU, real MiniLM weights
    python benchmarks/cost.py --model vit --rounds 5 --steps 4
    python benchmarks/cost.py --model minilm --device cuda --bf16           # GPU recipe (see benchmarks/gpu.sh)
    python benchmarks/cost.py --model cnn --probe_every 40 --configs adamw sam xsam xsam_every_step \
        xsam_sharpness_every_4 xsam_sharpness_every_4_reuse ...            # the label-noise CNN, probe per epoch

Each configuration gets its own XSAMTrainer driven step by step through `training_step` + `optimizer.step`
(what Trainer's loop runs per step), timed by `harness.interleave` (torch.utils.benchmark.Timer, rounds that
interleave the configurations so that machine noise hits them alike; the table quotes medians). A configuration
that probes at an interval is timed between probes: its timed copy never probes and holds ``--alpha`` (default
1.5, about the mean alpha* of our runs), so that its steps take the plane geometry, as a run's steps do between
probes (at alpha = 1 exactly XSAM takes SAM's path and skips it: the row ``xsam_sam_path`` times that). One with
`--xsam_sharpness_every N` over whole periods of N steps (one sharpness-aware step and N - 1 plain ones), and the
probe's extra time is measured on the configurations that probe every step; a configuration's cost is then, at
probe interval M, (sharp + (N - 1) plain) / N + (probe - sharp) / M.

``--model cnn`` is benchmarks/image_task.py's CNN (width 24) on a batch of 50 Fashion-MNIST-sized images, the model
of the label-noise studies (its base optimizer there is SGD; here, as for the others, the Trainer's). ``--configs``
picks configurations (``xsam_every_step`` is needed for the probe's share); ``--probe_every M`` sets the interval
of the configurations that probe at one (default: the Trainer's, 200).

Peak memory: on CUDA, torch.cuda.max_memory_allocated per configuration in this process; on CPU, the peak
resident set size of a fresh subprocess per configuration (`--memory`), which includes the interpreter and
libraries, so compare the differences, not the ratios.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys

import harness
import torch

from hf_xsam import XSAMTrainer, XSAMTrainingArguments
from hf_xsam.training_args import flag_default

DEFAULT_INTERVAL = XSAMTrainingArguments.__dataclass_fields__["xsam_probe_every"].default
# the base optimizer as the Trainer runs it by default, which is also what XSAM wraps by default (fused AdamW in
# Transformers 5), so that the ratios compare the same AdamW kernel
BASE_OPTIM = flag_default("base_optim")
CONFIGS = {
    "adamw": dict(optim=BASE_OPTIM),
    "sam": dict(optim="sam"),
    "xsam": dict(optim="xsam", xsam_probe_every=DEFAULT_INTERVAL),
    # XSAM holding alpha = 1: SAM's direction through XSAM's code, without the plane geometry (where the time goes)
    "xsam_sam_path": dict(optim="xsam", xsam_probe_every=0, xsam_alpha=1.0),
    "xsam_every_step": dict(optim="xsam", xsam_probe_every=1),
    "xsam_fast": dict(optim="xsam", xsam_probe_every=DEFAULT_INTERVAL, xsam_probe_search="fast"),
    "xsam_fast_every_step": dict(optim="xsam", xsam_probe_every=1, xsam_probe_search="fast"),
    # a sharpness-aware step every N steps, plain or carrying the last correction (reuse) in between
    **{f"xsam_sharpness_every_{n}{'_reuse' if reuse else ''}": dict(
        optim="xsam", xsam_probe_every=DEFAULT_INTERVAL, xsam_sharpness_every=n, xsam_reuse=reuse)
       for n in (2, 4, 5, 8) for reuse in (False, True) if not (reuse and n == 5)},
    "sam_sharpness_every_4_reuse": dict(optim="sam", xsam_sharpness_every=4, xsam_reuse=True),  # LookSAM
}
MEMORY_CONFIGS = ("adamw", "sam", "xsam", "xsam_every_step", "xsam_sharpness_every_4_reuse")


def build(model_name: str, batch_size: int, seq_len: int, device: str):
    """The model and one batch of inputs (random token ids / pixels: the cost does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    if model_name == "minilm":
        from transformers import AutoModelForSequenceClassification

        # MINILM_DIR: a copy saved elsewhere, e.g. in bf16 (45 MB) for a GPU machine that cannot install the package
        model = AutoModelForSequenceClassification.from_pretrained(harness.minilm_dir(), num_labels=3,
                                                                   dtype=torch.float32)
        vocab = model.config.vocab_size
        batch = {"input_ids": torch.randint(1000, vocab, (batch_size, seq_len), generator=g),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                 "labels": torch.randint(0, 3, (batch_size,), generator=g)}
    elif model_name == "cnn":
        from image_task import SmallCNN

        torch.manual_seed(0)
        model = _WithLoss(SmallCNN(1, 10, 24))
        batch = {"pixel_values": torch.randn(batch_size, 1, 28, 28, generator=g),
                 "labels": torch.randint(0, 10, (batch_size,), generator=g)}
    else:
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        config = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=6,
                           num_attention_heads=3, intermediate_size=768, num_labels=10)
        model = ViTForImageClassification(config)
        batch = {"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g),
                 "labels": torch.randint(0, 10, (batch_size,), generator=g)}
    return model.to(device), {k: v.to(device) for k, v in batch.items()}


class _WithLoss(torch.nn.Module):
    """A plain classifier as the Trainer takes it: pixel_values and labels in, the cross-entropy loss out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values, labels):
        logits = self.net(pixel_values)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def make_trainer(name: str, model, args, between_probes: bool = False) -> XSAMTrainer:
    """The configuration's trainer; ``between_probes``: an interval prober never probes and holds ``args.alpha``
    (its steps between probes)."""
    settings = interval_settings(name, args)
    if between_probes and settings.get("xsam_probe_every", 1) > 1:
        settings.update(xsam_probe_every=0, xsam_alpha=args.alpha)
    training_args = XSAMTrainingArguments(
        output_dir="/tmp/hf_xsam_cost", report_to="none", use_cpu=args.device == "cpu", bf16=args.bf16,
        learning_rate=5e-5, max_steps=10_000, **settings)
    trainer = XSAMTrainer(model=model, args=training_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10_000)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def interval_settings(name: str, args) -> dict:
    """The configuration's flags, with ``--probe_every`` for those that probe at an interval and ``--base_optim``
    as the base optimizer (the "adamw" row's own optimizer, and the one SAM and XSAM wrap)."""
    settings = dict(CONFIGS[name])
    if args.base_optim is not None and name == "adamw":
        settings["optim"] = args.base_optim
    elif args.base_optim is not None:
        settings["xsam_base_optim"] = args.base_optim
    if settings.get("xsam_probe_every", 1) > 1:
        settings["xsam_probe_every"] = args.probe_every
    return settings


def one_step(trainer: XSAMTrainer, batch) -> None:
    with trainer.accelerator.autocast():
        trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.model.zero_grad(set_to_none=True)


def measure_times(args) -> dict:
    """Each configuration's Measurement of seconds per period (N steps at sharpness interval N, else one step)."""
    fns, number = {}, {}
    for name in args.configs:
        settings = CONFIGS[name]
        model, batch = build(args.model, args.batch_size, args.seq_len, args.device)
        trainer = make_trainer(name, model, args, between_probes=True)
        one_step(trainer, batch)  # warm-up
        period = settings.get("xsam_sharpness_every", 1)
        fns[name] = lambda t=trainer, b=batch, n=period: [one_step(t, b) for _ in range(n)]
        number[name] = math.ceil(args.steps / period)
    return harness.interleave(fns, args.rounds, number)


def per_step_costs(measured: dict, probe_every: int) -> tuple[dict[str, float], dict[str, float]]:
    """Each configuration's seconds per optimizer step at its intervals, and the probe's extra seconds per
    search (over a sharpness-aware step), from the medians (a search whose every-step configuration was not
    measured counts as free: say so by measuring it)."""
    med = {name: measured[name].median / CONFIGS[name].get("xsam_sharpness_every", 1) for name in measured}
    probe_extra = {search: med[every] - med["xsam"] for search, every in
                   (("grid", "xsam_every_step"), ("fast", "xsam_fast_every_step")) if every in med and "xsam" in med}
    cost = {}
    for name in med:
        settings = CONFIGS[name]
        cost[name] = med[name]
        if settings["optim"] == "xsam" and settings["xsam_probe_every"] > 1:
            cost[name] += probe_extra.get(settings.get("xsam_probe_search", "grid"), 0.0) / probe_every
    return cost, probe_extra


def cheap_ratios(med: dict[str, float]) -> dict[str, float]:
    """Cost per step over the base optimizer's, keyed by benchmarks/noise_study.py's method names (xsam_n4_reuse,
    ...), so that a study of accuracy can place each method at its cost."""
    ratios = {"base": 1.0}
    for name, seconds in med.items():
        if name in ("sam", "xsam"):
            ratios[name] = seconds / med["adamw"]
        elif name.startswith(("xsam_sharpness_every_", "sam_sharpness_every_")):
            family, _, rest = name.partition("_sharpness_every_")
            ratios[f"{family}_n{rest}"] = seconds / med["adamw"]
    return ratios


def peak_memory_mb(args, name: str) -> float:
    if args.device == "cuda":
        model, batch = build(args.model, args.batch_size, args.seq_len, args.device)
        trainer = make_trainer(name, model, args)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            one_step(trainer, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    cmd = [sys.executable, __file__, "--model", args.model, "--batch_size", str(args.batch_size),
           "--seq_len", str(args.seq_len), "--probe_every", str(args.probe_every), "--_memory_child", name,
           *(["--base_optim", args.base_optim] if args.base_optim else [])]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def memory_child(args) -> None:
    model, batch = build(args.model, args.batch_size, args.seq_len, "cpu")
    trainer = make_trainer(args._memory_child, model, args)
    for _ in range(3):
        one_step(trainer, batch)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_flags(parser, rounds=5, steps=4, models=("minilm", "vit", "cnn"))
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="the configurations to time (default: all)")
    parser.add_argument("--base_optim", default=None,
                        help="the base optimizer of every configuration, e.g. sgd (default: the Trainer's default, "
                             f"{BASE_OPTIM}); the first row then times it alone")
    parser.add_argument("--probe_every", type=int, default=DEFAULT_INTERVAL,
                        help="the probe interval of the configurations that probe at one")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child:
        args.device, args.bf16 = "cpu", False
        return memory_child(args)
    harness.check_model_flags(args)
    harness.require_positive(args, "probe_every")
    if not {"adamw", "sam"} <= set(args.configs):
        raise ValueError(f"--configs={args.configs} is invalid: the ratios need adamw and sam")
    torch.manual_seed(0)

    measured = measure_times(args)
    med, probe_extra = per_step_costs(measured, args.probe_every)
    memory = ({name: peak_memory_mb(args, name) for name in MEMORY_CONFIGS if name in args.configs}
              if args.memory else {})

    print(f"model={args.model} device={args.device} bf16={args.bf16} batch={args.batch_size} "
          f"seq={args.seq_len} rounds={args.rounds}x{args.steps} probe interval={args.probe_every} "
          f"alpha between probes={args.alpha:g} base={args.base_optim or BASE_OPTIM} (the row adamw)")
    columns = [("config", 30, ""), ("s/step", 9, ".3f"), ("vs adamw", 10, ".3f"), ("vs sam", 8, ".3f")]
    columns += [("peak MB", 10, ".0f")] if memory else []
    rows = [[name, med[name], med[name] / med["adamw"], med[name] / med["sam"]] for name in args.configs]
    for row in rows:
        if row[0] in memory:
            row.append(memory[row[0]])
    print(harness.fixed_table(columns, rows))
    for search, extra in probe_extra.items():
        print(f"{search} probe alone: {extra:.3f} s = {extra / med['sam']:.2f} SAM steps; "
              f"xsam/sam at probe interval M = 1 + {extra / med['sam']:.2f}/M")
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "median_s": med, "probe_extra_s": probe_extra,
                                       "ratios_to_base": cheap_ratios(med),
                                       "peak_mb": memory, "raw": {k: m.times for k, m in measured.items()}})


if __name__ == "__main__":
    main()
