"""The paper's Figure 1 for the image regime: the loss on the (v0, v1) plane around theta_0 for a CNN trained by
benchmarks/paper_regime.py, beside the loss along XSAM's probe arc.

    python benchmarks/paper_plane.py --checkpoint benchmarks/results/paper_regime_ckpt_mid.pt --rho 0.1 \\
        --out benchmarks/results/paper_regime_plane.png

Loads the checkpoint into paper_regime's CNN (same --width, same fixed training subset), then scans the clean
(un-augmented) training batches in a fixed order: on each, one XSAM step's geometry through the library (g0 at
theta_0, one ascent of length rho, g1 there, the probe over alpha in {0, 0.1, ..., 2} at rho_max = 2 rho) until
a batch gives |alpha* - 1| >= --min_gap (else the batch with the largest gap). On that batch it evaluates the loss
on a grid over theta_0 + a u + b w, u = v0 (the ascent direction, g0's with k = 1) and w the unit vector of v1's
part orthogonal to v0. Left panel: the plane, the rho and rho_max circles, g0, SAM (v1) and XSAM (v(alpha*))
as arrows of length rho_max. Right panel: the probe's losses against alpha, SAM's alpha = 1 and XSAM's alpha*
marked. BatchNorm normalises with the batch's statistics (training mode), as in the optimizer's passes; no running
statistic is ever used, so the picture depends only on the weights and the batch.
"""

from __future__ import annotations

import argparse
import math
import os

import harness
import image_task  # the model and the data loader of the run that wrote the checkpoint
import torch
from torch.nn import functional as F

from hf_xsam import XSAM


def flat_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def probe_batch(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float) -> dict:
    """One XSAM step's geometry and probe on (x, y), through the library; the weights end at theta_0."""
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=rho, rho_max=2 * rho, lr=0.0, probe_every=1)
    g0 = flat_grad(model, x, y)
    opt.ascent_step()
    g1 = flat_grad(model, x, y)
    with torch.no_grad():
        info = opt.set_direction(lambda: F.cross_entropy(model(x), y))
    return dict(g0=g0, g1=g1, psi=info.psi.item(), alpha=info.alpha, probe_alphas=info.probe_alphas,
                probe_losses=info.probe_losses)


@torch.no_grad()
def set_weights(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (vector_to_parameters would make them alias it)."""
    start = 0
    for p in model.parameters():
        p.copy_(flat[start:start + p.numel()].view_as(p))
        start += p.numel()


@torch.no_grad()
def loss_at(model: torch.nn.Module, theta_0: torch.Tensor, offset: torch.Tensor, x, y) -> float:
    set_weights(model, theta_0 + offset)
    loss = F.cross_entropy(model(x), y).item()
    set_weights(model, theta_0)
    return loss


def pick_batch(model, x_train, y_train, args) -> tuple[int, dict]:
    """The first batch with |alpha* - 1| >= min_gap among the first max_batches, else the one with the largest."""
    best = None
    for i in range(min(args.max_batches, len(x_train) // args.batch_size)):
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        found = probe_batch(model, x_train[sl], y_train[sl], args.rho)
        print(f"batch {i}: psi={found['psi']:.3f} rad, alpha*={found['alpha']:.1f}")
        if best is None or abs(found["alpha"] - 1) > abs(best[1]["alpha"] - 1):
            best = (i, found)
        if abs(found["alpha"] - 1) >= args.min_gap:
            return i, found
    return best


def draw(grid: torch.Tensor, axis: torch.Tensor, found: dict, args, batch: int) -> None:
    psi, alpha, rho, rho_max = found["psi"], found["alpha"], args.rho, 2 * args.rho
    fig, (ax, arc) = harness.pyplot().subplots(1, 2, figsize=(12, 5.2), gridspec_kw=dict(width_ratios=[1.15, 1]))
    arrows = (("g0 = v0 (alpha=0)", 0.0, "tab:orange"), ("SAM: v1 (alpha=1)", psi, "tab:red"),
              (f"XSAM: v(alpha*={alpha:.1f})", alpha * psi, "magenta"))
    harness.draw_plane(fig, ax, axis, grid, [(rho, "-", f"rho = {rho:g}"), (rho_max, "--", f"rho_max = {rho_max:g}")],
                       arrows, rho_max, colorbar="loss on the batch", arrowstyle="-|>", lw=2.2)
    ax.set_title(f"loss on the (v0, v1) plane; rho={rho:g}, psi={psi:.2f} rad")
    ax.legend(loc="lower left", fontsize=8, framealpha=0.7)

    arc.plot(found["probe_alphas"], found["probe_losses"], "k.-", label="loss at theta_0 + rho_max v(alpha)")
    arc.axvline(0.0, color="tab:orange", ls=":", label="g0 / v0 (alpha=0)")
    arc.axvline(1.0, color="tab:red", ls="--", label="SAM (alpha=1)")
    arc.axvline(alpha, color="magenta", lw=2, label=f"XSAM alpha*={alpha:.1f} (the argmax)")
    arc.set_xlabel("alpha (angle from v0 in units of psi)")
    arc.set_ylabel("loss on the batch")
    arc.set_title(f"the probe arc at rho_max={rho_max:g} (batch {batch})")
    arc.legend(fontsize=8)
    harness.save_figure(fig, args.out)
    print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a state_dict saved by paper_regime.py --checkpoint")
    p.add_argument("--data_dir", default=None, help=f"default: {image_task.FASHION_DIR}")
    p.add_argument("--width", type=int, default=12, help="the run's --width")
    p.add_argument("--train_size", type=int, default=600, help="the run's --train_size (the same fixed subset)")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--min_gap", type=float, default=0.3, help="take the first batch with |alpha* - 1| >= this")
    p.add_argument("--max_batches", type=int, default=12, help="batches scanned at most")
    p.add_argument("--resolution", type=int, default=31, help="grid points per axis")
    p.add_argument("--extent", type=float, default=None, help="half-width of the plane (default 1.5 rho_max)")
    p.add_argument("--out", default="benchmarks/results/paper_regime_plane.png")
    args = p.parse_args(argv)
    for flag in ("rho", "batch_size", "resolution", "max_batches"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag}={getattr(args, flag)} is invalid: must be > 0")
    if not os.path.exists(args.checkpoint):
        raise SystemExit(f"--checkpoint={args.checkpoint!r} does not exist: run paper_regime.py --checkpoint first")
    torch.set_num_threads(1)

    x_train, y_train, _, _ = image_task.load_data("fashion_mnist", args.data_dir)
    if args.train_size:  # the same subset as the run (paper_regime.main picks it with this seed)
        pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1234))[: args.train_size]
        x_train, y_train = x_train[pick], y_train[pick]
    model = image_task.build_model("cnn", 1, 10, args.width)
    model.load_state_dict(torch.load(args.checkpoint))
    model.train()  # batch statistics, as in every pass of the optimizer

    batch, found = pick_batch(model, x_train, y_train, args)
    sl = slice(batch * args.batch_size, (batch + 1) * args.batch_size)
    x, y = x_train[sl], y_train[sl]
    theta_0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    u, w = harness.plane_basis(found["g0"], found["g1"])
    extent = args.extent or 1.5 * 2 * args.rho
    axis = torch.linspace(-extent, extent, args.resolution)
    grid = torch.tensor([[loss_at(model, theta_0, a * u + b * w, x, y) for a in axis] for b in axis])
    print(f"batch {batch}: psi={found['psi']:.3f} rad, alpha*={found['alpha']:.1f}, "
          f"loss(theta_0)={loss_at(model, theta_0, torch.zeros_like(u), x, y):.4f}")
    for name, a in (("g0", 0.0), ("SAM", 1.0), ("XSAM", found["alpha"])):
        angle = a * found["psi"]
        offset = 2 * args.rho * (math.cos(angle) * u + math.sin(angle) * w)
        print(f"{name:<5} alpha={a:.1f}  loss at rho_max: {loss_at(model, theta_0, offset, x, y):.4f}")
    draw(grid, axis, found, args, batch)


if __name__ == "__main__":
    main()
