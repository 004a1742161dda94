"""The paper's regime: training from scratch with SGD on images, SGD vs SAM vs XSAM at k = 1, 2, 3 ascent steps.

The paper (Chen & Zhou, ICLR 2026) claims, for image classifiers trained from scratch with SGD: (1) XSAM
generalizes better than SAM, (2) SAM degrades as the number of ascent steps k grows while XSAM does not, (3) the
probe (once per epoch, on the epoch's first batch) costs little. This script measures all three side by side on one
seed-paired grid: every method of a seed starts from the same initial weights and sees the same batches and the same
augmentation, so method gaps can be read per seed.

CPU run (what benchmarks/RESULTS.md reports; Fashion-MNIST from Debian, 45 runs, ~85 minutes on one thread of a
shared 2-core machine; the checkpoint feeds benchmarks/paper_plane.py)::

    apt-get install dataset-fashion-mnist      # idx files in /usr/share/datasets/fashion-mnist
    OMP_NUM_THREADS=1 python benchmarks/paper_regime.py --checkpoint benchmarks/results/paper_regime_ckpt \
        --out benchmarks/results/paper_regime

Sizing: 600 training images (a fixed random subset), width-12 CNN (19k weights), batch 50 (12 steps per epoch),
90 epochs (1080 steps), so the probe once per epoch runs every 12 steps and the library's default (every 200
steps) at steps 0, 200, ..., 1000. Augmentation: random crop with 2-pixel padding, no horizontal flip: in
Fashion-MNIST every sneaker and ankle boot (and 93% of sandals) faces the same way as its class mean, so a flipped
shoe never occurs at test time.

GPU recipe (the paper's CIFAR set-up; not run here: it needs the CIFAR python archive, unpacked, in --data_dir,
e.g. cifar-10-batches-py/ from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)::

    python benchmarks/paper_regime.py --dataset cifar10 --data_dir data/cifar-10-batches-py --model resnet18 \\
        --device cuda --train_size 0 --epochs 200 --batch_size 125 --lr 0.05 --weight_decay 1e-3 \\
        --flip --rhos 0.15 --ks 1 2 3 --default_ks --seeds 0 1 2 --threads 8 --out results/paper_regime_cifar10

(``--dataset cifar100 --data_dir data/cifar-100-python`` for CIFAR-100; rho_max = 2 rho = 0.3 as in the paper.)

Settings: SGD; SAM (XSAM with alpha = 1, no probe) and XSAM with the probe once per epoch on the epoch's first
batch, for every rho in --rhos and k in --ks; XSAM with the library's default schedule (a probe every
``--default_every`` = 200 optimizer steps) for k in --default_ks. Results go to <out>.jsonl (one line per run,
appended as runs finish, so an interrupted study resumes where it stopped), <out>.json (the summary), <out>.txt
(the printed table) and <out>_k.png (test accuracy against k).

Label noise (benchmarks/label_noise.py): ``--label_noise 0.2 --label_noise_seed 0`` gives 20% of the training
subset a label drawn uniformly from the other classes (the same images and labels for every method and seed); the
test set, and the clean validation set that ``--val_size N`` holds out of the rest of the training pool, stay
clean. Each record then holds ``train_acc`` on the noisy labels (memorisation) and ``val_acc``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import harness
import torch
from image_task import add_task_flags, check_task_args, prepare_data, train_one


# ---------------------------------------------------------------------- settings
def settings(rhos: list[float], ks: list[int], default_ks: list[int], default_every: int) -> list[dict]:
    """The grid, cheapest first. probe_every=None stands for once per epoch (set when the epoch length is known)."""
    grid = [dict(name="SGD", method="sgd", rho=0.0, k=0, probe_every=0)]
    for rho in rhos:
        for k in ks:
            grid.append(dict(name=f"SAM rho={rho:g} k={k}", method="sam", rho=rho, k=k, probe_every=0))
            grid.append(dict(name=f"XSAM/epoch rho={rho:g} k={k}", method="xsam", rho=rho, k=k, probe_every=None))
            if k in default_ks:
                grid.append(dict(name=f"XSAM/{default_every} rho={rho:g} k={k}", method="xsam", rho=rho, k=k,
                                 probe_every=default_every))
    return grid


# ---------------------------------------------------------------------- summary
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired_gap(runs: list[dict], a: str, b: str) -> tuple[float, float, int] | None:
    """Mean and standard error of test_acc(a) - test_acc(b) over the seeds both have (the runs are seed-paired)."""
    by = {(r["name"], r["seed"]): r["test_acc"] for r in runs}
    diffs = [by[(a, s)] - by[(b, s)] for (name, s) in by if name == a and (b, s) in by]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def summarize(runs: list[dict], grid: list[dict]) -> list[dict]:
    """One row per setting that has runs: accuracy mean +- sd over seeds, psi, alpha*, time relative to SGD."""
    sgd_seconds = {r["seed"]: r["seconds_per_epoch"] for r in runs if r["method"] == "sgd"}
    rows = []
    for setting in grid:
        mine = [r for r in runs if r["name"] == setting["name"]]
        if not mine:
            continue
        test, test_sd = _mean_sd([r["test_acc"] for r in mine])
        psis = [r["mean_psi"] for r in mine if r["mean_psi"] is not None]
        alphas = [r["mean_alpha"] for r in mine if r["mean_alpha"] is not None]
        ratios = [r["seconds_per_epoch"] / sgd_seconds[r["seed"]] for r in mine if r["seed"] in sgd_seconds]
        # the reference each row is compared with, on the same seeds: SAM against SGD, XSAM against SAM
        reference = {"sam": "SGD", "xsam": f"SAM rho={setting['rho']:g} k={setting['k']}"}.get(setting["method"])
        rows.append(dict(name=setting["name"], method=setting["method"], rho=setting["rho"], k=setting["k"],
                         probe_every=mine[0]["probe_every"], seeds=len(mine), test_acc=test, test_acc_sd=test_sd,
                         train_acc=statistics.mean(r["train_acc"] for r in mine),
                         train_acc_min=min(r["train_acc"] for r in mine),
                         train_loss=statistics.mean(r["train_loss"] for r in mine),
                         mean_psi=statistics.mean(psis) if psis else None,
                         mean_alpha=statistics.mean(alphas) if alphas else None,
                         time_vs_sgd=statistics.mean(ratios) if ratios else None,
                         reference=reference,
                         gap=_paired_gap(runs, setting["name"], reference) if reference else None))
    return rows


def format_table(rows: list[dict], runs: list[dict]) -> str:
    def opt(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"{'setting':<24}{'seeds':>6}{'test acc':>17}{'train acc':>11}{'train loss':>11}{'psi':>7}"
             f"{'alpha*':>8}{'s/epoch':>9}   gap vs reference (paired, +- SE)"]
    for r in rows:
        gap = r["gap"]
        gap_text = "" if gap is None else f"{gap[0]:+.4f} +- {gap[1]:.4f} vs {r['reference']}"
        lines.append(f"{r['name']:<24}{r['seeds']:>6}{r['test_acc']:>10.4f} +-{r['test_acc_sd']:.4f}"
                     f"{r['train_acc']:>11.4f}{r['train_loss']:>11.4f}{opt(r['mean_psi'], '.3f'):>7}"
                     f"{opt(r['mean_alpha'], '.2f'):>8}{opt(r['time_vs_sgd'], '.2f') + 'x':>9}   {gap_text}")
    # claim (2): does SAM (or XSAM) lose accuracy as k grows? paired k=max minus k=1 per rho
    names = {r["name"] for r in rows}
    for r in rows:
        if r["k"] > 1 and r["method"] in ("sam", "xsam") and r["k"] == max(x["k"] for x in rows):
            base = r["name"].replace(f"k={r['k']}", "k=1")
            gap = _paired_gap(runs, r["name"], base) if base in names else None
            if gap:
                lines.append(f"k={r['k']} minus k=1, {r['name'].split(' k=')[0]}: {gap[0]:+.4f} +- {gap[1]:.4f} "
                             f"(paired, {gap[2]} seeds)")
    return "\n".join(lines)


def plot_k(rows: list[dict], path: str) -> None:
    """Test accuracy against k: SAM and XSAM (probe once per epoch) per rho; SGD as a band."""
    fig, ax = harness.pyplot().subplots(figsize=(6.4, 4.4))
    sgd = [r for r in rows if r["method"] == "sgd"]
    if sgd:
        m, s = sgd[0]["test_acc"], sgd[0]["test_acc_sd"]
        ax.axhspan(m - s, m + s, color="grey", alpha=0.2)
        ax.axhline(m, color="grey", lw=1, label="SGD (mean +- sd)")
    rhos = sorted({r["rho"] for r in rows if r["method"] != "sgd"})
    for j, rho in enumerate(rhos):
        for method, label, marker, shift in (("sam", "SAM", "o", -0.06), ("xsam", "XSAM (probe once per epoch)", "s",
                                                                             0.06)):
            pts = [r for r in rows if r["method"] == method and r["rho"] == rho  # XSAM: the paper's schedule
                   and (method == "sam" or r["name"].startswith("XSAM/epoch"))]
            if not pts:
                continue
            ks = [r["k"] + shift + 0.02 * j for r in pts]
            ax.errorbar(ks, [r["test_acc"] for r in pts], yerr=[r["test_acc_sd"] for r in pts], marker=marker,
                        capsize=3, color=f"C{2 * j + (method == 'xsam')}", label=f"{label}, rho={rho:g}")
    ax.set_xticks(sorted({r["k"] for r in rows if r["k"] > 0}))
    ax.set_xlabel("ascent steps k")
    ax.set_ylabel("test accuracy (mean +- sd over seeds)")
    ax.legend(fontsize=8)
    harness.save_figure(fig, path)


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_flags(p)
    p.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--default_ks", type=int, nargs="*", default=[1],
                   help="k values that also run XSAM at the default schedule (--default_every); none: omit the flag's"
                        " values")
    p.add_argument("--default_every", type=int, default=200, help="the library's default probe interval (steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="*", default=None, help="run only the settings with these names (pilots)")
    p.add_argument("--checkpoint", default=None,
                   help="save the weights of the first run of the setting named by --checkpoint_setting here "
                        "(<path>_mid.pt at half the epochs, <path>_end.pt at the end), for paper_plane.py")
    p.add_argument("--checkpoint_setting", default="XSAM/epoch rho=0.1 k=1")
    p.add_argument("--out", default="benchmarks/results/paper_regime", help="output prefix")
    args = p.parse_args(argv)
    check_task_args(args)
    if args.default_every < 1:
        raise ValueError(f"--default_every={args.default_every} is invalid: must be >= 1")
    for flag in ("rhos", "ks", "seeds"):
        values = getattr(args, flag)
        if any(v <= 0 for v in values) and flag != "seeds":
            raise ValueError(f"--{flag}={values} is invalid: every value must be > 0")
    if not set(args.default_ks) <= set(args.ks):
        raise ValueError(f"--default_ks={args.default_ks} is invalid: must be a subset of --ks={args.ks}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data, val = prepare_data(args)
    x_train = data[0]
    steps_per_epoch = len(x_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    print(f"{len(x_train)} training images, {steps_per_epoch} steps/epoch, {total} steps; the default schedule "
          f"probes at steps {list(range(0, total, args.default_every))}", flush=True)

    grid = settings(args.rhos, args.ks, args.default_ks, args.default_every)
    if args.only is not None:
        grid = [s for s in grid if s["name"] in args.only]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    runs = []
    if os.path.exists(f"{args.out}.jsonl"):  # resume: keep finished runs
        with open(f"{args.out}.jsonl") as f:
            runs = [json.loads(line) for line in f if line.strip()]
    done = {(r["name"], r["seed"]) for r in runs}
    for seed in args.seeds:  # seeds outer: a partial study has whole seeds
        for setting in grid:
            if (setting["name"], seed) in done:
                continue
            wants_ckpt = args.checkpoint and setting["name"] == args.checkpoint_setting and seed == args.seeds[0]
            result = train_one(setting, seed, data, args, args.checkpoint if wants_ckpt else None, val)
            runs.append(result)
            with open(f"{args.out}.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"seed {seed} {setting['name']:<24} test {result['test_acc']:.4f} train {result['train_acc']:.4f} "
                  f"loss {result['train_loss']:.4f} {result['seconds_per_epoch']:.2f} s/epoch "
                  f"psi {result['mean_psi'] or 0:.3f} alpha {result['mean_alpha'] or 1:.2f}", flush=True)

    rows = summarize([r for r in runs if r["seed"] in args.seeds], grid)
    table = format_table(rows, [r for r in runs if r["seed"] in args.seeds])
    header = " ".join(["python benchmarks/paper_regime.py"] + (sys.argv[1:] if argv is None else argv))
    print(table)
    with open(f"{args.out}.txt", "w") as f:
        f.write(f"{header}\n{steps_per_epoch} steps/epoch x {args.epochs} epochs = {total} steps\n{table}\n")
    harness.write_json(f"{args.out}.json", dict(args=vars(args), steps_per_epoch=steps_per_epoch, rows=rows))
    plot_k(rows, f"{args.out}_k.png")


if __name__ == "__main__":
    main()
