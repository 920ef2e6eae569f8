r"""The manifold interface.

Notation used across the geometry code: ``x`` a point, ``u, v`` tangent vectors at ``x``,
``g`` a Euclidean gradient, ``y`` another point, ``t`` a step size.

A manifold is an immutable value (a frozen dataclass holding no tensors): it is hashable,
so optimizers use it as a bucket key, and it never needs ``.to()``.

Two layouts of a tensor appear:

* **points layout** ``(..., *point_shape)``: leading dimensions are a batch of independent
  points, and every geometry method broadcasts over them. ``point_shape`` is the natural
  shape of one point: ``()`` for :class:`Euclidean` (each coordinate is its own point),
  ``(d,)`` for :class:`Sphere`, ``(n, p)`` for :class:`Stiefel`.
* **parameter layout**: the shape of a weight, e.g. a conv kernel ``(out, in, kh, kw)``.
  The first ``batch_dims`` dimensions index independent points and the rest form one
  point (a conv kernel is one ``(out, in*kh*kw)`` matrix for Stiefel). :meth:`to_points`
  and :meth:`from_points` convert between the two.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class Manifold(ABC):
    """Base class of all manifolds.

    Args:
        batch_dims: how many leading dimensions of a parameter index independent points.
            ``Sphere(batch_dims=1)`` on an ``(out, in)`` weight puts every row on its own
            sphere (the oblique manifold); ``batch_dims=0`` makes the whole tensor one point.
    """

    batch_dims: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_dims, int) or self.batch_dims < 0:
            raise ValueError(f"batch_dims must be a non-negative int, got {self.batch_dims!r}")

    # ----------------------------------------------------------------- layout
    @property
    @abstractmethod
    def point_ndim(self) -> int:
        """Number of trailing dimensions that form one point in the points layout."""

    @abstractmethod
    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one point for a parameter of shape ``shape``.

        Raises:
            ValueError: if a parameter of this shape cannot lie on the manifold.
        """

    def _point_dims(self, shape: Sequence[int], least: int) -> tuple[int, ...]:
        """The dimensions after the batch ones, checked to number at least ``least``."""
        shape = tuple(shape)
        rest = shape[self.batch_dims :]
        if len(rest) < least:
            raise ValueError(
                f"{self!r} needs a parameter with at least {self.batch_dims + least} dimensions "
                f"({self.batch_dims} batch + {least} point), got shape {shape}"
            )
        return rest

    def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of the batch of points of a parameter of shape ``shape``."""
        return tuple(shape)[: self.batch_dims]

    def _matrix_point_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(n, p)`` for manifolds of matrices: the first dimension after the batch ones
        against all the others (a conv kernel ``(out, in, kh, kw)`` is ``(out, in*kh*kw)``)."""
        rest = self._point_dims(shape, 2)
        n, p = rest[0], numel(rest[1:])
        if n < 1 or p < 1:
            raise ValueError(f"{self!r} cannot hold an empty matrix (shape {tuple(shape)})")
        return (n, p)

    def to_points(self, tensor: Tensor) -> Tensor:
        """View a parameter-layout tensor as ``(num_points, *point_shape)`` (copies if it must)."""
        return tensor.reshape(-1, *self.point_shape(tensor.shape))

    def from_points(self, points: Tensor, shape: Sequence[int]) -> Tensor:
        """Inverse of :meth:`to_points`."""
        return points.reshape(shape)

    def project_parameter(self, tensor: Tensor) -> Tensor:
        """:meth:`project` applied in the parameter layout."""
        return self.from_points(self.project(self.to_points(tensor)), tensor.shape)

    def parameter_distance(self, tensor: Tensor) -> Tensor:
        """Largest :meth:`distance_to_manifold` over the points of a parameter (a 0-dim tensor)."""
        points = self.to_points(tensor)
        if points.numel() == 0:
            return points.new_zeros(())
        return self.distance_to_manifold(points).amax()

    # --------------------------------------------------------------- geometry
    @abstractmethod
    def project(self, x: Tensor) -> Tensor:
        """Nearest point of the manifold (Frobenius norm)."""

    @abstractmethod
    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        """Orthogonal projection of ``u`` onto the tangent space at ``x``."""

    @abstractmethod
    def riemannian_grad(self, x: Tensor, g: Tensor) -> Tensor:
        """Riemannian gradient from the Euclidean gradient ``g`` at ``x``."""

    @abstractmethod
    def retract(self, x: Tensor, u: Tensor, t: float = 1.0) -> Tensor:
        r"""Retraction :math:`R_x(t u)`.

        ``t`` scales ``u`` inside the retraction so that the Euclidean case can be one
        fused ``x + t u`` (bit-identical to ``torch.optim``).
        """

    @abstractmethod
    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Vector transport of ``v`` from the tangent space at ``x`` to the one at ``y``."""

    def retract_transport(self, x: Tensor, u: Tensor, v: Tensor, t: float = 1.0) -> tuple[Tensor, Tensor]:
        """``y = retract(x, u, t)`` and ``transport(x, y, v)`` at once."""
        y = self.retract(x, u, t)
        return y, self.transport(x, y, v)

    @abstractmethod
    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        """Riemannian metric, summed over each point and kept as singleton dims (``(..., 1, 1)``
        for matrices) so that it broadcasts against ``x``."""

    @abstractmethod
    def distance_to_manifold(self, x: Tensor) -> Tensor:
        """Feasibility residual of every point, shape ``x.shape[:-point_ndim]``; 0 on the manifold."""

    def random_point(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A random point (points layout ``shape = (*batch, *point_shape)``)."""
        return self.project(torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device))

    def random_tangent(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """A random tangent vector at ``x`` (projected Gaussian)."""
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.project_tangent(x, noise)

    # ------------------------------------------------------------ drift policy
    @property
    def retraction_drifts(self) -> bool:
        """True when the retraction lets rounding or truncation errors accumulate, so the
        optimizers measure :meth:`distance_to_manifold` after each step and re-project
        the points whose residual exceeds :meth:`drift_tolerance`."""
        return False

    def drift_tolerance(self, dtype: torch.dtype) -> float:
        """Residual above which a point is re-projected (when :attr:`retraction_drifts`)."""
        return 16 * torch.finfo(dtype).eps

    # -------------------------------------------------------------- helpers
    def _sum_point_dims(self, a: Tensor) -> Tensor:
        """Sum over the point dimensions, keeping them as singletons."""
        if self.point_ndim == 0:
            return a
        return a.sum(dim=tuple(range(-self.point_ndim, 0)), keepdim=True)


class EmbeddedManifold(Manifold):
    """A Riemannian submanifold of Euclidean space with the induced (Euclidean) metric.

    Defaults: Riemannian gradient = tangent projection, transport = tangent projection
    at the new point, inner product = Frobenius inner product of each point.
    """

    def riemannian_grad(self, x: Tensor, g: Tensor) -> Tensor:
        return self.project_tangent(x, g)

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.project_tangent(y, v)

    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return self._sum_point_dims(u * v)


def numel(shape: Sequence[int]) -> int:
    """Product of a shape's sizes (1 for an empty shape)."""
    return math.prod(shape)


def check_iterations(manifold: Manifold, retraction: str, iterations: int | None, iterative: tuple[str, ...]) -> None:
    """Validate an ``iterations`` option that only the ``iterative`` retractions take."""
    if iterations is None:
        return
    if retraction not in iterative:
        raise ValueError(
            f"iterations={iterations!r} applies only to the {' and '.join(map(repr, iterative))} retraction(s) of "
            f"{type(manifold).__name__}, not {retraction!r}; leave it as None"
        )
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive int or None, got {iterations!r}")
