"""Accuracy and training time of named option sets of an example, over seeds, side by side.

    python benchmarks/compare.py --task digits --seeds 0 1 2 3 4 --json benchmarks/results/interval_digits.json \
        --config "N=1:--xsam_sharpness_every 1" --config "N=2:--xsam_sharpness_every 2" \\
        --config "N=5:--xsam_sharpness_every 5"

Each --config is "name:flags" (flags for `examples/text_classification.py` or `image_classification.py`, on top of
its defaults and of the flags after --). Seeds are the outer loop, so the configurations interleave and share the
machine's load; the time column is the median training time, also as a ratio to the first configuration. Runs
already in --json are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import harness
from harness import ROOT

SCRIPTS = {"text": "examples/text_classification.py", "digits": "examples/image_classification.py"}


def parse_config(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition(":")
    if not sep or not name:
        raise ValueError(
            f"--config={text!r} is invalid: write it as 'name:flags', e.g. 'N=2:--xsam_sharpness_every 2'")
    return name, shlex.split(flags)


KEEP = ("eval_accuracy", "test_accuracy", "test_macro_f1", "train_loss", "train_runtime_s", "train_steps",
        "final_alpha", "mean_psi", "mean_correction", "probe_alphas")


def run(task: str, flags: list[str], seed: int, keep: tuple[str, ...] = KEEP, launcher: tuple[str, ...] = ()) -> dict:
    """One run of the task's example with these flags and --seed; the ``keep`` fields of its results.json.
    ``launcher``: a module (and its arguments) that runs the example's path given after them, e.g.
    ``("benchmarks/carried_rules.py", "unit")``."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, *launcher, os.path.join(ROOT, SCRIPTS[task]), "--output_dir", out, "--seed",
                   str(seed), "--disable_tqdm", "true", *flags]
        print("$", " ".join(command[1:]), flush=True)
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"the run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            result = json.load(f)
    return {k: result[k] for k in keep}


def table(configs, runs, seeds) -> str:
    rows, first = [], None
    for name, flags in configs:
        results = [runs[f"{name}|{s}"] for s in seeds]
        acc = [r["test_accuracy"] for r in results]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        seconds = statistics.median(r["train_runtime_s"] for r in results)
        first = first or seconds
        rows.append([name, f"`{' '.join(flags)}`", f"{statistics.fmean(acc):.4f} ± {sd:.4f}",
                     f"{statistics.fmean(r['eval_accuracy'] for r in results):.4f}", f"{seconds:.1f}",
                     f"{seconds / first:.2f}"])
    header = ["config", "flags", "test accuracy (mean ± sd)", "validation (mean)", "train s (median)", "time vs first"]
    return f"test accuracy over seeds {', '.join(map(str, seeds))}\n" + harness.markdown_table(header, rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--config", action="append", required=True, help="name:flags (repeat)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", required=True)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags for every configuration")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    configs = [parse_config(c) for c in args.config]
    names = [n for n, _ in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"--config names {names} are invalid: each name must be distinct")
    data = {"task": args.task, "extra_flags": extra, "runs": {}}
    if os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as f:
            data = json.load(f)
        if data["task"] != args.task or data["extra_flags"] != extra:
            raise ValueError(f"--json={args.json!r} holds runs of another task or flags: name another file")
    data["configs"] = dict(configs)
    for seed in args.seeds:
        for name, flags in configs:
            key = f"{name}|{seed}"
            if key not in data["runs"] or data["runs"][key].get("flags") != flags:
                data["runs"][key] = {**run(args.task, [*extra, *flags], seed), "flags": flags}
                result = data["runs"][key]
                print(f"  {name} seed {seed}: test {result['test_accuracy']:.4f} ({result['train_runtime_s']:.1f} s)",
                      flush=True)
                harness.write_json(args.json, data)
    print(table(configs, data["runs"], args.seeds))
    return data


if __name__ == "__main__":
    main()
