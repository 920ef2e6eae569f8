"""Buckets: parameters stepped together, in the points layout.

A bucket views (one parameter) or stacks (several) its points, gradients and states as
``(num_points, *point_shape)`` tensors in the geometry dtype, and writes new values back
where a device flag says the step is valid (:func:`select`: no host read). States live in
``optimizer.state[p]`` in the parameter layout; after a step the states of a stacked bucket
are pieces of one buffer (:func:`mark_flat`), so the next step neither stacks nor copies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..manifolds import Manifold
from ..manifolds.base import Workspace
from ..manifolds.linalg import real_dtype


def geometry_dtype(manifold: Manifold, dtype: torch.dtype) -> torch.dtype:
    """Half-precision points are stepped in float32 (complex32 in complex64: QR, SVD and eigh
    have no half kernels); elementwise (Euclidean) parameters keep their dtype, as in
    ``torch.optim``."""
    if manifold.point_ndim > 0 and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if manifold.point_ndim > 0 and dtype == torch.complex32:
        return torch.complex64
    return dtype


# The layout of a state in a bucket: "tangent" (like the points), "scalar" (one number per
# point) or a tuple (the trailing shape of one point's entry, e.g. (p, p)).
Layout = str | tuple[int, ...]


def state_dtype(dtype: torch.dtype, layout: Layout) -> torch.dtype:
    """The dtype of a state of this layout for points of geometry dtype ``dtype``: per-point
    numbers (``"scalar"``, e.g. Adam's second moment, an inner product) are real, also for
    complex points."""
    return real_dtype(dtype) if layout == "scalar" else dtype


@dataclass
class Bucket:
    """Parameters stepped together, in the points layout.

    ``x`` and ``grad`` are ``(num_points, *point_shape)`` tensors in the geometry dtype:
    views of the parameter and its gradient when the bucket holds one contiguous
    parameter of that dtype (nothing is copied), else stacked copies (one ``cat`` each).
    """

    manifold: Manifold
    point_shape: tuple[int, ...]
    dtype: torch.dtype
    params: list[Tensor]
    states: list[dict[str, Any]]
    # lends the buffers that stacked points and gradients are copied into (never states,
    # which become pieces of their stacked copy)
    workspace: Workspace | None = None
    x: Tensor = field(init=False)
    grad: Tensor = field(init=False)
    _x_is_view: bool = field(init=False)
    _old: dict[str, tuple[Tensor, bool]] = field(init=False, default_factory=dict)
    _replaced: dict[str, Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        first = self.params[0].shape
        self.same_shapes = all(p.shape == first for p in self.params)
        self.x, self._x_is_view = self._points(self.params, "tangent", "bucket_x")  # steps run under no_grad
        self.grad, _ = self._points([p.grad for p in self.params], "tangent", "bucket_grad")

    def _trailing(self, layout: Layout) -> tuple[int, ...]:
        if layout == "tangent":
            return self.point_shape
        if layout == "scalar":
            return (1,) * self.manifold.point_ndim
        return tuple(layout)

    def _points(self, tensors: list[Tensor], layout: Layout, scratch: str | None = None) -> tuple[Tensor, bool]:
        """The tensors in the points layout: a view when they are one tensor or the pieces of
        one buffer, else a stacked copy (into the workspace's buffer ``scratch`` if named)."""
        shape = self._trailing(layout)
        dtype = state_dtype(self.dtype, layout)
        if len(tensors) == 1:
            tensor = tensors[0]
            if tensor.dtype == dtype and tensor.is_contiguous():
                return tensor.view(-1, *shape), True
            return tensor.to(dtype).reshape(-1, *shape), False
        base = flat_base(tensors)
        if base is not None and base.dtype == dtype:  # states stored as pieces of one buffer
            return base.view(-1, *shape), True
        out = None
        if scratch is not None and self.workspace is not None and all(t.dtype == dtype for t in tensors):
            size = sum(t.numel() for t in tensors)
            out = self.workspace.empty(scratch, (size,), dtype, tensors[0].device)
        if self.same_shapes:  # one stack, no per-tensor reshape
            if out is not None:
                return torch.stack(tensors, out=out.view(len(tensors), *tensors[0].shape)).view(-1, *shape), False
            return torch.stack(tensors).to(dtype).view(-1, *shape), False
        if out is not None:
            return torch.cat([t.reshape(-1) for t in tensors], out=out).view(-1, *shape), False
        return torch.cat([t.reshape(-1) for t in tensors]).to(dtype).view(-1, *shape), False

    def state(self, name: str, layout: Layout = "tangent") -> Tensor | None:
        """A state of every parameter in the points layout (``(num_points, *trailing)``), or
        None before it exists. ``layout="stored"`` takes the trailing shape from the tensors."""
        if name in self._replaced:
            return self._replaced[name]
        values = [state.get(name) for state in self.states]
        if any(value is None for value in values):
            return None
        if layout == "stored":
            layout = tuple(values[0].shape[len(self.manifold.batch_shape(self.params[0].shape)) :])
        self._old[name] = self._points(values, layout)
        return self._old[name][0]

    def replace(self, x: Tensor, states: dict[str, Tensor]) -> None:
        """Step from ``x`` and ``states`` (new tensors in the points layout, e.g. the points
        projected onto the manifold) instead of the stored values; they are written back
        with the step's results, and stay where the step is not taken."""
        self.x, self._x_is_view = x, False
        for name, value in states.items():
            self._replaced[name] = value
            self._old[name] = (value, False)

    def write_params(self, new: Tensor, ok: Tensor) -> None:
        """Store the new points where ``ok`` (a 0-dim bool tensor); elsewhere nothing changes."""
        _write(list(self.params), self.x, self._x_is_view, new, ok, self.same_shapes)

    def write_state(self, write: StateWrite, ok: Tensor) -> None:
        """Store a new state where ``ok``. A state written for the first time is created, with
        ``write.fallback`` (zeros by default) where not ``ok``."""
        name, new = write.name, write.value
        targets = [state.get(name) for state in self.states]
        if any(target is None for target in targets):
            fallback = write.fallback if write.fallback is not None else torch.zeros((), dtype=new.dtype)
            fresh = torch.where(ok, new, fallback.to(new.device))
            if len(self.params) == 1:
                self.states[0][name] = fresh.reshape(self._shape(self.params[0], write.layout))
            else:
                self._store_pieces(name, fresh, write.layout)
            return
        old, is_view = self._old[name] if name in self._old else self._points(targets, write.layout)
        if is_view or torch.compiler.is_compiling():
            _write(targets, old, is_view, new, ok, self.same_shapes)
            return
        if new is not old:
            select(old, new, ok)
        # ``old`` is this step's own stacked copy: the states become its pieces, so the next
        # step finds them in one buffer and neither stacks nor copies back
        self._store_pieces(name, old, write.layout)

    def _store_pieces(self, name: str, buffer: Tensor, layout: Layout) -> None:
        """``state[name]`` of every parameter := its piece (a view) of the contiguous ``buffer``."""
        trailing = math.prod(self._trailing(layout))
        sizes = [self._batch_numel(p) * trailing for p in self.params]
        pieces = [
            piece.view(self._shape(param, layout))
            for param, piece in zip(self.params, torch.split(buffer.reshape(-1), sizes))
        ]
        for state, piece in zip(self.states, pieces):
            state[name] = piece
        mark_flat(pieces)

    def drop_state(self, name: str) -> None:
        for state in self.states:
            state.pop(name, None)

    def _batch_numel(self, param: Tensor) -> int:
        return math.prod(param.shape) // math.prod(self.point_shape)

    def _shape(self, param: Tensor, layout: Layout) -> tuple[int, ...]:
        if layout == "tangent":
            return tuple(param.shape)
        batch = self.manifold.batch_shape(param.shape)
        return tuple(batch) if layout == "scalar" else (*batch, *layout)


def mark_flat(pieces: list[Tensor]) -> None:
    """Record that ``pieces`` (views, in order) tile their common base; see :func:`flat_base`."""
    pieces[0]._base._flat_piece_ids = tuple(map(id, pieces))


def flat_base(tensors: list[Tensor]) -> Tensor | None:
    """The contiguous buffer ``tensors`` are the pieces of, in order (as stored by
    :func:`mark_flat`), or None. Stacking the tensors would copy exactly that buffer."""
    base = tensors[0]._base
    if base is None:
        return None
    ids = getattr(base, "_flat_piece_ids", None)
    if ids is None or len(ids) != len(tensors) or any(t._base is not base for t in tensors):
        return None
    return base if tuple(map(id, tensors)) == ids else None


def select(old: Tensor, new: Tensor, ok: Tensor) -> Tensor:
    """``old <- new`` where ``ok`` (a 0-dim bool), in place, exactly, NaN-safe.

    ``new`` (scratch) is cleaned of NaN/Inf first, then ``old.lerp_(new, ok)``: weight 1 gives
    ``new`` and weight 0 gives ``old`` bit for bit (up to the sign of a zero), for values below
    half the dtype's maximum. Two fast passes; ``torch.where`` is three times slower on CPUs.
    """
    torch.nan_to_num_(new, nan=0.0, posinf=0.0, neginf=0.0)
    return old.lerp_(new, ok.to(old.dtype))


def _write(targets: list[Tensor], old: Tensor, old_is_view: bool, new: Tensor, ok: Tensor, same_shapes: bool) -> None:
    if torch.compiler.is_compiling():
        # functional selection copied into the stored tensors themselves: AOT autograd cannot
        # merge mutated inputs that are views of one another (a parameter and its points view)
        pieces = torch.split(torch.where(ok, new, old).reshape(-1), [t.numel() for t in targets])
        for target, piece in zip(targets, pieces):
            target.copy_(piece.view_as(target))
        return
    if new is not old:  # else the update was written into the bucket's own tensor already
        select(old, new, ok)
    if old_is_view:
        return
    if same_shapes:
        torch._foreach_copy_(targets, list(old.view(len(targets), *targets[0].shape).unbind(0)))
        return
    pieces = torch.split(old.reshape(-1), [t.numel() for t in targets])
    torch._foreach_copy_(targets, [piece.view_as(t) for piece, t in zip(pieces, targets)])


@dataclass
class StateWrite:
    """A new state of a bucket (points layout ``(num_points, *trailing)``; see ``Layout``), and
    what to store where the step is skipped when the state does not exist yet."""

    name: str
    value: Tensor
    layout: Layout = "tangent"
    fallback: Tensor | None = None


@dataclass
class BucketUpdate:
    """The new values of a bucket, computed without touching the stored ones.

    ``x``: new points; ``states``: new states; ``ok``: a 0-dim bool tensor, False when
    anything came out non-finite (then nothing is written); ``drop`` (states to delete) and
    ``on_commit`` are host-side bookkeeping, done when the bucket is written whatever ``ok`` is.
    """

    x: Tensor
    states: list[StateWrite]
    ok: Tensor
    drop: tuple[str, ...] = ()
    on_commit: Callable[[], None] | None = None


def all_finite(*tensors: Tensor) -> Tensor:
    """A 0-dim bool tensor: every entry of every tensor is finite. One reduction each: a sum
    is non-finite iff an entry is (or the sum overflows, at values near the dtype's maximum)."""
    flags = [torch.isfinite(t.sum(dtype=torch.promote_types(t.dtype, torch.float32))) for t in tensors]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def grads_finite(grads: list[Tensor]) -> Tensor:
    """A 0-dim bool tensor: every gradient is finite and its square sums do not overflow
    (``torch._foreach_norm``: one fused reduction over the list)."""
    norms = torch._foreach_norm(grads)
    return torch.isfinite(torch.stack(norms)).all() if len(norms) > 1 else torch.isfinite(norms[0])
