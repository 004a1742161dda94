"""Dispatched aten operations and host syncs per optimizer step: AdamW, SAM, XSAM and XSAM with a probe.

    python benchmarks/op_count.py                                   # table, benchmarks/results/op_count.{txt,json}
    python benchmarks/op_count.py --module /tmp/xsam_old.py --name op_count_before   # another copy of xsam.py

Each configuration trains an MLP built here (2 parameter tensors per Linear layer: ~10 and ~130 tensors) with
``optimizer.step(closure)``; one step is counted after two warm-up steps (the base optimizer's state exists by then).
SAM is XSAM with alpha = 1 and no probe (what ``--optim sam`` runs), XSAM holds alpha = 0.5 with no probe
(``probe_every=0``: every step between two probes looks like this), "XSAM probe" probes on every step. With
``sharpness_every=2``: "plain_between" is a plain step between two sharpness steps, "reuse_between" the same step
carrying the correction (``reuse``), "reuse_sharp" a sharpness step that keeps one. The base
optimizer is AdamW with ``foreach=True`` everywhere, as on a GPU (on CPU torch would pick its per-tensor loop).

What counts as an operation: every aten operation that reaches the dispatcher below autograd
(``TorchDispatchMode``), views excluded (``view``, ``select``, ``unbind``, ...: metadata only, no kernel). A
``torch._foreach_*`` operation counts once: on a GPU it is one or a few kernel launches for the whole list (on CPU
its loop over the tensors runs inside the operation, out of the mode's sight). The count is a proxy for kernel
launches, which is what a small model on a fast GPU pays for; it says nothing about the bytes each one moves.

What counts as a host sync: the host reading a value the device computed, i.e. ``.item()``, ``float()``,
``int()``, ``bool()``, ``.tolist()``, ``.numpy()`` or a copy to the CPU (``.cpu()``, ``.to("cpu")``) of a tensor that
lives on the device. On a GPU each of those waits for the queued kernels to finish. A CPU run has no device, so the
counter (a ``TorchFunctionMode``, active from the first warm-up step) follows where each tensor would live on a
GPU: the parameters, the batch, the gradients and whatever is computed from any of them live on the device; copies
to the CPU, and whatever is computed from them (and constants) only, live on the host; a factory's output
(``torch.tensor(0.0)``, ``torch.arange(2, device=...)``: a constant the host wrote) takes the side of what it is
combined with. Only reads of device tensors are counted: reading a host tensor costs nothing on a GPU. The column
"reads" is the raw number of ``aten._local_scalar_dense`` calls (the operation behind every one of those reads on
CPU), host tensors included.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import harness
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

SIZES = {"small": 5, "large": 65}  # Linear layers: 10 and 130 parameter tensors
CONFIGS = {
    "adamw": None,
    "sam": dict(alpha=1.0, probe_every=0),
    "xsam": dict(alpha=0.5, probe_every=0),
    "xsam_probe": dict(alpha=0.5, probe_every=1),
    # sharpness every 2 steps: a plain step in between, the same carrying the correction (reuse), and a sharpness
    # step that keeps one; "warmup" steps first, so that the counted step is of that kind
    "plain_between": dict(alpha=0.5, probe_every=0, sharpness_every=2, warmup=3),
    "reuse_between": dict(alpha=0.5, probe_every=0, sharpness_every=2, reuse=True, warmup=3),
    "reuse_sharp": dict(alpha=0.5, probe_every=0, sharpness_every=2, reuse=True, warmup=4),
}
# methods that read a tensor's values into Python (matched by name: the mode sees torch._C.TensorBase's methods)
READS = {"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"}


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten operations dispatched inside the block, and the ``_local_scalar_dense`` among them."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.reads = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        if not func.is_view:
            self.ops += 1
            name = str(func.overloadpacket.__name__)
            self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if name == "cpu":
        return True
    if name == "to":
        targets = list(args[1:]) + [kwargs.get("device")]
        return any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device)))
    return False


class SyncCounter(TorchFunctionMode):
    """Counts reads of device tensors into the host while ``counting`` (the module docstring says which tensors
    live on the device)."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.syncs = 0
        self.side = WeakIdKeyDictionary()  # "host" or "constant"; any tensor not in it is on the device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        sides = {self.side.get(t, "device") for t in inputs}
        to_host = _to_host(func, args, kwargs)
        if self.counting and "device" in sides and (getattr(func, "__name__", "") in READS or to_host):
            self.syncs += 1
        out = func(*args, **kwargs)
        side = "host" if to_host else "device" if "device" in sides else "host" if "host" in sides else "constant"
        if side != "device":
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.side[t] = side
        return out


def load_xsam(path: str | None):
    if path is None:
        from hf_xsam import XSAM

        return XSAM
    spec = importlib.util.spec_from_file_location("xsam_under_count", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.XSAM


def build(layers: int, width: int = 16):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*blocks, nn.Linear(width, 1))
    x, y = torch.randn(8, width), torch.randn(8, 1)
    return model, x, y


def count(xsam_class, config: str, layers: int) -> dict:
    model, x, y = build(layers)
    base = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    settings = None if CONFIGS[config] is None else dict(CONFIGS[config])
    warmup = 2 if settings is None else settings.pop("warmup", 2)
    opt = base if settings is None else xsam_class(None, base, rho=0.05, **settings)

    def closure(backward=True):
        if settings is None:
            opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        if backward:
            loss.backward()
        return loss

    ops, syncs = OpCounter(), SyncCounter()
    with syncs:
        for _ in range(warmup):
            opt.step(closure)
        syncs.counting = True
        with ops:
            opt.step(closure)
    return dict(config=config, tensors=sum(1 for _ in model.parameters()), ops=ops.ops, syncs=syncs.syncs,
                reads=ops.reads, by_name=dict(sorted(ops.names.items())))


def table(rows: list[dict]) -> str:
    sam = {r["tensors"]: r["ops"] for r in rows if r["config"] == "sam"}
    columns = [("config", 12, ""), ("tensors", 7, ""), ("ops/step", 9, ""), ("vs SAM", 7, "+"), ("syncs", 6, ""),
               ("reads", 6, "")]
    return harness.fixed_table(columns, [(r["config"], r["tensors"], r["ops"], r["ops"] - sam[r["tensors"]],
                                          r["syncs"], r["reads"]) for r in rows], sep=" ")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default=None, help="a copy of hf_xsam/xsam.py to count instead of the package's")
    parser.add_argument("--name", default="op_count", help="file name (no extension) under benchmarks/results")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    xsam_class = load_xsam(args.module)
    rows = [count(xsam_class, config, layers) for layers in SIZES.values() for config in CONFIGS]
    text = table(rows)
    print(text)
    if not args.no_save:
        source = args.module or "hf_xsam/xsam.py"
        header = f"# benchmarks/op_count.py on {source}, torch {torch.__version__}, CPU\n"
        with open(os.path.join(harness.RESULTS, f"{args.name}.txt"), "w") as f:
            f.write(header + text + "\n")
        harness.write_json(os.path.join(harness.RESULTS, f"{args.name}.json"),
                           dict(source=source, torch=torch.__version__, rows=rows))
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
