"""The batched optimizer path shared by every optimizer of the package.

Each step, the parameters of a param group that have gradients are grouped into
buckets by (manifold, point shape, dtype, device, and a per-optimizer state key such as
Adam's step count). Each bucket is stacked into one ``(num_points, *point_shape)``
tensor, stepped by one call of a pure update function that uses only manifold methods,
and written back. Per-parameter state lives in ``self.state[p]`` in the parameter
layout, so checkpoints are those of ``torch.optim``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..manifolds import Euclidean, Manifold, from_geoopt, is_geoopt_manifold
from .functional import keep_on_manifold

EUCLIDEAN = Euclidean()
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


def geometry_dtype(manifold: Manifold, dtype: torch.dtype) -> torch.dtype:
    """Half-precision points are stepped in float32 (QR, SVD and eigh have no half kernels);
    elementwise (Euclidean) parameters keep their dtype, as in ``torch.optim``."""
    if manifold.point_ndim > 0 and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


@dataclass
class Bucket:
    """Parameters stepped together, stacked in the points layout.

    ``x`` and ``grad`` are ``(num_points, *point_shape)`` tensors in the geometry dtype.
    Stacking flattens each tensor and concatenates, so a bucket costs a few tensor
    operations per parameter whatever its manifold.
    """

    manifold: Manifold
    point_shape: tuple[int, ...]
    params: list[Tensor]
    states: list[dict[str, Any]]
    x: Tensor
    grad: Tensor

    @classmethod
    def gather(
        cls,
        manifold: Manifold,
        point_shape: tuple[int, ...],
        dtype: torch.dtype,
        params: list[Tensor],
        states: list[dict[str, Any]],
    ) -> Bucket:
        return cls(
            manifold=manifold,
            point_shape=point_shape,
            params=params,
            states=states,
            x=_stack([p.detach() for p in params], point_shape, dtype),
            grad=_stack([p.grad for p in params], point_shape, dtype),
        )

    def stack_state(self, name: str) -> Tensor:
        """Stack a tangent-vector state (parameter layout) into the points layout."""
        return _stack([state[name] for state in self.states], self.point_shape, self.x.dtype)

    def stack_second_moment(self, name: str) -> Tensor:
        """Stack a one-scalar-per-point state into ``(num_points, 1, ..., 1)``."""
        return _stack([state[name] for state in self.states], (1,) * self.manifold.point_ndim, self.x.dtype)

    def write_params(self, stacked: Tensor) -> None:
        """Copy stacked points back into the parameters (cast to their dtype)."""
        _scatter(stacked, [p.detach() for p in self.params])

    def write_state(self, name: str, stacked: Tensor, per_point: bool = False) -> None:
        """Copy a stacked state back into each parameter's state, creating it on first use
        in the parameter's shape (tangent vectors) or batch shape (``per_point``)."""
        targets = []
        for param, state in zip(self.params, self.states):
            if name not in state:
                shape = self.manifold.batch_shape(param.shape) if per_point else param.shape
                state[name] = torch.empty(shape, dtype=stacked.dtype, device=stacked.device)
            targets.append(state[name])
        _scatter(stacked, targets)


def _stack(tensors: list[Tensor], point_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.cat([t.flatten() for t in tensors]).to(dtype).view(-1, *point_shape)


def _scatter(stacked: Tensor, targets: list[Tensor]) -> None:
    pieces = torch.split(stacked.reshape(-1), [t.numel() for t in targets])
    torch._foreach_copy_(targets, [piece.view_as(t) for piece, t in zip(pieces, targets)])


class BucketedOptimizer(torch.optim.Optimizer):
    """Base class: ``torch.optim.Optimizer`` conventions with one batched update per bucket.

    Subclasses implement :meth:`_bucket_key` (extra grouping from the state),
    :meth:`_init_state` and :meth:`_step_bucket`.

    Args:
        params: tensors or param-group dicts, as for ``torch.optim``.
        defaults: default hyperparameters of a group.
        nonfinite: what a bucket with a NaN/Inf gradient, or whose update comes out
            non-finite, does: ``"skip"`` (default: its parameters and state stay untouched
            and a ``RuntimeWarning`` is issued) or ``"raise"`` (a ``FloatingPointError``).
            One reduction per bucket decides, before and after the update.

    Attributes:
        skipped_steps: bucket steps skipped for a non-finite gradient.
        reprojected_points: points re-projected by the drift check (retractions that
            accumulate error only, see :attr:`Manifold.retraction_drifts`).
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], nonfinite: str = "skip") -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.reprojected_points = 0
        super().__init__(params, defaults)

    # ------------------------------------------------------------ subclass API
    def _manifold(self, param: Tensor) -> Manifold:
        """The manifold ``param`` is stepped on (default: :func:`manifold_of`). Subclasses
        that assign geometry themselves (e.g. PSI-SGD's detection of scale-invariant
        weights) override this."""
        return manifold_of(param)

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        """Extra bucket key from a parameter's state (e.g. Adam's step count)."""
        return None

    def _init_state(self, group: dict[str, Any], param: Tensor, manifold: Manifold, dtype: torch.dtype) -> None:
        """Fill ``self.state[param]`` before its first step (``dtype`` is the geometry dtype)."""

    def _step_bucket(
        self, group: dict[str, Any], bucket: Bucket
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Step one bucket without touching the stored parameters or state: return the new
        points, the new tangent-vector states (stacked like the points; they follow the
        points through any re-projection) and the new one-scalar-per-point states. They are
        written back only if the new points are finite."""
        raise NotImplementedError

    def _bucket_stepped(self, bucket: Bucket) -> None:
        """Called after a bucket's results were written back (e.g. to advance step counts)."""

    # ---------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for bucket in self._buckets(group):
                if not self._finite_or_skip(bucket, bucket.grad, "gradient"):
                    continue
                new_x, tangents, per_point = self._step_bucket(group, bucket)
                if not self._finite_or_skip(bucket, new_x, "update (finite gradient; e.g. a step that overflows)"):
                    continue
                self.reprojected_points += keep_on_manifold(bucket.manifold, new_x, list(tangents.values()))
                bucket.write_params(new_x)
                for name, stacked in tangents.items():
                    bucket.write_state(name, stacked)
                for name, stacked in per_point.items():
                    bucket.write_state(name, stacked, per_point=True)
                self._bucket_stepped(bucket)
        return loss

    def _buckets(self, group: dict[str, Any]) -> list[Bucket]:
        grouped: dict[Hashable, list[Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if param.is_complex():
                raise TypeError(
                    f"{type(self).__name__} does not support complex parameters (got one of shape "
                    f"{tuple(param.shape)}, {param.dtype}); optimize torch.view_as_real(...) of it instead"
                )
            manifold = self._manifold(param)
            dtype = geometry_dtype(manifold, param.dtype)
            state = self.state[param]
            if not state:
                self._init_state(group, param, manifold, dtype)
            key = (manifold, manifold.point_shape(param.shape), dtype, param.device, self._bucket_key(state))
            grouped.setdefault(key, []).append(param)
        return [
            Bucket.gather(manifold, point_shape, dtype, params, [self.state[p] for p in params])
            for (manifold, point_shape, dtype, _, _), params in grouped.items()
        ]

    def _finite_or_skip(self, bucket: Bucket, tensor: Tensor, what: str) -> bool:
        """True if ``tensor`` is finite; otherwise apply the ``nonfinite`` policy (warn and
        skip the bucket, or raise) and return False."""
        # A sum is non-finite iff an entry is (or the sum overflows, at values near the
        # dtype's maximum); it is far cheaper than isfinite().all() on CPU.
        total = tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
        if math.isfinite(float(total)):
            return True
        shapes = ", ".join(f"{tuple(p.shape)}" for p in bucket.params)
        message = (
            f"non-finite {what} in a bucket of {len(bucket.params)} parameter(s) on {bucket.manifold!r} "
            f"(shapes {shapes})"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message + "; pass nonfinite='skip' to skip such steps instead")
        self.skipped_steps += 1
        warnings.warn(message + ": step skipped, parameters and state unchanged", RuntimeWarning, stacklevel=3)
        return False

    # ----------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but state tensors keep their saved
        dtype (torch casts them to the parameter dtype, which would round the float32
        state of half-precision manifold parameters)."""
        super().load_state_dict(state_dict)
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for index, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(index, {}).items():
                if isinstance(value, Tensor) and key != "step" and value.dtype != param.dtype:
                    self.state[param][key] = value.to(device=param.device, copy=True)


def check_nonnegative(name: str, value: float) -> None:
    """Raise a ValueError naming the hyperparameter unless it is a finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
