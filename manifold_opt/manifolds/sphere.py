"""The unit sphere, of a whole tensor or of each row (the oblique manifold)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import EmbeddedManifold, StepSize, Workspace, add_step, numel
from .linalg import real_product, unit_and_norm

SPHERE_RETRACTIONS = ("projection", "exp")


@dataclass(frozen=True, kw_only=True)
class Sphere(EmbeddedManifold):
    r"""The unit sphere :math:`S^{d-1} = \{x \in \mathbb{R}^d : \|x\| = 1\}` (of
    :math:`\mathbb{C}^d` for complex parameters, with the real inner product
    :math:`\langle u, v\rangle = \operatorname{Re}\,u^\mathsf{H} v`).

    A parameter is one point (``batch_dims=0``: the whole tensor has unit Frobenius
    norm) or a batch of points (``batch_dims=1`` on an ``(out, ...)`` weight: each output
    unit on its own sphere, the oblique manifold).

    .. math::
        P_x(g) = g - \langle x, g\rangle x, \qquad
        R_x(u) = \frac{x + u}{\|x + u\|}, \qquad
        \operatorname{Exp}_x(u) = x\cos\|u\| + \frac{u}{\|u\|}\sin\|u\|.

    Args:
        retraction: ``"projection"`` (normalize ``x + u``, default) or ``"exp"``
            (the exponential map, as geoopt's ``SphereExact``).
        batch_dims: leading dimensions of a parameter that index independent points.

    Shapes: points layout ``(..., d)``.

    Example:
        >>> import torch
        >>> from manifold_opt import Sphere
        >>> sphere = Sphere(batch_dims=1)
        >>> w = sphere.project_parameter(torch.randn(4, 3, 2))  # 4 unit-norm filters
        >>> torch.allclose(w.flatten(1).norm(dim=1), torch.ones(4))
        True
    """

    retraction: str = "projection"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retraction not in SPHERE_RETRACTIONS:
            raise ValueError(f"unknown Sphere retraction {self.retraction!r}; choose one of {SPHERE_RETRACTIONS}")

    @property
    def point_ndim(self) -> int:
        return 1

    @property
    def supports_complex(self) -> bool:
        return True

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        dim = numel(self._point_dims(shape, 0))
        if dim < 2:
            raise ValueError(
                f"a point of {self!r} from shape {tuple(shape)} would have {dim} coordinate(s); the sphere needs "
                f"at least 2 (lower batch_dims or use Euclidean)"
            )
        return (dim,)

    def project(self, x: Tensor) -> Tensor:
        """``x / ||x||`` with a scale-safe norm (entries near the dtype's limits neither
        overflow nor underflow); a zero point stays zero."""
        return unit_and_norm(x)[0]

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        return torch.addcmul(u, x, real_product(x, u).sum(-1, keepdim=True), value=-1, out=out)

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        if self.retraction == "exp":
            return self.exp(x, u * t)
        return self.project(add_step(x, u, t))

    def exp(self, x: Tensor, u: Tensor) -> Tensor:
        """Exponential map (great circle through ``x`` with initial velocity ``u``)."""
        direction, norm_u = unit_and_norm(u)
        return self.project(x * torch.cos(norm_u) + direction * torch.sin(norm_u))

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        return (real_product(x, x).sum(-1) - 1).abs()
