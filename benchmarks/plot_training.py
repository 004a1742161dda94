"""Plot alpha, psi and the losses over training from a run's trainer_state.json (written by XSAMTrainer).

    python benchmarks/plot_training.py outputs/text/trainer_state.json --out training.png

Top: the reported loss and the loss at the ascent point (their gap is the sharpness SAM sees). Middle: psi, the
angle between v0 and v1 (XSAM's direction departs from SAM's only when psi is large). Bottom: alpha, with the
probe points marked.
"""

from __future__ import annotations

import argparse
import json

import harness


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in log_history if key in h and "xsam/probe_losses" not in h]
    return [s for s, _ in points], [v for _, v in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trainer_state", help="path to trainer_state.json")
    parser.add_argument("--out", default="training.png")
    args = parser.parse_args()

    with open(args.trainer_state) as f:
        history = json.load(f)["log_history"]
    probes = [h for h in history if "xsam/probe_losses" in h]
    if not any("xsam/alpha" in h for h in history):
        raise ValueError(f"{args.trainer_state} has no xsam/* entries: was it trained with XSAMTrainer --optim xsam?")

    fig, (ax_loss, ax_psi, ax_alpha) = harness.pyplot().subplots(3, 1, figsize=(7, 7), sharex=True)
    for key, label in (("loss", "loss at theta_0"), ("xsam/ascent_loss", "loss at the ascent point")):
        ax_loss.plot(*series(history, key), label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_psi.plot(*series(history, "xsam/psi"), color="tab:green")
    ax_psi.set_ylabel("psi (rad)")
    ax_alpha.plot(*series(history, "xsam/alpha"), color="tab:purple", drawstyle="steps-post", label="alpha in use")
    ax_alpha.scatter([p["step"] for p in probes], [p["xsam/alpha"] for p in probes], color="tab:red", zorder=3,
                     label="probe result")
    ax_alpha.set_ylabel("alpha")
    ax_alpha.set_xlabel("optimizer step")
    ax_alpha.legend()
    harness.save_figure(fig, args.out)
    print(f"wrote {args.out} ({len(probes)} probes)")


if __name__ == "__main__":
    main()
