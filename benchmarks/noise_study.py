"""What the noisy-label and rho studies share (benchmarks/label_noise.py, rho_sensitivity.py, cheap_sharpness.py):
the store of runs, the runners (an example as a subprocess, or the image task in this process), the methods and
their names, and the statistics of paired seeds.

A method is "base", "sam" or "xsam", or one of the cheap modes ``<sam|xsam>_n<N>`` (``--xsam_sharpness_every N``)
and ``<sam|xsam>_n<N>_reuse`` (with ``--xsam_reuse``): see `parse_method`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
from collections.abc import Callable

import harness

Runner = Callable[[str, float | None, int], dict]  # run(method, rho, seed) -> record
_CHEAP = re.compile(r"(sam|xsam)_n([1-9][0-9]*)(_reuse)?")


def parse_method(method: str) -> tuple[str, int, bool]:
    """(family, sharpness_every, reuse): ("xsam", 1, False) for "xsam", ("sam", 4, True) for "sam_n4_reuse"."""
    if method in ("base", "sam", "xsam"):
        return method, 1, False
    match = _CHEAP.fullmatch(method)
    if match is None or int(match[2]) < 2:
        raise ValueError(f"method={method!r} is invalid: must be base, sam, xsam, or <sam|xsam>_n<N>[_reuse] "
                         "with N >= 2 (e.g. xsam_n4_reuse)")
    return match[1], int(match[2]), match[3] is not None


# ---------------------------------------------------------------------- runs
class Store:
    """The runs so far, by key, in a JSON file saved after every run; ``config`` must match the file's."""

    def __init__(self, path: str, config: dict):
        self.path = path
        self.data = {"config": config, "runs": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("config") != config:
                raise ValueError(f"--json={path!r} holds runs of {saved.get('config')}, not of {config}: "
                                 "name another file")
            self.data = saved

    def merge(self, paths: list[str]) -> None:
        """Add the runs of other results files of the same ``config`` (a study split over processes, e.g. one noise
        level each) that this one lacks."""
        for path in paths:
            with open(path, encoding="utf-8") as f:
                other = json.load(f)
            if other.get("config") != self.data["config"]:
                raise ValueError(f"--merge={path!r} holds runs of {other.get('config')}, not of "
                                 f"{self.data['config']}: only runs of the same study merge")
            for key, record in other["runs"].items():
                self.data["runs"].setdefault(key, record)
        if paths:
            harness.write_json(self.path, self.data)

    def get(self, key: str, make: Callable[[], dict], describe: str) -> dict:
        """The run saved under ``key``, or ``make()``'s, saved at once."""
        if key not in self.data["runs"]:
            record = make()
            self.data["runs"][key] = record
            harness.write_json(self.path, self.data)
            fit = "" if record["train_acc"] is None else f" train (labels trained on) {record['train_acc']:.4f}"
            print(f"  {describe}: val {record['val_acc']:.4f} test {record['test_acc']:.4f}{fit} "
                  f"({record['seconds']:.0f} s)", flush=True)
        return self.data["runs"][key]


def run_key(method: str, noise: float, rho: float | None, seed: int) -> str:
    return f"{method}|{noise:g}|{'-' if rho is None else f'{rho:g}'}|{seed}"


def example_runner(task: str, flags: list[str], train_accuracy: bool = True, launcher: tuple[str, ...] = ()) -> Runner:
    """run(method, rho, seed) for an example (`compare.run`, a subprocess, started through ``launcher`` when given):
    its record, in this script's fields (``train_acc``, on the labels trained on, is None unless ``train_accuracy``:
    it costs a pass over the split)."""
    from compare import KEEP
    from compare import run as run_example

    from hf_xsam.training_args import flag_default

    # the base run takes the optimizer SAM and XSAM wrap (the Trainer's default), so the gaps compare like with like
    optim = {"base": flag_default("base_optim"), "sam": "sam", "xsam": "xsam"}

    def run(method: str, rho: float | None, seed: int) -> dict:
        family, every, reuse = parse_method(method)
        rho_flags = [] if rho is None else ["--xsam_rho", str(rho)]
        cheap = [] if every == 1 else ["--xsam_sharpness_every", str(every), "--xsam_reuse", str(reuse)]
        fit = ("train_accuracy",) if train_accuracy else ()
        result = run_example(task, ["--optim", optim[family], *rho_flags, *cheap, "--train_accuracy",
                                    str(train_accuracy), *flags], seed, keep=(*KEEP, *fit),
                             launcher=launcher)
        alphas = result["probe_alphas"]
        return dict(val_acc=result["eval_accuracy"], test_acc=result["test_accuracy"],
                    train_acc=result.get("train_accuracy"), mean_alpha=statistics.fmean(alphas) if alphas else None,
                    mean_psi=result["mean_psi"], mean_correction=result["mean_correction"],
                    seconds=result["train_runtime_s"], steps=result["train_steps"])

    return run


def image_runner(argv: list[str]) -> Runner:
    """run(method, rho, seed) for benchmarks/image_task.py's model (in this process): SGD, SAM or XSAM (probe once
    per epoch), k = 1, in any cheap mode of `parse_method`, on the data of the task flags ``argv`` (loaded once)."""
    import torch
    from image_task import add_task_flags, check_task_args, prepare_data, train_one

    parser = argparse.ArgumentParser()
    add_task_flags(parser)
    args = parser.parse_args(argv)
    check_task_args(args)
    torch.set_num_threads(args.threads)
    data, val = prepare_data(args)

    def run(method: str, rho: float | None, seed: int) -> dict:
        family, every, reuse = parse_method(method)
        setting = dict(name=method, method="sgd" if family == "base" else family, rho=rho or 0.0,
                       k=0 if family == "base" else 1, probe_every=None if family == "xsam" else 0,
                       sharpness_every=every, reuse=reuse)
        r = train_one(setting, seed, data, args, val=val)
        return dict(val_acc=r["val_acc"], test_acc=r["test_acc"], train_acc=r["train_acc"],
                    mean_alpha=r["mean_alpha"], mean_psi=r["mean_psi"], mean_correction=r["mean_correction"],
                    seconds=r["seconds_per_epoch"] * args.epochs,
                    seconds_per_epoch=r["seconds_per_epoch"], steps=len(data[0]) // args.batch_size * args.epochs)

    return run


# ---------------------------------------------------------------------- statistics
def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_gap(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int] | None:
    """Mean and standard error (sd / sqrt(n); nan for one pair) of a[seed] - b[seed] over the seeds both have."""
    diffs = [a[s] - b[s] for s in a if s in b]
    if not diffs:
        return None
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), se, len(diffs)


def choose_rho(val_by_rho: dict[float, float]) -> float:
    """The rho of the best validation accuracy (the smaller rho on a tie)."""
    return max(val_by_rho, key=lambda r: (val_by_rho[r], -r))


# ---------------------------------------------------------------------- names and checks
def number_text(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def gap_text(gap) -> str:
    return "-" if gap is None else f"{gap[0]:+.4f} ± {gap[1]:.4f}"


def method_name(method: str, base: str, rho: float | None = None) -> str:
    """"XSAM", "XSAM N=4", "SAM N=4 reuse", the base optimizer's name...; with " rho 0.1" when given."""
    family, every, reuse = parse_method(method)
    name = {"base": base, "sam": "SAM", "xsam": "XSAM"}[family]
    name += "" if every == 1 else f" N={every}" + (" reuse" if reuse else "")
    return name if rho is None else f"{name} rho {rho:g}"


def cost_ratios(path: str | None) -> dict[str, float] | None:
    """benchmarks/cost.py's JSON (``--json``) as cost per step over the base optimizer's, keyed by method name
    (``xsam_n4_reuse``, ...); None without a path."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["ratios_to_base"]


def check_distinct(args, *names: str) -> None:
    for name in names:
        values = getattr(args, name)
        if len(set(values)) != len(values):
            raise ValueError(f"--{name}={values} is invalid: the values must be distinct")


def check_rhos(rhos: list[float]) -> None:
    if any(r <= 0 for r in rhos):
        raise ValueError(f"--rhos={rhos} is invalid: every rho must be > 0")
