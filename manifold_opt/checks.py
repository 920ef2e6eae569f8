"""Public diagnostics, after Manopt's ``checkretraction`` and ``checkgradient``.

* :func:`check_retraction`: the order of a retraction from the log-log slope of
  :math:`\\|R_x(tu) - \\operatorname{Exp}_x(tu)\\|` against ``t``.
* :func:`check_gradient`: the Riemannian gradient of a function against autograd.
* :func:`manifold_residuals`: distance to the manifold of every
  :class:`~manifold_opt.ManifoldParameter` of a model, for monitoring.
* :func:`steepest_direction_gap`: how far a spectral-norm steepest direction (the oracle of
  :class:`~manifold_opt.RiemannianMuon`) is from the optimum, by its duality gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .manifolds import Manifold
from .manifolds.linalg import real_product
from .manifolds.spectral import duality_gap
from .optim.base import manifold_of


@dataclass(frozen=True)
class SlopeCheck:
    """A log-log slope and the data it was fitted on.

    Attributes:
        slope: least-squares slope of ``log(errors)`` against ``log(step_sizes)`` over the
            points above the rounding floor.
        step_sizes: the step sizes ``t``.
        errors: the measured error at each ``t``.
    """

    slope: float
    step_sizes: Tensor
    errors: Tensor


def fit_slope(step_sizes: Tensor, errors: Tensor, floor: float) -> float:
    """Least-squares slope of ``log(errors)`` against ``log(step_sizes)`` where ``errors > floor``."""
    keep = errors > floor
    if int(keep.sum()) < 2:
        return math.nan
    log_t, log_e = step_sizes[keep].log(), errors[keep].log()
    log_t = log_t - log_t.mean()
    return float((log_t * (log_e - log_e.mean())).sum() / (log_t * log_t).sum())


def _step_sizes(low: float, high: float, dtype: torch.dtype) -> Tensor:
    return torch.logspace(low, high, 11, dtype=dtype)


def check_retraction(
    manifold: Manifold,
    x: Tensor,
    u: Tensor | None = None,
    *,
    step_sizes: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SlopeCheck:
    r"""Order of the retraction of ``manifold`` at ``x`` along ``u``.

    Measures :math:`e(t) = \|R_x(tu) - \operatorname{Exp}_x(tu)\|` over the step sizes:
    a first-order retraction gives slope 2, a second-order one slope 3. Work in float64.

    Args:
        manifold: a manifold with an ``exp`` method.
        x: a point (points layout).
        u: a tangent vector at ``x``; a random unit one by default.
        step_sizes: the ``t`` values (default ``logspace(-3, -0.5, 11)``).
        generator: for the random tangent.

    Returns:
        A :class:`SlopeCheck`.
    """
    if not hasattr(manifold, "exp"):
        raise TypeError(f"{manifold!r} has no exp method, so its retraction order cannot be measured")
    if u is None:
        u = manifold.random_tangent(x, generator=generator)
        u = u / manifold.inner(x, u, u).sqrt().amax()
    ts = _step_sizes(-3, -0.5, x.dtype) if step_sizes is None else step_sizes
    errors = torch.stack([(manifold.retract(x, u, float(t)) - manifold.exp(x, float(t) * u)).norm() for t in ts])
    return SlopeCheck(fit_slope(ts, errors, 100 * torch.finfo(x.dtype).eps), ts, errors)


@dataclass(frozen=True)
class GradientCheck:
    """Result of :func:`check_gradient`.

    Attributes:
        identity_error: :math:`|\\langle \\operatorname{grad} f, u\\rangle_x - Df(x)[u]|`
            relative to :math:`\\|\\operatorname{grad} f\\|\\|u\\|`; rounding level when right.
        tangent_error: distance of the Riemannian gradient from the tangent space, relative.
        taylor: slope of :math:`|f(R_x(tu)) - f(x) - t\\langle \\operatorname{grad} f, u\\rangle_x|`;
            2 when the gradient is right, 1 when it is wrong.
    """

    identity_error: float
    tangent_error: float
    taylor: SlopeCheck


def check_gradient(
    manifold: Manifold,
    function: Callable[[Tensor], Tensor],
    x: Tensor,
    u: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> GradientCheck:
    """Check ``manifold.riemannian_grad`` of a scalar ``function`` at ``x`` against autograd.

    The Riemannian gradient is defined by :math:`\\langle \\operatorname{grad} f(x), u\\rangle_x
    = Df(x)[u] = \\langle \\nabla f(x), u\\rangle` for every tangent ``u``.

    Args:
        manifold: the manifold.
        function: maps a point (points layout) to a scalar tensor.
        x: the point.
        u: a tangent vector at ``x`` (random by default).
        generator: for the random tangent.
    """
    point = x.detach().requires_grad_(True)
    (euclidean_grad,) = torch.autograd.grad(function(point), point)
    riemannian = manifold.riemannian_grad(x, euclidean_grad)
    if u is None:
        u = manifold.random_tangent(x, generator=generator)
    scale = float(riemannian.norm() * u.norm()) or 1.0
    identity = float((manifold.inner(x, riemannian, u).sum() - real_product(euclidean_grad, u).sum()).abs()) / scale
    tangent = float((manifold.project_tangent(x, riemannian) - riemannian).norm()) / (float(riemannian.norm()) or 1.0)
    with torch.no_grad():
        f0 = function(x)
        slope = float(manifold.inner(x, riemannian, u).sum())
        ts = _step_sizes(-5, -2, x.dtype)  # small enough for the t^2 term to dominate
        errors = torch.stack([(function(manifold.retract(x, u, float(t))) - f0 - float(t) * slope).abs() for t in ts])
    floor = 100 * torch.finfo(x.dtype).eps * max(1.0, float(f0.abs()))
    return GradientCheck(identity, tangent, SlopeCheck(fit_slope(ts, errors, floor), ts, errors))


def manifold_residuals(module: torch.nn.Module) -> dict[str, float]:
    """Largest distance to its manifold of every non-Euclidean parameter of ``module``.

    Example:
        >>> import torch
        >>> from manifold_opt import ManifoldParameter, Stiefel
        >>> from manifold_opt.checks import manifold_residuals
        >>> layer = torch.nn.Linear(4, 8)
        >>> layer.weight = ManifoldParameter(layer.weight, Stiefel())
        >>> manifold_residuals(layer)["weight"] < 1e-5
        True
    """
    residuals = {}
    for name, parameter in module.named_parameters():
        manifold = manifold_of(parameter)
        if manifold.point_ndim > 0:
            residuals[name] = float(manifold.parameter_distance(parameter.detach()))
    return residuals


def steepest_direction_gap(
    manifold: Manifold,
    x: Tensor,
    g: Tensor,
    shape: tuple[int, ...] | torch.Size | None = None,
    *,
    iterations: int = 200,
) -> Tensor:
    r"""The relative duality gap of :meth:`~manifold_opt.manifolds.Manifold.steepest_direction`
    at ``x`` for the gradient (or momentum) ``g``, one number per matrix.

    The manifold's direction :math:`A` (projected onto the tangent space, scaled to spectral
    norm 1) has the value :math:`\ell = \langle g, A\rangle \le` optimum; any
    :math:`Z = g - \nu` with :math:`\nu` in the normal space bounds the optimum from above by
    :math:`\|Z\|_*`. :math:`Z` comes from ``iterations`` steps of the generic solver
    (:func:`~manifold_opt.manifolds.spectral.admm_steepest_direction`, whatever the manifold
    computes its own direction with), so the gap :math:`(\|Z\|_* - \ell)/\|Z\|_*` bounds how
    far the direction is from the true optimum, without trusting the manifold's method
    (loosely where the solver has not converged: more ``iterations`` tighten it).

    Args:
        manifold: the manifold of ``x``.
        x, g: one parameter (or a stack of them) in the points layout.
        shape: the parameter's shape (default: ``x.shape``, one point).
        iterations: iterations of the solver that provides :math:`Z`.

    Example:
        >>> import torch
        >>> from manifold_opt import Stiefel
        >>> from manifold_opt.checks import steepest_direction_gap
        >>> st = Stiefel()
        >>> x = st.random_point((12, 4), dtype=torch.float64)
        >>> bool(steepest_direction_gap(st, x, torch.randn(12, 4, dtype=torch.float64)) < 1e-6)
        True
    """
    shape = tuple(x.shape) if shape is None else tuple(shape)
    direction = manifold.steepest_direction(x, g, shape, iterations=iterations).direction
    bound = Manifold.steepest_direction(manifold, x, g, shape, iterations=iterations).dual
    rows, cols = manifold.spectral_matrix_shape(shape)
    matrices = (-1, rows, cols)

    def project(a: Tensor) -> Tensor:
        return manifold.project_tangent(x, a.reshape(x.shape)).reshape(a.shape)

    return duality_gap(g.reshape(matrices), direction.reshape(matrices), bound.reshape(matrices), project)
