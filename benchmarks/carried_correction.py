"""Which correction should XSAM's sharpness steps leave to the steps in between (issue 32)? The cheap mode
``--optim xsam --xsam_sharpness_every 4 --xsam_reuse`` under each rule of benchmarks/carried_rules.py, beside the
base optimizer, full XSAM and LookSAM (SAM N=4 reuse), on both regimes the project measured:

- ``--task fashion_mnist``: the CNN from scratch with SGD (cheap_sharpness.py's set-up: 2000 images x 40 epochs,
  20% and 40% noise), at XSAM's rho of that study (0.1, chosen on clean validation);
- ``--task text``: MiniLM fine-tuned with the Trainer's AdamW (label_noise.py's issue-27 set-up: 1000 tweets x 6
  epochs, 40% noise), each rule's rho chosen on clean validation over ``--rhos`` on the first seed.

Commands of RESULTS.md ("Which correction to carry"), one process per core::

    OMP_NUM_THREADS=1 python benchmarks/carried_correction.py --task fashion_mnist \\
        --json benchmarks/results/carried_correction_fashion_mnist.json \\
        --merge benchmarks/results/cheap_sharpness.json -- --pad 0 --width 24
        # 12 new runs of 1600 steps (capped and unit; landed merged): about 40 min on one core
    OMP_NUM_THREADS=1 python benchmarks/carried_correction.py --task text \\
        --json benchmarks/results/carried_correction_text.json \\
        --merge benchmarks/results/label_noise_text.json benchmarks/results/label_noise_text_reuse_rho002.json
        # 10-12 new runs of 378 steps: about 1.5 h on one core

Runs of ``xsam_n4_reuse`` in the ``--merge`` files were made before issue 32, so with the ``landed`` rule: they are
stored here as that rule's. A rule's runs are keyed ``xsam_n4_reuse:<rule>``. The reference runs (base, full XSAM at
its chosen rho, LookSAM at SAM's) are taken from the merged files, and made if missing (full XSAM over ``--rhos``).

Printed per noise level: each rule's validation accuracy over the rho sweep (first seed; with its mean ||c'||, the
logged ``xsam/correction``), then test accuracy (mean +- sd), the fit of the noisy training labels, the paired
gaps (+- SE) to the base optimizer and to full XSAM, the share of XSAM's gain over the base kept, the lowest test
accuracy of any run of the rule (a collapse shows as the majority class's share) and the mean alpha*.
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness
from carried_rules import RULES, installed
from noise_study import (
    Store,
    check_distinct,
    check_rhos,
    choose_rho,
    example_runner,
    gap_text,
    image_runner,
    mean_sd,
    number_text,
    paired_gap,
    run_key,
)

TASKS = {  # per task: the base optimizer's name, noise levels, rho grid of the rules, examples, epochs
    "fashion_mnist": dict(base="SGD", noise_levels=[0.2, 0.4], rhos=[0.1], train_examples=2000, num_train_epochs=40),
    "text": dict(base="AdamW", noise_levels=[0.4], rhos=[0.02, 0.05, 0.1], train_examples=1000, num_train_epochs=6),
}
CHEAP = "xsam_n4_reuse"


def rule_method(rule: str) -> str:
    return f"{CHEAP}:{rule}"


def landed_as_rule(runs: dict) -> None:
    """Re-key the merged runs of the cheap mode made before issue 32 as the ``landed`` rule's."""
    for key in [k for k in runs if k.split("|")[0] == CHEAP]:
        runs.setdefault(rule_method("landed") + key[len(CHEAP):], runs.pop(key))


def make_runner(args, noise: float, rule: str | None):
    """run(method, rho, seed) under ``rule`` (None: the library's, for the reference methods)."""
    if args.task == "text":
        return example_runner("text", ["--max_steps", "-1", "--num_train_epochs", str(args.num_train_epochs),
                                       "--max_train_samples", str(args.train_examples), "--label_noise", str(noise),
                                       "--label_noise_seed", str(args.label_noise_seed), *args.extra],
                              launcher=() if rule is None else (os.path.join(harness.ROOT, "benchmarks",
                                                                             "carried_rules.py"), rule))
    run = image_runner([*(["--data_dir", args.data_dir] if args.data_dir else []), "--train_size",
                        str(args.train_examples), "--val_size", str(args.val_examples), "--epochs",
                        str(args.num_train_epochs), "--threads", "1", "--label_noise", str(noise),
                        "--label_noise_seed", str(args.label_noise_seed), *args.extra])
    if rule is None:
        return run

    def with_rule(method, rho, seed):
        with installed(rule):
            return run(method, rho, seed)

    return with_rule


def study(args, store: Store, noise: float) -> dict:
    """The runs of one noise level, made as needed; returns what its tables need."""
    runs, seeds = store.data["runs"], args.seeds
    runners = {}

    def run(method: str, rho: float | None, seed: int, rule: str | None = None) -> dict:
        key = run_key(method if rule is None else rule_method(rule), noise, rho, seed)
        if key not in runs and rule not in runners:  # the image data load only when a run is missing
            runners[rule] = make_runner(args, noise, rule)
        describe = f"noise {noise:g} {method}{'' if rule is None else f' ({rule})'} rho {rho} seed {seed}"
        return store.get(key, lambda: runners[rule](method, rho, seed), describe)

    def seed0_rhos(method: str) -> list[float]:
        return sorted({float(k.split("|")[2]) for k in runs
                       if k.startswith(f"{method}|{noise:g}|") and k.endswith(f"|{seeds[0]}")})

    result = {"base": {s: run("base", None, s) for s in seeds}}
    xsam_rhos = seed0_rhos("xsam") or args.rhos
    rho_x = choose_rho({r: run("xsam", r, seeds[0])["val_acc"] for r in xsam_rhos})
    result["xsam"] = {s: run("xsam", rho_x, s) for s in seeds}
    rho_s = choose_rho({r: runs[run_key("sam", noise, r, seeds[0])]["val_acc"] for r in seed0_rhos("sam")}) \
        if seed0_rhos("sam") else None
    looksam = {s: runs[k] for s in seeds if rho_s is not None and (k := run_key("sam_n4_reuse", noise, rho_s, s))
               in runs}
    if looksam:
        result["LookSAM"] = looksam
    result["rho"] = {"xsam": rho_x, "LookSAM": rho_s}
    result["sweep"] = {}
    for rule in args.rules:
        sweep = {r: run(CHEAP, r, seeds[0], rule) for r in args.rhos}
        result["sweep"][rule] = sweep
        chosen = choose_rho({r: v["val_acc"] for r, v in sweep.items()})
        result["rho"][rule] = chosen
        result[rule] = {s: run(CHEAP, chosen, s, rule) for s in seeds}
    return result


def rows_of(result: dict, rules: list[str], base: str) -> list[list[str]]:
    test = {m: {s: r["test_acc"] for s, r in result[m].items()} for m in ("base", "xsam", *rules, "LookSAM")
            if m in result}
    full = paired_gap(test["xsam"], test["base"])
    rows = []
    for method in test:
        runs = result[method]
        gain = paired_gap(test[method], test["base"]) if method != "base" else None
        alphas = [r["mean_alpha"] for r in runs.values() if r.get("mean_alpha") is not None]
        name = {"base": base, "xsam": "XSAM", "LookSAM": "LookSAM"}.get(method, f"XSAM N=4 reuse, {method}")
        rows.append([
            name, number_text(result["rho"].get(method), "g"), str(len(runs)), "{:.4f} ± {:.4f}".format(
                *mean_sd(list(test[method].values()))),
            f"{statistics.fmean(r['train_acc'] for r in runs.values()):.3f}", gap_text(gain),
            gap_text(paired_gap(test[method], test["xsam"]) if method not in ("base", "xsam") else None),
            f"{100 * gain[0] / full[0]:.0f}%" if gain and full and full[0] > 0 else "-",
            f"{min(test[method].values()):.4f}", number_text(statistics.fmean(alphas) if alphas else None, ".2f")])
    return rows


def sweep_rows(result: dict) -> list[list[str]]:
    return [[rule, f"{rho:g}", f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}", f"{r['train_acc']:.3f}",
             number_text(r.get("mean_correction"), ".3f"), number_text(r.get("mean_alpha"), ".2f")]
            for rule, sweep in result["sweep"].items() for rho, r in sweep.items()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--noise_levels", type=float, nargs="+", default=None)
    parser.add_argument("--label_noise_seed", type=int, default=0)
    parser.add_argument("--rhos", type=float, nargs="+", default=None,
                        help="the rules' rho grid, chosen on the first seed (default: 0.1 fashion_mnist, "
                             "0.02 0.05 0.1 text)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_examples", type=int, default=None)
    parser.add_argument("--num_train_epochs", type=int, default=None)
    parser.add_argument("--val_examples", type=int, default=2000, help="fashion_mnist: clean validation images")
    parser.add_argument("--data_dir", default=None, help="fashion_mnist: the idx .gz files (default: Debian's)")
    parser.add_argument("--json", required=True, help="results file; existing runs in it are reused")
    parser.add_argument("--merge", nargs="+", default=[], help="results files of the same set-up to copy runs from")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the example or image_task")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    for name, value in TASKS[args.task].items():
        if name != "base" and getattr(args, name) is None:
            setattr(args, name, value)
    harness.require_positive(args, "train_examples", "num_train_epochs", "val_examples")
    check_distinct(args, "rules", "noise_levels", "rhos", "seeds")
    check_rhos(args.rhos)
    for noise in args.noise_levels:
        harness.example("_common").check_label_noise(noise, "--noise_levels")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # the config of the studies whose runs merge in (label_noise.py's; cheap_sharpness.py's for fashion_mnist)
    config = dict(task=args.task, label_noise_seed=args.label_noise_seed, train_examples=args.train_examples,
                  num_train_epochs=args.num_train_epochs, extra=args.extra)
    if args.task == "fashion_mnist":
        config["val_examples"] = args.val_examples
    store = Store(args.json, config)
    store.merge(args.merge)
    landed_as_rule(store.data["runs"])
    harness.write_json(args.json, store.data)
    base = TASKS[args.task]["base"]
    summary = {}
    for noise in args.noise_levels:
        result = study(args, store, noise)
        print(f"\n{noise:.0%} label noise, {args.train_examples} examples x {args.num_train_epochs} epochs, "
              f"seeds {', '.join(map(str, args.seeds))} (validation and test labels clean)")
        print(f"rho sweep on seed {args.seeds[0]}:")
        print(harness.markdown_table(["rule", "rho", "val", "test", "fit of noisy labels", "mean ||c'||",
                                      "mean alpha*"], sweep_rows(result)))
        rows = rows_of(result, args.rules, base)
        print(harness.markdown_table(["method", "rho", "seeds", "test (mean ± sd)", "fit of noisy labels",
                                      f"gap to {base}", "gap to XSAM", "XSAM's gain kept", "lowest test",
                                      "mean alpha*"], rows))
        summary[f"{noise:g}"] = {"rho": result["rho"], "rows": rows}
    store.data["summary"] = summary
    harness.write_json(args.json, store.data)
    return summary


if __name__ == "__main__":
    main()
