"""Generalization: AdamW vs SAM vs XSAM test accuracy over seeds, with rho chosen on the validation split.

Runs the examples (`examples/text_classification.py` or `examples/image_classification.py`, their defaults
unless overridden) as subprocesses and reads each run's `results.json`. Three phases:

1. rho sweep, on the first seed: SAM and XSAM at every --rhos value. Prints validation and test accuracy with
   XSAM's mean psi and mean probed alpha* at each rho (the accuracy-against-rho table).
2. Same number of optimizer steps: each method's rho is the one with the best *validation* accuracy of phase 1
   (test accuracy never chooses anything); AdamW, SAM and XSAM over all --seeds.
3. Same wall-clock budget: AdamW again, for --max_steps x (SAM's seconds per step / AdamW's) steps, i.e. the
   time SAM's runs took. The ratio is --time_ratio when given (e.g. from a quiet `cost.py` run), else the median
   ratio of the phase-2 training times measured here.

Every run is appended to --json as it finishes, and runs already there are skipped, so an interrupted benchmark
resumes where it stopped.

    python benchmarks/generalization.py --task digits --seeds 0 1 2 --json benchmarks/results/gen_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import harness
from compare import SCRIPTS
from compare import run as run_example  # the same subprocess run and results.json fields

DEFAULT_STEPS = {"text": 140, "digits": 300}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=None, help="the example's default when omitted")
    parser.add_argument("--time_ratio", type=float, default=None,
                        help="SAM's seconds per step over AdamW's for phase 3 (default: measured in phase 2)")
    parser.add_argument("--json", required=True, help="results file; existing runs in it are reused")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the example")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    steps = args.max_steps or DEFAULT_STEPS[args.task]
    for name in ("rhos", "seeds"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            raise ValueError(f"--{name}={values} is invalid: the values must be distinct")
    if any(r <= 0 for r in args.rhos):
        raise ValueError(f"--rhos={args.rhos} is invalid: every rho must be > 0")
    if args.time_ratio is not None and args.time_ratio <= 0:
        raise ValueError(f"--time_ratio={args.time_ratio} is invalid: must be > 0")

    store = Store(args.json, task=args.task, extra=extra)
    first = args.seeds[0]

    # 1. the rho sweep on the first seed
    for rho in args.rhos:
        for optim in ("sam", "xsam"):
            store.run(optim, rho, first, steps)
    chosen = {optim: max(args.rhos, key=lambda r: (store.get(optim, r, first, steps)["eval_accuracy"], -r))
              for optim in ("sam", "xsam")}
    print(sweep_table(store, args.rhos, first, steps, chosen))

    # 2. same number of optimizer steps, rho chosen on validation
    configs = [("adamw_torch", None), ("sam", chosen["sam"]), ("xsam", chosen["xsam"])]
    for seed in args.seeds:
        for optim, rho in configs:
            store.run(optim, rho, seed, steps)

    # 3. same wall clock: AdamW for as long as SAM trained
    ratio = args.time_ratio
    if ratio is None:
        ratio = statistics.median(store.get("sam", chosen["sam"], s, steps)["train_runtime_s"] for s in args.seeds)
        ratio /= statistics.median(store.get("adamw_torch", None, s, steps)["train_runtime_s"] for s in args.seeds)
    long_steps = round(steps * ratio)
    for seed in args.seeds:
        store.run("adamw_torch", None, seed, long_steps)

    rows = [(f"{label(o, r)}, {steps} steps", [store.get(o, r, s, steps) for s in args.seeds]) for o, r in configs]
    rows.append((f"AdamW, {long_steps} steps (SAM's time, ratio {ratio:.2f})",
                 [store.get("adamw_torch", None, s, long_steps) for s in args.seeds]))
    print(seeds_table(rows, args.seeds))
    summary = {"task": args.task, "steps": steps, "chosen_rho": chosen, "time_ratio": ratio,
               "same_time_adamw_steps": long_steps, "seeds": args.seeds,
               "means": {name: mean_std([r["test_accuracy"] for r in runs]) for name, runs in rows}}
    store.data["summary"] = summary
    store.save()
    return summary


class Store:
    """The runs so far, keyed by optimizer, rho, seed and steps; saved after every run."""

    def __init__(self, path: str, task: str, extra: list[str]):
        self.path, self.task, self.extra = path, task, extra
        self.data = {"task": task, "extra_flags": extra, "runs": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("task") != task or saved.get("extra_flags") != extra:
                raise ValueError(
                    f"--json={path!r} holds runs of task {saved.get('task')!r} with flags {saved.get('extra_flags')}"
                    f", not {task!r} with {extra}: name another file"
                )
            self.data = saved

    @staticmethod
    def key(optim, rho, seed, steps) -> str:
        return f"{optim}|{rho}|{seed}|{steps}"

    def get(self, optim, rho, seed, steps) -> dict:
        return self.data["runs"][self.key(optim, rho, seed, steps)]

    def run(self, optim, rho, seed, steps) -> dict:
        key = self.key(optim, rho, seed, steps)
        if key not in self.data["runs"]:
            flags = ["--optim", optim, "--max_steps", str(steps),
                     *(["--xsam_rho", str(rho)] if rho is not None else []), *self.extra]
            result = run_example(self.task, flags, seed)
            self.data["runs"][key] = {k: v for k, v in result.items() if k != "train_steps"}
            print(f"  {label(optim, rho)} seed {seed} steps {steps}: eval {result['eval_accuracy']:.4f} "
                  f"test {result['test_accuracy']:.4f} ({result['train_runtime_s']:.0f} s)", flush=True)
            self.save()
        return self.get(optim, rho, seed, steps)

    def save(self) -> None:
        harness.write_json(self.path, self.data)


def label(optim: str, rho) -> str:
    name = {"adamw_torch": "AdamW", "sam": "SAM", "xsam": "XSAM"}[optim]
    return name if rho is None else f"{name} rho {rho:g}"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_table(store: Store, rhos, seed, steps, chosen) -> str:
    rows = []
    for rho in rhos:
        sam, xsam = store.get("sam", rho, seed, steps), store.get("xsam", rho, seed, steps)
        alphas = xsam["probe_alphas"]
        edge = sum(a in (0.0, 2.0) for a in alphas)
        star = {optim: "*" if chosen[optim] == rho else "" for optim in ("sam", "xsam")}
        rows.append([f"{rho:g}", f"{sam['eval_accuracy']:.4f}{star['sam']}", f"{sam['test_accuracy']:.4f}",
                     f"{xsam['eval_accuracy']:.4f}{star['xsam']}", f"{xsam['test_accuracy']:.4f}",
                     "-" if xsam["mean_psi"] is None else f"{xsam['mean_psi']:.3f}",
                     f"{statistics.fmean(alphas):.2f}" if alphas else "-", f"{edge} of {len(alphas)}"])
    header = ["rho", "SAM val", "SAM test", "XSAM val", "XSAM test", "XSAM mean psi (rad)", "XSAM mean alpha*",
              "alpha* at edge"]
    return (f"rho sweep, seed {seed}, {steps} steps (* = best validation accuracy, the rho used below)\n"
            + harness.markdown_table(header, rows))


def seeds_table(rows, seeds) -> str:
    cells = []
    for name, runs in rows:
        mean, sd = mean_std([r["test_accuracy"] for r in runs])
        cells.append([name, f"{mean:.4f} ± {sd:.4f}", ", ".join(f"{r['test_accuracy']:.4f}" for r in runs),
                      f"{statistics.fmean(r['eval_accuracy'] for r in runs):.4f}",
                      f"{statistics.median(r['train_runtime_s'] for r in runs):.0f}"])
    header = ["method", "test accuracy (mean ± sd)", "per seed", "validation (mean)", "train s (median)"]
    return f"test accuracy over seeds {', '.join(map(str, seeds))}\n" + harness.markdown_table(header, cells)


if __name__ == "__main__":
    main()
