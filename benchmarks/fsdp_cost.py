"""Seconds per optimizer step and peak memory per rank, DDP vs FSDP2, AdamW vs SAM vs XSAM (2 CPU processes).

    python benchmarks/fsdp_cost.py --nproc 2 --steps 6

Launches itself under torchrun (gloo). Every configuration trains the same MLP (4 layers of width --width, so the
weights are large enough for memory to show) on random data with a plain loop: `opt.step(closure)` for SAM and
XSAM (held alpha 0.5, probing only on the warm-up step), a backward and `opt.step()` for AdamW. DDP wraps the
model in DistributedDataParallel; FSDP2 applies fully_shard to every layer and the root. Reported per rank: the
median seconds per step after the warm-up, the bytes of parameters, gradients, optimizer state and theta_0 this
rank holds (exact, from the tensors), and the peak resident set size of the process (includes the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [(wrap, optim) for wrap in ("ddp", "fsdp2") for optim in ("adamw", "sam", "xsam")]


def tensor_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from hf_xsam import XSAM

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for wrap, optim in CONFIGS:
        torch.manual_seed(0)
        layers = [nn.Linear(args.width, args.width) for _ in range(4)] + [nn.Linear(args.width, 10)]
        model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())][:-1])
        if wrap == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
        if optim == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            opt = XSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-4,
                       alpha=1.0 if optim == "sam" else 0.5, probe_every=0 if optim == "sam" else 1000)
        g = torch.Generator().manual_seed(rank)
        times = []
        for _ in range(args.steps + 1):
            x, y = torch.randn(args.batch, args.width, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

            def closure(backward=True, x=x, y=y, model=model):
                loss = nn.functional.cross_entropy(model(x), y)
                if backward:
                    loss.backward()
                return loss

            start = time.perf_counter()
            if optim == "adamw":
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.step(closure)
            times.append(time.perf_counter() - start)
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        results[f"{wrap}_{optim}"] = {
            "s": statistics.median(times[1:]),
            "param_mb": tensor_bytes(params) / 2**20, "grad_mb": tensor_bytes([p.grad for p in params]) / 2**20,
            "state_mb": tensor_bytes(state) / 2**20,
            "theta_0_mb": tensor_bytes(opt._theta_0.values()) / 2**20 if isinstance(opt, XSAM) else 0.0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="per process")
    parser.add_argument("--out", default="/tmp/hf_xsam_fsdp_cost.json")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    for name in ("nproc", "steps", "width", "batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} is invalid: must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           __file__, "--_worker", "--steps", str(args.steps), "--width", str(args.width), "--batch", str(args.batch),
           "--out", args.out]
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
    with open(args.out) as f:
        results = json.load(f)
    print(f"{args.nproc} processes (gloo, CPU), MLP width {args.width}, batch {args.batch} per process, "
          f"median of {args.steps} steps; memory per rank in MB")
    print(f"{'config':<14}{'s/step':>8}{'vs adamw':>10}{'params':>8}{'grads':>7}{'state':>7}{'theta_0':>9}"
          f"{'peak RSS':>10}")
    for name, r in results.items():
        base = results[name.split("_")[0] + "_adamw"]["s"]
        print(f"{name:<14}{r['s']:>8.3f}{r['s'] / base:>10.2f}{r['param_mb']:>8.1f}{r['grad_mb']:>7.1f}"
              f"{r['state_mb']:>7.1f}{r['theta_0_mb']:>9.1f}{r['peak_rss_mb']:>10.0f}")


if __name__ == "__main__":
    main()
