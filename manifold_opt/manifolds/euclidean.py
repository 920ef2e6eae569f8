"""Euclidean space: the geometry of an unconstrained parameter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Manifold, StepSize, Workspace, add_step
from .linalg import real_product


@dataclass(frozen=True, kw_only=True)
class Euclidean(Manifold):
    r"""Flat space :math:`\mathbb{R}^{\text{shape}}`; every coordinate is its own point.

    Treating each coordinate as a point makes the scalar-per-point second moment of
    :class:`~manifold_opt.RiemannianAdam` coordinate-wise, so both optimizers reduce to
    ``torch.optim.SGD`` and ``torch.optim.Adam`` on Euclidean parameters. Plain tensors
    given to an optimizer are Euclidean. ``batch_dims`` has no effect here.

    Shapes: points layout ``(...)`` (``point_shape = ()``).

    Example:
        >>> import torch
        >>> from manifold_opt import Euclidean
        >>> x, u = torch.zeros(3), torch.ones(3)
        >>> Euclidean().retract(x, u, t=0.5)
        tensor([0.5000, 0.5000, 0.5000])
    """

    @property
    def point_ndim(self) -> int:
        return 0

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return ()

    def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape)

    def project(self, x: Tensor) -> Tensor:
        return x

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        return u if out is None or out is u else out.copy_(u)

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        return g if out is None or out is g else out.copy_(g)

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        return add_step(x, u, t)

    def exp(self, x: Tensor, u: Tensor) -> Tensor:
        """Exponential map ``x + u`` (equal to the retraction)."""
        return x + u

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        return real_product(u, u if v is None else v)  # every coordinate is a point: nothing to keep

    @property
    def supports_complex(self) -> bool:
        return True

    @property
    def transport_is_projection(self) -> bool:
        return True

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)
