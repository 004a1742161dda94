"""Deliberately naive reference implementations, written from docs/algorithm.md and nothing else.

Everything here is the slow, literal version: all parameters with a gradient are flattened into one float64
vector (torch.cat), theta_0, v0 and v1 are explicit full copies, every probe point reads its loss with
``.item()``, and the base optimizer is driven the naive way (restore theta_0, write d into ``.grad``, call
``base.step()``). It shares no code with hf_xsam, so a test that compares the two checks the implementation
against the spec rather than against itself.

Conventions shared with hf_xsam (so that the comparison is meaningful):
* ``loss_fn()`` computes the loss on the step's fixed batch and returns it (no backward).
* Every pass of a step after the first sees the random numbers of the first (dropout masks): the generators
  (CPU, and CUDA when used) are saved before the theta_0 pass, restored before every other pass, and left where
  the theta_0 pass left them.
* Only the theta_0 pass may change the model's buffers (BatchNorm running statistics): here every buffer is
  backed up after the theta_0 pass and copied back after every other pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# The fallback threshold of the spec's "sin(psi) ~ 0" case: below it v0 and v1 are treated as (anti)parallel
# and the direction is v1. The value is the implementation's (hf_xsam.geometry.SIN_PSI_MIN), restated on purpose.
SIN_PSI_MIN = 1e-4


# ---------------------------------------------------------------------- flat-vector helpers
def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 vector holding all the tensors (a full copy)."""
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    """The gradients as one float64 vector; a parameter without ``.grad`` contributes zeros."""
    return flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


@torch.no_grad()
def write_params(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    """Copy a flat vector into the parameters (rounded to each parameter's dtype)."""
    offset = 0
    for p in params:
        p.copy_(vector[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


@torch.no_grad()
def add_to_params(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    """Add a flat vector to the parameters, in their own dtype (as any optimizer applies its update)."""
    offset = 0
    for p in params:
        p.add_(vector[offset : offset + p.numel()].view_as(p).to(p.dtype))
        offset += p.numel()


def write_grads(params: list[nn.Parameter], vector: torch.Tensor) -> None:
    offset = 0
    for p in params:
        p.grad = vector[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()


def probe_grid(alpha_step: float, alpha_max: float) -> list[float]:
    """{0, delta, 2 delta, ..., alpha_max}."""
    count = int(math.floor(alpha_max / alpha_step + 1e-9)) + 1
    return [round(i * alpha_step, 10) for i in range(count)]


def geometry(e: torch.Tensor, g_k: torch.Tensor, eps: float = 1e-12):
    """v0, v1, psi and whether the plane is degenerate (parallel/opposite vectors or a zero vector)."""
    norm_e, norm_g = e.norm().item(), g_k.norm().item()
    if norm_e <= eps or norm_g <= eps:
        return None, None, None, True
    v0, v1 = e / norm_e, g_k / norm_g
    psi = math.acos(min(1.0, max(-1.0, torch.dot(v0, v1).item())))
    return v0, v1, psi, math.sin(psi) < SIN_PSI_MIN


def slerp(v0: torch.Tensor, v1: torch.Tensor, psi: float, alpha: float) -> torch.Tensor:
    """v(alpha) = [sin((1 - alpha) psi) v0 + sin(alpha psi) v1] / sin(psi)."""
    return (math.sin((1 - alpha) * psi) * v0 + math.sin(alpha * psi) * v1) / math.sin(psi)


def argmax_first(values: list[float]) -> int:
    """The index of the largest value; on ties, the first (the smaller alpha)."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best]:
            best = i
    return best


def get_rng_state() -> tuple:
    """The CPU generator's state and, where CUDA has been used, every CUDA generator's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class FrozenBuffers:
    """Back up every buffer of the model now; ``restore()`` copies the backup back (BatchNorm statistics)."""

    def __init__(self, model: nn.Module | None):
        self.saved = [] if model is None else [(b, b.detach().clone()) for b in model.buffers()]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, value in self.saved:
            buffer.copy_(value)


# ---------------------------------------------------------------------- XSAM
class ReferenceXSAM:
    """XSAM as docs/algorithm.md states it, around a base optimizer instance that owns the parameters."""

    def __init__(
        self,
        base: torch.optim.Optimizer,
        rho: float,
        rho_max: float | None = None,
        alpha: float = 1.0,
        alpha_max: float = 2.0,
        alpha_step: float = 0.1,
        ascent_steps: int = 1,
        probe_every: int = 0,
        eps: float = 1e-12,
        sharpness_every: int = 1,
        reuse: bool = False,
    ):
        self.base = base
        self.params = [p for group in base.param_groups for p in group["params"]]
        self.rho = rho
        self.rho_max = 2 * rho if rho_max is None else rho_max
        self.alpha = alpha
        self.grid = probe_grid(alpha_step, alpha_max)
        self.k = ascent_steps
        self.interval = probe_every
        self.eps = eps
        self.every = sharpness_every
        self.reuse = reuse
        self.correction: torch.Tensor | None = None  # c / ||g_0|| of the last sharpness step (reuse)
        self.t = 0  # optimizer steps taken
        self.last_probe_losses: list[float] | None = None
        self.last_psi: float | None = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def _pass(self, model, loss_fn, rng_start, buffers, backward: bool) -> torch.Tensor:
        """Any pass but the first: replay the first pass's random numbers, leave the buffers alone."""
        set_rng_state(rng_start)
        if backward:
            self.zero_grad()
            loss = loss_fn()
            loss.backward()
        else:
            with torch.no_grad():
                loss = loss_fn()
        buffers.restore()
        return loss

    def step(self, loss_fn: Callable[[], torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        # 1. theta_0 and g_0; this pass alone may update BatchNorm statistics and advance the generator
        rng_start = get_rng_state()
        self.zero_grad()
        loss = loss_fn()
        loss.backward()
        rng_after = get_rng_state()
        buffers = FrozenBuffers(model)
        self.last_probe_losses = None
        self.last_psi = None
        if self.rho == 0 or self.t % self.every != 0:  # a plain step, between sharpness steps
            if self.rho > 0 and self.reuse and self.correction is not None:  # g + ||g|| c / ||g_0||
                active = [p for p in self.params if p.grad is not None]
                g = flat_grads(active)
                write_grads(active, g + g.norm() * self.correction)
            self.base.step()
            self.t += 1
            return loss

        active = [p for p in self.params if p.grad is not None]
        theta_0 = flatten(active)
        g = flat_grads(active)
        g_0 = g

        # 2-3. k ascent steps of length rho/k along the normalised gradient, then g_k
        for _ in range(self.k):
            norm = g.norm().item()
            if norm > 0:  # a zero gradient gives no direction to move in
                add_to_params(active, (self.rho / self.k) * g / norm)
            self._pass(model, loss_fn, rng_start, buffers, backward=True)
            g = flat_grads(active)
        g_k = g
        theta_k = flatten(active)

        # 4. the plane spanned by the ascent and the gradient at its end
        e = theta_k - theta_0
        v0, v1, psi, degenerate = geometry(e, g_k, self.eps)
        self.last_psi = psi

        # 7. re-choose alpha on the first sharpness step at or after each multiple of probe_every: the loss at
        # theta_0 + rho_max v(alpha), argmax
        if self.interval > 0 and self.t % self.interval < self.every and not degenerate:
            losses = []
            for alpha in self.grid:
                write_params(active, theta_0 + self.rho_max * slerp(v0, v1, psi, alpha))
                losses.append(self._pass(model, loss_fn, rng_start, buffers, backward=False).item())
            self.alpha = self.grid[argmax_first(losses)]
            self.last_probe_losses = losses

        # 5-6. d = ||g_k|| v(alpha), or g_k itself when the plane is degenerate
        d = g_k if degenerate else g_k.norm() * slerp(v0, v1, psi, self.alpha)
        if self.reuse:  # the part of d orthogonal to g_0, never longer than SAM's (g_k's), per unit of ||g_0||
            norm_0 = g_0.norm()
            if norm_0 > 0:
                c = d - (torch.dot(d, g_0) / norm_0**2) * g_0
                c_sam = g_k - (torch.dot(g_k, g_0) / norm_0**2) * g_0
                if c.norm() > c_sam.norm():
                    c = c * (c_sam.norm() / c.norm())
                self.correction = c / norm_0
            else:
                self.correction = torch.zeros_like(d)
        write_params(active, theta_0)
        write_grads(active, d)
        set_rng_state(rng_after)
        self.base.step()
        self.t += 1
        return loss


# ---------------------------------------------------------------------- plain SAM
class ReferenceSAM:
    """Sharpness-Aware Minimization the usual (davda54/sam) way: e = rho g/||g||, the gradient at theta + e,
    restore theta, base step. Its second pass replays the first pass's random numbers and leaves the buffers
    alone, as XSAM's does, so that the two can be compared bitwise."""

    def __init__(self, base: torch.optim.Optimizer, rho: float):
        self.base = base
        self.rho = rho

    def step(self, loss_fn: Callable[[], torch.Tensor], model: nn.Module | None = None) -> torch.Tensor:
        params = [p for group in self.base.param_groups for p in group["params"]]
        rng_start = get_rng_state()
        self.base.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        rng_after = get_rng_state()
        buffers = FrozenBuffers(model)
        with torch.no_grad():
            with_grad = [p for p in params if p.grad is not None]
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in with_grad]), p=2)
            scale = self.rho / (grad_norm + 1e-12)
            old = {}
            for p in with_grad:
                old[p] = p.data.clone()
                p.add_(p.grad * scale)
        set_rng_state(rng_start)
        self.base.zero_grad(set_to_none=True)
        loss_fn().backward()
        buffers.restore()
        with torch.no_grad():
            for p, value in old.items():
                p.data = value
        set_rng_state(rng_after)
        self.base.step()
        return loss
