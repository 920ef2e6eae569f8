"""Use geoopt's manifolds with manifold_opt's optimizers.

geoopt's Euclidean, Sphere, SphereExact and EuclideanStiefel map onto the batched
implementations of this package; every other geoopt manifold (PoincareBall, SPD,
canonical Stiefel, products, ...) is stepped through geoopt's own methods by
:class:`GeooptManifold`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Manifold, StepSize, Workspace, into, unsupported_steepest_direction
from .euclidean import Euclidean
from .spectral import SteepestDirection
from .sphere import Sphere
from .stiefel import Stiefel


def is_geoopt_manifold(manifold: object) -> bool:
    """True for an instance of a geoopt manifold class (checked without importing geoopt)."""
    return any(cls.__module__.startswith("geoopt.") for cls in type(manifold).__mro__)


def import_geoopt() -> Any:
    """The geoopt module, or an ImportError that says how to install it: geoopt is an
    optional dependency (the extra ``manifold_opt[geoopt]``), needed only by this interop."""
    try:
        import geoopt
    except ImportError as error:
        raise ImportError(
            "manifold_opt's geoopt interop needs geoopt, which is not installed: pip install manifold_opt[geoopt]"
        ) from error
    return geoopt


def from_geoopt(manifold: Any, ndim: int) -> Manifold:
    """The manifold_opt manifold for a geoopt manifold carried by a tensor of ``ndim`` dims.

    geoopt treats all but the last ``manifold.ndim`` dimensions as a batch; the mapped
    manifold gets the matching ``batch_dims``.
    """
    geoopt = import_geoopt()

    kind = type(manifold)
    if kind is geoopt.Euclidean and manifold.ndim == 0:
        return Euclidean()
    if kind in (geoopt.Sphere, geoopt.SphereExact) and manifold.projector is None and ndim >= 1:
        retraction = "exp" if kind is geoopt.SphereExact else "projection"
        return Sphere(retraction=retraction, batch_dims=ndim - 1)
    if kind is geoopt.EuclideanStiefel and ndim >= 2:
        return Stiefel(retraction="qr", batch_dims=ndim - 2)
    return GeooptManifold(manifold=manifold)


@dataclass(frozen=True, eq=False)
class GeooptManifold(Manifold):
    """A geoopt manifold behind the manifold_opt interface (compared by identity).

    Points are batched the geoopt way: the last ``manifold.ndim`` dimensions form a point.
    The second moment of :class:`~manifold_opt.RiemannianAdam` uses ``manifold.inner``
    (one scalar per point).
    """

    manifold: Any = None

    @property
    def supports_complex(self) -> bool:  # geoopt's complex manifolds step through their own methods
        return True

    @property
    def point_ndim(self) -> int:
        return int(self.manifold.ndim)

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if len(shape) < self.point_ndim:
            raise ValueError(f"{self.manifold!r} needs at least {self.point_ndim} dimensions, got shape {shape}")
        return shape[len(shape) - self.point_ndim :]

    def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)[: len(shape) - self.point_ndim]

    def project(self, x: Tensor) -> Tensor:
        return self.manifold.projx(x)

    # some geoopt manifolds (Lorentz) write into their argument: they get copies, so that a
    # gradient or a stored momentum is never modified
    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        return into(out, self.manifold.proju(x, u.clone()))

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        return into(out, self.manifold.egrad2rgrad(x, g.clone()))

    # the spectral-norm oracle (RiemannianMuon) needs the Euclidean-orthogonal projection onto
    # the tangent space, which geoopt's proju is not for every manifold (CanonicalStiefel's
    # u - x u^T x is not even idempotent): only manifolds whose tangent spaces are known get it
    @property
    def steepest_direction_supported(self) -> bool:
        return type(self.manifold).__name__ == "CanonicalStiefel"

    def steepest_direction(
        self, x: Tensor, g: Tensor, shape: Sequence[int], *, iterations: int, dual: Tensor | None = None
    ) -> SteepestDirection:
        """geoopt's ``CanonicalStiefel`` has the Stiefel manifold's tangent spaces (only its
        metric differs, which the oracle does not use): :class:`~manifold_opt.Stiefel`'s
        closed form. Other geoopt manifolds raise a TypeError that says what to use instead."""
        if not self.steepest_direction_supported:
            raise TypeError(unsupported_steepest_direction(self, shape))
        return Stiefel().steepest_direction(x, g, shape, iterations=iterations)

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        return self.manifold.retr(x, u * t)

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.manifold.transp(x, y, v)

    def retract_transport(
        self, x: Tensor, u: Tensor, v: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None
    ) -> tuple[Tensor, Tensor]:
        return self.manifold.retr_transp(x, u * t, v)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        """geoopt's ``inner``, with the point dimensions kept as singletons (``keepdim``) whatever
        geoopt's own ``keepdim`` keeps: geoopt's Siegel manifolds (``UpperHalf``,
        ``BoundedDomain``) keep one dimension for their ``n x n`` points, ``(..., 1)``, which
        does not broadcast against a batch of points (``(k, 1)`` against ``(k, n, n)``)."""
        value = self.manifold.inner(x, u, v, keepdim=keepdim)
        if keepdim and self.point_ndim > 0:
            batch = tuple(x.shape[: x.dim() - self.point_ndim])
            target = batch + (1,) * self.point_ndim
            if tuple(value.shape) != target and value.numel() == math.prod(batch):
                value = value.reshape(target)
        return value

    @property
    def second_moment_layout(self) -> str:
        """geoopt's convention: Adam averages ``component_inner``, which is one number per
        coordinate where a geoopt manifold overrides it (``Euclidean``, ``ProductManifold``)
        and the point's inner product otherwise."""
        geoopt = import_geoopt()

        own = type(self.manifold).component_inner
        return "scalar" if own is geoopt.manifolds.base.Manifold.component_inner else "tangent"

    def second_moment_increment(self, x: Tensor, r: Tensor) -> Tensor:
        if self.second_moment_layout == "scalar":  # real: the optimizers keep it in a real dtype
            inner = self.inner(x, r, r)
            return inner.real if inner.is_complex() else inner
        return self.manifold.component_inner(x, r)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        gap = (self.manifold.projx(x) - x).abs()
        if self.point_ndim == 0:
            return gap
        return gap.flatten(-self.point_ndim).amax(-1)

    def random_point(self, shape, *, generator=None, dtype=None, device=None) -> Tensor:
        del generator  # geoopt samplers use the global generator
        return torch.as_tensor(self.manifold.random(*shape, dtype=dtype, device=device))
