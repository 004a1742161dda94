"""XSAM: eXplicit Sharpness-Aware Minimization (Chen & Zhou, ICLR 2026, arXiv 2603.10048), in pure PyTorch.

The optimizer itself: its settings, its state and the pieces of a step, reading top to bottom like
docs/algorithm.md. The maths lives beside it: the plane of v0 and v1 in `hf_xsam.geometry`, the probe's searches
in `hf_xsam.probe`, the passes over a step's micro-batches in `hf_xsam.passes`. Nothing here imports transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

from hf_xsam import geometry, reuse, sharding
from hf_xsam.closures import closure_batch
from hf_xsam.distributed import mean_over_processes
from hf_xsam.hyperparameters import DEFAULTS, HYPERPARAMETERS, OPTIMIZER_SETTINGS, PREFIX, validate
from hf_xsam.passes import sharpness_passes
from hf_xsam.probe import alpha_at, alpha_grid, probe_points, search
from hf_xsam.replay import RNGState
from hf_xsam.types import DirectionInfo, MicroBatch, PassesInfo

# Keys XSAM adds to every param group, "xsam_<name>" as the Trainer flags spell them (the prefix keeps them apart
# from the base optimizer's own keys). They are global to the optimizer (the norms span every group), live in the
# groups so that state_dict() carries them, and are kept equal across groups. alpha is a setting and a counter:
# the probe moves it.
_COUNTERS = ("angle", "step")
_KEYS = tuple(PREFIX + name for name in OPTIMIZER_SETTINGS + _COUNTERS)


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
    length rho/k; gradient g_k at theta_k; v0 = (theta_k - theta_0)/||.||, v1 = g_k/||g_k||, psi their angle;
    direction d = ||g_k|| v(alpha) with v(alpha) the slerp from v0 through v1; the weights go back to theta_0
    bitwise and the base optimizer steps with d as the gradient. Every ``probe_every`` steps alpha is re-chosen
    by probing the loss at theta_0 + rho_max v(alpha) over the probe grid and keeping the argmax (ties: the
    smaller alpha). alpha = 1 without probing is exactly SAM; rho = 0 is exactly the base optimizer.

    Args:
        params: parameters or param groups, as for any optimizer; ``None`` when ``base_optimizer`` is an instance.
        base_optimizer: an optimizer class (built with ``params`` and ``**base_kwargs``) or an optimizer instance.
        rho (0.05), rho_max (2 * rho), alpha (1.0), alpha_max (2.0), alpha_step (0.1), ascent_steps (1),
        probe_every (200), sharpness_every (1), reuse (False), probe_search ("grid"), probe_space ("alpha"),
        norm_eps (1e-12):
            the settings of the table in `hf_xsam.hyperparameters` (meaning, default and check of each), stored in
            every param group as ``xsam_<name>``, the spelling of the Trainer's flags. ``norm_eps`` is named apart
            from the base optimizer's own ``eps``, which ``**base_kwargs`` passes through.
        foreach (None): use the ``torch._foreach_*`` kernels (default) or the per-parameter loop that they mirror.

    Memory: one persistent buffer the size of the parameters that receive gradients (theta_0, not in
    ``state_dict()``), beyond the base optimizer's state; a probe step holds a second one (theta_k - theta_0)
    while it probes. Host syncs: none in a step without a probe; a probe syncs twice (the plane's geometry, then
    all its losses at once).

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
        reuse: bool = DEFAULTS["reuse"],
        probe_search: str = DEFAULTS["probe_search"],
        probe_space: str = DEFAULTS["probe_space"],
        norm_eps: float = DEFAULTS["norm_eps"],
        foreach: bool | None = None,
        **base_kwargs,
    ):
        settings = dict(rho=rho, rho_max=rho_max, alpha=alpha, alpha_max=alpha_max, alpha_step=alpha_step,
                        ascent_steps=ascent_steps, probe_every=probe_every, sharpness_every=sharpness_every,
                        reuse=reuse, probe_search=probe_search, probe_space=probe_space, norm_eps=norm_eps)
        validate(settings)
        if rho_max is None:
            settings["rho_max"] = 2 * rho
        base = _build_base(params, base_optimizer, base_kwargs)
        for group in base.param_groups:
            _refuse_group_settings(group)
        # a float setting given as an int (rho=1) is stored as a float, so state_dict() round-trips its type
        defaults = {PREFIX + name: float(value) if type(value) is int and HYPERPARAMETERS[name].type is not int
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
        self._norm_g0: torch.Tensor | None = None  # ||g_0|| of the step in progress (reuse splits d along g_0)
        self._local: list[torch.Tensor] = []  # their local shards (the tensors themselves unless FSDP2 shards them)
        self._warned_plain_closure = False
        self._groups: tuple = ()  # the process groups FSDP2 shards the parameters over, when it does
        self._window: list[MicroBatch] = []  # the micro-batches of the step in progress (`backward`)
        self.last_step_info: PassesInfo | None = None  # what the latest step's passes measured

    # ------------------------------------------------------------------ settings and counters
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

    @property
    def correction_due(self) -> bool:
        """True on a plain step that carries the last sharpness step's correction (``reuse``, `hf_xsam.reuse`)."""
        return self._get("reuse") and self._get("rho") > 0 and not self.sharpness_due and bool(self._theta_0)

    def probe_grid(self) -> list[float]:
        """The alphas of the probe grid: 0, alpha_step, ..., up to alpha_max (included when on the grid)."""
        return alpha_grid(self._get("alpha_step"), self._get("alpha_max"))

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
        self._theta_0.update(reuse.held(self.state))  # the corrections a checkpoint carried
        self._active, self._local, self._window = [], [], []

    # ------------------------------------------------------------------ the pieces of a step
    @torch.no_grad()
    def ascent_step(self) -> None:
        """One of the k ascent steps: theta += (rho/k) g/||g|| with g the gradients now in ``.grad``.

        The first call of a step saves theta_0 (and takes the parameters' local shards, once per step). The
        gradients are consumed (scaled in place); zero them before the next backward. With rho = 0 this does
        nothing.
        """
        rho, k, eps = self._get("rho"), self._get("ascent_steps"), self._get("norm_eps")
        if rho == 0:
            return
        if not self._active:
            self._active = self._with_grads()
            if not self._active:
                raise RuntimeError("XSAM.ascent_step() found no gradients: run backward() at theta_0 first")
            self._groups = sharding.shard_groups(self._active)
            self._local = sharding.local(self._active)  # views: writing to them writes the parameters
            self._save_theta_0()
        grads = self._local_grads()
        norm = geometry.global_norm(grads, self.foreach, self._groups)
        if self._norm_g0 is None:  # the step's first ascent: ||g_0||
            self._norm_g0 = norm
        scale = (rho / k) / (norm + eps)
        geometry.ascend(self._local, grads, scale, self.foreach)

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
            the grid, three for the fast search). Defaults to the mean over the processes when several run.
        """
        if self._get("rho") == 0 or not self._active:
            return DirectionInfo(psi=None, alpha=self.alpha)  # nothing moved: .grad already holds g_0
        if reduce_losses is None:
            reduce_losses = mean_over_processes()
        params, grads = self._local, self._local_grads()
        theta_0 = [self._theta_0[p] for p in self._active]
        info = DirectionInfo(psi=None, alpha=self.alpha)
        carrying = self._get("reuse")  # then d and the correction from the plane, and theta_0 restored with them
        if self.alpha != 1.0 or self.angle is not None or probe_fn is not None or carrying:  # else SAM: d = g_k
            eps = self._get("norm_eps")
            e = geometry.displacement(params, theta_0, in_place=probe_fn is None, foreach=self.foreach)
            # the weights are free until theta_0 is restored: they hold w = ||g_k|| (v0 - v1), no new buffer
            norms, psi = geometry.plane(e, grads, params, eps, self.foreach, self._groups)
            if probe_fn is not None:
                probed = self._probe(theta_0, e, grads, norms, psi, probe_fn, reduce_losses)
                if probed is not None:
                    info.probe_alphas, info.probe_losses = probed
                info.alpha = self.alpha
                geometry.chord(params, e, grads, norms, eps, self.foreach)  # the probe moved the weights: w again
            if self.angle is not None:  # the held angle: alpha = angle / psi of this step, with no host sync
                a = geometry.rotation_coefficients(self.angle, psi, norms, eps)
            else:
                a = geometry.slerp_coefficients(self.alpha, psi, norms, eps)
            if carrying:
                info.correction = reuse.carry(params, theta_0, grads, a, psi, norms, self._norm_g0, eps,
                                              self.foreach)
            else:
                geometry.direction(params, grads, a, self.foreach)
            info.psi = psi
        self._end_passes(restore=not carrying)
        return info

    @torch.no_grad()
    def apply_correction(self) -> None:
        """On a step where ``correction_due``, with the step's gradient g in ``.grad``: .grad = g + ||g|| c', with
        c' the correction the last sharpness step kept (`hf_xsam.reuse.correct`)."""
        reuse.correct_step(self._with_grads(), self._theta_0, self._get("norm_eps"), self.foreach)

    @torch.no_grad()
    def step(self, closure: Callable[..., torch.Tensor] | None = None):
        """Without a closure: the base optimizer's step with the gradients now in ``.grad`` (after `backward` or
        the pieces, that is the XSAM direction). With a closure: one whole XSAM step on one batch, returning the
        loss at theta_0 (the gradients are zeroed first).

        The closure's contract (``backward=False`` lets the probe skip backwards) is in `hf_xsam.closures`.

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
        self._window.append(closure_batch(closure, rng, self))
        if last:
            batches, self._window = self._window, []
            self.last_step_info = sharpness_passes(self, batches)
        return loss

    @property
    def devices(self) -> set[torch.device]:
        """The devices of the parameters (whose random generators the replays rewind)."""
        return {p.device for group in self.param_groups for p in group["params"]}

    @torch.no_grad()
    def discard_step(self) -> None:
        """Abandon the step in progress: the weights go back to theta_0 if an ascent moved them, and the
        micro-batches given to `backward` are dropped (``.grad`` is left as it is: zero it before the next step).
        The pass driver calls this when a pass raises, e.g. out of memory, so a caller that retries (the Trainer's
        ``auto_find_batch_size``) resumes from unperturbed weights."""
        if self._active:
            self._end_passes()
        self._window = []

    def _base_step(self):
        self._active, self._local = [], []
        result = self.base_optimizer.step()
        if self._get("reuse"):
            reuse.hold(self._with_grads(), self._theta_0, self.state)
        self._set("step", self._get("step") + 1)
        return result

    # ------------------------------------------------------------------ internals
    def _local_grads(self) -> list[torch.Tensor]:
        # a parameter used at theta_0 but not at theta_k (e.g. routed away) has a zero gradient there
        for p in self._active:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return sharding.local([p.grad for p in self._active])

    def _with_grads(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def _save_theta_0(self) -> None:
        for key, p in zip(self._active, self._local):  # sharded parameters keep a sharded theta_0
            kept = self._theta_0.get(key)
            if kept is None or kept.shape != p.shape or kept.dtype != p.dtype:
                self._theta_0[key] = torch.empty_like(p, memory_format=torch.preserve_format)
        geometry.copy([self._theta_0[p] for p in self._active], self._local, self.foreach)

    def _end_passes(self, restore: bool = True) -> None:
        """Weights back to theta_0 bitwise (unless already); the next ascent_step starts a new pass set."""
        if restore:
            geometry.copy(self._local, [self._theta_0[p] for p in self._active], self.foreach)
        self._norm_g0 = None
        self._active, self._local = [], []

    def _probe(self, theta_0, e, grads, norms, psi, probe_fn, reduce_losses):
        """Evaluate probe_fn at theta_0 + rho_max v(alpha) over the probe points the search picks; set alpha (and
        in the angle space the angle) to the argmax. Returns (alphas, losses) of the evaluated points in
        increasing alpha, or None when the plane is degenerate."""
        rho_max, eps = self._get("rho_max"), self._get("norm_eps")
        # Host sync: the plane's geometry, so each point is set with plain scalar axpys (no temporaries).
        host = torch.cat([norms, psi.reshape(1)]).double().cpu()
        norms_h, psi_t = host[:2], host[2]
        n_e_h, n_g_h = norms_h.unbind()
        if geometry.degenerate(torch.sin(psi_t), norms_h, eps) and reduce_losses is None:
            return None  # v0 and v1 span no plane: every v(alpha) is v1, nothing to choose
        # (with reduce_losses every rank must join the collectives: a degenerate rank probes v1 at every point)
        space = self._get("probe_space")
        points = probe_points(space, self._get("alpha_step"), self._get("alpha_max"))
        alphas = [alpha_at(space, point, float(psi_t)) for point in points]

        def evaluate(indices: list[int]) -> list[float]:
            losses = []
            for i in indices:
                a0, a1 = geometry.slerp_coefficients(alphas[i], psi_t, norms_h, eps).unbind()
                c0, c1 = (rho_max * a0 / (n_e_h + eps)).item(), (rho_max * a1 / (n_g_h + eps)).item()
                geometry.set_point(self._local, theta_0, e, grads, c0, c1, self.foreach)
                losses.append(probe_fn().detach().float().reshape(()))
            # the weights are left at the last probe point: set_direction restores theta_0 next
            losses = torch.stack(losses)
            if reduce_losses is not None:
                losses = reduce_losses(losses)
            return losses.tolist()  # host sync: a stage's losses at once (grid: one stage; fast: three)

        order, losses, best = search(self._get("probe_search"), len(points), evaluate)
        if best is not None:
            if space == "angle":
                self._set("angle", float(points[order[best]]))
            self._set("alpha", float(alphas[order[best]]))
        return [alphas[i] for i in order], losses


# ---------------------------------------------------------------------- helpers
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
