"""Where sharpness-awareness pays (issue 22): test accuracy under symmetric label noise, base optimizer vs SAM vs XSAM.

Full-size commands for this 2-core machine (estimates: the quiet-machine step times of benchmarks/RESULTS.md, i.e.
MiniLM 0.91 s per AdamW step, 1.72 per SAM step, ~1.9 per XSAM step probing every 50; the CNN 35, 66 and ~70 ms,
plus the per-run start-up and evaluation seen in the smoke runs; one study at a time)::

    python benchmarks/label_noise.py --task text --json benchmarks/results/label_noise_text.json
        # MiniLM on 2000 tweets x 5 epochs (625 steps a run), 39 runs: about 12 h
    OMP_NUM_THREADS=1 python benchmarks/label_noise.py --task fashion_mnist --train_examples 2000 \
        --num_train_epochs 40 --json benchmarks/results/label_noise_fashion_mnist.json -- --pad 0 --width 24
        # the CNN of image_task.py (paper_regime's), 24 channels wide, no random crops, on 2000 images x 40 epochs
        # (1600 steps a run):
        # SGD memorises 40% noise there (RESULTS.md). 39 runs: about 2.5 h on one core
        # (needs `apt-get install dataset-fashion-mnist`, or --data_dir with the four idx .gz files)

The fine-tuning study of RESULTS.md (issue 27) is ``--task text --train_examples 1000 --num_train_epochs 6
--noise_levels 0.4 --rhos 0.02 0.05 --methods base sam xsam xsam_n4_reuse``: 14 runs of 378 steps, about 2 h as two
one-thread processes here (its commands in RESULTS.md split it by method).

What sharpness-awareness buys in fine-tuning (issue 33, RESULTS.md) is the same study on two tasks, the tweets
and BBC News (``-- --builtin_dataset bbc_news``), with the cheap modes ``xsam_n4_reuse`` and ``sam_n4_reuse``
(LookSAM) and ``--cost benchmarks/results/cost_minilm_cpu_finetune.json`` (the quiet cost run's ratios in the
table instead of the runs' own seconds); ``--report`` prints the tables of the runs there are and trains nothing
(methods run over fewer seeds than others).

The issue's bigger text study (3000 tweets x 6 epochs, 1125 steps a run) is ``--train_examples 3000
--num_train_epochs 6``: about 22 h here, so rather on a GPU. If the CNN does not fit the noisy labels (the
"train acc, noisy labels" column well under 1 - noise), give it more capacity after ``--`` (``--width``), or take
away the random crops (``--pad 0``).

A study splits over processes by noise level, one results file each (the CNN uses one core: run two at once), and
``--merge`` gathers them: ``--noise_levels 0.4 --json a.json`` beside ``--noise_levels 0 0.2 --json b.json``, then
the full command with ``--merge a.json b.json``, which trains nothing more.

Set-up. Symmetric label noise on the training split only: a fraction f of the training examples (``--noise_levels``,
default 0, 0.2, 0.4) gets a label drawn uniformly from the other classes, chosen with ``--label_noise_seed``, so every
method and seed sees the same noisy labels; validation and test stay clean. ``--task text`` runs
`examples/text_classification.py` (MiniLM, tweets; base optimizer AdamW) as subprocesses on the first
``--train_examples`` training tweets for ``--num_train_epochs``; ``--task fashion_mnist`` calls
`benchmarks/image_task.py`'s CNN (base optimizer SGD; SAM and XSAM with k = 1, XSAM probing once per epoch) on
``--train_examples`` images for ``--num_train_epochs``, with ``--val_examples`` clean images held out for validation.
Flags after ``--`` go to the example (text) or to image_task's flags (fashion_mnist).

Per noise level: SAM's and XSAM's rho each chosen by clean validation accuracy over ``--rhos`` on the first seed,
then the base optimizer, SAM and XSAM at their chosen rho over every ``--seeds`` value. The tables: the rho choice;
test accuracy mean +- sd; the paired (same seed) gap to the base optimizer and, for XSAM, to SAM, with its standard
error; the training accuracy on the noisy labels (memorisation); XSAM's mean alpha* and mean psi. A plot
(``--plot``, default: the --json path with .png) draws test accuracy and the fit of the noisy labels against the
noise level. Every run is appended to ``--json`` as it finishes and runs already there are skipped, so an
interrupted study resumes.
"""

from __future__ import annotations

import argparse
import os
import statistics

import harness
from noise_study import (
    Runner,
    Store,
    check_distinct,
    check_rhos,
    choose_rho,
    cost_ratios,
    example_runner,
    gap_text,
    image_runner,
    mean_sd,
    method_name,
    number_text,
    paired_gap,
    parse_method,
    run_key,
)

METHODS = ("base", "sam", "xsam")
BASE = {"text": "AdamW", "digits": "AdamW", "fashion_mnist": "SGD"}
DEFAULTS = {  # per task: rho grid, training examples, epochs
    "text": dict(rhos=[0.02, 0.05, 0.1], train_examples=2000, num_train_epochs=5),
    "fashion_mnist": dict(rhos=[0.05, 0.1, 0.2], train_examples=2000, num_train_epochs=100),
}


def summary_rows(runs: dict[str, dict], noise_levels: list[float], seeds: list[int],
                 chosen: dict[float, dict[str, float]], methods=METHODS,
                 cost: dict[str, float] | None = None) -> list[dict]:
    """One row per noise level and method with runs on ``seeds``: accuracies over the seeds, the paired gaps (a
    cheap mode, e.g. xsam_n4_reuse, runs at its family's rho and is also compared with its family's full method),
    and ``cost`` (per step over the base optimizer's, `cost_ratios`) where given."""
    rows = []
    for noise in noise_levels:
        rho = {"base": None, **chosen.get(noise, {})}
        test = {}
        for method in methods:
            family, every, _ = parse_method(method)
            if family not in rho:
                continue
            mine = {s: runs[k] for s in seeds if (k := run_key(method, noise, rho[family], s)) in runs}
            if not mine:
                continue
            test[method] = {s: r["test_acc"] for s, r in mine.items()}
            alphas = [r["mean_alpha"] for r in mine.values() if r["mean_alpha"] is not None]
            psis = [r["mean_psi"] for r in mine.values() if r["mean_psi"] is not None]
            rows.append(dict(
                noise=noise, method=method, rho=rho[family], seeds=len(mine),
                test=mean_sd(list(test[method].values())),
                val=statistics.fmean(r["val_acc"] for r in mine.values()),
                train=statistics.fmean(r["train_acc"] for r in mine.values()),
                vs_base=paired_gap(test[method], test["base"]) if method != "base" and "base" in test else None,
                vs_sam=paired_gap(test[method], test["sam"]) if method == "xsam" and "sam" in test else None,
                vs_full=paired_gap(test[method], test[family]) if every > 1 and family in test else None,
                mean_alpha=statistics.fmean(alphas) if alphas else None,
                mean_psi=statistics.fmean(psis) if psis else None,
                seconds=statistics.median(r["seconds"] for r in mine.values()),
                cost=None if cost is None else cost.get(method)))
    return rows


# ---------------------------------------------------------------------- tables
def results_table(rows: list[dict], base: str) -> str:
    header = ["noise", "method", "seeds", "test accuracy (mean ± sd)", f"gap to {base} (paired ± SE)",
              "gap to SAM (paired ± SE)", "train acc, noisy labels", "validation", "mean alpha*", "mean psi (rad)",
              "train s (median)"]
    cells = [[f"{r['noise']:g}", method_name(r["method"], base, r["rho"]), str(r["seeds"]),
              f"{r['test'][0]:.4f} ± {r['test'][1]:.4f}", gap_text(r["vs_base"]), gap_text(r["vs_sam"]),
              f"{r['train']:.4f}", f"{r['val']:.4f}", number_text(r["mean_alpha"], ".2f"),
              number_text(r["mean_psi"], ".3f"), f"{r['seconds']:.0f}"]
             for r in rows]
    if any(r.get("vs_full") for r in rows):  # a cheap mode was run: its gap to its family's full method
        header.insert(6, "gap to its full method (paired ± SE)")
        for row, r in zip(cells, rows):
            row.insert(6, gap_text(r.get("vs_full")))
    if any(r.get("cost") is not None for r in rows):  # --cost: the quiet cost run's ratio, not these runs' seconds
        header[-1] = f"cost per step vs {base} (cost.py)"
        for row, r in zip(cells, rows):
            row[-1] = "-" if r["cost"] is None else f"{r['cost']:.2f}x"
    return harness.markdown_table(header, cells)


def rho_table(runs: dict[str, dict], noise_levels, rhos, seed: int, chosen) -> str:
    header = ["noise", "rho", "SAM val", "SAM test", "XSAM val", "XSAM test", "XSAM mean alpha*", "XSAM mean psi"]
    cells = []
    for noise in noise_levels:
        for rho in rhos:
            sam, xsam = (runs.get(run_key(m, noise, rho, seed)) for m in ("sam", "xsam"))
            if sam is None or xsam is None:
                continue
            star = {m: "*" if chosen.get(noise, {}).get(m) == rho else "" for m in ("sam", "xsam")}
            cells.append([f"{noise:g}", f"{rho:g}", f"{sam['val_acc']:.4f}{star['sam']}", f"{sam['test_acc']:.4f}",
                          f"{xsam['val_acc']:.4f}{star['xsam']}", f"{xsam['test_acc']:.4f}",
                          number_text(xsam["mean_alpha"], ".2f"), number_text(xsam["mean_psi"], ".3f")])
    return (f"rho chosen on the clean validation split, seed {seed} (* = best validation accuracy, used below)\n"
            + harness.markdown_table(header, cells))


def plot(rows: list[dict], path: str, title: str, base: str) -> None:
    """Test accuracy (mean +- sd) and the accuracy on the noisy training labels against the noise level, one line
    per method; the fraction of clean training labels (1 - noise) as a dashed line: a method above it memorises.
    At one noise level, one point and one bar per method instead (`plot_one_level`)."""
    if len({r["noise"] for r in rows}) == 1:
        return plot_one_level(rows, path, title, base)
    fig, (test_ax, train_ax) = harness.pyplot().subplots(1, 2, figsize=(10, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):  # in the order run
        marker = {"base": "^", "sam": "o", "xsam": "s"}[parse_method(method)[0]]
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["noise"])
        noise = [r["noise"] for r in mine]
        label = method_name(method, base)
        test_ax.errorbar(noise, [r["test"][0] for r in mine], yerr=[r["test"][1] for r in mine], marker=marker,
                         capsize=3, label=label)
        train_ax.plot(noise, [r["train"] for r in mine], marker=marker, label=label)
    levels = sorted({r["noise"] for r in rows})
    train_ax.plot(levels, [1 - n for n in levels], "k--", lw=1, label="1 - noise (the clean labels)")
    test_ax.set_ylabel("test accuracy, clean labels (mean +- sd)")
    train_ax.set_ylabel("training accuracy on the noisy labels")
    for ax in (test_ax, train_ax):
        ax.set_xlabel("label noise (fraction of training labels flipped)")
        ax.set_xticks(levels)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    harness.save_figure(fig, path)


def plot_one_level(rows: list[dict], path: str, title: str, base: str) -> None:
    """One noise level: each method's test accuracy (mean +- sd) and its fit of the noisy labels (a bar), side by
    side, named with its rho and, where known, its cost per step (x the base optimizer's)."""
    fig, (test_ax, train_ax) = harness.pyplot().subplots(1, 2, figsize=(11, 4.2))
    names = [method_name(r["method"], base, r["rho"]).replace(" rho ", "\nrho ")
             + ("" if r.get("cost") is None else f"\n{r['cost']:.2f}x") for r in rows]
    for i, r in enumerate(rows):
        test_ax.errorbar([i], [r["test"][0]], yerr=[r["test"][1]], marker="o", capsize=3)
    train_ax.bar(range(len(rows)), [r["train"] for r in rows])
    train_ax.axhline(1 - rows[0]["noise"], color="k", ls="--", lw=1, label="1 - noise (the clean labels)")
    train_ax.legend(fontsize=8)
    test_ax.set_ylabel("test accuracy, clean labels (mean +- sd)")
    train_ax.set_ylabel("training accuracy on the noisy labels")
    for ax in (test_ax, train_ax):
        ax.set_xticks(range(len(rows)), names, fontsize=7)
    fig.suptitle(f"{title}, {rows[0]['noise']:g} label noise")
    harness.save_figure(fig, path)


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(DEFAULTS), required=True)
    parser.add_argument("--noise_levels", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--label_noise_seed", type=int, default=0, help="which examples are flipped, and to what")
    parser.add_argument("--rhos", type=float, nargs="+", default=None,
                        help="rho grid for SAM and XSAM (default: 0.02 0.05 0.1 text, 0.05 0.1 0.2 fashion_mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="base, sam, xsam, or a cheap mode: <sam|xsam>_n<N>[_reuse], e.g. xsam_n4_reuse "
                             "(--xsam_sharpness_every 4 --xsam_reuse), at its family's rho")
    parser.add_argument("--train_examples", type=int, default=None, help="training subset (default: 2000)")
    parser.add_argument("--num_train_epochs", type=int, default=None,
                        help="epochs (default: 5 text, 100 fashion_mnist)")
    parser.add_argument("--val_examples", type=int, default=2000,
                        help="fashion_mnist: clean validation images held out of the training pool")
    parser.add_argument("--data_dir", default=None, help="fashion_mnist: the idx .gz files (default: Debian's)")
    parser.add_argument("--threads", type=int, default=1, help="fashion_mnist: torch CPU threads")
    parser.add_argument("--json", required=True, help="results file; existing runs in it are reused")
    parser.add_argument("--merge", nargs="+", default=[],
                        help="more results files of the same study (e.g. one noise level per process) whose runs "
                             "are copied into --json first")
    parser.add_argument("--plot", default=None, help="PNG path (default: --json with .png)")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the tables of the runs in --json (and --merge) as they are, e.g. "
                             "methods run over fewer seeds than others, or a study still running")
    parser.add_argument("--cost", default=None,
                        help="benchmarks/cost.py's JSON for the task's model: its quiet ratios to the base optimizer "
                             "replace the runs' own seconds in the table")
    parser.add_argument("extra", nargs=argparse.REMAINDER,
                        help="after --: more flags for the example (text) or image_task (fashion_mnist)")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    for name, value in DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    harness.require_positive(args, "train_examples", "num_train_epochs", "val_examples", "threads")
    check_distinct(args, "noise_levels", "rhos", "seeds", "methods")
    for method in args.methods:
        parse_method(method)
    check_rhos(args.rhos)
    check_label_noise = harness.example("_common").check_label_noise
    for noise in args.noise_levels:
        check_label_noise(noise, "--noise_levels")
    return args


def runner_for(args, noise: float) -> Runner:
    common = ["--label_noise", str(noise), "--label_noise_seed", str(args.label_noise_seed)]
    if args.task == "text":
        return example_runner("text", ["--max_steps", "-1", "--num_train_epochs", str(args.num_train_epochs),
                                       "--max_train_samples", str(args.train_examples), *common, *args.extra])
    return image_runner([
        *(["--data_dir", args.data_dir] if args.data_dir else []), "--train_size", str(args.train_examples),
        "--val_size", str(args.val_examples), "--epochs", str(args.num_train_epochs), "--threads", str(args.threads),
        *common, *args.extra])


def study_noise_level(args, store: Store, noise: float) -> dict[str, float]:
    """One noise level: SAM's and XSAM's rho chosen on validation (first seed), then every method over the seeds.
    Returns the chosen rhos. With ``--report`` nothing is trained: a missing run is left out (a family without any
    run of its rho grid gets no rho, and none of its runs)."""
    print(f"label noise {noise:g}", flush=True)
    runner = None

    def run(method, rho, seed):
        nonlocal runner
        key = run_key(method, noise, rho, seed)
        if key not in store.data["runs"]:
            if args.report:
                return None
            runner = runner or runner_for(args, noise)  # loads the data only when a run is missing
        return store.get(key, lambda: runner(method, rho, seed),
                         f"noise {noise:g} {method_name(method, BASE[args.task], rho)} seed {seed}")

    families = {parse_method(m)[0] for m in args.methods}
    chosen = {}
    for family in ("sam", "xsam"):
        if family in families:
            val = {rho: r["val_acc"] for rho in args.rhos if (r := run(family, rho, args.seeds[0])) is not None}
            if val:
                chosen[family] = choose_rho(val)
    for seed in args.seeds:
        for method in args.methods:
            family = parse_method(method)[0]
            if family == "base" or family in chosen:
                run(method, chosen.get(family), seed)
    return chosen


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = {k: getattr(args, k) for k in ("task", "label_noise_seed", "train_examples", "num_train_epochs", "extra")}
    if args.task == "fashion_mnist":
        config["val_examples"] = args.val_examples
    store = Store(args.json, config)
    store.merge(args.merge)
    runs, first, base = store.data["runs"], args.seeds[0], BASE[args.task]
    chosen = {noise: study_noise_level(args, store, noise) for noise in args.noise_levels}
    print(rho_table(runs, args.noise_levels, args.rhos, first, chosen))
    rows = summary_rows(runs, args.noise_levels, args.seeds, chosen, args.methods, cost_ratios(args.cost))
    print(f"test accuracy over seeds {', '.join(map(str, args.seeds))} (validation and test labels clean)")
    print(results_table(rows, base))
    path = args.plot or os.path.splitext(args.json)[0] + ".png"
    plot(rows, path, f"{args.task}: {args.train_examples} training examples x {args.num_train_epochs} epochs", base)
    print(f"plot: {path}")
    store.data["summary"] = {"seeds": args.seeds, "rhos": args.rhos, "chosen_rho": {f"{n:g}": c for n, c in
                                                                                    chosen.items()}, "rows": rows}
    harness.write_json(args.json, store.data)
    return store.data["summary"]


if __name__ == "__main__":
    main()
