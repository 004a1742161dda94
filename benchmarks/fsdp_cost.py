"""Seconds per optimizer step and peak memory per rank, DDP vs FSDP2, AdamW vs SAM vs XSAM (2 CPU processes).

    python benchmarks/fsdp_cost.py --nproc 2 --steps 6

Launches itself under torchrun (gloo, `harness.launch`). Every configuration trains the same MLP (4 layers of width
--width, so the weights are large enough for memory to show) on random data with a plain loop: `opt.step(closure)`
for SAM and XSAM (held alpha 0.5, probing only on the warm-up step), a backward and `opt.step()` for AdamW. DDP
wraps the model in DistributedDataParallel; FSDP2 applies fully_shard to every layer and the root. The
configurations are built one after another (each with its warm-up step), then timed round-robin by
`harness.interleave` (torch.utils.benchmark.Timer: one timed step per configuration per round, after the Timer's 2
warm-up calls).
Reported per rank: the median seconds per step, the bytes of parameters, gradients, optimizer state and theta_0 this
rank holds (exact, from the tensors), and the peak resident set size of the process after the configuration's
warm-up step (includes the interpreter and every configuration built before it).
"""

from __future__ import annotations

import argparse
import resource

import harness

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
    steps, results = {}, {}
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

        def step(model=model, opt=opt, g=g, adamw=optim == "adamw"):
            x, y = torch.randn(args.batch, args.width, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

            def closure(backward=True):
                loss = nn.functional.cross_entropy(model(x), y)
                if backward:
                    loss.backward()
                return loss

            if adamw:
                opt.zero_grad()
                closure()
                opt.step()
            else:
                opt.step(closure)

        step()  # warm-up: the optimizer state exists after it
        name = f"{wrap}_{optim}"
        steps[name] = step
        params = list(model.parameters())
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        results[name] = {
            "param_mb": tensor_bytes(params) / 2**20, "grad_mb": tensor_bytes([p.grad for p in params]) / 2**20,
            "state_mb": tensor_bytes(state) / 2**20,
            "theta_0_mb": tensor_bytes(opt._theta_0.values()) / 2**20 if isinstance(opt, XSAM) else 0.0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    for name, measured in harness.interleave(steps, rounds=args.steps).items():
        results[name] = {"s": measured.median, **results[name]}
    harness.finish_worker(results, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="per process")
    harness.add_launch_flags(parser, out="/tmp/hf_xsam_fsdp_cost.json")
    args = parser.parse_args()
    if args._worker:
        return worker(args)
    harness.require_positive(args, "nproc", "steps", "width", "batch")
    results = harness.launch(__file__, ["--steps", str(args.steps), "--width", str(args.width), "--batch",
                                        str(args.batch)], args.nproc, args.out, threads=1)
    print(f"{args.nproc} processes (gloo, CPU), MLP width {args.width}, batch {args.batch} per process, "
          f"median of {args.steps} steps; memory per rank in MB")
    columns = [("config", 14, ""), ("s/step", 8, ".3f"), ("vs adamw", 10, ".2f"), ("params", 8, ".1f"),
               ("grads", 7, ".1f"), ("state", 7, ".1f"), ("theta_0", 9, ".1f"), ("peak RSS", 10, ".0f")]
    rows = [(name, r["s"], r["s"] / results[name.split("_")[0] + "_adamw"]["s"], r["param_mb"], r["grad_mb"],
             r["state_mb"], r["theta_0_mb"], r["peak_rss_mb"]) for name, r in results.items()]
    print(harness.fixed_table(columns, rows))


if __name__ == "__main__":
    main()
