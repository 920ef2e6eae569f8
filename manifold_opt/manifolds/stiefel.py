"""The Stiefel manifold of matrices with orthonormal columns (or rows)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import EmbeddedManifold, check_iterations
from .linalg import (
    identity_like,
    newton_iterations_needed,
    newton_schulz,
    polar_eigh,
    polar_svd,
    qr_positive,
    sym,
)

STIEFEL_RETRACTIONS = ("qr", "polar", "cayley", "newton")

# Newton retraction: with S = (X + u)^T (X + u) and delta = ||S - I||_F, the eigenvalues of
# S lie in [1 - delta, 1 + delta]. Points with delta above this are scaled by 1 / (1 + delta)
# (their eigenvalues are >= 1 for X on the manifold and u tangent, so they land in
# [1 / (1 + delta), 1]).
_NEWTON_SCALE_ABOVE = 0.9
# The fixed-point Cayley iteration contracts by q = ||t u_bar||_F; above this the exact
# (Woodbury) solve is cheaper than the iterations it would need.
_CAYLEY_EXACT_ABOVE = 0.5


@dataclass(frozen=True, kw_only=True)
class Stiefel(EmbeddedManifold):
    r"""Matrices with orthonormal columns, :math:`\mathrm{St}(n, p) = \{X \in \mathbb{R}^{n\times p} : X^\top X = I\}`.

    A wide matrix (``n < p``) has orthonormal rows instead (:math:`XX^\top = I`). A
    parameter ``(out, *rest)`` is one ``(out, prod(rest))`` matrix, so a conv kernel is
    orthonormal as a whole, not per ``kh x kw`` slice; ``batch_dims=1`` on a
    ``(groups, n, p)`` tensor makes each slice its own point. The metric is the
    Euclidean one, :math:`\langle u, v\rangle = \operatorname{tr}(u^\top v)`.

    .. math::
        P_X(g) = g - X\,\mathrm{sym}(X^\top g), \qquad
        \text{project}(A) = UV^\top \text{ for } A = U\Sigma V^\top.

    Retractions :math:`R_X(u)`:

    * ``"qr"``: the ``Q`` factor of ``X + u`` with positive ``diag(R)`` (the map of
      geoopt's ``EuclideanStiefel.retr``); first order; the fastest LAPACK choice.
    * ``"polar"``: :math:`(X+u)(I + u^\top u)^{-1/2}`, the polar factor of ``X + u`` by
      ``eigh`` of a ``p x p`` Gram matrix; second order.
    * ``"cayley"``: :math:`(I - \tfrac12 A)^{-1}(I + \tfrac12 A)X` with
      :math:`A = \bar u X^\top - X \bar u^\top`, :math:`\bar u = u - \tfrac12 X X^\top u`,
      solved by the fixed-point iteration of Li, Fuxin and Todorovic (ICLR 2020),
      :math:`Y \leftarrow X + \tfrac12 A(X + Y)`, with ``A`` kept in factored form
      (``O(np^2)`` per iteration, matmuls only). The iteration contracts by
      :math:`q = \|\bar u\|_F`; for ``q >= 0.5`` the exact solve (a ``2p x 2p`` system by
      the Woodbury identity) replaces it, so there is no cap on the step size.
    * ``"newton"``: the polar factor of ``X + u`` by the Newton–Schulz iteration
      (:func:`~manifold_opt.manifolds.linalg.newton_schulz`, the iteration of ONI);
      matmuls only; second order once converged. ``X + u`` is scaled into the
      convergence region when a cheap bound on its norm asks for it.

    ``iterations``: for ``"cayley"`` and ``"newton"``, ``None`` (default) picks the
    number of iterations that reaches working precision from a bound on the step (one
    host synchronization per call); an int fixes it (Li et al. use 2 for Cayley), in which
    case the optimizers' drift check re-projects points that leave the manifold.

    Args:
        retraction: one of ``"qr"``, ``"polar"``, ``"cayley"``, ``"newton"``.
        iterations: iteration count of ``"cayley"``/``"newton"`` (see above).
        batch_dims: leading dimensions of a parameter that index independent matrices.

    Shapes: points layout ``(..., n, p)``.

    Example:
        >>> import torch
        >>> from manifold_opt import Stiefel
        >>> stiefel = Stiefel(retraction="polar")
        >>> x = stiefel.random_point((5, 3), dtype=torch.float64)
        >>> y = stiefel.retract(x, stiefel.random_tangent(x), t=0.1)
        >>> bool(stiefel.distance_to_manifold(y) < 1e-12)
        True
    """

    retraction: str = "qr"
    iterations: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retraction not in STIEFEL_RETRACTIONS:
            raise ValueError(f"unknown Stiefel retraction {self.retraction!r}; choose one of {STIEFEL_RETRACTIONS}")
        check_iterations(self, self.retraction, self.iterations, ("cayley", "newton"))

    # ----------------------------------------------------------------- layout
    @property
    def point_ndim(self) -> int:
        return 2

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self._matrix_point_shape(shape)

    # --------------------------------------------------------------- geometry
    def project(self, x: Tensor) -> Tensor:
        return polar_svd(x)

    def project_tangent(self, x: Tensor, u: Tensor) -> Tensor:
        if _is_wide(x):
            return self.project_tangent(x.mT, u.mT).mT
        return u - x @ sym(x.mT @ u)

    def retract(self, x: Tensor, u: Tensor, t: float = 1.0) -> Tensor:
        if _is_wide(x):
            return self.retract(x.mT, u.mT, t).mT
        if self.retraction == "qr":
            return qr_positive(torch.add(x, u, alpha=t))
        if self.retraction == "polar":
            return polar_eigh(torch.add(x, u, alpha=t))
        if self.retraction == "cayley":
            return _cayley(x, t * u, self.iterations)
        return _newton_polar(torch.add(x, u, alpha=t), self.iterations)

    def exp(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Exponential map of the Euclidean metric (Edelman, Arias, Smith 1998, eq. 2.45).

        .. math::
            \operatorname{Exp}_X(u) = [X, u]\,\exp\!\begin{pmatrix} A & -S \\ I & A\end{pmatrix}
            \begin{pmatrix} \exp(-A) \\ 0 \end{pmatrix},\quad A = X^\top u,\ S = u^\top u.
        """
        if _is_wide(x):
            return self.exp(x.mT, u.mT).mT
        p = x.shape[-1]
        a = x.mT @ u
        s = u.mT @ u
        eye = identity_like(a).expand_as(a)
        block = torch.cat([torch.cat([a, -s], dim=-1), torch.cat([eye, a], dim=-1)], dim=-2)
        e = torch.linalg.matrix_exp(block)[..., :, :p]
        return torch.cat([x, u], dim=-1) @ e @ torch.linalg.matrix_exp(-a)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        """Largest entry of :math:`|X^\\top X - I|` (:math:`|XX^\\top - I|` for wide ``X``)."""
        tall = x.mT if _is_wide(x) else x
        gram = tall.mT @ tall
        return (gram - identity_like(gram)).abs().amax(dim=(-2, -1))

    def random_point(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A Haar-distributed point: the sign-fixed ``Q`` of a Gaussian matrix."""
        gaussian = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        if _is_wide(gaussian):
            return qr_positive(gaussian.mT).mT
        return qr_positive(gaussian)

    # ------------------------------------------------------------ drift policy
    @property
    def retraction_drifts(self) -> bool:
        # qr and polar orthonormalize X + u from scratch: no error carries over.
        return self.retraction in ("cayley", "newton")

    def drift_tolerance(self, dtype: torch.dtype) -> float:
        return 16 * torch.finfo(dtype).eps


def _is_wide(x: Tensor) -> bool:
    return x.shape[-2] < x.shape[-1]


def _cayley(x: Tensor, u: Tensor, iterations: int | None) -> Tensor:
    """Cayley retraction of tall ``x`` along ``u`` (already scaled by the step size).

    Points whose contraction bound ``q`` is too large for the fixed-point iteration take the
    exact solve; the choice is made per point, so a batch gives the results of its items.
    """
    u_bar = u - 0.5 * x @ (x.mT @ u)

    def apply_a(z: Tensor) -> Tensor:  # A z with A = u_bar x^T - x u_bar^T, never formed
        return u_bar @ (x.mT @ z) - x @ (u_bar.mT @ z)

    q = torch.linalg.matrix_norm(u_bar)
    exact = ~(q < (1.0 if iterations is not None else _CAYLEY_EXACT_ABOVE))  # also catches NaN
    if bool(exact.all()):
        return _cayley_exact(x, u_bar)
    if iterations is None:
        q_max = float(torch.where(exact, 0.0, q).max()) if q.numel() else 0.0
        tolerance = torch.finfo(x.dtype).eps
        # the first iterate X + u is within O(q^2) of the fixed point; each step gains a factor q
        iterations = 1 if q_max == 0.0 else max(1, math.ceil(math.log(tolerance) / math.log(q_max)) - 2)
    y = x + apply_a(x)
    for _ in range(iterations):
        y = x + 0.5 * apply_a(x + y)
    if bool(exact.any()):
        y = torch.where(exact[..., None, None], _cayley_exact(x, u_bar), y)
    return y


def _cayley_exact(x: Tensor, u_bar: Tensor) -> Tensor:
    r"""Exact Cayley transform :math:`(I - \tfrac12 A)^{-1}(I + \tfrac12 A)X`.

    For ``2p < n`` by the Woodbury identity (a ``2p x 2p`` system): with
    :math:`A = UV^\top`, :math:`U = [\bar u, X]`, :math:`V = [X, -\bar u]`,
    :math:`(I - \tfrac12 UV^\top)^{-1} = I + \tfrac12 U (I - \tfrac12 V^\top U)^{-1} V^\top`;
    otherwise by the ``n x n`` system itself, which is then the smaller one."""
    n, p = x.shape[-2:]
    if 2 * p >= n:
        a = u_bar @ x.mT - x @ u_bar.mT
        eye = identity_like(a)
        return torch.linalg.solve(eye - 0.5 * a, x + 0.5 * a @ x)
    left = torch.cat([u_bar, x], dim=-1)
    right = torch.cat([x, -u_bar], dim=-1)
    z = x + 0.5 * left @ (right.mT @ x)
    small = right.mT @ left
    system = identity_like(small) - 0.5 * small
    return z + 0.5 * left @ torch.linalg.solve(system, right.mT @ z)


def _newton_polar(a: Tensor, iterations: int | None) -> Tensor:
    r"""Polar factor of tall ``a = X + u`` by :func:`newton_schulz`.

    With :math:`S = A^\top A` and :math:`\delta = \|S - I\|_F`, the eigenvalues of ``S``
    lie in :math:`[1 - \delta, 1 + \delta]` (Weyl). A point with
    :math:`\delta > 0.9` is scaled by :math:`(1 + \delta)^{-1/2}`, which puts them in
    :math:`[1/(1+\delta), 1]` for ``X`` on the manifold and ``u`` tangent. With
    ``iterations=None`` the count comes from the worst interval over the batch
    (:func:`newton_iterations_needed`). ``S`` also serves the first iteration.
    """
    s = a.mT @ a
    eye = identity_like(s)
    delta = torch.linalg.matrix_norm(s - eye)
    scale = torch.where(delta > _NEWTON_SCALE_ABOVE, 1 + delta, torch.ones_like(delta))[..., None, None]
    if iterations is None:
        worst = float(delta.max()) if delta.numel() else 0.0
        if not math.isfinite(worst):
            return polar_svd(a)
        if worst <= _NEWTON_SCALE_ABOVE:
            low, high = 1 - worst, 1 + worst
        else:  # a mix of unscaled points and points scaled into [1 / (1 + worst), 1]
            low, high = min(1 - _NEWTON_SCALE_ABOVE, 1 / (1 + worst)), 1 + _NEWTON_SCALE_ABOVE
        iterations = newton_iterations_needed(max(low, 1e-12), high, 8 * torch.finfo(a.dtype).eps)
    y = a * scale.rsqrt()
    if iterations == 0:
        return y
    y = y @ (1.5 * eye - (0.5 / scale) * s)  # the first Newton–Schulz step, reusing S
    return newton_schulz(y, iterations - 1)
