"""How sensitive are SAM and XSAM to rho (issue 22)? Test accuracy against rho on a log grid, with AdamW as a line.

Full-size commands for this 2-core machine (estimates: the quiet-machine step times of benchmarks/RESULTS.md, i.e.
MiniLM ~1.8 s per SAM/XSAM step, the digits ViT's 300 steps in 20-26 s, plus start-up and evaluation as seen in
the smoke runs; one study at a time)::

    python benchmarks/rho_sensitivity.py --task digits --json benchmarks/results/rho_digits.json
        # 8 rhos x 2 methods x 3 seeds + 3 AdamW = 51 runs of 300 steps: about 30 min
    python benchmarks/rho_sensitivity.py --task text --json benchmarks/results/rho_text.json
        # the same 51 runs of the MiniLM tweets example (140 steps): about 4.5 h

Runs the examples (`examples/text_classification.py`, MiniLM on the tweets, or `examples/image_classification.py`,
the small ViT on scikit-learn's digits; their defaults, ``--max_steps`` when given, and the flags after ``--``) as
subprocesses: AdamW, and SAM and XSAM at every ``--rhos`` value, over ``--seeds`` (seeds the outer loop, so a
partial study holds whole curves). Prints a table of test accuracy (mean +- sd) against rho and, per method, the
widest run of neighbouring grid rhos around its best whose mean accuracy is within ``--tolerance`` (1 point) of
the best, as a range and a factor ("0.02-0.2, x10"); draws both curves (mean, +-sd band) and AdamW's line in a PNG
(``--plot``, default: the --json path with .png). Every run is appended to ``--json`` as it finishes and runs
already there are skipped, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import os

import harness
from noise_study import Store, check_distinct, check_rhos, example_runner, mean_sd, method_name, run_key

DEFAULT_RHOS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]


def flat_range(means: dict[float, float], tolerance: float) -> tuple[float, float, float]:
    """(best rho, lowest rho, highest rho) of the neighbouring grid rhos around the best mean (the smaller rho on a
    tie) whose means are all within ``tolerance`` of it."""
    rhos = sorted(means)
    best = max(rhos, key=lambda r: (means[r], -r))
    floor = means[best] - tolerance - 1e-12  # tolerance is inclusive despite rounding
    i = j = rhos.index(best)
    while i > 0 and means[rhos[i - 1]] >= floor:
        i -= 1
    while j + 1 < len(rhos) and means[rhos[j + 1]] >= floor:
        j += 1
    return best, rhos[i], rhos[j]


def curves(runs: dict[str, dict], rhos: list[float], seeds: list[int]) -> dict[str, dict[float, tuple]]:
    """Per method (and "base", under rho None): rho -> (mean, sd) of test accuracy over the seeds that have runs."""
    out: dict[str, dict[float, tuple]] = {}
    for method, grid in (("base", [None]), ("sam", rhos), ("xsam", rhos)):
        for rho in grid:
            acc = [runs[k]["test_acc"] for s in seeds if (k := run_key(method, 0.0, rho, s)) in runs]
            if acc:
                out.setdefault(method, {})[rho] = mean_sd(acc)
    return out


def sensitivity_table(points: dict[str, dict], tolerance: float, base: str) -> str:
    """The accuracy-against-rho table (+ = within tolerance of the method's best) and each method's flat range."""
    rhos = sorted({r for m in ("sam", "xsam") for r in points.get(m, {})})
    lines = []
    if "base" in points:
        mean, sd = points["base"][None]
        lines.append(f"{base}: {mean:.4f} ± {sd:.4f}")
    ranges = {}
    for method in ("sam", "xsam"):
        if method in points:
            best, lo, hi = flat_range({r: v[0] for r, v in points[method].items()}, tolerance)
            ranges[method] = (lo, hi)
            lines.append(f"{method_name(method, base)}: best {points[method][best][0]:.4f} at rho {best:g}; within "
                         f"{100 * tolerance:g} pt of it: rho {lo:g}-{hi:g}, x{hi / lo:.3g}")

    def cell(method, rho):
        if rho not in points.get(method, {}):
            return "-"
        mean, sd = points[method][rho]
        lo, hi = ranges[method]
        return f"{mean:.4f} ± {sd:.4f}{' +' if lo <= rho <= hi else ''}"

    table = harness.markdown_table(["rho", "SAM test (mean ± sd)", "XSAM test (mean ± sd)"],
                                   [[f"{r:g}", cell("sam", r), cell("xsam", r)] for r in rhos])
    return table + "\n(+ = within the flat range around the method's best)\n" + "\n".join(lines)


def plot(points: dict[str, dict], path: str, title: str, base: str) -> None:
    fig, ax = harness.pyplot().subplots(figsize=(6.4, 4.4))
    if "base" in points:
        mean, sd = points["base"][None]
        ax.axhspan(mean - sd, mean + sd, color="grey", alpha=0.2)
        ax.axhline(mean, color="grey", lw=1, label=f"{base} (mean +- sd)")
    for method, marker in (("sam", "o"), ("xsam", "s")):
        if method not in points:
            continue
        rhos = sorted(points[method])
        means = [points[method][r][0] for r in rhos]
        sds = [points[method][r][1] for r in rhos]
        line, = ax.plot(rhos, means, marker=marker, label=method_name(method, base))
        ax.fill_between(rhos, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("rho")
    ax.set_ylabel("test accuracy (mean +- sd over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["digits", "text"], required=True)
    parser.add_argument("--rhos", type=float, nargs="+", default=DEFAULT_RHOS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=None, help="the example's default when omitted")
    parser.add_argument("--tolerance", type=float, default=0.01, help="the flat range's accuracy drop (1 point)")
    parser.add_argument("--json", required=True, help="results file; existing runs in it are reused")
    parser.add_argument("--plot", default=None, help="PNG path (default: --json with .png)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the example")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    check_distinct(args, "rhos", "seeds")
    check_rhos(args.rhos)
    if args.max_steps is not None:
        harness.require_positive(args, "max_steps")
    if not 0 < args.tolerance < 1:
        raise ValueError(f"--tolerance={args.tolerance} is invalid: must be an accuracy difference in (0, 1)")

    steps = [] if args.max_steps is None else ["--max_steps", str(args.max_steps)]
    store = Store(args.json, {"task": args.task, "max_steps": args.max_steps, "extra": extra})
    runner = example_runner(args.task, [*steps, *extra], train_accuracy=False)
    for seed in args.seeds:
        for method, rho in [("base", None)] + [(m, r) for r in args.rhos for m in ("sam", "xsam")]:
            store.get(run_key(method, 0.0, rho, seed), lambda: runner(method, rho, seed),  # noqa: B023 (called here)
                      f"{method_name(method, 'AdamW', rho)} seed {seed}")

    points = curves(store.data["runs"], args.rhos, args.seeds)
    print(f"test accuracy against rho, {args.task}, seeds {', '.join(map(str, args.seeds))}")
    print(sensitivity_table(points, args.tolerance, "AdamW"))
    path = args.plot or os.path.splitext(args.json)[0] + ".png"
    plot(points, path, f"{args.task}: test accuracy against rho", "AdamW")
    print(f"plot: {path}")
    summary = {"seeds": args.seeds, "rhos": args.rhos, "tolerance": args.tolerance,
               "points": {m: {str(r): v for r, v in p.items()} for m, p in points.items()}}
    store.data["summary"] = summary
    harness.write_json(args.json, store.data)
    return summary


if __name__ == "__main__":
    main()
