r"""The PSI manifold: positive scale invariance of the weights feeding a normalization.

Source: Yi, Meng, Chen, Ma, "Towards Accelerating Training of Batch Normalization: A
Manifold Perspective" (arXiv 2101.02916). The math and how sure we are of each formula
are in ``docs/psi.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Manifold, StepSize, Workspace, add_step, combine, into, numel
from .linalg import unit_and_norm


@dataclass(frozen=True, kw_only=True)
class PSI(Manifold):
    r"""The quotient :math:`(\mathbb{R}^d \setminus \{0\}) / \mathbb{R}_{>0}` of positive scale invariance.

    A weight whose loss satisfies :math:`L(c\,\theta) = L(\theta)` for every :math:`c > 0`
    (the weights feeding one BatchNorm channel) is a point of this quotient: ``θ`` and
    ``cθ`` are the same point. A point is stored as any nonzero representative ``θ``;
    nothing is ever normalized, so the parameter keeps the scale it was given.

    With the default ``batch_dims=1``, a weight of shape ``(out, *rest)`` is ``out``
    independent groups, one per output row (a conv filter is one group): the invariance
    of a layer followed by BatchNorm or InstanceNorm. ``batch_dims=0`` makes the whole
    tensor one group: the invariance of a bias-free layer followed by LayerNorm,
    GroupNorm or RMSNorm (or of a ConvTranspose, whose BN channels are its dim 1).

    Metric, horizontal space, Riemannian gradient and retraction, for each group
    (:math:`\hat\theta = \theta/\|\theta\|`):

    .. math::
        g_\theta(\xi, \zeta) = \frac{\langle \xi, \zeta\rangle}{\|\theta\|^2}, \qquad
        P_\theta(u) = u - \langle u, \hat\theta\rangle\hat\theta, \qquad
        \operatorname{grad} L(\theta) = \|\theta\|^2 P_\theta(\nabla L(\theta)), \qquad
        R_\theta(\xi) = \theta + \xi.

    The metric is invariant under :math:`\theta \mapsto c\theta` (so it descends to the
    quotient), and for an invariant loss :math:`\nabla L(c\theta) = \nabla L(\theta)/c`,
    so every operation above is equivariant: :math:`\operatorname{grad}L(c\theta) = c
    \operatorname{grad}L(\theta)` and :math:`R_{c\theta}(c\xi) = cR_\theta(\xi)`. For an
    invariant loss ``∇L`` is already horizontal; the projection only removes rounding
    (and the tiny radial part a normalization's ``eps`` adds). Transport is the
    horizontal projection at the new point. Since a horizontal step is orthogonal to
    ``θ``, :math:`\|R_\theta(\xi)\| \ge \|\theta\|`: a group never reaches zero.

    Norms are computed scale-safely (a row of norm 1e-30 in float32 is handled, not
    flushed to zero), and a zero row gives a zero gradient and step instead of NaN.

    Args:
        batch_dims: leading dimensions of a parameter that index independent groups:
            ``1`` (default) for one group per output row, ``0`` for the whole tensor.

    Shapes: points layout ``(..., d)`` with ``d >= 2`` (``d = prod(rest)``).

    Raises:
        ValueError: for a 0-dim parameter or groups of fewer than 2 coordinates (whose
            quotient is a point: only the sign matters, so nothing could ever move).

    Example:
        >>> import torch
        >>> from manifold_opt import PSI
        >>> psi = PSI()  # one group per output row
        >>> w = torch.randn(4, 3, dtype=torch.float64)
        >>> g = torch.randn(4, 3, dtype=torch.float64)
        >>> r = psi.riemannian_grad(w, g)
        >>> torch.allclose(psi.riemannian_grad(10 * w, g / 10), 10 * r)  # scale equivariant
        True
        >>> torch.allclose((r * w).sum(dim=1), torch.zeros(4, dtype=torch.float64))  # horizontal
        True
    """

    batch_dims: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_dims > 1:
            raise ValueError(
                f"PSI groups are output rows (batch_dims=1) or the whole tensor (batch_dims=0), "
                f"got batch_dims={self.batch_dims!r}"
            )

    # ----------------------------------------------------------------- layout
    @property
    def point_ndim(self) -> int:
        return 1

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(shape)
        if len(shape) == 0:
            raise ValueError(
                f"{self!r} needs a parameter with at least one dimension, got a 0-dim one; a scalar has no "
                f"scale-invariant direction: leave it Euclidean"
            )
        dim = numel(self._point_dims(shape, 0))
        if dim < 2:
            what = "row" if self.batch_dims == 1 else "tensor"
            raise ValueError(
                f"a PSI group of {dim} coordinate(s) (each {what} of shape {shape}) has no direction to move in, "
                f"only a sign; leave this parameter Euclidean"
                + (" or use PSI(batch_dims=0) for whole-tensor invariance" if self.batch_dims == 1 else "")
            )
        return (dim,)

    # --------------------------------------------------------------- geometry
    def project(self, x: Tensor) -> Tensor:
        """Identity: every nonzero tensor represents a point (a zero group has no projection,
        :meth:`distance_to_manifold` reports it)."""
        return x

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Horizontal projection :math:`u - \\langle u, \\hat x\\rangle \\hat x` (``u`` unchanged at a zero point)."""
        unit, _ = unit_and_norm(x)
        return torch.addcmul(u, unit, (u * unit).sum(-1, keepdim=True), value=-1, out=out)

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        r""":math:`\|x\|^2 P_x(g)`, computed as :math:`\|x\|(\|x\| P_x(g))` so that neither
        factor underflows or overflows on its own."""
        unit, norm = unit_and_norm(x)
        horizontal = g - (g * unit).sum(-1, keepdim=True) * unit
        return into(out, norm * (norm * horizontal))

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        return add_step(x, u, t)

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.project_tangent(y, v)

    @property
    def transport_is_projection(self) -> bool:
        return True

    def transport_add_grad(
        self, x: Tensor, v: Tensor, g: Tensor, a: float, b: float, *, out: Tensor | None = None
    ) -> Tensor:
        r""":math:`P_x(a v) + b\|x\|^2 P_x(g) = P_x(a v + b\|x\|^2 g)`: one projection (the
        metric factor is applied as :math:`\|x\|(\|x\| g)`, scale-safely)."""
        _, norm = unit_and_norm(x)
        return self.project_tangent(x, combine(v, a, norm * (norm * g), b), out=out)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        _, norm = unit_and_norm(x)
        norm = norm.clamp_min(torch.finfo(x.dtype).tiny)
        v = u if v is None else v
        return ((u / norm) * (v / norm)).sum(-1, keepdim=keepdim)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        """0 for a nonzero finite group, 1 for a zero or non-finite one (which is no point of the quotient)."""
        _, norm = unit_and_norm(x)
        valid = (norm > 0) & torch.isfinite(norm)
        return (~valid).squeeze(-1).to(x.dtype)

    def exp(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Exponential map along a horizontal ``u``: the horizontal geodesic keeps
        :math:`\|x\|` and turns :math:`\hat x` along a great circle,
        :math:`\|x\|\big(\hat x\cos\tfrac{\|u\|}{\|x\|} + \hat u\sin\tfrac{\|u\|}{\|x\|}\big)`
        (the metric is :math:`d(\log r)^2 + ds^2` in polar coordinates ``θ = r s``)."""
        unit, norm = unit_and_norm(x)
        direction, length = unit_and_norm(u)
        angle = length / norm.clamp_min(torch.finfo(x.dtype).tiny)
        return norm * (unit * torch.cos(angle) + direction * torch.sin(angle))

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        r"""Geodesic distance on the quotient: the angle between the rays of ``x`` and ``y``,
        :math:`2\operatorname{atan2}(\|\hat x - \hat y\|, \|\hat x + \hat y\|)` (accurate near 0 and π).

        Shapes: ``(..., d)`` -> ``(...)``.
        """
        ux, _ = unit_and_norm(x)
        uy, _ = unit_and_norm(y)
        return 2 * torch.atan2((ux - uy).norm(dim=-1), (ux + uy).norm(dim=-1))
