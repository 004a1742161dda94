"""The probe: which point of the arc from v0 through v1 has the highest loss (docs/algorithm.md, "Choosing alpha").

Pure functions: the probe points (alphas, or rotation angles) and the searches over them, which take an
``evaluate(indices) -> losses`` callable and never touch a tensor. The optimizer supplies ``evaluate`` (it moves
the weights to each point and runs the loss).
"""

from __future__ import annotations

import math
from collections.abc import Callable

# probe_space="angle" searches rotation angles from v0 in [0, ANGLE_MAX]: past 90 degrees the direction would have
# a negative component along the ascent direction, i.e. point downhill at theta_0.
ANGLE_MAX = math.pi / 2

Evaluate = Callable[[list[int]], list[float]]


def alpha_grid(alpha_step: float, alpha_max: float) -> list[float]:
    """The alphas of the probe grid: 0, alpha_step, ..., up to alpha_max (included when on the grid)."""
    return [round(i * alpha_step, 12) for i in range(int(math.floor(alpha_max / alpha_step + 1e-9)) + 1)]


def angle_grid(n: int) -> list[float]:
    """n rotation angles (radians from v0), evenly over [0, pi/2]."""
    return [ANGLE_MAX * i / (n - 1) for i in range(n)] if n > 1 else [0.0]


def probe_points(space: str, alpha_step: float, alpha_max: float) -> list[float]:
    """The points a probe evaluates: the alpha grid (``space="alpha"``, the paper), or as many rotation angles from
    v0, evenly over [0, pi/2] (``space="angle"``)."""
    grid = alpha_grid(alpha_step, alpha_max)
    return grid if space == "alpha" else angle_grid(len(grid))


def alpha_at(space: str, point: float, psi: float) -> float:
    """The alpha of a probe point: itself in the alpha space; angle / psi in the angle space (1.0 when psi = 0,
    where the plane is degenerate and every alpha gives v1)."""
    if space == "alpha":
        return point
    return point / psi if psi > 0 else 1.0


def search(kind: str, n: int, evaluate: Evaluate) -> tuple[list[int], list[float], int | None]:
    """Run the ``kind`` ("grid" or "fast") search over n probe points. Returns the evaluated indices in increasing
    order, their losses, and the position (in those lists) of the largest finite loss, the first on ties (None
    when no loss is finite)."""
    found = (grid_search if kind == "grid" else fast_search)(n, evaluate)
    order = sorted(found)
    losses = [found[i] for i in order]
    return order, losses, argmax_first(losses)


def grid_search(n: int, evaluate: Evaluate) -> dict[int, float]:
    """The paper's exhaustive search: every one of the n probe points, in one stage. Returns {index: loss}."""
    return dict(zip(range(n), evaluate(list(range(n)))))


def fast_search(n: int, evaluate: Evaluate) -> dict[int, float]:
    """At most 8 of the n probe points, in three stages (each one call of ``evaluate`` on a list of indices):

    1. 5 points evenly spaced over the range, its two ends included;
    2. around the best so far, the midpoints towards its evaluated neighbours (2 points);
    3. the grid point nearest the vertex of the parabola through the best and its two evaluated neighbours
       (at a range end, the point next to the best instead), when not evaluated yet (1 point).

    Exact when the loss along the arc is a parabola; for any loss that rises then falls over the range it
    lands within a point or two of the grid's argmax (measured: benchmarks/RESULTS.md). Returns
    {index: loss} for the evaluated indices; the caller takes the argmax.
    """
    found: dict[int, float] = {}

    def stage(indices) -> None:
        new = sorted({i for i in indices if 0 <= i < n and i not in found})
        if new:
            found.update(zip(new, evaluate(new)))

    def best_and_neighbours():
        # the best finite loss (ties: the smaller index); all non-finite: the middle, as the search's centre
        finite = [i for i in sorted(found) if math.isfinite(found[i])]
        best = max(finite, key=lambda i: (found[i], -i)) if finite else sorted(found)[len(found) // 2]
        left = max((i for i in found if i < best), default=None)
        right = min((i for i in found if i > best), default=None)
        return best, left, right

    stage(round(j * (n - 1) / 4) for j in range(5))
    best, left, right = best_and_neighbours()
    stage([(best + side) // 2 if side < best else -(-(best + side) // 2)
           for side in (left, right) if side is not None and abs(side - best) > 1])
    best, left, right = best_and_neighbours()
    if left is None or right is None:
        stage([best + 1 if left is None else best - 1])
    else:
        stage([_parabola_vertex(left, best, right, found)])
    return found


def _parabola_vertex(left: int, mid: int, right: int, found: dict[int, float]) -> int:
    """Grid index nearest the vertex of the parabola through three evaluated points, kept inside [left, right];
    ``mid`` when the losses are not finite or the parabola has no maximum."""
    (x0, y0), (x1, y1), (x2, y2) = ((i, found[i]) for i in (left, mid, right))
    if not all(math.isfinite(y) for y in (y0, y1, y2)):
        return mid
    # vertex of the interpolating parabola, in the divided-difference form
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    curvature = (d12 - d01) / (x2 - x0)
    if curvature >= 0:  # no maximum between the points (flat or convex): keep the best
        return mid
    vertex = (x0 + x1) / 2 - d01 / (2 * curvature)
    return min(max(round(vertex), left), right)


def argmax_first(values: list[float]) -> int | None:
    """Index of the largest finite value (the first on ties); None when no value is finite."""
    best = None
    for i, v in enumerate(values):
        if math.isfinite(v) and (best is None or v > values[best]):
            best = i
    return best
