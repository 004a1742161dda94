"""The plane of v0 and v1, in pure functions on lists of tensors (docs/algorithm.md, "One step").

Every function takes plain lists (the local shards of sharded parameters, the tensors themselves otherwise) and a
``foreach`` flag: the readable per-tensor loop and the ``torch._foreach_*`` path that mirrors it line for line sit
side by side, and tests compare the two. Scalars stay on the device (0-dim tensors), so none of this syncs with the
host. Norms accumulate in float32 (float64 for float64 tensors), so bf16/fp16 parameters are safe.
"""

from __future__ import annotations

import torch

from hf_xsam import sharding

# Below this sin(psi), v0 and v1 are (anti)parallel: the great circle through them is not unique and the slerp
# coefficients blow up (1/sin(psi)). The direction then falls back to v1, i.e. SAM's gradient.
SIN_PSI_MIN = 1e-4


# ---------------------------------------------------------------------- norms
def accumulation_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def global_norms(lists, foreach: bool, groups: tuple = ()) -> torch.Tensor:
    """The L2 norms over each of several equally long lists of tensors, as one small vector, from one multi-tensor
    norm over all of them. With ``groups`` the tensors are local shards: their squared norms are summed over the
    ranks in one all-reduce, then rooted."""
    tensors = [t for ts in lists for t in ts]
    dtype = accumulation_dtype(tensors)
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    per_tensor = torch.stack(norms).view(len(lists), -1)
    if not groups:
        return torch.linalg.vector_norm(per_tensor, 2, dim=1)
    return sharding.sum_over(per_tensor.square().sum(dim=1), groups).sqrt()


def global_norm(tensors, foreach: bool, groups: tuple = ()) -> torch.Tensor:
    """L2 norm over all tensors (over every rank's shard when ``groups`` are given)."""
    return global_norms([tensors], foreach, groups)[0]


# ---------------------------------------------------------------------- moving the weights
def copy(out, tensors, foreach: bool) -> None:
    """out[i] = tensors[i], in place."""
    if foreach:
        torch._foreach_copy_(out, tensors)
    else:
        for o, t in zip(out, tensors):
            o.copy_(t)


def ascend(params, grads, scale: torch.Tensor, foreach: bool) -> None:
    """theta += scale * g, scaling the gradients in place on the way (they are consumed)."""
    _scale_then_add(grads, scale, params, foreach)


def _scale_then_add(tensors, scale: torch.Tensor, into, foreach: bool) -> None:
    """tensors *= scale, then into += tensors: an axpy that needs no temporary (``tensors`` is spent)."""
    if foreach:
        torch._foreach_mul_(tensors, scale)
        torch._foreach_add_(into, tensors)
    else:
        for t, i in zip(tensors, into):
            t.mul_(scale)
            i.add_(t)


def displacement(params, theta_0, in_place: bool, foreach: bool) -> list[torch.Tensor]:
    """e = theta_k - theta_0: into the weights themselves (``in_place``; they are restored from theta_0 afterwards
    anyway, so no allocation), or into one new parameter-sized buffer when the weights are needed (a probe)."""
    if in_place:
        if foreach:
            torch._foreach_sub_(params, theta_0)
        else:
            for p, t in zip(params, theta_0):
                p.sub_(t)
        return params
    if foreach:
        return torch._foreach_sub(params, theta_0)
    return [p - t for p, t in zip(params, theta_0)]


def set_point(params, theta_0, e, grads, c0: float, c1: float, foreach: bool) -> None:
    """theta = theta_0 + c0 e + c1 g_k: a probe point, with plain scalars (no temporaries)."""
    if foreach:
        torch._foreach_copy_(params, theta_0)
        torch._foreach_add_(params, e, alpha=c0)
        torch._foreach_add_(params, grads, alpha=c1)
    else:
        for p, t, ei, g in zip(params, theta_0, e, grads):
            p.copy_(t)
            p.add_(ei, alpha=c0)
            p.add_(g, alpha=c1)


# ---------------------------------------------------------------------- the plane
def chord(out, e, grads, norms, eps: float, foreach: bool) -> None:
    """out = (||g_k|| / ||e||) e - g_k = ||g_k|| (v0 - v1), in place (``out`` may be ``e`` itself).

    Scaling e to the length of g_k, rather than both to unit length, leaves g_k untouched in ``.grad`` (it is
    needed bitwise when the plane is degenerate) and needs no scalar on the host."""
    scale = norms[1] / (norms[0] + eps)
    if foreach:
        if out is not e:
            torch._foreach_copy_(out, e)
        torch._foreach_mul_(out, scale)
        torch._foreach_sub_(out, grads)
    else:
        for o, t, g in zip(out, e, grads):
            if out is not e:
                o.copy_(t)
            o.mul_(scale)
            o.sub_(g)


def plane(e, grads, out, eps: float, foreach: bool, groups: tuple = ()):
    """(||e||, ||g_k||) as one 2-vector, and psi, the angle between v0 and v1, as a 0-dim tensor; leaves
    w = ||g_k|| (v0 - v1) in ``out``.

    psi = 2 asin(||v0 - v1|| / 2) with the difference taken elementwise keeps float32's resolution at small
    angles, where arccos<v0, v1> cannot: 1 - cos psi = psi^2 / 2 drowns in the rounding of a float32 cosine near 1
    (measured on random planes of 3000 elements: relative errors 7e-7 against 0.23 at psi = 1e-3, 4e-6 against 2
    at psi = 2e-4; tests/test_op_count.py). No dot product is needed, so every per-tensor quantity is a
    multi-tensor operation and the count of operations does not grow with the number of tensors. The chord is
    clamped to 2 (antiparallel vectors), so that rounding can never make asin NaN; near psi = pi it is as
    ill-conditioned as arccos was (1e-6 relative at 3.1), and the degenerate fallback catches exact opposites.

    With bf16/fp16 parameters w is rounded to their precision, and psi is off by up to ~5e-4 rad (measured; the
    float32 dot product was within 1e-5 rad at psi >= 0.1): below what storing g_k in bf16 already does to its
    direction (~1e-3 rad), and far below theta_k - theta_0 held in bf16, whose elements carry the rounding of the
    weights. Computing w in float32 instead would take a parameter-sized float32 buffer.
    """
    norms = global_norms([e, grads], foreach, groups)
    chord(out, e, grads, norms, eps, foreach)
    half_chord = global_norm(out, foreach, groups) / (norms[1] + eps)
    psi = torch.asin(half_chord.mul_(0.5).clamp_(max=1.0)).mul_(2.0)
    return norms, psi


def degenerate(sin_psi, norms, eps: float) -> torch.Tensor:
    """v0 and v1 span no plane: (anti)parallel, or one of them has no length."""
    return (sin_psi < SIN_PSI_MIN) | (norms <= eps).any()


def arc_coefficients(psi, beta, norms, eps: float) -> torch.Tensor:
    """(a0, a1) with a0 v0 + a1 v1 the unit vector at angle ``beta`` from v0 towards v1 on their great circle:
    [sin(psi - beta), sin(beta)] / sin(psi); (0, 1), i.e. v1, when the plane is degenerate. One 2-vector, from
    one sine of the three angles stacked."""
    sines = torch.sin(torch.stack([psi - beta, beta, psi]))
    flat = degenerate(sines[2], norms, eps)
    # arange(2) is (0, 1), made on the device (a tensor built from a list would be a copy from the host); the
    # inf/nan of a zero sin(psi) in the other branch is discarded by where
    v1 = torch.arange(2, dtype=psi.dtype, device=psi.device)
    return torch.where(flat, v1, sines[:2] / sines[2])


def slerp_coefficients(alpha: float, psi, norms, eps: float) -> torch.Tensor:
    """(a0, a1) with v(alpha) = a0 v0 + a1 v1: [sin((1 - alpha) psi), sin(alpha psi)] / sin(psi)."""
    return arc_coefficients(psi, psi * alpha, norms, eps)


def rotation_coefficients(angle: float, psi, norms, eps: float) -> torch.Tensor:
    """(a0, a1) of the unit vector at ``angle`` radians from v0 towards v1 in their plane: the slerp with
    alpha = angle / psi, written so that psi stays on the device (no host sync)."""
    return arc_coefficients(psi, torch.full_like(psi, angle), norms, eps)


def direction(w, grads, a: torch.Tensor, foreach: bool) -> None:
    """.grad = d = ||g_k|| (a0 v0 + a1 v1) = a0 w + (a0 + a1) g_k, in place (``w`` is scaled on the way).

    The cumulative sum gives (a0, a0 + a1) in one operation, and the degenerate (0, 1) gives g_k bitwise."""
    c_w, c_g = torch.cumsum(a, 0).unbind()
    if foreach:
        torch._foreach_mul_(grads, c_g)
    else:
        for g in grads:
            g.mul_(c_g)
    _scale_then_add(w, c_w, grads, foreach)
