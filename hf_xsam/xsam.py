"""XSAM: eXplicit Sharpness-Aware Minimization (Chen & Zhou, ICLR 2026, arXiv 2603.10048), in pure PyTorch.

The method is described in docs/algorithm.md; the symbols below follow it (rho, rho_max, alpha, v0, v1, psi,
theta_0). This module never imports transformers: the Trainer glue sits on top of it.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch.optim import Optimizer

from hf_xsam import sharding
from hf_xsam.hyperparameters import DEFAULTS, HYPERPARAMETERS, OPTIMIZER_SETTINGS, PREFIX, validate
from hf_xsam.passes import MicroBatch, PassesInfo, sharpness_passes
from hf_xsam.replay import RNGState

# Below this sin(psi), v0 and v1 are (anti)parallel: the great circle through them is not unique and
# the slerp coefficients blow up (1/sin(psi)). The direction then falls back to v1, i.e. SAM's gradient.
SIN_PSI_MIN = 1e-4

# probe_space="angle" searches rotation angles from v0 in [0, ANGLE_MAX]: past 90 degrees the direction would
# have a negative component along the ascent direction, i.e. point downhill at theta_0.
ANGLE_MAX = math.pi / 2

# Keys XSAM adds to every param group, "xsam_<name>" as the Trainer flags spell them (the prefix keeps them apart
# from the base optimizer's own keys). They are global to the optimizer (the norms span every group), live in the
# groups so that state_dict() carries them, and are kept equal across groups. alpha is a setting and a counter:
# the probe moves it.
_COUNTERS = ("angle", "step")
_KEYS = tuple(PREFIX + name for name in OPTIMIZER_SETTINGS + _COUNTERS)


@dataclass
class DirectionInfo:
    """What `XSAM.set_direction` measured on this step (for logging).

    psi: angle between v0 and v1 in radians, a 0-dim tensor on the parameters' device (reading it syncs);
        None when it was not computed (alpha = 1 without a probe is plain SAM and skips the geometry).
    alpha: the alpha the direction was built with (after the probe, if one ran); in the angle space, the alpha
        that the held angle gave at the latest probe.
    probe_losses: the loss at each evaluated probe point, in increasing alpha, or None when no probe ran.
    probe_alphas: the alpha of each of those points (the grid's, a subset of it for the fast search, or
        angle / psi in the angle space).
    """

    psi: torch.Tensor | None
    alpha: float
    probe_losses: list[float] | None = None
    probe_alphas: list[float] | None = None


class XSAM(Optimizer):
    r"""eXplicit Sharpness-Aware Minimization around any base optimizer.

    Example::

        model = torch.nn.Linear(4, 1)
        opt = XSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        x, y = torch.randn(8, 4), torch.randn(8, 1)

        def closure(backward=True):
            loss = torch.nn.functional.mse_loss(model(x), y)
            if backward:
                loss.backward()
            return loss

        loss = opt.step(closure)  # the loss at theta_0

    One step (docs/algorithm.md): gradient g_0 at theta_0; ``ascent_steps`` (k) normalised ascent steps of
    length rho/k; gradient g_k at theta_k; v0 = (theta_k - theta_0)/||.||, v1 = g_k/||g_k||,
    psi = arccos<v0, v1>; direction d = ||g_k|| v(alpha) with v(alpha) the slerp from v0 through v1; the
    weights go back to theta_0 bitwise and the base optimizer steps with d as the gradient. Every
    ``probe_every`` steps alpha is re-chosen by probing the loss at theta_0 + rho_max v(alpha) for
    alpha in {0, alpha_step, ..., alpha_max} and keeping the argmax (ties: the smaller alpha).
    alpha = 1 without probing is exactly SAM; rho = 0 is exactly the base optimizer.

    Args:
        params: parameters or param groups, as for any optimizer; ``None`` when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class (built with ``params`` and ``**base_kwargs``) or an optimizer instance.
        rho (0.05): total ascent length.
        rho_max (2 * rho): radius of the probe points.
        alpha (1.0): the initial alpha, or the fixed one when ``probe_every`` is 0.
        alpha_max (2.0): the probe grid's upper end.
        alpha_step (0.1): the probe grid's spacing (the paper's delta).
        ascent_steps (1): k, the number of ascent steps.
        probe_every (200): optimizer steps between probes; 0 never probes. Probes run on steps
            0, N, 2N, ... (counted by ``step()``); with ``sharpness_every`` > 1, on the first sharpness-aware
            step at or after each of them.
        sharpness_every (1): a sharpness-aware step every N optimizer steps (0, N, 2N, ...), a plain
            base-optimizer step from one gradient in between (MosaicML Composer's SAM ``interval``).
        probe_search ("grid"): "grid" evaluates every probe point (the paper); "fast" evaluates at most 8 of
            them: 5 evenly spaced, the 2 midpoints around the best, then the vertex of a parabola through the
            best and its neighbours (beyond the paper; see benchmarks/RESULTS.md for its agreement with "grid").
        probe_space ("alpha"): "alpha" probes alpha in {0, alpha_step, ..., alpha_max} (the paper); "angle"
            probes the same number of rotation angles from v0, evenly over [0, pi/2], whatever psi is, so the
            search does not clip when the maximum lies past alpha_max * psi; the chosen angle (not alpha) is
            then held until the next probe (beyond the paper).
        norm_eps (1e-12): the method's eps, added to every norm (named apart from the base optimizer's own
            ``eps``, which ``**base_kwargs`` passes through). Norms are accumulated in float32
            (float64 for float64 parameters), so this is safe for bf16/fp16 parameters too.
        foreach (None): use the ``torch._foreach_*`` kernels (default) or the per-parameter loop that
            they mirror.

    The settings and their checks are the table in `hf_xsam.hyperparameters`; they are stored in every param
    group as ``xsam_<name>``, the spelling of the Trainer's flags.

    Memory: one persistent buffer the size of the parameters that receive gradients (theta_0, kept between
    steps so it is allocated once; not in ``state_dict()``), beyond the base optimizer's own state. A probe
    step holds a second parameter-sized buffer (theta_k - theta_0) while it probes; other steps compute that
    displacement inside the weights, which are restored from theta_0 right after, and allocate nothing.

    Host syncs: none in a step without a probe; a probe syncs twice (the plane's geometry, then all its
    losses at once), never per probe point.

    Driving the pieces (what a trainer does, and what ``step(closure)`` does for you)::

        loss = compute_loss(); loss.backward()        # g_0 at theta_0
        for _ in range(opt.ascent_steps):
            opt.ascent_step()                         # moves the weights; consumes .grad
            opt.zero_grad(); compute_loss().backward()  # the gradient at the new point
        info = opt.set_direction(probe_fn if opt.probe_due else None)  # .grad = d, weights = theta_0
        opt.step()                                    # the base optimizer's step
    """

    def __init__(
        self,
        params: Iterable | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = DEFAULTS["rho"],
        rho_max: float | None = DEFAULTS["rho_max"],
        alpha: float = DEFAULTS["alpha"],
        alpha_max: float = DEFAULTS["alpha_max"],
        alpha_step: float = DEFAULTS["alpha_step"],
        ascent_steps: int = DEFAULTS["ascent_steps"],
        probe_every: int = DEFAULTS["probe_every"],
        sharpness_every: int = DEFAULTS["sharpness_every"],
        probe_search: str = DEFAULTS["probe_search"],
        probe_space: str = DEFAULTS["probe_space"],
        norm_eps: float = DEFAULTS["norm_eps"],
        foreach: bool | None = None,
        **base_kwargs,
    ):
        settings = dict(rho=rho, rho_max=rho_max, alpha=alpha, alpha_max=alpha_max, alpha_step=alpha_step,
                        ascent_steps=ascent_steps, probe_every=probe_every, sharpness_every=sharpness_every,
                        probe_search=probe_search, probe_space=probe_space, norm_eps=norm_eps)
        validate(settings)
        if rho_max is None:
            settings["rho_max"] = 2 * rho
        base = _build_base(params, base_optimizer, base_kwargs)
        for group in base.param_groups:
            _refuse_group_settings(group)
        # a float setting given as an int (rho=1) is stored as a float, so state_dict() round-trips its type
        defaults = {PREFIX + name: float(value) if isinstance(value, int) and HYPERPARAMETERS[name].type is not int
                    else value for name, value in settings.items()}
        defaults.update(xsam_angle=None, xsam_step=0)
        # Optimizer.__init__ adds our defaults to the base optimizer's own group dicts; then we share its
        # groups and state, so schedulers, state_dict() and the base step all see one set. The base's defaults
        # come too: schedulers read them (transformers' polynomial and min-lr cosine read defaults["lr"]).
        super().__init__(base.param_groups, {**base.defaults, **defaults})
        self.base_optimizer = base
        self.param_groups = base.param_groups
        self.state = base.state
        self.foreach = True if foreach is None else bool(foreach)
        self._theta_0: dict[torch.Tensor, torch.Tensor] = {}  # the one persistent buffer, per parameter
        self._active: list[torch.Tensor] = []  # parameters perturbed in the current step
        self._warned_plain_closure = False
        self._groups: tuple = ()  # the process groups FSDP2 shards the parameters over, when it does
        self._window: list[MicroBatch] = []  # the micro-batches of the step in progress (`backward`)
        self.last_step_info: PassesInfo | None = None  # what the latest step's passes measured

    # ------------------------------------------------------------------ hyperparameters and counters
    def _get(self, name: str):
        return self.param_groups[0][f"xsam_{name}"]

    def _set(self, name: str, value) -> None:
        for group in self.param_groups:
            group[f"xsam_{name}"] = value

    @property
    def alpha(self) -> float:
        return self._get("alpha")

    @property
    def rho(self) -> float:
        return self._get("rho")

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (saved in state_dict(); drives the probe schedule)."""
        return self._get("step")

    @property
    def ascent_steps(self) -> int:
        return self._get("ascent_steps")

    @property
    def angle(self) -> float | None:
        """The rotation angle from v0 (radians) chosen by the latest probe in the angle space, else None."""
        return self._get("angle")

    @property
    def sharpness_due(self) -> bool:
        """True when this optimizer step is sharpness-aware (steps 0, N, 2N, ... with N = sharpness_every); the
        others are
        plain base-optimizer steps. False whenever rho = 0."""
        return self._get("rho") > 0 and self._get("step") % self._get("sharpness_every") == 0

    @property
    def probe_due(self) -> bool:
        """True when this optimizer step should re-choose alpha: a sharpness-aware step with a multiple of
        ``probe_every`` among the ``sharpness_every`` steps ending at it (steps 0, N, 2N, ... when every
        step is sharpness-aware)."""
        every = self._get("probe_every")
        return every > 0 and self.sharpness_due and self._get("step") % every < self._get("sharpness_every")

    def probe_grid(self) -> list[float]:
        """The alphas of the probe grid: 0, alpha_step, ..., up to alpha_max (included when on the grid)."""
        step, top = self._get("alpha_step"), self._get("alpha_max")
        return [round(i * step, 12) for i in range(int(math.floor(top / step + 1e-9)) + 1)]

    def probe_angles(self) -> list[float]:
        """The rotation angles (radians from v0) the angle space probes: as many as the alpha grid has points,
        evenly over [0, pi/2]."""
        n = len(self.probe_grid())
        return [ANGLE_MAX * i / (n - 1) for i in range(n)] if n > 1 else [0.0]

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__ for the base's groups
            return super().add_param_group(param_group)
        _refuse_group_settings(param_group)  # they would be overwritten below, silently
        self.base_optimizer.add_param_group(param_group)
        for key in _KEYS:
            self.param_groups[-1][key] = self.param_groups[0][key]

    def train(self) -> None:
        """Switch a base optimizer with train/eval modes (the schedule-free ones) to train mode; the Trainer and
        Accelerate call this before training steps. Otherwise nothing."""
        if callable(getattr(self.base_optimizer, "train", None)):
            self.base_optimizer.train()

    def eval(self) -> None:
        """Switch a base optimizer with train/eval modes to eval mode (its evaluation weights); otherwise nothing."""
        if callable(getattr(self.base_optimizer, "eval", None)):
            self.base_optimizer.eval()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the base optimizer (its state and our counters travel in its groups), then re-link."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:  # a plain base-optimizer state_dict has no XSAM keys: keep ours
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._active = []
        self._window = []

    # ------------------------------------------------------------------ the pieces a trainer drives
    @torch.no_grad()
    def ascent_step(self) -> None:
        """One of the k ascent steps: theta += (rho/k) g/||g|| with g the gradients now in ``.grad``.

        The first call of a step saves theta_0. The gradients are consumed (scaled in place); zero them before
        the next backward. With rho = 0 this does nothing.
        """
        rho, k, eps = self._get("rho"), self._get("ascent_steps"), self._get("norm_eps")
        if rho == 0:
            return
        if not self._active:
            self._active = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            if not self._active:
                raise RuntimeError("XSAM.ascent_step() found no gradients: run backward() at theta_0 first")
            self._groups = sharding.shard_groups(self._active)
            self._save_theta_0()
        # local shards of FSDP2 parameters (views of them), the tensors themselves otherwise
        params = sharding.local(self._active)
        grads = sharding.local(_grads(self._active, fill_missing=True))  # unused at theta_i: zero
        scale = (rho / k) / (_global_norm(grads, self.foreach, self._groups) + eps)
        if self.foreach:
            torch._foreach_mul_(grads, scale)
            torch._foreach_add_(params, grads)
        else:
            for p, g in zip(params, grads):
                g.mul_(scale)
                p.add_(g)

    @torch.no_grad()
    def set_direction(
        self,
        probe_fn: Callable[[], torch.Tensor] | None = None,
        reduce_losses: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> DirectionInfo:
        """Turn g_k (in ``.grad``, weights at theta_k) into the XSAM direction d, restore theta_0 bitwise.

        probe_fn: when given, alpha is re-chosen first: ``probe_fn()`` is called once per probe point the search
            evaluates (all 21 by default; at most 8 with ``probe_search="fast"``) with the weights at
            theta_0 + rho_max v(alpha) and must return the loss on the step's batch (no backward, the same
            dropout masks every call). Pass it only when ``probe_due`` (``step(closure)`` does).
        reduce_losses: applied to each stage's vector of probe losses before any decision, e.g. an all-reduce
            mean across processes, so that every rank picks the same alpha (one collective per stage: one for
            the grid, three for the fast search).
        """
        if self._get("rho") == 0 or not self._active:
            return DirectionInfo(psi=None, alpha=self.alpha)  # nothing moved: .grad already holds g_0
        if reduce_losses is None:
            reduce_losses = _mean_over_processes()
        params = sharding.local(self._active)
        grads = sharding.local(_grads(self._active, fill_missing=True))
        theta_0 = [self._theta_0[p] for p in self._active]
        info = DirectionInfo(psi=None, alpha=self.alpha)
        if self.alpha != 1.0 or self.angle is not None or probe_fn is not None:
            eps = self._get("norm_eps")
            e = self._displacement(params, theta_0, in_place=probe_fn is None)
            # the weights are free until theta_0 is restored: they hold w = ||g_k|| (v0 - v1), no new buffer
            norms, psi = _geometry(e, grads, params, eps, self.foreach, self._groups)
            if probe_fn is not None:
                probed = self._probe(params, theta_0, e, grads, norms, psi, probe_fn, reduce_losses)
                if probed is not None:
                    info.probe_alphas, info.probe_losses = probed
                info.alpha = self.alpha
                _chord(params, e, grads, norms, eps, self.foreach)  # the probe moved the weights: w again
            if self.angle is not None:  # the held angle: alpha = angle / psi of this step, with no host sync
                a = _rotation_coefficients(self.angle, psi, norms, eps)
            else:
                a = _slerp_coefficients(self.alpha, psi, norms, eps)
            # d = ||g_k|| (a0 v0 + a1 v1) = a0 w + (a0 + a1) g_k; the cumulative sum gives (a0, a0 + a1) in one
            # operation, and the degenerate (0, 1) gives g_k bitwise
            c_w, c_g = torch.cumsum(a, 0).unbind()
            if self.foreach:
                torch._foreach_mul_(params, c_w)
                torch._foreach_mul_(grads, c_g)
                torch._foreach_add_(grads, params)
            else:
                for p, g in zip(params, grads):
                    p.mul_(c_w)
                    g.mul_(c_g)
                    g.add_(p)
            info.psi = psi
        # alpha = 1 without a probe is SAM: d = g_k, already in .grad
        self._restore_theta_0()
        self._active = []  # the next ascent_step starts a new pass set (next micro-batch or step)
        return info

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor] | None = None):
        """Without a closure: the base optimizer's step with the gradients now in ``.grad`` (after `backward` or
        the pieces, that is the XSAM direction). With a closure: one whole XSAM step on one batch, returning the
        loss at theta_0 (the gradients are zeroed first).

        Closure contract: ``closure()`` computes the loss on one fixed batch, calls ``loss.backward()`` and
        returns the loss. A closure that also takes ``backward=False`` and then skips the backward (it runs under
        ``torch.no_grad()``) lets the probe pay forward passes only; a standard PyTorch closure works too, but
        each probe point then pays a backward whose gradients are thrown away (warned once).

        XSAM replays the random number generators so that every pass sees the dropout masks of the first;
        afterwards the generators are where a single pass would have left them. Only the first pass updates
        BatchNorm running statistics (the layers are found as they run). Under torch.distributed (DDP), the
        probe's losses are averaged over the processes, so every rank picks the same alpha.
        """
        if closure is None:
            return self._base_step()
        self.zero_grad(set_to_none=True)
        loss = self.backward(closure)
        self._base_step()
        return loss

    @torch.no_grad()
    def backward(self, closure: Callable[..., torch.Tensor], *, last: bool = True) -> torch.Tensor:
        """One micro-batch of a step: its theta_0 pass now (``closure()``, gradients added to ``.grad``); on the
        step's last micro-batch (``last=True``), the rest of the step's passes over every micro-batch given since
        the previous step. Then ``.grad`` holds the direction d of the whole batch, the weights are theta_0, and
        ``step()`` (or Accelerate's ``optimizer.step()``, which unscales fp16 gradients first) takes the base step.

        For custom loops with gradient accumulation; the closure contract is `step`'s, and each closure's loss
        must be its micro-batch's share of the step's loss (e.g. the mean loss divided by the number of
        micro-batches), as for plain accumulation. Example with Accelerate::

            with accelerator.accumulate(model):
                xsam.backward(closure, last=accelerator.sync_gradients)  # instead of accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()

        Returns the closure's loss at theta_0.
        """
        rng = RNGState.capture(self.devices)
        with torch.enable_grad():
            loss = closure()
        self._window.append(MicroBatch(run=partial(self._replay, closure), rng=rng))
        if last:
            batches, self._window = self._window, []
            self.last_step_info = sharpness_passes(self, batches)
        return loss

    def _replay(self, closure: Callable[..., torch.Tensor], backward: bool) -> torch.Tensor:
        if backward:
            with torch.enable_grad():
                return closure()
        return self._forward_only(closure)

    @property
    def devices(self) -> set[torch.device]:
        """The devices of the parameters (whose random generators the replays rewind)."""
        return {p.device for group in self.param_groups for p in group["params"]}

    def _forward_only(self, closure: Callable[..., torch.Tensor]) -> torch.Tensor:
        """The closure's loss at a probe point. A closure without ``backward`` runs its backward anyway: into
        fresh gradients, thrown away, so that g_k (still needed for the next points) is left alone."""
        if _takes_backward(closure):
            return closure(backward=False)
        if not self._warned_plain_closure:
            warnings.warn(
                "XSAM.step(closure): the closure takes no `backward` argument, so each of the probe's points runs "
                "a backward pass it does not need. Write it as `def closure(backward=True): loss = ...; "
                "if backward: loss.backward(); return loss` to probe with forward passes only.",
                stacklevel=4,
            )
            self._warned_plain_closure = True
        params = [p for group in self.param_groups for p in group["params"]]
        kept = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                return closure().detach()
        finally:
            for p, grad in zip(params, kept):
                p.grad = grad

    @torch.no_grad()
    def discard_step(self) -> None:
        """Abandon the step in progress: the weights go back to theta_0 if an ascent moved them, and the
        micro-batches given to `backward` are dropped (``.grad`` is left as it is: zero it before the next step).
        The pass driver calls this when a pass raises, e.g. out of memory, so a caller that retries (the Trainer's
        ``auto_find_batch_size``) resumes from unperturbed weights."""
        if self._active:
            self._restore_theta_0()
        self._active = []
        self._window = []

    def _base_step(self):
        self._active = []
        result = self.base_optimizer.step()
        self._set("step", self._get("step") + 1)
        return result

    # ------------------------------------------------------------------ internals
    def _save_theta_0(self) -> None:
        params = sharding.local(self._active)  # sharded parameters keep a sharded theta_0
        for key, p in zip(self._active, params):
            kept = self._theta_0.get(key)
            if kept is None or kept.shape != p.shape or kept.dtype != p.dtype:
                self._theta_0[key] = torch.empty_like(p, memory_format=torch.preserve_format)
        theta_0 = [self._theta_0[p] for p in self._active]
        if self.foreach:
            torch._foreach_copy_(theta_0, params)
        else:
            for t, p in zip(theta_0, params):
                t.copy_(p)

    def _displacement(self, params, theta_0, in_place: bool) -> list[torch.Tensor]:
        """e = theta_k - theta_0. Without a probe it is computed into the weights themselves, which are
        restored from theta_0 afterwards anyway: no allocation. A probe needs the weights for its points, so
        then e is the one transient buffer, freed when set_direction returns."""
        if in_place:
            if self.foreach:
                torch._foreach_sub_(params, theta_0)
            else:
                for p, t in zip(params, theta_0):
                    p.sub_(t)
            return params
        if self.foreach:
            return torch._foreach_sub(params, theta_0)
        return [p - t for p, t in zip(params, theta_0)]

    def _restore_theta_0(self) -> None:
        params = sharding.local(self._active)
        theta_0 = [self._theta_0[p] for p in self._active]
        if self.foreach:
            torch._foreach_copy_(params, theta_0)
        else:
            for p, t in zip(params, theta_0):
                p.copy_(t)

    def _probe(self, params, theta_0, e, grads, norms, psi, probe_fn, reduce_losses):
        """Evaluate probe_fn at theta_0 + rho_max v(alpha) over the probe points the search picks; set alpha (and
        in the angle space the angle) to the argmax. Returns (alphas, losses) of the evaluated points in
        increasing alpha, or None when the plane is degenerate."""
        rho_max, eps = self._get("rho_max"), self._get("norm_eps")
        # Host sync: the plane's geometry, so each point is set with plain scalar axpys (no temporaries).
        geometry = torch.cat([norms, psi.reshape(1)]).double().cpu()
        norms_h, psi_t = geometry[:2], geometry[2]
        n_e_h, n_g_h = norms_h.unbind()
        if _degenerate(torch.sin(psi_t), norms_h, eps) and reduce_losses is None:
            return None  # v0 and v1 span no plane: every v(alpha) is v1, nothing to choose
        # (with reduce_losses every rank must join the collectives: a degenerate rank probes v1 at every point)
        in_angles = self._get("probe_space") == "angle"
        points = self.probe_angles() if in_angles else self.probe_grid()
        psi_h = float(psi_t)

        def alpha_of(i: int) -> float:
            if not in_angles:
                return points[i]
            return points[i] / psi_h if psi_h > 0 else 1.0  # psi = 0 is degenerate: v1 whatever alpha is

        def evaluate(indices: list[int]) -> list[float]:
            losses = []
            for i in indices:
                a0, a1 = _slerp_coefficients(alpha_of(i), psi_t, norms_h, eps).unbind()
                c0 = (rho_max * a0 / (n_e_h + eps)).item()
                c1 = (rho_max * a1 / (n_g_h + eps)).item()
                if self.foreach:
                    torch._foreach_copy_(params, theta_0)
                    torch._foreach_add_(params, e, alpha=c0)
                    torch._foreach_add_(params, grads, alpha=c1)
                else:
                    for p, t, ei, g in zip(params, theta_0, e, grads):
                        p.copy_(t)
                        p.add_(ei, alpha=c0)
                        p.add_(g, alpha=c1)
                losses.append(probe_fn().detach().float().reshape(()))
            # the weights are left at the last probe point: set_direction restores theta_0 next
            losses = torch.stack(losses)
            if reduce_losses is not None:
                losses = reduce_losses(losses)
            return losses.tolist()  # host sync: a stage's losses at once (grid: one stage; fast: three)

        search = grid_search if self._get("probe_search") == "grid" else fast_search
        found = search(len(points), evaluate)
        order = sorted(found)
        values = [found[i] for i in order]
        best = _argmax_first(values)
        if best is not None:
            if in_angles:
                self._set("angle", float(points[order[best]]))
            self._set("alpha", float(alpha_of(order[best])))
        return [alpha_of(i) for i in order], values


# ---------------------------------------------------------------------- probe searches (pure functions)
def grid_search(n: int, evaluate: Callable[[list[int]], list[float]]) -> dict[int, float]:
    """The paper's exhaustive search: every one of the n probe points, in one stage. Returns {index: loss}."""
    return dict(zip(range(n), evaluate(list(range(n)))))


def fast_search(n: int, evaluate: Callable[[list[int]], list[float]]) -> dict[int, float]:
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


# ---------------------------------------------------------------------- helpers (pure functions)
def _refuse_group_settings(group: dict) -> None:
    clash = {key: group[key] for key in sorted(set(group) & set(_KEYS))}
    if clash:
        raise ValueError(
            f"param group sets {clash}: XSAM's hyperparameters are global (its norms span every group); "
            "pass them to XSAM(...) instead"
        )


def _build_base(params, base_optimizer, base_kwargs) -> Optimizer:
    if isinstance(base_optimizer, Optimizer):
        if params is not None or base_kwargs:
            raise ValueError(
                "base_optimizer is an optimizer instance: pass params=None and no optimizer kwargs "
                "(the instance already has its parameters and settings)"
            )
        if isinstance(base_optimizer, XSAM):
            raise ValueError("base_optimizer=XSAM(...) is invalid: XSAM cannot wrap itself")
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
        if base_optimizer is XSAM:
            raise ValueError("base_optimizer=XSAM is invalid: XSAM cannot wrap itself")
        if params is None:
            raise ValueError("params=None is invalid when base_optimizer is a class: pass the parameters")
        return base_optimizer(params, **base_kwargs)
    raise ValueError(
        f"base_optimizer={base_optimizer!r} is invalid: must be a torch.optim.Optimizer subclass "
        "(e.g. torch.optim.AdamW) or an instance of one"
    )


def _mean_over_processes() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Under torch.distributed with several processes (DDP, or any loop that keeps replicas in step), the probe's
    losses are averaged over the default group, so that every rank picks the same alpha; None otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    world = torch.distributed.get_world_size()
    if world == 1:
        return None

    def mean(losses: torch.Tensor) -> torch.Tensor:
        losses = losses.clone()
        torch.distributed.all_reduce(losses)
        return losses / world

    return mean


def _takes_backward(closure: Callable) -> bool:
    try:
        parameters = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: assume the standard contract
        return False
    return any(p.name == "backward" or p.kind is p.VAR_KEYWORD for p in parameters)


def _grads(params, fill_missing: bool = False) -> list[torch.Tensor]:
    if fill_missing:
        # a parameter used at theta_0 but not at theta_k (e.g. routed away) has a zero gradient there
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _accumulation_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _global_norm(tensors, foreach: bool, groups: tuple = ()) -> torch.Tensor:
    """L2 norm over all tensors, accumulated in float32 (float64 for float64 tensors); over every rank's shard
    when ``groups`` (sharded parameters) are given."""
    return _global_norms([tensors], foreach, groups)[0]


def _global_norms(lists, foreach: bool, groups: tuple = ()) -> torch.Tensor:
    """The L2 norms over each of several equally long lists of tensors, as one small vector, from one multi-tensor
    norm over all of them (accumulated in float32, float64 for float64 tensors). With ``groups`` the tensors are
    local shards: their squared norms are summed over the ranks in one all-reduce, then rooted."""
    tensors = [t for ts in lists for t in ts]
    dtype = _accumulation_dtype(tensors)
    if foreach:
        norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]
    per_tensor = torch.stack(norms).view(len(lists), -1)
    if not groups:
        return torch.linalg.vector_norm(per_tensor, 2, dim=1)
    return sharding.sum_over(per_tensor.square().sum(dim=1), groups).sqrt()


def _chord(out, e, grads, norms, eps: float, foreach: bool) -> None:
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


def _geometry(e, grads, out, eps: float, foreach: bool, groups: tuple = ()):
    """(||e||, ||g_k||) as one 2-vector, and psi, the angle between v0 and v1, as a 0-dim tensor (no host sync);
    leaves w = ||g_k|| (v0 - v1) in ``out``.

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
    norms = _global_norms([e, grads], foreach, groups)
    _chord(out, e, grads, norms, eps, foreach)
    chord = _global_norm(out, foreach, groups) / (norms[1] + eps)
    psi = torch.asin(chord.mul_(0.5).clamp_(max=1.0)).mul_(2.0)
    return norms, psi


def _degenerate(sin_psi, norms, eps: float) -> torch.Tensor:
    """v0 and v1 span no plane: (anti)parallel, or one of them has no length."""
    return (sin_psi < SIN_PSI_MIN) | (norms <= eps).any()


def _arc_coefficients(psi, beta, norms, eps: float) -> torch.Tensor:
    """(a0, a1) with a0 v0 + a1 v1 the unit vector at angle ``beta`` from v0 towards v1 on their great circle:
    [sin(psi - beta), sin(beta)] / sin(psi); (0, 1), i.e. v1, when the plane is degenerate. One 2-vector, from
    one sine of the three angles stacked."""
    sines = torch.sin(torch.stack([psi - beta, beta, psi]))
    degenerate = _degenerate(sines[2], norms, eps)
    # arange(2) is (0, 1), made on the device (a tensor built from a list would be a copy from the host); the
    # inf/nan of a zero sin(psi) in the other branch is discarded by where
    v1 = torch.arange(2, dtype=psi.dtype, device=psi.device)
    return torch.where(degenerate, v1, sines[:2] / sines[2])


def _slerp_coefficients(alpha: float, psi, norms, eps: float) -> torch.Tensor:
    """(a0, a1) with v(alpha) = a0 v0 + a1 v1: [sin((1 - alpha) psi), sin(alpha psi)] / sin(psi)."""
    return _arc_coefficients(psi, psi * alpha, norms, eps)


def _rotation_coefficients(angle: float, psi, norms, eps: float) -> torch.Tensor:
    """(a0, a1) of the unit vector at ``angle`` radians from v0 towards v1 in their plane: the slerp with
    alpha = angle / psi, written so that psi stays on the device (no host sync)."""
    return _arc_coefficients(psi, torch.full_like(psi, angle), norms, eps)


def _argmax_first(values: list[float]) -> int | None:
    """Index of the largest finite value (the first on ties); None when no value is finite."""
    best = None
    for i, v in enumerate(values):
        if math.isfinite(v) and (best is None or v > values[best]):
            best = i
    return best
