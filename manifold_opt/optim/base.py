"""The batched optimizer path shared by every optimizer of the package.

Each step, the parameters of a param group that have gradients are grouped into buckets
by (manifold, point shape, geometry dtype, device, and a per-optimizer key such as "has a
momentum buffer"). A bucket of plain (Euclidean) tensors is stepped by ``torch.optim``'s
own functional kernels (fused by default), so it gets their numbers bit for bit. Every
other bucket is viewed (one parameter) or stacked (several) as one
``(num_points, *point_shape)`` tensor, stepped by one call of a pure update function into
scratch buffers, and written back. Per-parameter state lives in ``self.state[p]`` in the
parameter layout, so checkpoints are those of ``torch.optim``.

Nothing derived from a parameter, a gradient or the state is read on the host during a
step: a bucket's validity is a device flag, and writing back keeps the old values where
the flag is false (``torch.where``), as GradScaler's found-inf mechanism does.
``nonfinite="raise"`` reads the flags once, after every bucket is computed and before
anything is written, so a step that raises changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from ..manifolds import Euclidean, Manifold, from_geoopt, is_geoopt_manifold
from ..manifolds.base import Workspace
from ..manifolds.linalg import real_dtype
from ..parameter import _onto_manifold_when_loaded, check_manifold_argument
from .buckets import Bucket, BucketUpdate, all_finite, geometry_dtype, grads_finite
from .checkpoints import Checkpoints
from .functional import keep_on_manifold
from .projection import PROJECTED, mark_written, needs_projection, projects_points
from .sharded import (
    Exchange,
    LocalShards,
    agree_on_all_ranks,
    all_reduce_owned,
    check_row_sharded,
    full_tensor_rows,
    gather_to_owners,
    is_sharded,
    scatter_from_owners,
)
from .tracking import TRACKING

EUCLIDEAN = Euclidean()
# Manifold parameters with at least this many entries get a bucket of their own (views of
# the parameter and its state, no copies): stacking only pays where per-call overhead does.
STACK_BELOW = 2**16
NONFINITE_POLICIES = ("skip", "raise")


def manifold_of(parameter: Tensor) -> Manifold:
    """The manifold a parameter lives on: its ``.manifold`` (geoopt's too), else Euclidean."""
    manifold = getattr(parameter, "manifold", None)
    if manifold is None:
        return EUCLIDEAN
    if isinstance(manifold, Manifold):
        return manifold
    if is_geoopt_manifold(manifold):
        return from_geoopt(manifold, parameter.dim())
    raise TypeError(f"parameter of shape {tuple(parameter.shape)} has an unknown .manifold of type {type(manifold)}")


@dataclass(frozen=True)
class _StaticKey:
    """The state-independent part of a parameter's bucket key (see ``_group_buckets``)."""

    id: int
    manifold: Manifold
    point_shape: tuple[int, ...]
    dtype: torch.dtype  # the geometry dtype
    device: torch.device
    own_bucket: bool
    shape: torch.Size
    param_dtype: torch.dtype
    declared: bool  # the manifold came from the parameter's ``.manifold``
    sharded: bool  # a DTensor (FSDP2): stepped by its owner rank

    def matches(self, param: Tensor, manifold: Manifold) -> bool:
        return (
            manifold is self.manifold
            and param.dtype is self.param_dtype
            and param.shape == self.shape
            and param.device == self.device
        )


@dataclass
class _Pending:
    """A computed bucket, not yet written (``nonfinite="raise"`` writes after one check)."""

    ok: Tensor
    commit: Callable[[], None]
    describe: Callable[[], str]


class BucketedOptimizer(Checkpoints):
    """Base class: ``torch.optim.Optimizer`` conventions with one batched update per bucket.

    Subclasses implement :meth:`_step_bucket` (a bucket of points on a manifold),
    :meth:`_plain_step` (a bucket of plain tensors, by ``torch.optim``'s kernels), and may
    override :meth:`_bucket_key`, :meth:`_init_state` and :meth:`_bucket_committed`.

    Args:
        params: tensors or param-group dicts, as for ``torch.optim``. A group's
            ``"manifold"`` (a :class:`~manifold_opt.manifolds.Manifold` instance) declares
            the manifold of all its tensors (see :meth:`add_param_group`); otherwise each
            tensor's ``.manifold`` (a :class:`~manifold_opt.ManifoldParameter`'s, or
            geoopt's) decides, and tensors without one are Euclidean.
        defaults: default hyperparameters of a group.
        nonfinite: what a bucket with a NaN/Inf gradient, or whose update comes out
            non-finite, does: ``"skip"`` (default: its parameters and state stay untouched,
            decided on the device, with no host synchronization; :attr:`skipped_steps`
            counts the steps that skipped any, :attr:`skipped_buckets` the buckets) or
            ``"raise"`` (a ``FloatingPointError`` before anything of the step is written; one
            host read per step).

    A bucket's first step (the first of a parameter, the first after :meth:`add_param_group`
    or :meth:`load_state_dict`, the first after an in-place write into a parameter since its
    last step) first projects the points that are off the manifold, batched and with no host
    read; points on it are kept bit for bit (see ``docs/design.md``, points off the manifold).
    Zero-size manifold parameters are skipped.

    Attributes:
        reprojected_points: points re-projected by the drift check (fixed iteration counts
            only, see :attr:`Manifold.retraction_drifts`).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], nonfinite: str = "skip") -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.reprojected_points = 0
        self._skipped: dict[torch.device, Tensor] = {}  # skipped buckets
        self._skipped_steps: dict[torch.device, Tensor] = {}  # steps with a skipped bucket
        self._step_skips: list[Tensor] = []  # this step's flags, one per committed bucket
        self._workspace = Workspace()
        self._static_keys: dict[Tensor, _StaticKey] = {}
        self._static_ids: dict[tuple[Any, ...], int] = {}
        self._stabilize_counts: dict[int, int] = {}
        super().__init__(params, defaults)

    _NOT_PICKLED = ("_workspace", "_static_keys", "_static_ids")  # caches, rebuilt on demand

    def _rebuild_caches(self) -> None:
        self._workspace = Workspace()
        self._static_keys = {}
        self._static_ids = {}
        self.__dict__.setdefault("_stabilize_counts", {})
        self.__dict__.setdefault("nonfinite", "skip")
        self.__dict__.setdefault("reprojected_points", 0)
        self.__dict__.setdefault("_skipped", {})
        self.__dict__.setdefault("_skipped_steps", {})
        self.__dict__.setdefault("_step_skips", [])

    @property
    def skipped_steps(self) -> int:
        """Calls of :meth:`step` that skipped something for a non-finite gradient or update
        (one per call, however many buckets it skipped; reading it synchronizes)."""
        return int(sum(int(count) for count in self._skipped_steps.values()))

    @property
    def skipped_buckets(self) -> int:
        """Bucket steps skipped (a call of :meth:`step` that skips two buckets counts 2;
        reading it synchronizes)."""
        return int(sum(int(count) for count in self._skipped.values()))

    # ------------------------------------------------------------ subclass API
    def _manifold(self, group: dict[str, Any], param: Tensor) -> Manifold:
        """The manifold ``param`` of ``group`` is stepped on: the declared one
        (:meth:`declared_manifold`), else Euclidean. Subclasses that assign geometry
        themselves (e.g. PSI-SGD's detection of scale-invariant weights) override this."""
        declared = self.declared_manifold(group, param)
        return EUCLIDEAN if declared is None else declared

    def declared_manifold(self, group: dict[str, Any], param: Tensor) -> Manifold | None:
        """The group's ``"manifold"`` if it has one, else the parameter's ``.manifold``, else None.

        Raises:
            ValueError: if both are set and differ.
        """
        declared = group.get("manifold")
        own = getattr(param, "manifold", None)
        if declared is None:
            return None if own is None else manifold_of(param)
        if own is not None and own is not declared and manifold_of(param) != declared:
            raise ValueError(
                f"a parameter of shape {tuple(param.shape)} carries .manifold = {own!r} but its param group "
                f"declares {declared!r}: remove one of the two, or make them the same"
            )
        return declared

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        """Extra bucket key from a parameter's state (e.g. whether a momentum buffer exists)."""
        return None

    def _init_state(self, group: dict[str, Any], param: Tensor, manifold: Manifold, dtype: torch.dtype) -> None:
        """Fill ``self.state[param]`` before its first step (``dtype`` is the geometry dtype)."""

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket, workspace: Workspace) -> BucketUpdate:
        """Step one bucket of manifold points without touching the stored parameters or state."""
        raise NotImplementedError

    def _bucket_committed(self, bucket: Bucket, ok: Tensor) -> None:
        """Called after a bucket's results were written (e.g. to advance step counts where ``ok``)."""

    def _prepare_step(self) -> None:
        """Host-side decisions taken before a step's buckets are formed (e.g. PSI-SGD's
        detection); runs first, so under ``torch.compile`` it is at most one graph break."""

    def _plain_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        found_inf: Tensor | None,
    ) -> None:
        """Step plain tensors in place by ``torch.optim``'s kernels (``states[i]`` is the state
        dict of ``params[i]``; entries it creates or replaces are kept); with ``found_inf`` (a
        float 0-dim tensor, 1 for a non-finite gradient) the fused kernels skip on the device."""
        raise NotImplementedError

    def _plain_is_fused(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        """Whether :meth:`_plain_step` runs a fused kernel (which honours ``found_inf``)."""
        return False

    def _plain_needs_check(self, group: dict[str, Any]) -> bool:
        """Whether a plain update can come out non-finite from finite gradients (e.g. Adam
        with ``eps=0``), so the update must be checked after it is computed."""
        return False

    # ---------------------------------------------------------------- stepping
    @_use_grad_for_differentiable  # torch.optim's: no_grad, with graph breaks torch.compile relies on
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._prepare_step()
        self._step_skips = []
        pending: list[_Pending] = []
        for group in self.param_groups:
            for static, *params in self._group_buckets(group).values():
                if isinstance(static.manifold, Euclidean):
                    pending.append(self._plain_bucket(group, params, static.dtype))
                elif static.sharded:
                    pending.append(self._sharded_manifold_bucket(group, static, params))
                else:
                    pending.append(
                        self._manifold_bucket(group, static.manifold, static.point_shape, static.dtype, params)
                    )
                if self.nonfinite == "skip":
                    pending.pop().commit()
        if pending:
            self._raise_or_commit(pending)
        self._count_skipped_step()
        self._stabilize()
        return loss

    def _stabilize(self) -> None:
        """geoopt's ``stabilize=N``: every N steps of a group, its manifold parameters are
        projected onto their manifolds and their tangent states onto the tangent spaces."""
        for index, group in enumerate(self.param_groups):
            every = group.get("stabilize")
            if not every:
                continue
            count = self._stabilize_counts[index] = self._stabilize_counts.get(index, 0) + 1
            if count % every:
                continue
            with torch.no_grad():
                for param in group["params"]:
                    manifold = self._manifold(group, param)
                    if isinstance(manifold, Euclidean) or is_sharded(param) or param.numel() == 0:
                        continue
                    x = manifold.project(manifold.to_points(param.detach()))
                    param.copy_(manifold.from_points(x, param.shape))
                    state = self.state.get(param, {})
                    if PROJECTED in state:  # its own write
                        mark_written([param], [state])
                    for name in self._tangent_state_names(group):
                        if isinstance(state.get(name), Tensor):
                            tangent = manifold.project_tangent(x, manifold.to_points(state[name]).to(x.dtype))
                            state[name].copy_(manifold.from_points(tangent, param.shape))

    def _group_buckets(self, group: dict[str, Any]) -> dict[Hashable, list[Tensor]]:
        """The group's parameters with gradients, by bucket key (see :meth:`_static_key`)."""
        grouped: dict[Hashable, list[Tensor]] = {}
        compiling = torch.compiler.is_compiling()  # dynamo traces through caches, and warns
        for param in group["params"]:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            manifold = self._manifold(group, param)
            static = None if compiling else self._static_keys.get(param)
            if static is None or not static.matches(param, manifold):  # (a cached key: not empty)
                if param.numel() == 0 and not isinstance(manifold, Euclidean):
                    continue  # no points: nothing to step (torch.optim's kernels step empty plain tensors)
                if static is not None and static.declared and getattr(param, "manifold", None) is None:
                    raise RuntimeError(_lost_manifold_message(param, static.manifold))
                static = self._static_key(param, manifold)
                if not compiling:
                    self._static_keys[param] = static
            state = self.state[param]
            if not state:
                self._init_state(group, param, manifold, static.dtype)
            key = (static.id, self._bucket_key(state))
            if static.own_bucket:
                key = (*key, id(param))  # its own bucket: a view, nothing copied
            entry = grouped.get(key)
            if entry is None:
                grouped[key] = entry = [static]
            entry.append(param)
        return grouped

    def _static_key(self, param: Tensor, manifold: Manifold) -> _StaticKey:
        """What a parameter's bucket depends on besides its state, computed once per parameter
        and reused while its manifold object, shape, dtype and device stay the same."""
        if param.is_complex() and not manifold.supports_complex:
            raise TypeError(
                f"{type(self).__name__} does not support complex parameters on {manifold!r} (got one of shape "
                f"{tuple(param.shape)}, {param.dtype}): complex parameters are stepped when plain (as torch.optim "
                "steps them), on Stiefel or Sphere, or on a geoopt manifold; optimize torch.view_as_real(...) of it "
                "instead"
            )
        dtype = geometry_dtype(manifold, param.dtype)
        value = (manifold, manifold.point_shape(param.shape), dtype, param.device)
        # equal manifolds (by value) share one small integer, so grouping never hashes a manifold
        sharded = is_sharded(param)
        number = self._static_ids.setdefault((*value, sharded), len(self._static_ids))
        own_bucket = param.numel() >= STACK_BELOW and not isinstance(manifold, Euclidean) and not sharded
        declared = getattr(param, "manifold", None) is not None and not isinstance(manifold, Euclidean)
        return _StaticKey(number, *value, own_bucket, param.shape, param.dtype, declared, sharded)

    def _manifold_bucket(
        self,
        group: dict[str, Any],
        manifold: Manifold,
        point_shape: tuple[int, ...],
        dtype: torch.dtype,
        params: list[Tensor],
        states: list[dict[str, Any]] | None = None,
        fresh: bool | None = None,
    ) -> _Pending:
        states = [self.state[p] for p in params] if states is None else states
        # one shared workspace when each bucket is written before the next is computed
        if torch.compiler.is_compiling():
            workspace = Workspace(enabled=False)
        else:
            workspace = self._workspace if self.nonfinite == "skip" else Workspace()
        bucket = Bucket(manifold, point_shape, dtype, params, states, workspace)
        projects = projects_points(manifold)
        if fresh is None:
            fresh = projects and needs_projection(params, states)
        if fresh:
            self._onto_manifold(group, bucket)
        update = self._step_bucket(group, bucket, workspace)

        def commit() -> None:
            if manifold.retraction_drifts:
                tangents = [write.value for write in update.states if write.layout == "tangent"]
                self.reprojected_points += keep_on_manifold(manifold, update.x, tangents)
            bucket.write_params(update.x, update.ok)
            for write in update.states:
                bucket.write_state(write, update.ok)
            for name in update.drop:
                bucket.drop_state(name)
            if update.on_commit is not None:
                update.on_commit()
            if projects:
                mark_written(params, states)
            self._bucket_committed(bucket, update.ok)
            self._count_skip(~update.ok)

        return _Pending(update.ok, commit, lambda: _describe("gradient or update", manifold, params))

    def _onto_manifold(self, group: dict[str, Any], bucket: Bucket) -> None:
        """The bucket's first step: points farther off the manifold than rounding are projected
        onto it, their tangent states onto the new tangent spaces, and a tracking state is
        formed again from the data there, all into new tensors (written with the step).

        One residual and one projection per point, batched, with no host read; points on the
        manifold, and their states, are kept bit for bit (so a resumed checkpoint continues
        exactly). Rounding is ``16 eps`` of the parameter's dtype (or of the geometry dtype,
        whichever is coarser: half-precision points are rounded when stored)."""
        manifold, x = bucket.manifold, bucket.x
        coarsest = max(torch.finfo(p.dtype).eps for p in bucket.params)
        tolerance = max(manifold.drift_tolerance(real_dtype(x.dtype)), 16 * coarsest)
        off = (manifold.distance_to_manifold(x) > tolerance).reshape(-1, *(1,) * manifold.point_ndim)
        y = torch.where(off, manifold.project(x), x)
        states: dict[str, Tensor] = {}
        for name in self._tangent_state_names(group):
            m = bucket.state(name)
            if m is None:
                continue
            m = states[name] = torch.where(off, manifold.project_tangent(y, m.to(y.dtype)), m)
            tracking = bucket.state(name + TRACKING, "stored")
            if tracking is not None:
                off_small = off.reshape(-1, *(1,) * (tracking.dim() - 1))
                states[name + TRACKING] = torch.where(off_small, manifold.tracking_state(y, m), tracking)
        bucket.replace(y, states)

    def _sharded_manifold_bucket(self, group: dict[str, Any], static: _StaticKey, params: list[Tensor]) -> _Pending:
        """A bucket of FSDP2-sharded manifold parameters: each rank steps the whole matrices it
        owns (see :mod:`manifold_opt.optim.sharded`), and the new rows return to their shards."""
        for param in params:
            check_row_sharded(param)
        mesh = params[0].device_mesh
        process_group = mesh.get_group()
        states = [self.state[p] for p in params]
        names = [n for n in self._sharded_state_names(group, static.manifold) if all(n in state for state in states)]
        exchange = Exchange([p.shape for p in params], mesh.size(), mesh.get_local_rank(), 2 + len(names))
        local = [
            [t.to(static.dtype) for t in (p.to_local(), p.grad.to_local(), *(s[n].to_local() for n in names))]
            for p, s in zip(params, states)
        ]
        owned = exchange.owned
        full = gather_to_owners(exchange, local, process_group)
        whole_params, whole_states = [], []
        for i, (x, grad, *tangent) in zip(owned, full):
            whole = x.to(params[i].dtype)
            whole.grad = grad.to(params[i].grad.dtype)
            whole_params.append(whole)
            state = {k: v for k, v in states[i].items() if not is_sharded(v)}  # per-point: replicated
            state.update(zip(names, tangent))
            whole_states.append(state)
        inner = None
        # each rank's own record: the whole matrices are new tensors at every step
        fresh = projects_points(static.manifold) and not all(PROJECTED in state for state in states)
        if owned:
            inner = self._manifold_bucket(
                group, static.manifold, static.point_shape, static.dtype, whole_params, whole_states, fresh
            )
        ok = inner.ok if inner is not None else torch.ones((), dtype=torch.bool, device=params[0].to_local().device)
        if self.nonfinite == "raise":  # every rank takes the same decision
            ok = agree_on_all_ranks(ok, process_group)

        def commit() -> None:
            if inner is not None:
                inner.commit()
            if projects_points(static.manifold):  # the owners projected their points (if off)
                for state in states:
                    state[PROJECTED] = True
            after = list(self._sharded_state_names(group, static.manifold))
            for param, state in zip(params, states):
                for name in after:
                    if name not in state:  # created by this step (e.g. SGD's first momentum buffer)
                        state[name] = torch.zeros_like(param, dtype=static.dtype)
            new = [[whole, *(state[n] for n in after)] for whole, state in zip(whole_params, whole_states)]
            targets = [[p.to_local(), *(s[n].to_local() for n in after)] for p, s in zip(params, states)]
            back = dataclasses.replace(exchange, kinds=1 + len(after))  # parameter and tangent states
            scatter_from_owners(back, [[t.to(static.dtype) for t in row] for row in new], targets, process_group)
            for key in self._replicated_state_names(group, static.manifold):
                if not all(key in state for state in states):  # the same on every rank
                    continue
                for j, i in enumerate(owned):  # the step may have replaced the owner's tensor
                    states[i][key] = whole_states[j][key].clone()
                all_reduce_owned(exchange, [state[key] for state in states], process_group)

        return _Pending(ok, commit, lambda: _describe("gradient or update", static.manifold, params))

    def _tangent_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        """Tangent vectors kept in the parameter's layout (projected with their points)."""
        return ()

    def _sharded_state_names(self, group: dict[str, Any], manifold: Manifold) -> tuple[str, ...]:
        """Every state in the parameter's layout after a step of a parameter on ``manifold``
        (sharded like the parameter under FSDP2): the tangent ones by default."""
        return self._tangent_state_names(group)

    def _replicated_state_names(self, group: dict[str, Any], manifold: Manifold) -> tuple[str, ...]:
        """States of one number per point (or per parameter) of a manifold parameter."""
        return ()

    def _plain_bucket(self, group: dict[str, Any], params: list[Tensor], dtype: torch.dtype) -> _Pending:
        sharded = is_sharded(params[0])
        states = [self.state[p] for p in params]
        if sharded:  # elementwise work on the local shards, as torch.optim does under FSDP2
            shards = LocalShards(params, states)
            params, grads, states = shards.params, shards.grads, shards.states
            ok = shards.all_ranks(grads_finite(grads))
        else:
            grads = [p.grad for p in params]
            ok = grads_finite(grads)
        fused = self._plain_is_fused(group, params, states)
        check_after = self._plain_needs_check(group)

        def commit() -> None:
            if self.nonfinite == "raise" or (fused and not check_after):
                # raise: every gradient is finite by now; fused: the kernel skips on found_inf
                found_inf = None if self.nonfinite == "raise" else (~ok).to(torch.float32)
                self._plain_step(group, params, grads, states, found_inf)
                if self.nonfinite == "skip":
                    self._count_skip(~ok)
            else:
                keep = _snapshot(params, states)
                self._plain_step(group, params, grads, states, None)
                valid = ok & all_finite(*[p.detach() for p in params]) if check_after else ok
                if sharded:
                    valid = shards.all_ranks(valid)
                keep.restore(valid)
                self._count_skip(~valid)
            if sharded:
                shards.store_states()

        return _Pending(ok, commit, lambda: _describe("gradient", EUCLIDEAN, params))

    def _raise_or_commit(self, pending: list[_Pending]) -> None:
        flags = torch.stack([p.ok.to("cpu", non_blocking=False) for p in pending])
        if not bool(flags.all()):
            bad = next(p for p, flag in zip(pending, flags.tolist()) if not flag)
            raise FloatingPointError(
                f"non-finite {bad.describe()}; nothing of this step was written. Pass nonfinite='skip' to skip "
                "such buckets instead"
            )
        for item in pending:
            item.commit()

    def _count_skip(self, skipped: Tensor) -> None:
        """Count a committed bucket that was skipped where ``skipped`` (a 0-dim bool tensor)."""
        _add_to_counter(self._skipped, skipped)
        self._step_skips.append(skipped)

    def _count_skipped_step(self) -> None:
        """Count this step once if any of its buckets was skipped: one device reduction, no
        host read (flags on several devices are gathered on an accelerator's, never copied
        to the host)."""
        flags, self._step_skips = self._step_skips, []
        if not flags:
            return
        device = next((flag.device for flag in flags if flag.device.type != "cpu"), flags[0].device)
        skipped = flags[0] if len(flags) == 1 else torch.stack([flag.to(device) for flag in flags]).any()
        _add_to_counter(self._skipped_steps, skipped)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; a ``"manifold"`` key declares the
        manifold of every tensor of the group (a :class:`~manifold_opt.manifolds.Manifold`
        instance). It lives in the optimizer, so it survives anything that replaces the
        parameter objects' attributes; each tensor is checked against it (shape, a
        disagreeing ``.manifold``) and projected onto it when it is not on it yet."""
        manifold = param_group.get("manifold")
        if manifold is not None:
            check_group_manifold(manifold)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("manifold") is None:
            return
        for param in group["params"]:
            self.declared_manifold(group, param)  # raises on a disagreeing .manifold
            group["manifold"].point_shape(param.shape)  # raises a ValueError naming the shape
            with torch.no_grad():
                if is_sharded(param):  # the whole matrices, once, at construction
                    value, (start, end) = full_tensor_rows(param.detach())
                    target = param.to_local()
                else:
                    value, (start, end), target = param.detach(), (0, param.shape[0] if param.dim() else 0), param
                projected = _onto_manifold_when_loaded(value, group["manifold"], quiet=True, what="a param group")
                if projected is not value:
                    target.copy_(projected[start:end] if is_sharded(param) else projected)


def _add_to_counter(counters: dict[torch.device, Tensor], flag: Tensor) -> None:
    count = counters.get(flag.device)
    if count is None:
        count = counters[flag.device] = torch.zeros((), dtype=torch.int64, device=flag.device)
    count.add_(flag)  # a bool flag adds 0 or 1: no cast (one operation per count)


def check_group_manifold(manifold: Any) -> None:
    """A param group's ``"manifold"``: a manifold_opt Manifold instance (a clear TypeError else)."""
    check_manifold_argument(manifold, 'a param group\'s "manifold"')
    if not isinstance(manifold, Manifold):
        raise TypeError(
            f'a param group\'s "manifold" must be a manifold_opt Manifold, got {type(manifold).__name__}; '
            "give geoopt manifolds on the parameters (geoopt.ManifoldParameter)"
        )


def _lost_manifold_message(param: Tensor, manifold: Manifold) -> str:
    return (
        f"a parameter of shape {tuple(param.shape)} was stepped on {manifold!r} and has no .manifold any more: "
        "something replaced its ManifoldParameter by a plain nn.Parameter (e.g. module.to(...) with "
        "torch.__future__.set_swap_module_params_on_conversion(True)). Give it back its manifold "
        f"(param.manifold = {manifold!r} works on any tensor), or convert the module before wrapping its weights"
    )


def _describe(what: str, manifold: Manifold, params: list[Tensor]) -> str:
    shapes = ", ".join(f"{tuple(p.shape)}" for p in params)
    return f"{what} in a bucket of {len(params)} parameter(s) on {manifold!r} (shapes {shapes})"


class _snapshot:  # noqa: N801 - used like a function
    """Copies of plain parameters and their state tensors, restored where a flag is false
    (for ``torch.optim`` kernels that cannot skip on the device themselves)."""

    def __init__(self, params: list[Tensor], states: list[dict[str, Any]]) -> None:
        self.params, self.states = params, states
        self.keys = [set(state) for state in states]
        self.copies = [p.detach().clone() for p in params]
        self.state_copies = [{k: v.clone() for k, v in state.items() if isinstance(v, Tensor)} for state in states]

    def restore(self, ok: Tensor) -> None:
        for param, copy in zip(self.params, self.copies):
            torch.where(ok, param.detach(), copy, out=param.detach())
        for state, keys, copies in zip(self.states, self.keys, self.state_copies):
            for key, value in state.items():
                if not isinstance(value, Tensor):
                    continue
                if key in copies:
                    old = copies[key]
                    torch.where(ok.to(value.device), value, old, out=value)
                elif key not in keys:  # created by this step (e.g. SGD's first momentum buffer)
                    torch.where(ok.to(value.device), value, torch.zeros((), dtype=value.dtype), out=value)


def check_stabilize(stabilize: Any) -> int | None:
    """geoopt's ``stabilize``: None, or a positive int (re-project every that many steps)."""
    if stabilize is None:
        return None
    if not isinstance(stabilize, int) or isinstance(stabilize, bool) or stabilize < 1:
        raise ValueError(f"stabilize must be None or an int >= 1 (steps between re-projections), got {stabilize!r}")
    return stabilize


def check_nonnegative(name: str, value: Any) -> None:
    """Raise a ValueError naming the hyperparameter unless it is a finite real number >= 0
    (a Python or NumPy number, or a one-element tensor, as ``torch.optim`` accepts for lr)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got {value!r}")
        number = float(value)  # at construction, not during a step
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
