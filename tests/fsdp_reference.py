"""The model, data and optimizers shared by the FSDP2 worker and its one-process reference (tests/test_fsdp.py),
and the plain closure loop they and the DDP custom-loop worker run."""

import torch
from torch import nn

from hf_xsam import XSAM

STEPS = 6
# every dimension 0 even, so that 2 ranks hold equal halves
CONFIGS = {
    "xsam": dict(rho=0.3, alpha=0.5, probe_every=2),
    "xsam_fast": dict(rho=0.3, probe_every=1, probe_search="fast"),
    "sam": dict(rho=0.3, alpha=1.0, probe_every=0),
    # the checkpoint after step 2 falls between two sharpness steps: the correction must travel sharded
    "xsam_reuse": dict(rho=0.3, alpha=0.5, probe_every=2, sharpness_every=2, reuse=True),
    "sam_reuse": dict(rho=0.3, alpha=1.0, probe_every=0, sharpness_every=2, reuse=True),
}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def make_optimizer(model: nn.Module, settings: dict) -> XSAM:
    return XSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **settings)


def closure_steps(model: nn.Module, opt: XSAM, data, steps, record: dict, weights) -> None:
    """The obvious loop: for each step, ``opt.step(closure)`` on ``data(step) = (x, y)`` with a cross-entropy loss;
    appends the alpha of every probe to ``record["alphas"]`` and ``weights(model)`` after every step to
    ``record["weights"]``."""
    for step in steps:
        x, y = data(step)

        def closure(backward=True, x=x, y=y):
            loss = nn.functional.cross_entropy(model(x), y)
            if backward:
                loss.backward()
            return loss

        probing = opt.probe_due
        opt.step(closure)
        if probing:
            record["alphas"].append(opt.alpha)
        record["weights"].append(weights(model))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of 8 of a step (each of 2 ranks trains on its half)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
