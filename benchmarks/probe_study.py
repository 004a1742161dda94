"""The alpha probe under the microscope: the fast search against the grid, the angle space against the alpha
range, and how much one batch's noise moves alpha*.

    python benchmarks/probe_study.py --task digits --rhos 0.05 0.5 --checkpoints 1 100 200 300 --batches 16 \
        --json benchmarks/results/probe_study_digits.json

Trains an example (`--task text`: MiniLM on the tweets; `digits`: the small ViT) with its default XSAM settings
and, at each checkpoint step, freezes the run (weights, gradients and random generators are restored after) to
probe at every --rhos value. The plane (v0, v1) comes from the first of --batches training batches, as in a real
probe; at every alpha-grid point the loss is taken on all the batches (each with its own fixed dropout masks),
and at every point of the angle space on the first batch. From those losses, with no further forward passes:

* fast vs grid: on each single batch, the alpha the fast search (`hf_xsam.probe.fast_search`, replayed on the
  recorded losses: it evaluates a subset of the same points) picks against the grid's argmax;
* angle vs alpha: the largest probe loss each space finds, and where;
* steadiness: alpha* from the mean loss over K batches, for K = 1, 2, 4, ... over many subsets of the batches:
  its spread, and its distance to alpha* of all batches together.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics

import harness
import torch
from transformers import TrainerCallback

from hf_xsam import XSAM
from hf_xsam.probe import fast_search
from hf_xsam.replay import RNGState


class ProbeStudy(TrainerCallback):
    """At the checkpoint steps, probes the live model and records every loss; leaves the run as it was."""

    def __init__(self, checkpoints, rhos, n_batches, batch_size, seed):
        self.checkpoints, self.rhos, self.n_batches = set(checkpoints), rhos, n_batches
        self.batch_size, self.seed = batch_size, seed
        self.rows: list[dict] = []

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step not in self.checkpoints:
            return
        device = next(model.parameters()).device
        rng = RNGState.capture({device})
        grads = {p: p.grad for p in model.parameters()}
        batches = self._batches(train_dataloader, state.global_step, device)
        for rho in self.rhos:
            row = {"step": state.global_step, "rho": rho}
            row.update(probe(model, batches, rho, "alpha", all_batches=True))
            angle = probe(model, batches, rho, "angle", all_batches=False)
            row.update(angle_alphas=angle["alphas"], angle_losses=[r[0] for r in angle["losses"]])
            self.rows.append(row)
            print(summary_line(row), flush=True)
        for p, g in grads.items():
            p.grad = g
        rng.restore()

    def _batches(self, loader, step, device):
        dataset, collate = loader.dataset, loader.collate_fn
        picker = random.Random(self.seed * 100003 + step)
        batches = []
        for _ in range(self.n_batches):
            examples = [dataset[i] for i in picker.sample(range(len(dataset)), self.batch_size)]
            batch = collate(examples)
            batches.append({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return batches


def probe(model, batches, rho, space, all_batches):
    """One probe of hf_xsam.XSAM at rho (plane from batches[0]); the losses of every point on every batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = XSAM(params, torch.optim.SGD, rho=rho, probe_every=1, probe_space=space, lr=0.0)

    def loss_on(b):
        torch.manual_seed(10_000 + b)  # batch b's dropout masks, the same at every point
        return model(**batches[b]).loss

    opt.zero_grad(set_to_none=True)
    loss_on(0).backward()
    opt.ascent_step()
    opt.zero_grad(set_to_none=True)
    loss_on(0).backward()
    losses = []

    def probe_fn():
        with torch.no_grad():
            row = [loss_on(b).item() for b in (range(len(batches)) if all_batches else [0])]
        losses.append(row)
        return torch.tensor(row[0])

    info = opt.set_direction(probe_fn)  # the weights are back at theta_0, bitwise
    opt.zero_grad(set_to_none=True)
    return {"psi": info.psi.item(), "alphas": info.probe_alphas, "losses": losses}


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def fast_pick(values):
    found = fast_search(len(values), lambda idx: [values[i] for i in idx])
    return max(sorted(found), key=lambda i: (found[i], -i)), len(found)


def summary_line(row):
    first = [r[0] for r in row["losses"]]
    a, b = argmax(first), argmax(row["angle_losses"])
    return (f"step {row['step']:>4} rho {row['rho']:g}: psi {row['psi']:.3f}  alpha* {row['alphas'][a]:.1f} "
            f"(loss {first[a]:.4f})  angle* {math.degrees(row['angle_alphas'][b] * row['psi']):.1f} deg = alpha "
            f"{row['angle_alphas'][b]:.2f} (loss {row['angle_losses'][b]:.4f})")


# ---------------------------------------------------------------------- analysis of the recorded losses
def fast_vs_grid(rows):
    """Per rho: over every (checkpoint, batch) probe, how often the fast search picks the grid's alpha*."""
    out = {}
    for rho in sorted({r["rho"] for r in rows}):
        picks = []
        for r in (r for r in rows if r["rho"] == rho):
            for b in range(len(r["losses"][0])):
                values = [point[b] for point in r["losses"]]
                grid, (fast, forwards) = argmax(values), fast_pick(values)
                picks.append((grid, fast, forwards, values[fast] / values[grid]))
        out[rho] = {
            "probes": len(picks),
            "exact": sum(g == f for g, f, _, _ in picks) / len(picks),
            "within_one_point": sum(abs(g - f) <= 1 for g, f, _, _ in picks) / len(picks),
            "max_forwards": max(n for _, _, n, _ in picks),
            "mean_forwards": statistics.fmean(n for _, _, n, _ in picks),
            "worst_loss_ratio": min(q for _, _, _, q in picks),
        }
    return out


def steadiness(rows, sizes, samples=200, seed=0):
    """Per rho and K: the spread of alpha* from K-batch mean losses, and its distance to all batches' alpha*."""
    picker = random.Random(seed)
    out = {}
    for rho in sorted({r["rho"] for r in rows}):
        sel = [r for r in rows if r["rho"] == rho]
        out[rho] = {}
        for k in sizes:
            spreads, gaps = [], []
            for r in sel:
                n, alphas = len(r["losses"][0]), r["alphas"]
                everything = alphas[argmax([statistics.fmean(p) for p in r["losses"]])]
                subsets = list(itertools.combinations(range(n), k))
                if len(subsets) > samples:
                    subsets = picker.sample(subsets, samples)
                chosen = [alphas[argmax([statistics.fmean(p[i] for i in s) for p in r["losses"]])] for s in subsets]
                spreads.append(statistics.pstdev(chosen))
                gaps.append(statistics.fmean(abs(a - everything) for a in chosen))
            out[rho][k] = {"std": statistics.fmean(spreads), "mean_abs_gap": statistics.fmean(gaps)}
    return out


def angle_vs_alpha(rows):
    table = []
    for r in rows:
        first = [p[0] for p in r["losses"]]
        a, b = argmax(first), argmax(r["angle_losses"])
        table.append({"step": r["step"], "rho": r["rho"], "psi": r["psi"], "alpha": r["alphas"][a],
                      "alpha_edge": a in (0, len(first) - 1), "alpha_loss": first[a],
                      "angle_deg": math.degrees(r["angle_alphas"][b] * r["psi"]), "angle_alpha": r["angle_alphas"][b],
                      "angle_loss": r["angle_losses"][b], "gain": r["angle_losses"][b] / first[a] - 1})
    return table


def report(rows, sizes) -> tuple[str, dict]:
    agree, steady, angles = fast_vs_grid(rows), steadiness(rows, sizes), angle_vs_alpha(rows)
    fast = [[f"{rho:g}", f"{a['probes']}", f"{a['exact']:.1%}", f"{a['within_one_point']:.1%}",
             f"{a['mean_forwards']:.1f}, {a['max_forwards']}", f"{a['worst_loss_ratio']:.5f}"]
            for rho, a in agree.items()]
    angle = [[f"{t['step']}", f"{t['rho']:g}", f"{t['psi']:.3f}",
              f"{t['alpha']:.1f}{' (edge)' if t['alpha_edge'] else ''}", f"{t['alpha_loss']:.4f}",
              f"{t['angle_deg']:.1f} = {t['angle_alpha']:.2f}", f"{t['angle_loss']:.4f}",
              f"{t['gain']:+.2%}"] for t in angles]
    steady_cells = [[f"{rho:g}", *(f"{v['std']:.3f}, {v['mean_abs_gap']:.3f}" for v in per_k.values())]
                    for rho, per_k in steady.items()]
    lines = ["fast search vs the 21-point grid, replayed on every recorded single-batch probe",
             harness.markdown_table(["rho", "probes", "same alpha*", "within one grid step", "forwards (mean, max)",
                                     "worst loss ratio"], fast),
             "", "angle space (21 angles over 0-90 deg) vs alpha range [0, 2], same plane, first batch",
             harness.markdown_table(["step", "rho", "psi", "alpha* (edge)", "its loss", "angle* (deg) = alpha",
                                     "its loss", "gain"], angle),
             "", "steadiness: alpha* from the mean probe loss over K batches (same plane)",
             harness.markdown_table(["rho", *(f"K={k}: sd, mean gap to all" for k in sizes)], steady_cells)]
    return "\n".join(lines), {"fast_vs_grid": agree, "steadiness": steady, "angle_vs_alpha": angles}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["text", "digits"], required=True)
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument("--checkpoints", type=int, nargs="+", required=True, help="optimizer steps to probe at")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for the example")
    args = parser.parse_args(argv)
    if args.batches < 2 or min(args.checkpoints) < 1:
        raise ValueError(f"--batches={args.batches} must be >= 2 and --checkpoints={args.checkpoints} >= 1")
    example = harness.example("text_classification" if args.task == "text" else "image_classification").main
    batch_size = 16 if args.task == "text" else 32
    study = ProbeStudy(args.checkpoints, args.rhos, args.batches, batch_size, args.seed)
    argv = ["--output_dir", f"/tmp/hf_xsam_probe_study_{args.task}", "--optim", "xsam", "--seed", str(args.seed),
            "--max_steps", str(max(args.checkpoints)), "--disable_tqdm", "true", "--max_eval_samples", "100",
            "--max_test_samples", "100", *[a for a in args.extra if a != "--"]]
    example(argv, callbacks=[study])
    sizes = [k for k in (1, 2, 4, 8) if k < args.batches]
    text, analysis = report(study.rows, sizes)
    print(text)
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "analysis": analysis, "rows": study.rows})
    return analysis


if __name__ == "__main__":
    main()
