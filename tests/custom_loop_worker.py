"""Custom training loops around XSAM, run by tests/test_custom_loops.py (under torchrun for 2 processes):

    python tests/custom_loop_worker.py OUT.pt ddp                  # torch DDP, XSAM.step(closure)
    python tests/custom_loop_worker.py OUT.pt accelerate GA BATCH [overflow_at]

`ddp`: the obvious loop, `opt.step(closure)` on a DistributedDataParallel model, different data on each rank.
`accelerate`: Accelerate's loop shape with `accelerator.accumulate` and `xsam.backward`; with `overflow_at`, a
GradScaler on the CPU scales the passes and the forward pass number `overflow_at` returns inf.
Each rank saves its weights after every optimizer step, the alpha of every probe, and which steps were skipped.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from hf_xsam import XSAM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fsdp_reference import closure_steps  # noqa: E402

STEPS, RHO, LR = 6, 0.3, 0.1


def model_and_data(examples: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(examples, 8, generator=g), torch.randint(0, 3, (examples,), generator=g)


def snapshot(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def ddp_loop(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, x, y = model_and_data(8 * STEPS * dist.get_world_size())
    model = nn.parallel.DistributedDataParallel(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, rho=RHO, probe_every=2, lr=LR)
    torch.manual_seed(100 + rank)  # each rank its own dropout masks, as in real data-parallel training
    world = dist.get_world_size()
    record = {"weights": [], "alphas": []}
    closure_steps(model, opt, lambda step: (x[(step * world + rank) * 8:(step * world + rank + 1) * 8],
                                            y[(step * world + rank) * 8:(step * world + rank + 1) * 8]),
                  range(STEPS), record, snapshot)
    torch.save({**record, "rank": rank}, f"{out}.rank{rank}")
    dist.barrier()  # every rank done before teardown: gloo can abort a rank torn down while another still talks
    dist.destroy_process_group()


def accelerate_loop(out: str, accumulation: int, batch: int, overflow_at: int | None) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    if overflow_at is not None:  # fp16's scaler, on the CPU: every pass is scaled, the step unscales and checks
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    model, x, y = model_and_data(STEPS * accumulation * batch * accelerator.num_processes)
    if overflow_at is None:
        model[2].p = 0.0  # no dropout: runs with other splits of the batch must be comparable
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    xsam = XSAM(model.parameters(), torch.optim.SGD, rho=RHO, probe_every=2, lr=LR)
    model, optimizer, loader = accelerator.prepare(model, xsam, loader)
    passes = [0]

    def maybe_overflow(module, args, output):
        passes[0] += 1
        # on rank 0 only: the all-reduce of that pass carries the inf to every rank, and all skip together
        hit = passes[0] == overflow_at and accelerator.process_index == 0
        return output * float("inf") if hit else output

    model.register_forward_hook(maybe_overflow)
    torch.manual_seed(100 + accelerator.process_index)
    weights, alphas, skipped, scales = [], [], [], []
    for inputs, labels in loader:
        with accelerator.accumulate(model):
            def closure(backward=True, inputs=inputs, labels=labels):
                loss = nn.functional.cross_entropy(model(inputs), labels)
                if backward:
                    accelerator.backward(loss)
                return loss

            probing = accelerator.sync_gradients and xsam.probe_due
            xsam.backward(closure, last=accelerator.sync_gradients)
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                if probing:
                    alphas.append(xsam.alpha)
                weights.append(snapshot(model))
                skipped.append(optimizer.step_was_skipped)
                scales.append(accelerator.scaler.get_scale() if accelerator.scaler is not None else None)
    torch.save({"weights": weights, "alphas": alphas, "skipped": skipped, "scales": scales,
                "steps": xsam.step_count, "passes": passes[0]}, f"{out}.rank{accelerator.process_index}")
    if dist.is_initialized():  # left to the interpreter's exit, gloo's threads can abort a process
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "ddp":
        ddp_loop(out)
    else:
        overflow = int(sys.argv[5]) if len(sys.argv) > 5 else None
        accelerate_loop(out, int(sys.argv[3]), int(sys.argv[4]), overflow)
