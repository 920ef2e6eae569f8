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

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .geoopt_names import GeooptNames
from .linalg import real_product
from .spectral import SteepestDirection, admm_steepest_direction
from .workspace import Workspace

# A step size: one number, or one per point (a tensor that broadcasts against the points,
# e.g. ``(num_points, 1, 1)`` for matrices), as Adam's per-point step sizes are.
StepSize = float | Tensor


@dataclass
class MomentumStep:
    """The result of :meth:`Manifold.momentum_step`."""

    x: Tensor
    momentum: Tensor
    grad_norm_sq: Tensor | None
    tracking: Tensor | None
    tracking_used: Tensor | None = None  # the tracking state the step started from
    finite: Tensor | None = None  # a 0-dim bool: x and momentum are finite (None: not known)


def add_step(x: Tensor, u: Tensor, t: StepSize, *, out: Tensor | None = None) -> Tensor:
    """``x + t u`` in one pass, for a number ``t`` (torch's fused add) or per-point ``t``."""
    if isinstance(t, Tensor):
        return torch.addcmul(x, u, t, out=out)
    return torch.add(x, u, alpha=t, out=out)


def combine(v: Tensor, a: float, g: Tensor, b: float, *, out: Tensor | None = None) -> Tensor:
    """``a v + b g``: one pass when ``b`` is 1, two otherwise; ``out`` may be ``v`` or ``g``."""
    if b == 1:
        return torch.add(g, v, alpha=a, out=out)
    if out is v:
        return v.mul_(a).add_(g, alpha=b)
    return torch.mul(g, b, out=out).add_(v, alpha=a)


def recording(*tensors: Any) -> bool:
    """Whether autograd records an operation on these tensors (grad mode on and one of them
    requires grad): the geometry then takes its out-free, differentiable paths. Under
    ``torch.no_grad`` (the optimizers' steps) it is False at the cost of one call."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in tensors)


def keep_or_drop(value: Tensor, point_ndim: int, keepdim: bool) -> Tensor:
    """A per-point number with its point dimensions kept as singletons (``keepdim``) or dropped."""
    if keepdim or point_ndim == 0:
        return value
    return value.reshape(value.shape[: value.dim() - point_ndim])


def into(out: Tensor | None, result: Tensor) -> Tensor:
    """``result``, copied into ``out`` when one is given (for methods with no in-place form)."""
    return result if out is None else out.copy_(result)


@dataclass(frozen=True, kw_only=True)
class Manifold(GeooptNames, ABC):
    """Base class of all manifolds.

    Every manifold also answers to geoopt's method names (``projx``, ``proju``,
    ``egrad2rgrad``, ``retr``, ``expmap``, ``transp``, ``random``, ...), aliases of the
    methods below: see :class:`~manifold_opt.manifolds.geoopt_names.GeooptNames`.

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
    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Orthogonal projection of ``u`` onto the tangent space at ``x`` (written into
        ``out`` if given, which may be ``u`` itself)."""

    @abstractmethod
    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        """Riemannian gradient from the Euclidean gradient ``g`` at ``x`` (into ``out`` if given)."""

    @abstractmethod
    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        r"""Retraction :math:`R_x(t u)`.

        ``t`` scales ``u`` inside the retraction (a number, or one per point: a tensor that
        broadcasts against ``x``), so that the Euclidean case is one fused ``x + t u``
        (bit-identical to ``torch.optim``) and a per-point step costs no extra pass.
        ``workspace`` lends scratch buffers; the result may be one of them.
        """

    @abstractmethod
    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Vector transport of ``v`` from the tangent space at ``x`` to the one at ``y``."""

    @property
    def supports_complex(self) -> bool:
        """True when complex parameters may lie on this manifold (with the real inner product
        :math:`\\operatorname{Re}\\sum \bar u_i v_i`); the optimizers and
        :class:`~manifold_opt.ManifoldParameter` refuse complex data on the others."""
        return False

    @property
    def second_moment_layout(self) -> str:
        """Layout of Adam's second moment on this manifold: ``"scalar"`` (one number per
        point, :math:`\\langle r, r\rangle_x`; every native manifold) or ``"tangent"`` (one per
        coordinate, :meth:`second_moment_increment` like the point; geoopt manifolds whose
        ``component_inner`` is component-wise, e.g. ``Euclidean(ndim=1)``, ``ProductManifold``)."""
        return "scalar"

    def second_moment_increment(self, x: Tensor, r: Tensor) -> Tensor:
        """What Adam's second moment averages: :math:`\\langle r, r\rangle_x` per point by
        default (see :attr:`second_moment_layout`)."""
        return self.inner(x, r, r)

    @property
    def transport_is_projection(self) -> bool:
        """True when :meth:`transport` is the tangent projection at the destination,
        ``transport(x, y, v) = project_tangent(y, v)``.

        The optimizers then transport lazily: a momentum is stored where it was formed and
        projected at the next step, together with the new gradient (projection is linear,
        so ``P_y(a m + b g) = a P_y(m) + b P_y(g)``): one projection per step instead of
        two. Manifolds whose transport needs the old point (geoopt's parallel transports)
        keep this False and are transported at the end of each step.
        """
        return False

    def transport_add(
        self, x: Tensor, v: Tensor, w: Tensor, a: float, b: float, *, out: Tensor | None = None
    ) -> Tensor:
        r""":math:`a\,\mathcal{T}(v) + b\,w` for ``w`` tangent at ``x``: a stored momentum ``v``
        brought to ``x`` and combined with a new tangent vector.

        With :attr:`transport_is_projection` the optimizers store ``v`` un-transported, and
        this is :math:`P_x(a v + b w)`, one projection; otherwise ``v`` was transported at the
        end of the previous step and this is :math:`a v + b w`.
        """
        if self.transport_is_projection:
            return self.project_tangent(x, combine(v, a, w, b, out=out), out=out)
        return combine(v, a, w, b, out=out)

    def transport_add_grad(
        self, x: Tensor, v: Tensor, g: Tensor, a: float, b: float, *, out: Tensor | None = None
    ) -> Tensor:
        r""":math:`a\,\mathcal{T}(v) + b\operatorname{grad}f(x)` from the Euclidean gradient ``g``
        (see :meth:`transport_add`). Manifolds whose Riemannian gradient is a projection of
        a rescaled ``g`` override this to project once: :math:`P_x(a v + b g)` for an
        embedded manifold."""
        return self.transport_add(x, v, self.riemannian_grad(x, g), a, b, out=out)

    def momentum_step(
        self,
        x: Tensor,
        m: Tensor | None,
        g: Tensor,
        a: float,
        b: float,
        *,
        step_size: Callable[[Tensor | None], StepSize],
        needs_grad_norm: bool,
        tracking: Tensor | None = None,
        refresh: bool = False,
        workspace: Workspace | None = None,
        in_place: bool = False,
    ) -> MomentumStep:
        r"""One step of a momentum method, the part that touches the geometry.

        .. math::
            r = \operatorname{grad} f(x) \text{ of } g, \quad
            m' = a\,\mathcal{T}(m) + b\,r, \quad
            x' = R_x(t\, m'), \quad t = \texttt{step\_size}(\langle r, r\rangle_x)

        ``m`` is the stored momentum (``None``: zero), ``t`` a number or one per point, and
        ``step_size`` receives the per-point squared norms of ``r`` when ``needs_grad_norm``
        (Adam's second moment), else ``None``. Returns the new point, the momentum to store
        (un-transported for projection transports, see :attr:`transport_is_projection`),
        :math:`\langle r, r\rangle_x` and, for manifolds that keep one, a small ``tracking``
        state to pass back at the next step (``refresh=True`` asks for it to be rebuilt from
        the data instead of updated). This default composes the manifold's methods;
        manifolds override it to share products between the pieces (the Stiefel manifold
        tracks :math:`X^\top m` so that a step needs four matrix products instead of six).
        """
        work = workspace if workspace is not None else Workspace()
        if needs_grad_norm:
            r = self.riemannian_grad(x, g, out=work.like("gradient", x))
            norm_sq = self.second_moment_increment(x, r)
            m_new = r.mul_(b) if m is None else self.transport_add(x, m, r, a, b, out=r)
        else:
            norm_sq = None
            direction = work.like("direction", x)
            if m is None:
                m_new = self.riemannian_grad(x, g, out=direction).mul_(b)
            else:
                m_new = self.transport_add_grad(x, m, g, a, b, out=direction)
        t = step_size(norm_sq)
        if self.transport_is_projection:
            return MomentumStep(self.retract(x, m_new, t, workspace=work), m_new, norm_sq, None)
        # retract and transport in one call: some manifolds (geoopt's canonical Stiefel) only
        # transport along their own retraction
        y, stored = self.retract_transport(x, m_new, m_new, t, workspace=work)
        return MomentumStep(y, stored, norm_sq, None)

    def tracking_state(self, x: Tensor, m: Tensor) -> Tensor:
        """The tracking state :meth:`momentum_step` keeps for the momentum ``m`` at ``x``,
        formed from the data (for manifolds that return one; none of the defaults does)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no tracking state")

    def retract_transport(
        self, x: Tensor, u: Tensor, v: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None
    ) -> tuple[Tensor, Tensor]:
        """``y = retract(x, u, t)`` and ``transport(x, y, v)`` at once."""
        y = self.retract(x, u, t, workspace=workspace)
        return y, self.transport(x, y, v)

    @abstractmethod
    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        """Riemannian metric, summed over each point and kept as singleton dims (``(..., 1, 1)``
        for matrices) so that it broadcasts against ``x``; ``keepdim=False`` drops them (the
        default of geoopt's ``inner``). ``v`` defaults to ``u`` (the squared norm)."""

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

    # ------------------------------------------- steepest descent under the spectral norm
    def spectral_matrix_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """``(rows, cols)`` of the matrices whose spectral norm measures a step of a parameter
        of shape ``shape`` (:class:`~manifold_opt.RiemannianMuon`): each point on manifolds of
        matrices (``point_ndim == 2``, e.g. Stiefel); otherwise the parameter as one
        ``(out, prod(rest))`` matrix (a vector is one row), whose rows are the points of a
        row-wise manifold (``Sphere(batch_dims=1)``, ``PSI``)."""
        shape = tuple(shape)
        if self.point_ndim == 2:
            return self.point_shape(shape)  # type: ignore[return-value]
        if len(shape) < 2:
            return (1, numel(shape))
        return (shape[0], numel(shape[1:]))

    @property
    def steepest_direction_supported(self) -> bool:
        """True when :meth:`steepest_direction` works here (every native manifold; geoopt's
        only where its tangent projection is known to be orthogonal)."""
        return True

    @property
    def steepest_direction_warm_starts(self) -> bool:
        """True when :meth:`steepest_direction` is this class's generic solver, which returns a
        dual variable (in the parameter's layout) that warm-starts the next solve; manifolds
        that override it with a closed form keep none."""
        return type(self).steepest_direction is Manifold.steepest_direction

    def steepest_direction(
        self, x: Tensor, g: Tensor, shape: Sequence[int], *, iterations: int, dual: Tensor | None = None
    ) -> SteepestDirection:
        r"""The steepest unit step under the spectral norm inside the tangent space,

        .. math::
            A^\star = \arg\max\ \langle g, A\rangle
            \quad\text{subject to}\quad \|A\|_2 \le 1,\ A \in T_x\mathcal M,

        with the norm of the matrices of :meth:`spectral_matrix_shape`. ``x`` and ``g`` are
        whole parameters of shape ``shape`` in the points layout. This default solves it for
        any tangent space by :func:`~manifold_opt.manifolds.spectral.admm_steepest_direction`
        (``iterations`` ADMM steps from ``dual``, the previous solve's dual variable, or from
        the tangent projection of :math:`\operatorname{msign}(g)`); manifolds with a closed
        form override it."""
        rows, cols = self.spectral_matrix_shape(shape)

        def project(a: Tensor) -> Tensor:
            return self.project_tangent(x, a.reshape(x.shape)).reshape(a.shape)

        matrices = g.reshape(-1, rows, cols)
        result = admm_steepest_direction(
            matrices, project, iterations=iterations, dual=None if dual is None else dual.reshape(matrices.shape)
        )
        return SteepestDirection(
            result.direction.reshape(x.shape), None if result.dual is None else result.dual.reshape(x.shape)
        )

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
    r"""A Riemannian submanifold of Euclidean space with the induced (Euclidean) metric.

    Defaults: Riemannian gradient = tangent projection, transport = tangent projection
    at the new point, inner product = Frobenius inner product of each point (its real
    part, :math:`\operatorname{Re}\operatorname{tr}(u^\mathsf{H} v)`, for complex points).
    """

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        return self.project_tangent(x, g, out=out)

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.project_tangent(y, v)

    @property
    def transport_is_projection(self) -> bool:
        return True

    def transport_add_grad(
        self, x: Tensor, v: Tensor, g: Tensor, a: float, b: float, *, out: Tensor | None = None
    ) -> Tensor:
        return self.project_tangent(x, combine(v, a, g, b, out=out), out=out)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None, *, keepdim: bool = True) -> Tensor:
        value = self._sum_point_dims(real_product(u, u if v is None else v))
        return keep_or_drop(value, self.point_ndim, keepdim)


def unsupported_steepest_direction(manifold: Manifold, shape: Sequence[int]) -> str:
    """The error message for a manifold without a spectral-norm oracle."""
    inner = getattr(manifold, "manifold", manifold)
    return (
        f"RiemannianMuon has no spectral-norm steepest direction for a parameter of shape {tuple(shape)} on "
        f"{type(inner).__name__}: the oracle needs the Euclidean-orthogonal projection onto its tangent spaces, "
        "which this manifold does not provide. Declare the parameter on manifold_opt's own manifold (Stiefel(), "
        "Sphere(), PSI(), ConditionedSpectrum()), put it in a param group with algorithm 'adamw' if it is "
        "Euclidean, or step it with RiemannianAdam / RiemannianSGD"
    )


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


def manifold_spec(manifold: Manifold) -> dict[str, Any]:
    """A manifold as plain data: ``{"manifold": class name, **its fields}`` (for checkpoints)."""
    spec: dict[str, Any] = {"manifold": type(manifold).__name__}
    for item in dataclasses.fields(manifold):
        spec[item.name] = getattr(manifold, item.name)
    return spec


def manifold_from_spec(spec: dict[str, Any]) -> Manifold:
    """The manifold :func:`manifold_spec` describes (a subclass of :class:`Manifold` by name)."""
    classes = {}
    pending = list(Manifold.__subclasses__())
    while pending:
        cls = pending.pop()
        classes[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    fields = dict(spec)
    name = fields.pop("manifold", None)
    if name not in classes:
        raise ValueError(f"unknown manifold {name!r} in a checkpoint; known: {sorted(classes)}")
    return classes[name](**fields)
