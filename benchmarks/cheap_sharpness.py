"""How much of XSAM's gain do the cheap modes keep (issue 26)? Label noise on Fashion-MNIST: SGD, SAM, XSAM, XSAM
with a sharpness step every N steps (``--xsam_sharpness_every N``), plain or carrying the last correction
(``--xsam_reuse``), and SAM with reuse (LookSAM).

Full-size command for this 2-core machine (the label-noise study's set-up, at the rhos its clean validation chose;
its SGD/SAM/XSAM runs and rho-choice runs are merged in, not run again; one core per noise level)::

    for noise in 0.2 0.4; do OMP_NUM_THREADS=1 python benchmarks/cheap_sharpness.py --noise_levels $noise \\
        --json benchmarks/results/cheap_sharpness_$noise.json \\
        --merge benchmarks/results/label_noise_fashion_mnist.json -- --pad 0 --width 24 & done; wait
    python benchmarks/cheap_sharpness.py --json benchmarks/results/cheap_sharpness.json \\
        --merge benchmarks/results/cheap_sharpness_0.2.json benchmarks/results/cheap_sharpness_0.4.json \\
        --cost benchmarks/results/cost_cnn_cpu.json -- --pad 0 --width 24
        # 42 new runs of 1600 steps: about 85 min as two one-core processes

Set-up (benchmarks/label_noise.py's, whose store format and runs this shares): the image_task CNN on
``--train_examples`` images for ``--num_train_epochs``, symmetric noise on the training split only, ``--val_examples``
clean validation images, SGD base (lr 0.05, momentum 0.9, cosine), k = 1, XSAM probing once per epoch. Per noise
level the rho of SAM and XSAM is chosen on clean validation over ``--rhos`` (seed 0); every cheap mode takes its
family's rho. Methods run in ``--methods`` order, each over every seed, so a study cut short holds whole methods.

Printed per noise level: test accuracy (mean +- sd), the fit of the noisy training labels, the paired gaps (+- SE)
to SGD and to full XSAM, the share of XSAM's gain over SGD kept (mean gap over mean gap), and the time per epoch
(median of the runs; with ``--cost``, the cost benchmark's quiet, interleaved ratio to SGD instead, which is what
the plot's x axis shows).
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness
from noise_study import (
    Store,
    check_distinct,
    check_rhos,
    choose_rho,
    cost_ratios,
    image_runner,
    mean_sd,
    method_name,
    paired_gap,
    parse_method,
    run_key,
)

METHODS = ["base", "sam", "xsam", "xsam_n4_reuse", "xsam_n4", "sam_n4_reuse", "xsam_n8_reuse", "xsam_n2_reuse",
           "xsam_n8", "xsam_n2"]


def chosen_rhos(rhos: list[float], seed: int, run) -> dict[str, float]:
    """SAM's and XSAM's rho by clean validation accuracy over ``rhos`` on ``seed`` (runs missing are made)."""
    return {m: choose_rho({rho: run(m, rho, seed)["val_acc"] for rho in rhos}) for m in ("sam", "xsam")}


def summary_rows(runs: dict, noise_levels: list[float], seeds: list[int], methods: list[str],
                 chosen: dict[float, dict[str, float]], cost: dict[str, float] | None) -> list[dict]:
    rows = []
    for noise in noise_levels:
        test = {}
        for method in methods:
            family, _, _ = parse_method(method)
            rho = None if family == "base" else chosen[noise][family]
            mine = {s: runs[k] for s in seeds if (k := run_key(method, noise, rho, s)) in runs}
            if not mine:
                continue
            test[method] = {s: r["test_acc"] for s, r in mine.items()}
            gain = paired_gap(test[method], test.get("base", {}))
            full = paired_gap(test.get("xsam", {}), test.get("base", {}))
            rows.append(dict(
                noise=noise, method=method, rho=rho, seeds=len(mine), test=mean_sd(list(test[method].values())),
                train=statistics.fmean(r["train_acc"] for r in mine.values()),
                vs_base=gain if method != "base" else None,
                vs_xsam=paired_gap(test[method], test["xsam"]) if method != "xsam" and "xsam" in test else None,
                kept=gain[0] / full[0] if gain and full and full[0] > 0 and method != "base" else None,
                step_s=statistics.median(r["seconds"] / r["steps"] for r in mine.values()),
                cost=None if cost is None else cost.get(method)))
    return rows


def _gap(gap) -> str:
    return "-" if gap is None else f"{100 * gap[0]:+.1f} ± {100 * gap[1]:.1f} pt"


def results_table(rows: list[dict]) -> str:
    """The runs' own time per step is shown only without ``--cost``: runs made side by side with other work (or in
    another session) time that work too; the cost benchmark's interleaved ratio does not."""
    with_cost = any(r["cost"] is not None for r in rows)
    header = ["noise", "method", "rho", "seeds", "test accuracy (mean ± sd)", "fit of the noisy labels",
              "gap to SGD (paired ± SE)", "gap to XSAM (paired ± SE)", "XSAM's gain kept",
              "cost per step vs SGD (cost.py)" if with_cost else "ms per step (median of the runs)"]
    cells = [[f"{r['noise']:g}", method_name(r["method"], "SGD"), "-" if r["rho"] is None else f"{r['rho']:g}",
              str(r["seeds"]), f"{r['test'][0]:.4f} ± {r['test'][1]:.4f}", f"{r['train']:.3f}", _gap(r["vs_base"]),
              _gap(r["vs_xsam"]), "-" if r["kept"] is None else f"{100 * r['kept']:.0f}%",
              ("-" if r["cost"] is None else f"{r['cost']:.2f}x") if with_cost else f"{1000 * r['step_s']:.0f}"]
             for r in rows]
    return harness.markdown_table(header, cells)


def kept_overall(rows: list[dict]) -> dict[str, float]:
    """Per method, the share of XSAM's gain kept, averaged over the noise levels."""
    shares: dict[str, list[float]] = {}
    for r in rows:
        if r["kept"] is not None:
            shares.setdefault(r["method"], []).append(r["kept"])
    return {m: statistics.fmean(v) for m, v in shares.items()}


def plot(rows: list[dict], path: str) -> None:
    """Test accuracy (mean +- sd) against the cost per step (ratio to SGD from --cost, else ms per step), one panel
    per noise level."""
    levels = sorted({r["noise"] for r in rows})
    fig, axes = harness.pyplot().subplots(1, len(levels), figsize=(5.5 * len(levels), 4.4), squeeze=False)
    for ax, noise in zip(axes[0], levels):
        for r in (r for r in rows if r["noise"] == noise):
            x = r["cost"] if r["cost"] is not None else 1000 * r["step_s"]
            family, every, reuse = parse_method(r["method"])
            marker = {"base": "^", "sam": "o", "xsam": "s"}[family]
            ax.errorbar([x], [r["test"][0]], yerr=[r["test"][1]], marker=marker, capsize=3,
                        mfc="none" if every > 1 and not reuse else None)
            ax.annotate(method_name(r["method"], "SGD"), (x, r["test"][0]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel("cost per step vs SGD (benchmarks/cost.py)" if rows[0]["cost"] is not None
                      else "ms per step (median of the runs)")
        ax.set_ylabel("test accuracy, clean labels (mean +- sd)")
        ax.set_title(f"{noise:.0%} label noise")
    harness.save_figure(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise_levels", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="run in this order, each over every seed")
    parser.add_argument("--label_noise_seed", type=int, default=0)
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="the rho grid of SAM/XSAM")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_examples", type=int, default=2000)
    parser.add_argument("--num_train_epochs", type=int, default=40)
    parser.add_argument("--val_examples", type=int, default=2000)
    parser.add_argument("--data_dir", default=None, help="the idx .gz files (default: Debian's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", required=True, help="results file; existing runs in it are reused")
    parser.add_argument("--merge", nargs="+", default=[], help="results files of the same set-up to copy runs from")
    parser.add_argument("--cost", default=None, help="benchmarks/cost.py's JSON on the CNN: cost ratios to SGD")
    parser.add_argument("--plot", default=None, help="PNG path (default: --json with .png)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for image_task")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    harness.require_positive(args, "train_examples", "num_train_epochs", "val_examples", "threads")
    check_distinct(args, "noise_levels", "rhos", "seeds", "methods")
    check_rhos(args.rhos)
    for method in args.methods:
        parse_method(method)
    for noise in args.noise_levels:
        harness.example("_common").check_label_noise(noise, "--noise_levels")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # label_noise.py's config: its fashion_mnist runs merge in
    config = dict(task="fashion_mnist", label_noise_seed=args.label_noise_seed, train_examples=args.train_examples,
                  num_train_epochs=args.num_train_epochs, extra=args.extra, val_examples=args.val_examples)
    store = Store(args.json, config)
    store.merge(args.merge)
    chosen = {}
    for noise in args.noise_levels:
        runner = None

        def run(method, rho, seed, noise=noise):
            nonlocal runner
            key = run_key(method, noise, rho, seed)
            if key not in store.data["runs"] and runner is None:  # loads the data only when a run is missing
                runner = image_runner([
                    *(["--data_dir", args.data_dir] if args.data_dir else []), "--train_size",
                    str(args.train_examples), "--val_size", str(args.val_examples), "--epochs",
                    str(args.num_train_epochs), "--threads", str(args.threads), "--label_noise", str(noise),
                    "--label_noise_seed", str(args.label_noise_seed), *args.extra])
            describe = f"noise {noise:g} {method_name(method, 'SGD', rho)} seed {seed}"
            return store.get(key, lambda: runner(method, rho, seed), describe)

        chosen[noise] = chosen_rhos(args.rhos, args.seeds[0], run)
        for method in args.methods:
            family, _, _ = parse_method(method)
            for seed in args.seeds:
                run(method, None if family == "base" else chosen[noise][family], seed)
    rows = summary_rows(store.data["runs"], args.noise_levels, args.seeds, args.methods, chosen,
                        cost_ratios(args.cost))
    print(f"test accuracy over seeds {', '.join(map(str, args.seeds))}; {args.train_examples} images x "
          f"{args.num_train_epochs} epochs (validation and test labels clean)")
    print(results_table(rows))
    overall = kept_overall(rows)
    print("XSAM's gain over SGD kept, mean over the noise levels: "
          + ", ".join(f"{method_name(m, 'SGD')} {100 * v:.0f}%" for m, v in overall.items()))
    path = args.plot or os.path.splitext(args.json)[0] + ".png"
    plot(rows, path)
    print(f"plot: {path}")
    store.data["summary"] = {"seeds": args.seeds, "chosen_rho": {f"{n:g}": c for n, c in chosen.items()},
                             "rows": rows, "kept": overall}
    harness.write_json(args.json, store.data)
    return store.data["summary"]


if __name__ == "__main__":
    main()
