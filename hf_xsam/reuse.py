"""The correction a sharpness step leaves for the plain steps after it (``reuse``), in pure functions on lists of
tensors beside `hf_xsam.geometry` (docs/algorithm.md, "Beyond the paper").

With one ascent step the ascent runs along g_0, so v0 = g_0 / ||g_0||. A sharpness step's direction d splits into
its part along v0, which a plain step along g_0 would also take, and the rest, c = d - (d . v0) v0: what
sharpness-awareness adds. The step keeps c' = gain c / ||g_0||, with the gain of `carried_gain` (at most SAM's
part is carried), and each plain step until the next sharpness step
descends along g + ||g|| c' instead of g: the correction, grown to that step's own gradient norm (the global
decomposition of LookSAM, Liu et al., CVPR 2022, with the prototype's scale rather than LookSAM's fixed one).

c' is free of the gradient's scale: fp16's loss scale multiplies c and ||g_0|| alike, and g + ||g|| c' scales with
g, so a scaler may change its scale between the steps.

Memory: c' lives in the theta_0 buffer, which a sharpness step needs only while it runs, so reuse adds no buffer.
Handing the buffer over takes care: at the end of the step the weights must get theta_0 back bitwise from that
buffer while the buffer receives c', and c' is made of vectors that live in the weights and the gradients. `carry`
forms c' in the weights (free once theta_0 is restored) and then exchanges weights and buffer bit for bit. Every
scalar stays on the device: no host sync, no temporary.
"""

from __future__ import annotations

import torch

from hf_xsam import sharding
from hf_xsam.geometry import global_norm

# With reuse the theta_0 buffer holds the correction between steps, and the optimizer state holds that buffer under
# this key, so that state_dict() and distributed checkpoints carry it.
STATE_KEY = "xsam_correction"

# integer dtypes of each element size: the exchange of `swap` adds bit patterns
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _add(out, tensors, foreach: bool) -> None:
    if foreach:
        torch._foreach_add_(out, tensors)
    else:
        for o, t in zip(out, tensors):
            o.add_(t)


def _mul(out, scale: torch.Tensor, foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_(out, scale)
    else:
        for o in out:
            o.mul_(scale)


def kept_axpy(y, x, t: torch.Tensor, foreach: bool) -> None:
    """y += t x for a 0-dim device tensor t, keeping x (to two roundings).

    torch's multi-tensor axpy takes its factor as a host number, so it would sync. Here x is scaled in place and
    added twice: y += s x, then y += s r x, then x is scaled back by 1 / (s r), with s(1 + r) = t. s = -1 for
    t >= 0 and +1 otherwise makes |r| = 1 + |t| >= 1, so nothing is ever divided by a small number."""
    s = 1.0 - 2.0 * (t >= 0).to(t.dtype)
    r = t / s - 1.0
    _mul(x, s, foreach)
    _add(y, x, foreach)
    _mul(x, r, foreach)
    _add(y, x, foreach)
    _mul(x, 1.0 / (s * r), foreach)


def swap(a, b, foreach: bool) -> None:
    """Exchange the contents of two lists of tensors bit for bit, with no temporary: on integer views,
    a += b; b -= a (b = -a_old); b = -b; a -= b. Integer addition wraps around, so every bit pattern (NaN and inf
    included) comes through unchanged, which a float exchange could not promise."""
    a = [t.view(_BITS[t.element_size()]) for t in a]
    b = [t.view(_BITS[t.element_size()]) for t in b]
    if foreach:
        torch._foreach_add_(a, b)
        torch._foreach_sub_(b, a)
        torch._foreach_neg_(b)
        torch._foreach_sub_(a, b)
    else:
        for x, y in zip(a, b):
            x.add_(y)
            y.sub_(x)
            y.neg_()
            x.sub_(y)


def carried_gain(a: torch.Tensor) -> torch.Tensor:
    """The factor on the part of d that a sharpness step keeps: 1 / max(|a1|, 1), so that the steps in between carry
    at most SAM's part (LookSAM's correction), and less when the probe chose alpha* < 1 (docs/algorithm.md, "Beyond
    the paper").

    With one ascent step the plane of v0 and v1 has one direction orthogonal to v0, so the kept part of XSAM's
    d = ||g_k|| (a0 v0 + a1 v1) is a1 times SAM's (a1 = sin(alpha psi) / sin(psi)): the probe can only scale it.
    That scale was chosen for the sharpness step's own batch; carried unchanged over the steps in between, a gain
    a1 > 1 (alpha* > 1) amplifies a stale direction, which collapsed AdamW fine-tuning (benchmarks/RESULTS.md,
    "Which correction to carry"). The divisor is at least 1: no small number is ever divided by."""
    return 1.0 / torch.clamp(a[1].abs(), min=1.0)


def carry(params, theta_0, grads, a: torch.Tensor, psi: torch.Tensor, norms: torch.Tensor, norm_g0: torch.Tensor,
          eps: float, foreach: bool) -> torch.Tensor:
    """End a sharpness step that keeps its correction; returns ||c'||, the size of the steps in between's correction
    relative to their gradient (from the plane's scalars: no extra pass over the tensors).

    On entry (after `geometry.plane`): ``params`` hold w = ||g_k|| (v0 - v1), ``grads`` g_k, ``theta_0`` the saved
    weights; ``a`` = (a0, a1) are the direction's coefficients, d = ||g_k|| (a0 v0 + a1 v1), ``norms`` are
    (||e||, ||g_k||) and ``norm_g0`` is ||g_0|| (the ascent's own norm). On return ``grads`` hold d (as
    `geometry.direction` builds it, to rounding), ``params`` theta_0 bitwise, and ``theta_0``'s buffers
    c' = gain (d - (d . v0) v0) / ||g_0||, with gain = `carried_gain` (a).
    """
    _add(params, grads, foreach)  # u = w + g_k = ||g_k|| v0
    _mul(grads, a[1], foreach)
    kept_axpy(grads, params, a[0], foreach)  # d = a0 u + a1 g_k
    # (d . v0) v0 = beta u with beta = a0 + a1 cos(psi); with no g_0 there is nothing to split off: c' = 0
    beta = a[0] + a[1] * torch.cos(psi)
    inverse = torch.where(norm_g0 > eps, 1.0 / (norm_g0 + eps), torch.zeros_like(norm_g0))
    scale = inverse * carried_gain(a)
    _mul(params, -beta, foreach)
    _add(params, grads, foreach)
    _mul(params, scale, foreach)  # c'
    swap(params, theta_0, foreach)
    # ||d - (d . v0) v0|| = ||g_k|| |a1| sin(psi)
    return scale * norms[1] * a[1].abs() * torch.sin(psi)


def correct(grads, carried_grads, carried, eps: float, foreach: bool, groups: tuple = ()) -> None:
    """A step between sharpness steps: g = ||g|| (g / ||g|| + c') in place, which is g + ||g|| c'.

    ``grads`` are all the gradients (the norm spans them, over the shards' ranks when ``groups`` are given: one
    all-reduce of a scalar); ``carried_grads`` those of them with a kept c', ``carried`` those c'. One norm and
    three multi-tensor operations; no host sync."""
    norm = global_norm(grads, foreach, groups)
    _mul(grads, 1.0 / (norm + eps), foreach)
    _add(carried_grads, carried, foreach)
    _mul(grads, norm, foreach)


def correct_step(params, buffers: dict, eps: float, foreach: bool) -> None:
    """`correct` on the parameters with a gradient (``params``); those with a kept correction in ``buffers``
    (parameter -> its local c') take it. Sharded parameters are worked on shard by shard."""
    kept = [p for p in params if p in buffers]
    correct(sharding.local([p.grad for p in params]), sharding.local([p.grad for p in kept]),
            [buffers[p] for p in kept], eps, foreach, sharding.shard_groups(params))


def hold(params, buffers: dict, state: dict, key: str = STATE_KEY) -> None:
    """Put each parameter's kept correction into its optimizer state, laid out like the parameter (a DTensor for
    a sharded one), so that checkpoints carry it. Called after the base optimizer's step: before its first one the
    state must stay empty (optimizers initialise a state they find empty). A parameter with a gradient but none kept
    gets zeros (no correction), so that a state laid out by one step on zero gradients, as distributed checkpoints
    lay it out before loading, has the entries to load into."""
    for p in params:
        kept = buffers.get(p)
        if kept is None:
            kept = buffers[p] = torch.zeros_like(sharding.local([p])[0])
        held = state[p].get(key)
        if held is None or sharding.local([held])[0].data_ptr() != kept.data_ptr():
            state[p][key] = sharding.like(kept, p)


def held(state: dict, key: str = STATE_KEY) -> dict:
    """parameter -> the local tensor of its correction, for those whose state holds one (after a checkpoint)."""
    return {p: sharding.local([s[key]])[0] for p, s in state.items() if key in s}
