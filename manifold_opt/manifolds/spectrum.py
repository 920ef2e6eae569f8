r"""The conditioned-spectrum set: matrices whose singular values lie in a band.

Two forms (our design, not the weight-conditioning paper's):

* the fixed band :math:`\{W : a \le \sigma_i(W) \le b\}`;
* the condition-number bound :math:`\{W : \sigma_{\max}(W) \le \kappa\, \sigma_{\min}(W)\}`,
  a cone (closed under scaling).

It is a constraint set with interior, stepped by ``project(x + t u)``: the tangent space
is all of :math:`\mathbb{R}^{n\times p}` with the Frobenius metric, so the Riemannian
gradient, the tangent projection and the transport are identities, and the optimizers run
projected SGD/Adam.

``sigma`` is a singular value, ``s`` a vector of them; ``low``/``high`` the band edges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Manifold, StepSize, Workspace, add_step, check_iterations, keep_or_drop
from .linalg import identity_like, newton_schulz, qr_positive
from .spectral import SteepestDirection, msign

SPECTRUM_RETRACTIONS = ("svd", "newton")
# Newton–Schulz steps of the matmul-only clipping when ``iterations`` is None; the accuracy
# this gives is measured in docs/spectrum.md (benchmarks/spectrum_projection.py).
DEFAULT_NEWTON_ITERATIONS = 16
# The largest singular value for the matmul-only clipping of the kappa form is estimated by
# power iteration on the Gram matrix raised to 2**_SQUARINGS.
_SQUARINGS = 6
_POWER_STEPS = 2


@dataclass(frozen=True, kw_only=True)
class ConditionedSpectrum(Manifold):
    r"""Matrices whose singular values lie in a band: a constraint set stepped by ``project(x + t u)``.

    Give either ``kappa`` (:math:`\sigma_{\max} \le \kappa\,\sigma_{\min}`) or a fixed
    band ``sigma_min`` :math:`\le \sigma_i \le` ``sigma_max`` (either edge may be left out:
    ``sigma_max`` alone is the spectral-norm ball). A parameter ``(out, *rest)`` is one
    ``(out, prod(rest))`` matrix, as for :class:`~manifold_opt.Stiefel`; ``batch_dims``
    makes leading dimensions independent matrices. The singular values are the
    ``min(n, p)`` ones of the thin SVD.

    **Projection** (:meth:`project`, always exact): the Frobenius-nearest point of the set.
    By von Neumann's trace inequality it keeps the singular vectors and moves each singular
    value to the nearest admissible vector: for the band, :math:`\sigma \mapsto
    \operatorname{clamp}(\sigma, a, b)`; for the ``kappa`` form, a clamp into
    :math:`[m^*, \kappa m^*]` with

    .. math::
        m^* = \arg\min_{m \ge 0} \sum_i \big(\sigma_i - \operatorname{clamp}(\sigma_i, m, \kappa m)\big)^2,

    a convex piecewise-quadratic problem solved exactly over its breakpoints
    :math:`\{\sigma_i, \sigma_i/\kappa\}`. (Clamping into :math:`[\sigma_{\max}/\kappa,
    \sigma_{\max}]` is feasible too, but not the nearest point when small singular values
    violate the bound: lowering the top of the band a little moves the rest less.)
    A point already in the set is returned unchanged.

    **Geometry**: the set has interior, so the tangent space is the whole space with the
    Frobenius metric: ``riemannian_grad(x, g) = g``, ``project_tangent`` and ``transport``
    are identities and ``inner`` sums ``u * v`` over each matrix (RiemannianAdam keeps one
    second-moment scalar per matrix). A step is projected gradient descent.

    **Retractions** :math:`R_x(tu)`:

    * ``"svd"``: ``project(x + t u)`` (one SVD per matrix).
    * ``"newton"``: the matmul-only clipping :func:`clip_singular_values` of ``x + t u``,
      with ``iterations`` Newton–Schulz steps (default 16), for large matrices on
      accelerators where an SVD is slow. It is approximate: a singular value at distance
      ``d`` outside the band ends at most ``d/2`` outside it, and those far outside are
      clipped to working precision (measured accuracy in ``docs/spectrum.md``), while the
      singular values of ``x + t u`` span a moderate range. A step that dwarfs the point
      (``|t u|`` a thousand times ``|x|`` and more) leaves the small singular values below
      the band (relative violation up to about ``a / b``): the iteration cannot resolve them
      next to the large one. Use ``"svd"`` where such steps can occur. For the
      ``kappa`` form the band is anchored at a power-iteration estimate
      :math:`\hat\sigma \le \sigma_{\max}`: ``[σ̂/κ, σ̂]``, feasible but not the nearest
      band. Errors do not accumulate over steps (each step clips ``x + t u`` afresh), so
      no drift check runs; :meth:`project` gives the exact point at any time.

    Args:
        kappa: bound on the condition number, ``>= 1`` (``1`` is the cone of scaled
            orthogonal matrices, which has no interior).
        sigma_min: lower edge ``a >= 0`` of the fixed band (default 0).
        sigma_max: upper edge ``b >= a``, ``b > 0`` of the fixed band (default infinity).
        retraction: ``"svd"`` (default) or ``"newton"``.
        iterations: Newton–Schulz steps of ``"newton"`` (positive int; ``None`` for 16).
        batch_dims: leading dimensions of a parameter that index independent matrices.

    Shapes: points layout ``(..., n, p)``.

    Example:
        >>> import torch
        >>> from manifold_opt import ConditionedSpectrum
        >>> band = ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0)
        >>> w = band.project(torch.diag(torch.tensor([4.0, 1.0, 0.1])))
        >>> torch.linalg.svdvals(w)
        tensor([2.0000, 1.0000, 0.5000])
        >>> cone = ConditionedSpectrum(kappa=10.0)
        >>> s = torch.linalg.svdvals(cone.project(torch.randn(6, 4, dtype=torch.float64) ** 3))
        >>> bool(s.max() <= 10.0 * s.min() * (1 + 1e-12))
        True
    """

    kappa: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    retraction: str = "svd"
    iterations: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kappa is not None:
            if self.sigma_min is not None or self.sigma_max is not None:
                raise ValueError(
                    f"give either kappa or the band (sigma_min, sigma_max), not both: got kappa={self.kappa!r}, "
                    f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}"
                )
            if not _is_real(self.kappa) or not math.isfinite(self.kappa) or self.kappa < 1:
                raise ValueError(
                    f"kappa must be a finite number >= 1 (the largest allowed sigma_max/sigma_min), got {self.kappa!r}"
                )
        else:
            if self.sigma_min is None and self.sigma_max is None:
                raise ValueError(
                    "ConditionedSpectrum needs kappa=... (e.g. kappa=10.0) or a band sigma_min=..., sigma_max=..."
                )
            low, high = self.band_edges
            if not _is_real(low) or not math.isfinite(low) or low < 0:
                raise ValueError(f"sigma_min must be a finite number >= 0, got {self.sigma_min!r}")
            if not _is_real(high) or math.isnan(high) or high <= 0:
                raise ValueError(f"sigma_max must be a number > 0 (or None for no upper edge), got {self.sigma_max!r}")
            if low > high:
                raise ValueError(f"sigma_min={self.sigma_min!r} exceeds sigma_max={self.sigma_max!r}; swap them")
            if low == 0 and math.isinf(high):
                raise ValueError("the band [0, inf] constrains nothing: give sigma_min > 0 or a finite sigma_max")
        if self.retraction not in SPECTRUM_RETRACTIONS:
            raise ValueError(
                f"unknown ConditionedSpectrum retraction {self.retraction!r}; choose one of {SPECTRUM_RETRACTIONS}"
            )
        check_iterations(self, self.retraction, self.iterations, ("newton",))

    # ----------------------------------------------------------------- layout
    @property
    def point_ndim(self) -> int:
        return 2

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self._matrix_point_shape(shape)

    @property
    def band_edges(self) -> tuple[float, float]:
        """``(sigma_min, sigma_max)`` of the fixed band with defaults filled in (``(0, inf)`` for kappa)."""
        low = 0.0 if self.sigma_min is None else self.sigma_min
        high = math.inf if self.sigma_max is None else self.sigma_max
        return low, high

    # --------------------------------------------------------------- geometry
    def project(self, x: Tensor) -> Tensor:
        """Frobenius-nearest point of the set (SVD, clamp, recompose); points inside are returned as they are."""
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        clamped = self._clamp(s)
        projected = (u * clamped.unsqueeze(-2)) @ vh
        inside = (clamped == s).all(-1)
        return torch.where(inside[..., None, None], x, projected)

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        return u if out is None or out is u else out.copy_(u)

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        return g if out is None or out is g else out.copy_(g)

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        """``project(x + t u)`` (or its matmul-only approximation). A non-finite ``x + t u``
        (an overflowing step) gives NaN points, never a LAPACK error or a finite guess: the
        matrices are replaced by zeros for the factorization, then marked."""
        y = add_step(x, u, t)
        finite = torch.isfinite(y).flatten(-2).all(-1)[..., None, None]
        y = torch.where(finite, y, 0.0)
        y = self.project(y) if self.retraction == "svd" else self.project_approximate(y)
        return torch.where(finite, y, torch.nan)

    def steepest_direction(
        self, x: Tensor, g: Tensor, shape: Sequence[int], *, iterations: int, dual: Tensor | None = None
    ) -> SteepestDirection:
        r"""The set is a full-dimensional band: every direction is tangent, so the steepest unit
        step is :math:`\operatorname{msign}(g)` of each point, and the retraction (a projection
        onto the band) keeps the spectrum in it."""
        return SteepestDirection(msign(g))

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    @property
    def transport_is_projection(self) -> bool:
        return True

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        return keep_or_drop(self._sum_point_dims(u * (u if v is None else v)), 2, keepdim)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        r"""Relative band violation of every matrix; 0 inside the set.

        ``kappa`` form: :math:`\max(0, \sigma_{\max} - \kappa\sigma_{\min}) / \sigma_{\max}`
        (0 for a zero matrix). Band form: :math:`\max(a - \sigma_{\min}, \sigma_{\max} - b, 0)`
        divided by ``b`` (by ``a`` when ``b`` is infinite).
        """
        s = torch.linalg.svdvals(x)
        top, bottom = s[..., 0], s[..., -1]
        if self.kappa is not None:
            return (top - self.kappa * bottom).clamp_min(0) / top.clamp_min(torch.finfo(s.dtype).tiny)
        low, high = self.band_edges
        violation = torch.maximum(low - bottom, top - high).clamp_min(0)
        return violation / (high if math.isfinite(high) else low)

    def random_point(
        self,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A random point strictly inside the set (except for ``kappa=1``, which has no interior).

        Haar-distributed singular vectors; singular values uniform in the inner 80% of the
        band (for ``kappa``: log-uniform in ``[1, kappa**0.8]``).
        """
        shape = tuple(shape)
        *batch, n, p = shape
        r = min(n, p)
        options = dict(generator=generator, dtype=dtype, device=device)
        left = qr_positive(torch.randn((*batch, n, r), **options))
        right = qr_positive(torch.randn((*batch, p, r), **options))
        fraction = torch.rand((*batch, r), **options)
        if self.kappa is not None:
            s = torch.exp(0.8 * math.log(self.kappa) * fraction)
        else:
            low, high = self.band_edges
            high = high if math.isfinite(high) else 2 * low
            s = low + (high - low) * (0.1 + 0.8 * fraction)
        return (left * s.unsqueeze(-2)) @ right.mT

    # ------------------------------------------------------- singular values
    def _clamp(self, s: Tensor) -> Tensor:
        """The nearest admissible singular values (``s`` of shape ``(..., r)``)."""
        if self.kappa is None:
            low, high = self.band_edges
            return s.clamp(min=low, max=None if math.isinf(high) else high)
        m = kappa_band_floor(s, self.kappa).unsqueeze(-1)
        return torch.minimum(torch.maximum(s, m), self.kappa * m)

    def project_approximate(self, x: Tensor) -> Tensor:
        """The matmul-only clipping of ``x`` into the band (the ``"newton"`` retraction's map).

        See :func:`clip_singular_values`; for the ``kappa`` form the band is
        ``[σ̂/κ, σ̂]`` with ``σ̂ <= σ_max`` a power-iteration estimate.
        """
        iterations = DEFAULT_NEWTON_ITERATIONS if self.iterations is None else self.iterations
        if self.kappa is None:
            low, high = self.band_edges
            return clip_singular_values(x, low, high, iterations)
        top = largest_singular_value_estimate(x)
        return clip_singular_values(x, top / self.kappa, top, iterations)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def kappa_band_floor(s: Tensor, kappa: float) -> Tensor:
    r"""Lower edge :math:`m^*` of the nearest band :math:`[m, \kappa m]` for singular values ``s``.

    Minimizes the convex piecewise quadratic
    :math:`f(m) = \sum_{\sigma_i < m} (m - \sigma_i)^2 + \sum_{\sigma_i > \kappa m} (\sigma_i - \kappa m)^2`
    exactly: between consecutive breakpoints of :math:`\{\sigma_i\} \cup \{\sigma_i/\kappa\}`
    the two index sets are fixed and the minimizer is
    :math:`(\sum_L \sigma_i + \kappa\sum_H \sigma_i) / (|L| + \kappa^2 |H|)`, clipped to the
    interval; the best interval wins. Prefix sums over the sorted values make it
    :math:`O(r \log r)` per matrix, batched.

    Shapes: ``s (..., r)`` -> ``(...)``.
    """
    r = s.shape[-1]
    if r == 1:
        return s[..., 0]
    values = s.sort(-1).values.contiguous()
    breaks = torch.cat([values, values / kappa], -1).sort(-1).values
    lo, hi = breaks[..., :-1], breaks[..., 1:]
    middle = (0.5 * (lo + hi)).contiguous()
    zero = values.new_zeros((*values.shape[:-1], 1))
    sums = torch.cat([zero, values.cumsum(-1)], -1)
    squares = torch.cat([zero, (values * values).cumsum(-1)], -1)
    n_low = torch.searchsorted(values, middle)  # count of sigma < m
    n_not_high = torch.searchsorted(values, (kappa * middle).contiguous(), right=True)  # count of sigma <= kappa m
    sum_low, square_low = sums.gather(-1, n_low), squares.gather(-1, n_low)
    sum_high = sums[..., -1:] - sums.gather(-1, n_not_high)
    square_high = squares[..., -1:] - squares.gather(-1, n_not_high)
    count_low = n_low.to(s.dtype)
    count_high = (r - n_not_high).to(s.dtype)
    denominator = count_low + kappa**2 * count_high
    m = torch.where(denominator > 0, (sum_low + kappa * sum_high) / denominator.clamp_min(1), middle)
    m = torch.minimum(torch.maximum(m, lo), hi)
    cost = (
        count_low * m * m
        - 2 * m * sum_low
        + square_low
        + square_high
        - 2 * kappa * m * sum_high
        + kappa**2 * count_high * m * m
    )
    return m.gather(-1, cost.argmin(-1, keepdim=True)).squeeze(-1)


def _spectral_radius_bound(h: Tensor) -> tuple[Tensor, Tensor]:
    r"""An upper bound of the spectral radius of symmetric ``h``, and ``(h/‖h‖_F)^4``.

    :math:`\rho(H)^4 \le \|H^4\|_F`, which overestimates :math:`\rho` by at most
    :math:`r^{1/8}` for an ``r x r`` matrix (``‖H‖_F``, by :math:`r^{1/2}`). The matrix is
    scaled by its Frobenius norm before squaring, so nothing overflows.

    Shapes: ``h (..., r, r)`` -> ``(...)``, ``(..., r, r)``.
    """
    frobenius = torch.linalg.matrix_norm(h).clamp_min(torch.finfo(h.dtype).tiny)
    h1 = h / frobenius[..., None, None]
    h2 = h1 @ h1
    h4 = h2 @ h2
    return frobenius * torch.linalg.matrix_norm(h4).pow(0.25), h4


def largest_singular_value_estimate(x: Tensor) -> Tensor:
    r"""A lower estimate :math:`\hat\sigma \le \sigma_{\max}(x)`, by matmuls only.

    The Gram matrix is raised to the power 64 by repeated squaring (renormalized at each
    step, so nothing overflows or underflows); its row sums, a few more products with it and
    the Rayleigh quotient of the Gram matrix give the estimate. The weight of an eigenvalue
    :math:`\lambda_i` in the quotient shrinks like :math:`(\lambda_i/\lambda_1)^{64 k}`.

    Shapes: ``x (..., n, p)`` -> ``(...)``.
    """
    tiny = torch.finfo(x.dtype).tiny
    gram = x.mT @ x if x.shape[-2] >= x.shape[-1] else x @ x.mT
    power = gram
    for _ in range(_SQUARINGS):
        power = power / torch.linalg.matrix_norm(power).clamp_min(tiny)[..., None, None]
        power = power @ power
    power = power / torch.linalg.matrix_norm(power).clamp_min(tiny)[..., None, None]
    v = power.sum(-1, keepdim=True)
    for _ in range(_POWER_STEPS):
        v = power @ v
        v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
    rayleigh = (v.mT @ gram @ v)[..., 0, 0] / (v.mT @ v)[..., 0, 0].clamp_min(tiny)
    return rayleigh.clamp_min(0).sqrt()


def _shifted_sign(gram: Tensor, shift: Tensor | float, iterations: int) -> Tensor:
    """``sign(gram - shift I)`` of a symmetric matrix by :func:`newton_schulz` (its polar factor)."""
    shift = torch.as_tensor(shift, dtype=gram.dtype, device=gram.device)
    h = gram - shift[..., None, None] * identity_like(gram)
    radius, _ = _spectral_radius_bound(h)
    return newton_schulz(h / radius.clamp_min(torch.finfo(h.dtype).tiny)[..., None, None], iterations)


def clip_singular_values(
    x: Tensor, low: Tensor | float, high: Tensor | float, iterations: int = DEFAULT_NEWTON_ITERATIONS
) -> Tensor:
    r"""Clamp the singular values of ``x`` into ``[low, high]`` with matmuls only (approximate).

    With the Gram matrix :math:`G = X^\top X` (short side), the polar factor
    :math:`Q = UV^\top` and the spectral projectors :math:`P_{<a} = \tfrac12(I - S_a)`,
    :math:`P_{>b} = \tfrac12(I + S_b)`, :math:`S_c = \operatorname{sign}(G - c^2 I)`:

    .. math::
        \operatorname{clip}(X) = X\,(I - P_{<a} - P_{>b}) + Q\,(a P_{<a} + b P_{>b}),

    each singular value :math:`\sigma` going to
    :math:`\sigma \tfrac12(s_a - s_b) + \varphi(\sigma)\big(\tfrac a2 (1 - s_a) + \tfrac b2 (1 + s_b)\big)`
    where :math:`s_c \approx \operatorname{sign}(\sigma^2 - c^2)` and
    :math:`\varphi(\sigma) \approx 1` are the Newton–Schulz approximations
    (:func:`~manifold_opt.manifolds.linalg.newton_schulz`: a sign function is the polar
    factor of a symmetric matrix). [derived] The sign iterations converge slowly only for
    singular values within a small relative distance of an edge; there the result lies
    between :math:`\sigma` and that edge, at most half-way, so the error is at most half the
    distance to the edge (inside the band the value stays inside). Values well inside the
    band keep :math:`X`'s own components and need no polar factor, so tiny singular values
    are untouched by an upper clip.
    Lifting a value below ``low`` needs :math:`\varphi(\sigma)`: a zero singular value has no
    direction to lift along and stays 0 (use the SVD projection for rank-deficient input).

    Cost: ``iterations`` Newton–Schulz steps on ``x`` and on two ``r x r`` matrices
    (``r = min(n, p)``), i.e. about ``6 * iterations`` matmuls for a square matrix.

    Args:
        x: matrices.
        low: lower edge ``a >= 0`` (a float, or one per matrix, shape ``(...)``).
        high: upper edge ``b >= a`` (``inf`` for none).
        iterations: Newton–Schulz steps of each iteration.

    Returns:
        The clipped matrices.

    Shapes: ``x (..., n, p)``, ``low``/``high`` scalars or ``(...)`` -> ``(..., n, p)``.
    """
    if x.shape[-2] < x.shape[-1]:
        return clip_singular_values(x.mT, low, high, iterations).mT
    gram = x.mT @ x
    eye = identity_like(gram)
    lower = not (isinstance(low, (int, float)) and low == 0)
    upper = not (isinstance(high, (int, float)) and math.isinf(high))
    polar = None
    if lower or upper:
        radius, _ = _spectral_radius_bound(gram)
        polar = newton_schulz(x * radius.clamp_min(torch.finfo(x.dtype).tiny).rsqrt()[..., None, None], iterations)
    result_right = eye.expand_as(gram).clone()  # X's coefficient: I - P_low - P_high
    lifted = torch.zeros_like(gram)  # Q's coefficient: a P_low + b P_high
    if lower:
        low_t = torch.as_tensor(low, dtype=x.dtype, device=x.device)
        p_low = 0.5 * (eye - _shifted_sign(gram, low_t * low_t, iterations))
        result_right = result_right - p_low
        lifted = lifted + low_t[..., None, None] * p_low
    if upper:
        high_t = torch.as_tensor(high, dtype=x.dtype, device=x.device)
        p_high = 0.5 * (eye + _shifted_sign(gram, high_t * high_t, iterations))
        result_right = result_right - p_high
        lifted = lifted + high_t[..., None, None] * p_high
    if polar is None:
        return x
    return x @ result_right + polar @ lifted
