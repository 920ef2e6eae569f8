"""The Stiefel manifold of matrices with orthonormal columns (or rows)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import EmbeddedManifold, MomentumStep, StepSize, Workspace, check_iterations, into, recording
from .linalg import (
    add_adjoint,
    all_finite_small,
    cholesky_input,
    cholesky_orthonormalize,
    cholesky_upper,
    divide_upper,
    identity_like,
    inverse_sqrt_newton,
    invert_upper,
    newton_iterations_needed,
    newton_schulz,
    polar_from_gram,
    polar_svd,
    product,
    qr_positive,
    real_dtype,
    sym,
)
from .spectral import SteepestDirection, stiefel_steepest_direction

STIEFEL_RETRACTIONS = ("qr", "polar", "cayley", "newton")

# The largest step the Gram-based retractions take: ||u^T u||_F <= MAX_STEP**2, i.e. the
# Schatten-4 norm (sum of sigma_i(u)^4)^(1/4) <= 3, which bounds the largest singular value
# of the step by 3 (a turn of at most atan(3) = 72 degrees of any direction). At the limit,
# Cholesky-QR of X + u is orthonormal to float32 rounding (max |Y^T Y - I| <= 1.1e-6 over
# rank-1 steps of norm up to 1e6 on 16 x 16 to 256 x 64 points; tests/test_stiefel.py checks
# < 1.5e-6); beyond it the Gram matrix (condition number 1 + sigma_max^2) would lose that.
MAX_STEP = 3.0
# Points with n < 4p from this p on get the next tracking state Y^T m' = R^-T (F + t B) by a
# triangular solve with the p x p right-hand side instead of the product Y^T m' (on one CPU
# thread, with the solve for Y: 256 x 256 in 0.29 against 0.39 ms, 20 x 128 x 128 in 1.05
# against 1.15, even at 64, slower below: 200 x 16 x 16 0.14 against 0.12).
TRACK_BY_SOLVE_FROM = 64
# Newton retraction: S = W^T W with delta = ||S - I||_F; above this S is scaled by 1 / (1 + delta).
_NEWTON_SCALE_ABOVE = 0.9


@dataclass(frozen=True, kw_only=True)
class Stiefel(EmbeddedManifold):
    r"""Matrices with orthonormal columns, :math:`\mathrm{St}(n, p) = \{X \in \mathbb{R}^{n\times p} : X^\top X = I\}`.

    A wide matrix (``n < p``) has orthonormal rows instead (:math:`XX^\top = I`). A
    parameter ``(out, *rest)`` is one ``(out, prod(rest))`` matrix, so a conv kernel is
    orthonormal as a whole, not per ``kh x kw`` slice; ``batch_dims=1`` on a
    ``(groups, n, p)`` tensor makes each slice its own point. The metric is the
    Euclidean one, :math:`\langle u, v\rangle = \operatorname{tr}(u^\top v)`.

    Complex parameters are matrices with orthonormal columns in :math:`\mathbb{C}^n`,
    :math:`X^\mathsf{H} X = I` (unitary when square), with the real metric
    :math:`\operatorname{Re}\operatorname{tr}(u^\mathsf{H} v)`: every formula below holds with
    :math:`^\top` read as :math:`^\mathsf{H}` (``"qr"`` takes the ``R`` with a real positive
    diagonal), and per-point numbers (Adam's second moment) stay real.

    .. math::
        P_X(g) = g - X\,\mathrm{sym}(X^\top g), \qquad
        \text{project}(A) = UV^\top \text{ for } A = U\Sigma V^\top.

    Retractions :math:`R_X(u)` (all free of host synchronization):

    * ``"qr"`` (default): the ``Q`` factor of ``W = X + u`` with positive ``diag(R)`` (the
      map of geoopt's ``EuclideanStiefel.retr``); first order. Computed by Cholesky-QR:
      :math:`Y = W R^{-1}` with :math:`R^\top R = W^\top W`, one Gram product, a
      ``p x p`` Cholesky factorization and one triangular solve (or a product with
      :math:`R^{-1}` for tall ``W``). The Gram matrix is formed from ``W`` itself, so
      rounding errors in ``X`` are removed at every step instead of accumulating.
    * ``"polar"``: the polar factor :math:`W (W^\top W)^{-1/2}`, by ``eigh`` of the
      ``p x p`` Gram matrix; second order.
    * ``"cayley"``: :math:`(I - \tfrac12 A)^{-1}(I + \tfrac12 A)X` with
      :math:`A = \bar u X^\top - X \bar u^\top`, :math:`\bar u = u - \tfrac12 X X^\top u`.
      By default solved exactly (a ``2p x 2p`` system by the Woodbury identity, or the
      ``n x n`` one when that is smaller) and followed by one Newton–Schulz step, which
      removes the rounding error the orthogonal transform would otherwise carry from step
      to step; with ``iterations=k``, by ``k`` steps of the
      fixed-point iteration of Li, Fuxin and Todorovic (ICLR 2020),
      :math:`Y \leftarrow X + \tfrac12 A(X + Y)` (matmuls only, ``O(np^2)`` each).
    * ``"newton"``: the polar factor of ``W`` by the Newton–Schulz iteration
      (:func:`~manifold_opt.manifolds.linalg.newton_schulz`, the iteration of ONI),
      matmuls only; second order. By default the iteration count is the one that converges
      for every step the retraction accepts (7 in float32, 8 in float64), on the
      ``p x p`` Gram matrix when ``W`` is tall enough for that to be cheaper; with
      ``iterations=k``, ``k`` steps (then the optimizers' drift check re-projects points
      that leave the manifold).

    **Long steps.** ``"qr"``, ``"polar"`` and ``"newton"`` work from the Gram matrix
    :math:`W^\top W = I + u^\top u`, whose condition number :math:`1 + \sigma_{\max}(u)^2`
    costs accuracy as it grows. A step with :math:`\|u^\top u\|_F > 9` (Schatten-4
    norm :math:`(\sum_i \sigma_i(u)^4)^{1/4} > 3`, which bounds every :math:`\sigma_i(u)`
    by 3: a turn of at most 72° of any direction) is shortened to that length before it is
    retracted, so every step lands on the manifold to working precision whatever the
    learning rate or the gradient's scale (float32, measured at the limit:
    :math:`\max|Y^\top Y - I|` up to 1.1e-6 for ``"qr"``, 5e-6 for ``"polar"`` and
    ``"newton"``, against 1e-6 for any small step). Steps below the limit are retracted as they are; in ordinary
    training every step is (RiemannianAdam moves each matrix by about ``lr`` in
    Frobenius norm). ``"cayley"`` shortens steps with
    :math:`\|\bar u\|_F > 3` the same way (a turn of at most :math:`2\operatorname{atan}(1.5)`,
    113°); with a fixed ``iterations`` it takes any step as it is.

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

    @property
    def supports_complex(self) -> bool:
        return True

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self._matrix_point_shape(shape)

    # --------------------------------------------------------------- geometry
    def project(self, x: Tensor) -> Tensor:
        """:math:`UV^\top` of the thin SVD, refined by one Newton–Schulz step (two products),
        which takes its orthonormality from about ten units of roundoff (up to 1.5e-6 in
        float32) to two or three."""
        return newton_schulz(polar_svd(x), 1)

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        if _is_wide(x):
            if out is None or torch.compiler.is_compiling():  # dynamo refuses a transposed out=
                return into(out, self.project_tangent(x.mT, u.mT).mT)
            return self.project_tangent(x.mT, u.mT, out=out.mT).mT
        return subtract_product(u, x, sym(x.mH @ u), out=out)

    def tracking_state(self, x: Tensor, m: Tensor) -> Tensor:
        r""":math:`E = X^\mathsf{H} m` (``p x p`` per point, on the tall orientation), as
        :meth:`momentum_step` forms it from the data."""
        if _is_wide(x):
            x, m = x.mT, m.mT
        return x.mH @ m

    def steepest_direction(
        self, x: Tensor, g: Tensor, shape: Sequence[int], *, iterations: int, dual: Tensor | None = None
    ) -> SteepestDirection:
        r"""In closed form for every shape (:func:`~manifold_opt.manifolds.spectral.stiefel_steepest_direction`):
        :math:`A^\star = \operatorname{msign}(\operatorname{skew}(G X^\mathsf{H}))\,X`, matrix products
        only (with one :math:`p \times p` Cholesky factor and solve for :math:`n > 2p`); wide
        points by the transposed problem. ``iterations`` and ``dual`` are not used."""
        if _is_wide(x):
            return SteepestDirection(stiefel_steepest_direction(x.mT, g.mT).mT)
        return SteepestDirection(stiefel_steepest_direction(x, g))

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        r"""The retraction (see the class docstring), in two forms that agree to rounding.

        Called without a ``workspace`` (a direct call), or while autograd records (``x``, ``u``
        or ``t`` requires grad, outside ``torch.no_grad``), it takes the **exact** form: no
        ``out=`` arguments (it is differentiable), and no assumption that ``x`` lies on the
        manifold: ``"qr"`` is the ``Q`` factor of a Householder QR of the (shortened) step
        ``W`` and ``"polar"`` and ``"newton"`` work from the Gram matrix of ``W`` itself, so a
        full-rank point off the manifold lands on it (``"newton"``: comes no farther from it).
        The optimizers pass a ``workspace`` and get the **fast** form: Cholesky-QR into its
        buffers, and the Gram matrix of a step shortened to the limit (steps with
        :math:`\|t u\|_F > 3` only) updated in closed form, which assumes :math:`X^\top X = I`
        (their points lie on the manifold, to rounding). ``"cayley"`` has one form: its
        orthogonal transform keeps :math:`X^\top X` as it is, and the Newton–Schulz step that
        follows is applied only where it brings the point closer to the manifold.
        """
        if _is_wide(x):
            return self.retract(x.mT, u.mT, t, workspace=workspace).mT
        if self.retraction == "cayley":
            return _cayley(x, u if _is_one(t) else u * t, self.iterations)
        if workspace is None or recording(x, u, t):
            return _retract_exact(self.retraction, x, u, t, self.iterations)
        work = workspace
        w, gram = _limited_step(x, u, _step_sizes(t, x), _squared_norms(u), work)
        if self.retraction == "qr":
            return cholesky_orthonormalize(w, gram, out=work.like("stiefel_point", x), workspace=work)
        if self.retraction == "polar":
            return polar_from_gram(w, gram)
        return _newton_polar(w, gram, self.iterations)

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
        r"""The momentum step of :meth:`Manifold.momentum_step`, fused for the ``"qr"`` retraction.

        The stored momentum ``m`` is tangent at the previous point, and
        ``tracking`` :math:`= E = X^\top m` (``p x p`` per point, on the short side) is known
        from the previous step. With :math:`A = X^\top g` and
        :math:`K = \mathrm{sym}(A) + \tfrac ab \mathrm{sym}(E)`:

        .. math::
            \tilde\Delta = g - XK = r - \tfrac ab X\,\mathrm{sym}(E), \quad
            m' = a m + b\tilde\Delta = P_X(a m + b g), \quad
            \|r\|^2 = \|\tilde\Delta\|^2 - \tfrac{a^2}{b^2}\|\mathrm{sym}(E)\|^2

        (``r`` and :math:`X\,\mathrm{sym}(E)` are orthogonal), :math:`F = X^\top m' =
        a\,\mathrm{skew}(E) + b\,\mathrm{skew}(A)`, :math:`B = m'^\top m'`, and the Gram
        matrix of :math:`W = X + t m'` is :math:`I + t^2 B` (``2 sym(F) = 0``). Cholesky-QR
        gives :math:`Y = W R^{-1}` and the next tracking state
        :math:`Y^\top m' = R^{-\top}(F + tB)`. Four products with ``n x p`` operands
        (``A``, :math:`\tilde\Delta`, ``B``, ``Y``) instead of the six of the composition.

        The algebra assumes :math:`X^\top X = I`; rounding makes that drift by about one
        unit roundoff per step, so the caller passes ``refresh=True`` every few steps: the
        Gram matrix is then formed from ``W`` itself (which re-orthonormalizes ``X`` to
        working precision) and no tracking state is returned, so the next step forms ``E``
        from the data. Without ``tracking`` ``E`` is formed from the data (one more product).
        """
        # without Adam's gradient norm the composition needs four products too (X^T h, the
        # projection, the Gram matrix, the solve); the fused step pays where it is written in
        # place, which saves passes over n x p tensors (the composition writes into scratch
        # buffers that are then selected into the stored ones)
        in_place_sgd = in_place and m is not None and 0 <= a < 1
        if self.retraction != "qr" or b == 0 or not (needs_grad_norm or in_place_sgd):
            return super().momentum_step(
                x, m, g, a, b, step_size=step_size, needs_grad_norm=needs_grad_norm, workspace=workspace
            )
        if _is_wide(x):
            result = self.momentum_step(
                x.mT,
                None if m is None else m.mT,
                g.mT,
                a,
                b,
                step_size=step_size,
                needs_grad_norm=needs_grad_norm,
                tracking=tracking,
                refresh=refresh,
                workspace=workspace,
                in_place=in_place,
            )
            return MomentumStep(
                result.x.mT,
                result.momentum.mT,
                result.grad_norm_sq,
                result.tracking,
                result.tracking_used,
                result.finite,
            )
        work = workspace or Workspace()
        if in_place and m is not None and 0 <= a < 1:
            return _fused_momentum_step_in_place(x, m, g, a, b, step_size, needs_grad_norm, tracking, refresh, work)
        return _fused_momentum_step(x, m, g, a, b, step_size, needs_grad_norm, tracking, refresh, work)

    def exp(self, x: Tensor, u: Tensor) -> Tensor:
        r"""Exponential map of the Euclidean metric (Edelman, Arias, Smith 1998, eq. 2.45).

        .. math::
            \operatorname{Exp}_X(u) = [X, u]\,\exp\!\begin{pmatrix} A & -S \\ I & A\end{pmatrix}
            \begin{pmatrix} \exp(-A) \\ 0 \end{pmatrix},\quad A = X^\top u,\ S = u^\top u.
        """
        if _is_wide(x):
            return self.exp(x.mT, u.mT).mT
        p = x.shape[-1]
        a = x.mH @ u
        s = u.mH @ u
        eye = identity_like(a).expand_as(a)
        block = torch.cat([torch.cat([a, -s], dim=-1), torch.cat([eye, a], dim=-1)], dim=-2)
        e = torch.linalg.matrix_exp(block)[..., :, :p]
        return torch.cat([x, u], dim=-1) @ e @ torch.linalg.matrix_exp(-a)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        """Largest entry of :math:`|X^\\top X - I|` (:math:`|XX^\\top - I|` for wide ``X``)."""
        tall = x.mT if _is_wide(x) else x
        gram = tall.mH @ tall
        return (gram - identity_like(gram)).abs().amax(dim=(-2, -1))

    def geoopt_random_point(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """geoopt's ``EuclideanStiefel.random`` draw (what :meth:`random` returns): ``Q`` of
        ``torch.linalg.qr`` of a Gaussian (of its transpose for wide shapes), without
        :meth:`random_point`'s sign fix."""
        if len(shape) < 2:
            return self.random_point(shape, generator=generator, dtype=dtype, device=device)  # its shape error
        gaussian = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        if shape[-2] < shape[-1]:
            return torch.linalg.qr(gaussian.mT)[0].mT
        return torch.linalg.qr(gaussian)[0]

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
        # qr and polar orthonormalize X + u from scratch, and the default cayley (an exact
        # solve) and newton (a count that converges for every step) land to working
        # precision: only fixed iteration counts let errors carry over.
        return self.retraction in ("cayley", "newton") and self.iterations is not None

    def drift_tolerance(self, dtype: torch.dtype) -> float:
        return 16 * torch.finfo(dtype).eps


def _is_wide(x: Tensor) -> bool:
    return x.shape[-2] < x.shape[-1]


def _is_one(t: StepSize) -> bool:
    return not isinstance(t, Tensor) and t == 1.0


def subtract_product(
    u: Tensor, x: Tensor, s: Tensor, *, alpha: float = 1.0, beta: float = 1.0, out: Tensor | None = None
) -> Tensor:
    """``beta u - alpha x @ s`` as one BLAS call (``addmm``/``baddbmm``), into ``out`` (which may be ``u``).

    Into the transpose of a contiguous ``out`` (a wide point's tall view), the transposed
    product :math:`\beta u^\top - \alpha s^\top x^\top` is formed instead: ``baddbmm``
    writes a transposed ``out`` one matrix at a time (10 x 288 x 64: 0.27 against 0.2 ms)."""
    if out is not None and x.dim() in (2, 3) and not out.is_contiguous() and out.mT.is_contiguous():
        return subtract_product(u.mT, s.mT, x.mT, alpha=alpha, beta=beta, out=out.mT).mT
    if x.dim() == 2:
        return torch.addmm(u, x, s, beta=beta, alpha=-alpha, out=out)
    if x.dim() == 3:
        return torch.baddbmm(u, x, s, beta=beta, alpha=-alpha, out=out)
    return into(out, beta * u - alpha * (x @ s))


def _fused_momentum_step(
    x: Tensor,
    m: Tensor | None,
    g: Tensor,
    a: float,
    b: float,
    step_size: Callable[[Tensor | None], StepSize],
    needs_grad_norm: bool,
    tracking: Tensor | None,
    refresh: bool,
    work: Workspace,
) -> MomentumStep:
    """:meth:`Stiefel.momentum_step` for tall ``x`` (see there)."""
    a_g = x.mH @ g
    if m is None:
        e, a = None, 0.0
    else:
        e = tracking if tracking is not None else x.mH @ m
    ratio = a / b
    # H = X^T (a m + b g) / b: sym(H) projects, F = X^T m' = b skew(H) (A and E enter together)
    h = a_g if e is None else torch.add(a_g, e, alpha=ratio)
    h2 = add_adjoint(h, out=_square_scratch(work, x, "stiefel_h2"))  # 2 sym(H), the one transposed pass
    # b Delta~ = b g - (b/2) X (2 sym H), one BLAS call
    m_new = subtract_product(g, x, h2, alpha=0.5 * b, beta=b, out=work.like("direction", x))
    norm_sq = None
    if needs_grad_norm:
        norm_sq = _squared_norms(m_new) / (b * b)
        if e is not None:  # minus the normal part ratio * X sym(E), orthogonal to r
            sym_e_sq = _squared_norms(add_adjoint(e, out=_square_scratch(work, x, "stiefel_pp")))
            norm_sq = (norm_sq - (0.5 * ratio) ** 2 * sym_e_sq).clamp_min(0)
    if m is not None:
        m_new.add_(m, alpha=a)
    t_points = _step_sizes(step_size(norm_sq), x).reshape(-1, 1, 1)
    used = torch.zeros_like(a_g) if e is None else e
    if refresh:
        w, gram = _limited_step(x, m_new, t_points, _squared_norms(m_new), work)
        upper = cholesky_upper(gram, workspace=work)
        y = divide_upper(upper, w, out=work.like("stiefel_point", x))
        # finite |r|^2 (from |Delta~|^2): finite Delta~, hence m'; finite factor: finite Y
        finite = torch.isfinite(norm_sq).all() & torch.isfinite(upper).all()
        return MomentumStep(y, m_new, norm_sq, None, used, finite)
    moment = m_new.mH @ m_new  # B
    gram, t_points = _limited_gram(moment, t_points, _gram_target(work, x))  # I + t^2 B
    w = torch.addcmul(x, m_new, t_points, out=work.like("stiefel_step", x))
    upper = cholesky_upper(gram, workspace=work)
    y, next_tracking = _orthonormalize_and_track(
        upper, w, m_new, h, h2, b, moment, t_points, work.like("stiefel_point", x), work
    )
    # B = m'^T m' finite: finite m'; finite factor (NaN when Cholesky fails) and limited step: finite Y
    finite = torch.isfinite(moment).all() & torch.isfinite(upper).all() & torch.isfinite(next_tracking).all()
    return MomentumStep(y, m_new, norm_sq, next_tracking, used, finite)


def _fused_momentum_step_in_place(
    x: Tensor,
    m: Tensor,
    g: Tensor,
    a: float,
    b: float,
    step_size: Callable[[Tensor | None], StepSize],
    needs_grad_norm: bool,
    tracking: Tensor | None,
    refresh: bool,
    work: Workspace,
) -> MomentumStep:
    r""":func:`_fused_momentum_step` with ``0 <= a < 1``, writing ``m'`` into ``m`` and the new
    points into ``x``.

    Whether the step is taken is decided before anything is written, from per-point norms:
    every :math:`\|m'\|` finite and below :math:`K = \sqrt{\max}/2` for the dtype's maximum
    (tested as :math:`\|\tilde\Delta\| < \tfrac{1-a}{b} K`, which gives
    :math:`\|m'\| \le a\|m\| + b\|\tilde\Delta\| < K` since :math:`\|m\| < K` held before,
    when ``m'`` is formed as :math:`a m + b\tilde\Delta`), so ``B = m'^T m'`` cannot overflow and
    the Gram matrix :math:`I + t^2 B` always has a Cholesky factor. A step not taken uses
    weights (1, 0), step 0 and thus the factor ``I``, which give back ``m`` and ``x`` exactly;
    the new momentum is cleaned of NaN/Inf first (one pass), which replaces the selection
    passes over ``x`` and ``m`` that writing from scratch buffers needs.

    Two ways to form ``m'``:

    * **tracked** (Adam, whose step size needs :math:`\|r\|`, and tall points): from
      :math:`\tilde\Delta` and the tracking state ``E``, as in :func:`_fused_momentum_step`;
    * **untracked** (SGD on near-square points, ``n < 4p``, where updating ``E`` costs about a
      product): :math:`m' = b P_X(g + \tfrac ab m)` from :math:`X^\top(g + \tfrac ab m)`, one
      pass more and no tracking state.

    With ``refresh`` (always, untracked) the Gram matrix is formed from ``W`` itself, which
    re-orthonormalizes ``X``; the step is first shortened to :math:`\|t m'\|_F \le 3p^{1/4}`, a
    bound beyond which :func:`limit_step` shortens it anyway (the Frobenius norm is at most
    :math:`p^{1/4}` times the Schatten-4 norm it limits), so that ``W`` stays finite for any
    step size.
    """

    def small(name: str) -> Tensor | None:
        return _square_scratch(work, x, name)

    n, p = x.shape[-2:]
    tracked = needs_grad_norm or tracking is not None or n >= 4 * p
    ratio = a / b
    if tracked:
        e = tracking if tracking is not None else x.mH @ m
        h = subtract_product(e, x.mH, g, alpha=-1.0, beta=ratio, out=small("stiefel_h"))  # H = X^T g + (a/b) E
        h2 = add_adjoint(h, out=small("stiefel_h2"))
        delta = subtract_product(g, x, h2, alpha=0.5, out=work.like("direction", x))  # Delta~
        delta_sq = _squared_norms(delta)
        bound = ((1 - a) / b) ** 2 * torch.finfo(delta.dtype).max / 4
    else:
        e = None
        c = torch.add(g, m, alpha=ratio, out=work.like("direction", x))
        h2 = add_adjoint(product(x.mH, c, out=small("stiefel_h")), out=small("stiefel_h2"))
        delta = subtract_product(c, x, h2, alpha=0.5 * b, beta=b, out=c)  # m' = b P_X(c)
        delta_sq = _squared_norms(delta)
        bound = torch.finfo(delta.dtype).max / 4
    norm_sq = None
    if needs_grad_norm:
        sym_e_sq = _squared_norms(add_adjoint(e, out=small("stiefel_pp")))
        norm_sq = (delta_sq - (0.5 * ratio) ** 2 * sym_e_sq).clamp_min(0)
    ok = (delta_sq < bound).all()  # False for NaN and Inf too
    t_points = _step_sizes(step_size(norm_sq), x).reshape(-1, 1, 1)
    ok = ok & all_finite_small(t_points)  # everything that decides the step is known: write
    torch.nan_to_num_(delta, nan=0.0, posinf=0.0, neginf=0.0)
    if not tracked:
        m.lerp_(delta, ok.to(m.dtype))  # m', or m
    elif abs(a + b - 1) < 1e-12:
        m.lerp_(delta, ok.to(m.dtype) * b)  # m' = a m + b Delta~, or m
    else:
        # the coefficient in m's own precision (torch.where of two Python numbers gives float32)
        keep = torch.full((), a, dtype=real_dtype(m.dtype), device=m.device).where(ok, 1.0)
        m.mul_(keep).addcmul_(delta, ok.to(m.dtype) * b)
    # a step not taken: t = 0, so W = X, the Gram matrix is I exactly, its factor I, and Y = X
    t_points = torch.where(ok, t_points, 0.0)
    if refresh or not tracked:  # the Gram matrix of W itself (re-orthonormalizes)
        # near-square: W (limited) into x, then LAPACK's solve in place (no copy of W into x)
        squared_norm = delta_sq if not tracked else _squared_norms(m)
        w, gram = _limited_step(x, m, t_points, squared_norm, work, out=x if n < 4 * p else None)
        gram = torch.mul(gram, ok, out=_gram_target(work, x, gram))
        gram.diagonal(dim1=-2, dim2=-1).add_(~ok)  # exactly I where not ok
        divide_upper(cholesky_upper(gram, workspace=work), w, out=x)
        return MomentumStep(x, m, norm_sq, x.mH @ m if tracked else None, e, ok)
    moment = product(m.mH, m, out=small("stiefel_moment"))  # B, finite
    # I + t^2 B: finite and positive definite, B being finite
    gram, t_points = _limited_gram(moment, t_points, _gram_target(work, x))
    upper = cholesky_upper(gram, workspace=work)
    # exactly x where t = 0; near-square W is formed in x and solved in place (no copy of W)
    w = x.addcmul_(m, t_points) if n < 4 * p else torch.addcmul(x, m, t_points, out=work.like("stiefel_step", x))
    # the next tracking state is a scratch buffer: where the step is not ok the caller keeps
    # the old one (tracking_used)
    _, next_tracking = _orthonormalize_and_track(upper, w, m, h, h2, b, moment, t_points, x, work)
    return MomentumStep(x, m, norm_sq, next_tracking, e, ok)


def _step_sizes(t: StepSize, x: Tensor) -> Tensor:
    r"""A step size (a number or a tensor broadcasting against ``x``) as a tensor in the real dtype
    of ``x``, NaN where :math:`|t| > \sqrt{\varepsilon / \text{tiny}}` (3e15 in float32, 1e146
    in float64), so that such a step fails the finiteness checks and is skipped.

    Below that bound, a direction whose squared norm underflows (and so cannot be shortened
    by its norm, nor enter a Gram matrix) moves the point by less than :math:`\sqrt\varepsilon`
    relative to it; above it, the step could be long and wrongly orthonormalized (measured:
    ``lr = 1e36`` on a gradient of 1e-30 wrote a point 1e6 off the manifold).
    """
    t = t if isinstance(t, Tensor) else torch.full((), t, dtype=real_dtype(x.dtype), device=x.device)
    info = torch.finfo(t.dtype)
    return torch.where(t.abs() <= math.sqrt(info.eps / info.tiny), t, math.nan)


def _shorten(t: Tensor, cap: Tensor) -> Tensor:
    """Per-point step sizes of magnitude at most ``cap``: ``sign(t) min(|t|, cap)`` (no product
    that could overflow; a ``cap`` of ``inf``, from a zero norm, or NaN, from a non-finite one,
    leaves ``t`` as it is)."""
    return torch.fmin(t.abs(), cap).copysign(t)


def _limited_step(
    x: Tensor, u: Tensor, t: Tensor, squared_norm: Tensor, work: Workspace, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""``W = X + t u`` shortened to the limit (:func:`_pre_limit`, then :func:`limit_step`) and
    its Gram matrix formed from ``W`` itself (re-orthonormalizes ``X``): the step of every
    path that does not know the Gram matrix in closed form. ``squared_norm``:
    :math:`\|u\|_F^2` per point; ``out`` as for :func:`limit_step`."""
    t = _pre_limit(t, squared_norm, x.shape[-1])
    w = torch.addcmul(x, u, t, out=work.like("stiefel_step", x))
    gram = product(w.mH, w, out=_square_scratch(work, x, "stiefel_gram"))
    return limit_step(x, w, gram, out=out, step_sq=t * t * squared_norm)


def _pre_limit(t: Tensor, squared_norm: Tensor, p: int) -> Tensor:
    r"""``t`` shortened to :math:`\|t u\|_F \le 3p^{1/4}` per point, for the paths that form
    ``W = X + t u`` and its Gram matrix from the data (``squared_norm``: :math:`\|u\|_F^2`, ``(k, 1, 1)``).

    The Frobenius norm is at most :math:`p^{1/4}` times the Schatten-4 norm that
    :func:`limit_step` bounds by ``MAX_STEP``, so a longer step is shortened by it anyway, to
    the same point; shortening first keeps ``W`` finite and its Gram matrix accurate however
    large the step size (``lr = 1e6`` on 5 x 5 points: 3e-5 off the manifold without it,
    4e-7 with it). Where :math:`\|u\|^2` is not finite (an overflowing or NaN direction) ``t``
    is left as it is, and the step fails its finiteness checks as before; where it underflows
    to 0 (entries below about 1e-19 in float32) ``t`` is left as it is too, so a step longer
    than the limit from such a direction (``|t|`` above 1e19) is only as accurate as the
    composition's (measured: 5e-6 off the manifold).
    """
    norm = squared_norm.sqrt()
    cap = torch.where(norm < math.inf, MAX_STEP * p**0.25 / norm, math.nan)
    return _shorten(t, cap)


def _limited_gram(moment: Tensor, t: Tensor, out: Tensor | None) -> tuple[Tensor, Tensor]:
    r"""The Gram matrix :math:`I + t^2 B` of ``W = X + t m`` (``B = m^H m``, ``X`` orthonormal,
    ``m`` tangent) and the step size ``t``, shortened per point to
    :math:`\|t^2 B\|_F \le` ``MAX_STEP**2`` (the limit of :func:`limit_step`).

    ``B`` is scaled by its trace first, so no intermediate overflows however large ``B`` or
    ``t`` (up to the bound of :func:`_step_sizes`): :math:`\|B\|_F` itself overflows float32
    for a momentum of norm 4e9, and :math:`t^2 B` for a long step of a large one.
    """
    trace = moment.diagonal(dim1=-2, dim2=-1).real.sum(-1)[..., None, None]
    trace = torch.where(trace > 0, trace, 1.0)  # B = 0: no step, nothing to scale
    unit = torch.div(moment, trace, out=out)  # B / tr B: entries at most 1
    size = torch.linalg.matrix_norm(unit)[..., None, None] * trace  # ||B||_F, at most tr B
    t = _shorten(t, MAX_STEP / size.sqrt())
    gram = unit.mul_(trace * t * t)  # |t^2 B| <= 9 entrywise
    gram.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return gram, t


def _gram_target(work: Workspace, x: Tensor, fallback: Tensor | None = None) -> Tensor | None:
    """Where to form the Gram matrix that :func:`cholesky_upper` factors next: its own buffer
    when it has one (no copy), else ``fallback``, else a scratch buffer."""
    target = cholesky_input((*x.shape[:-2], x.shape[-1], x.shape[-1]), x.dtype, x.device, work)
    if target is not None:
        return target
    return fallback if fallback is not None else _square_scratch(work, x, "stiefel_gram")


def _square_scratch(work: Workspace, x: Tensor, name: str) -> Tensor | None:
    """A ``p x p`` scratch buffer per point of tall ``x`` (None from a disabled workspace)."""
    p = x.shape[-1]
    return work.empty(name, (*x.shape[:-2], p, p), x.dtype, x.device)


def _orthonormalize_and_track(
    upper: Tensor,
    w: Tensor,
    m: Tensor,
    h: Tensor,
    h2: Tensor,
    b: float,
    moment: Tensor,
    t: Tensor,
    out: Tensor | None,
    work: Workspace,
) -> tuple[Tensor, Tensor]:
    r""":math:`Y = W R^{-1}` (into ``out``, which may be ``w``) and the next tracking state
    :math:`Y^\top m' = R^{-\top} W^\top m' = R^{-\top}(F + tB)`, :math:`F = b\,\mathrm{skew}(H)`
    (formed in ``h``'s place), for the fused steps. Tall ``W`` (``n >= 4p``, where
    :func:`divide_upper` multiplies by the inverse): one inverse serves both (products only).
    Otherwise LAPACK's solve for ``Y``, and the tracking state by a triangular solve with the
    ``p x p`` right-hand side (in place) from ``TRACK_BY_SOLVE_FROM`` on, by the product
    :math:`Y^\top m'` below it. On one CPU thread, both: 20 x 256 x 128 in 1.6 against 2.4 ms
    by the inverse and 2.2 by the product, 2048 x 1024 in 22 against 46 and 42 ms."""
    n, p = w.shape[-2:]
    if n < 4 * p:
        y = divide_upper(upper, w, out=out)
        if p < TRACK_BY_SOLVE_FROM:
            return y, product(y.mH, m, out=_square_scratch(work, w, "stiefel_tracking"))
        rhs = h.add_(h2, alpha=-0.5).mul_(b).addcmul_(moment, t)
        return y, torch.linalg.solve_triangular(upper.mH, rhs, upper=False, out=rhs)
    inverse = invert_upper(upper, out=_square_scratch(work, w, "stiefel_inverse"))
    y = product(w, inverse, out=out)
    rhs = h.add_(h2, alpha=-0.5).mul_(b).addcmul_(moment, t)
    return y, product(inverse.mH, rhs, out=_square_scratch(work, w, "stiefel_tracking"))


def _squared_norms(a: Tensor) -> Tensor:
    """Squared Frobenius norm of each matrix, ``(..., 1, 1)``."""
    return torch.linalg.vector_norm(a, dim=(-2, -1), keepdim=True).square()


def limit_step(
    x: Tensor, w: Tensor, gram: Tensor, *, out: Tensor | None = None, step_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""Shorten the steps with :math:`\|u^\top u\|_F > 9` (``MAX_STEP = 3``), without a host read.

    ``w = x + u`` for a tangent ``u`` has the Gram matrix :math:`I + u^\top u`, so
    ``gram - I`` measures the step. A point whose step is too long is replaced by
    :math:`x + s u`, :math:`s = 3/\|u^\top u\|_F^{1/2}`, whose Gram matrix
    :math:`(1 - s^2) I + s^2\,\text{gram}` needs no new product. ``w`` and ``gram`` are
    updated in place (a no-op for the others: ``lerp`` with weight 1 returns its end exactly);
    with ``out`` (``x`` itself may be given) the limited steps are written there instead of ``w``.

    ``step_sq`` (:math:`\|t u\|_F^2` per point, ``(..., 1, 1)``) leaves the steps with
    :math:`\|t u\|_F \le 3` as they are: their Schatten-4 norm is at most 3, so on the
    manifold nothing changes, and off it (where ``gram - I`` also holds :math:`X^\top X - I`
    and the closed form above does not hold) ``gram`` stays the Gram matrix of ``w``.

    Shapes: ``x, w (..., n, p)`` tall, ``gram (..., p, p)`` -> the same.
    """
    shrink2 = _limit_shrink2(gram, step_sq)
    s2 = shrink2[..., None, None]
    gram = gram.mul_(s2)  # (1 - s^2) I + s^2 gram, exactly gram when s = 1
    gram.diagonal(dim1=-2, dim2=-1).add_(1 - shrink2[..., None])
    weight = shrink2.sqrt()[..., None, None].to(x.dtype)  # lerp wants the weight in the points dtype
    if torch.compiler.is_compiling():
        return torch.lerp(x, w, weight), gram
    return torch.lerp(x, w, weight, out=w if out is None else out), gram


def _limit_shrink2(gram: Tensor, step_sq: Tensor | None) -> Tensor:
    r"""The squared shrink factor of :func:`limit_step` per point, ``(...)``: 1 for steps within
    the limit (and, given ``step_sq``, for those with :math:`\|t u\|_F \le 3`), NaN for NaN."""
    # ||gram - I||_F^2 = ||gram||_F^2 - 2 tr(gram) + p without forming gram - I: its rounding
    # error (about p eps) only matters far below the limit (81)
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    size2 = torch.linalg.matrix_norm(gram).square() - 2 * diagonal.real.sum(-1) + gram.shape[-1]
    # min(9 / sqrt(size2), 1) as 9 / sqrt(max(size2, 81)): the same numbers (NaN stays NaN),
    # and a finite derivative where the limit is not reached (sqrt has none at 0)
    shrink2 = MAX_STEP**2 / size2.clamp_min(MAX_STEP**4).sqrt()
    if step_sq is not None:
        shrink2 = torch.where(step_sq[..., 0, 0] <= MAX_STEP**2, 1.0, shrink2)
    return shrink2


def _retract_exact(retraction: str, x: Tensor, u: Tensor, t: StepSize, iterations: int | None) -> Tensor:
    r"""The exact form of :meth:`Stiefel.retract` for tall ``x`` (``"qr"``, ``"polar"``, ``"newton"``):
    out-free (differentiable), and correct for a point ``x`` off the manifold.

    The step is shortened as in the fast form (:func:`_pre_limit`, then the limit of
    :func:`limit_step` measured on the Gram matrix of ``W = X + t u``), by ``lerp`` out of
    place; then ``"qr"`` takes the ``Q`` factor of ``W`` by Householder QR
    (:func:`~manifold_opt.manifolds.linalg.qr_positive`, orthonormal to rounding for any ``W``),
    and ``"polar"``/``"newton"`` the polar factor from the Gram matrix of the shortened ``W``
    itself (one more product than the fast form). Norms whose derivative is undefined at 0
    (a zero step) are guarded so that gradients stay finite there.
    """
    p = x.shape[-1]
    t = _step_sizes(t, x)
    norm = torch.linalg.vector_norm(u, dim=(-2, -1), keepdim=True)  # derivative 0 at u = 0
    safe = torch.where(norm > 0, norm, 1.0)
    cap = torch.where(norm > 0, MAX_STEP * p**0.25 / safe, math.inf)
    t = torch.where(torch.isfinite(norm), _shorten(t, cap), t)  # as _pre_limit
    w = x + t.to(x.dtype) * u
    shrink2 = _limit_shrink2(w.mH @ w, (t * norm).square())
    w = torch.lerp(x, w, shrink2.sqrt()[..., None, None].to(x.dtype))
    if retraction == "qr":
        return qr_positive(w)
    gram = w.mH @ w
    if retraction == "polar":
        return polar_from_gram(w, gram)
    return _newton_polar(w, gram, iterations)


def newton_default_iterations(dtype: torch.dtype) -> int:
    r"""Newton–Schulz steps that converge for every step :func:`limit_step` lets through.

    After the limit, :math:`\delta = \|W^\top W - I\|_F \le 9`: unscaled (``delta <= 0.9``)
    the eigenvalues of the Gram matrix lie in ``[1 - delta, 1 + delta]``, scaled by
    ``1 / (1 + delta)`` in ``[1/10, 1]``.
    """
    tolerance = 8 * torch.finfo(dtype).eps
    low = 1.0 / (1.0 + MAX_STEP**2)
    return max(
        newton_iterations_needed(1 - _NEWTON_SCALE_ABOVE, 1 + _NEWTON_SCALE_ABOVE, tolerance),
        newton_iterations_needed(low, 1.0, tolerance),
    )


def _newton_polar(w: Tensor, gram: Tensor, iterations: int | None) -> Tensor:
    r"""Polar factor of tall ``w`` with Gram matrix ``gram``, by Newton–Schulz (matmuls only).

    With :math:`\delta = \|S - I\|_F` (``S = gram``), a point with :math:`\delta > 0.9` is
    scaled by :math:`(1 + \delta)^{-1/2}`, which puts the eigenvalues of its Gram matrix in
    :math:`[1/(1+\delta), 1]`. When ``w`` is tall enough (``3p <= 2n``) the iteration runs
    on the ``p x p`` Gram matrix (:func:`~manifold_opt.manifolds.linalg.inverse_sqrt_newton`,
    three ``p x p`` products a step) followed by one product with ``w``; otherwise on ``w``
    itself, the first step reusing ``S``.
    """
    if iterations is None:
        iterations = newton_default_iterations(w.dtype)
    eye = identity_like(gram)
    delta = torch.linalg.matrix_norm(gram - eye)
    scale = torch.where(delta > _NEWTON_SCALE_ABOVE, 1 + delta, torch.ones_like(delta))[..., None, None]
    n, p = w.shape[-2:]
    if 3 * p <= 2 * n:
        return w @ (inverse_sqrt_newton(gram / scale, iterations) * scale.rsqrt())
    y = w * scale.rsqrt()
    y = y @ (1.5 * eye - (0.5 / scale) * gram)  # the first Newton–Schulz step, reusing S
    return newton_schulz(y, iterations - 1)


def _cayley(x: Tensor, u: Tensor, iterations: int | None) -> Tensor:
    r"""Cayley retraction of tall ``x`` along ``u`` (already scaled by the step size).

    ``iterations=None``: the exact transform, of the step shortened to
    :math:`\|\bar u\|_F \le 3` (the solve loses accuracy as :math:`\|\bar u\|` grows),
    followed by one Newton–Schulz step :math:`Y \leftarrow \tfrac12 Y(3I - Y^\top Y)`: the
    transform is orthogonal, so it keeps whatever rounding error ``x`` carries and adds its
    own, which would random-walk away from the manifold over thousands of steps (float32,
    ``tests/test_drift.py``: 3e-6 after 2000 steps, 5.5e-6 after 8000); the Newton–Schulz step
    squares that error away (two products). A fixed count runs the fixed-point iteration,
    which contracts by ``q = ||u_bar||_F``; points with ``q >= 1``, where it would diverge,
    take the exact solve (one host read decides whether any does).
    """
    u_bar = u - 0.5 * x @ (x.mH @ u)
    if iterations is None:
        shrink = MAX_STEP / torch.linalg.matrix_norm(u_bar).clamp_min(MAX_STEP)  # at most 1; NaN stays NaN
        return _newton_schulz_where_closer(_cayley_exact(x, u_bar * shrink[..., None, None]))

    def apply_a(z: Tensor) -> Tensor:  # A z with A = u_bar x^T - x u_bar^T, never formed
        return u_bar @ (x.mH @ z) - x @ (u_bar.mH @ z)

    diverges = ~(torch.linalg.matrix_norm(u_bar) < 1.0)  # also catches NaN
    y = x + apply_a(x)
    for _ in range(iterations):
        y = x + 0.5 * apply_a(x + y)
    if bool(diverges.any()):
        y = torch.where(diverges[..., None, None], _cayley_exact(x, u_bar), y)
    return y


def _newton_schulz_where_closer(y: Tensor) -> Tensor:
    r"""One Newton–Schulz step :math:`\tfrac12 Y(3I - Y^\top Y)` of tall ``y``, taken by the points
    it brings closer to the manifold (by :meth:`Stiefel.distance_to_manifold`), the others kept.

    With :math:`E = Y^\top Y - I` the step gives :math:`E' = \tfrac14 E^2(E - 3I)` (exactly, up
    to rounding): for a point near the manifold ``E`` is squared away, while one far off
    (singular values above :math:`\sqrt5`) would be thrown farther. ``E'`` costs two
    ``p x p`` products; ``Y^\top Y`` is the one the step needs anyway."""
    gram = y.mH @ y
    error = gram - identity_like(gram)
    square = error @ error
    predicted = 0.25 * (square @ error - 3 * square)
    closer = predicted.abs().amax(dim=(-2, -1)) <= error.abs().amax(dim=(-2, -1))
    return torch.where(closer[..., None, None], 1.5 * y - 0.5 * (y @ gram), y)


def _cayley_exact(x: Tensor, u_bar: Tensor) -> Tensor:
    r"""Exact Cayley transform :math:`(I - \tfrac12 A)^{-1}(I + \tfrac12 A)X`.

    For ``2p < n`` by the Woodbury identity (a ``2p x 2p`` system): with
    :math:`A = UV^\top`, :math:`U = [\bar u, X]`, :math:`V = [X, -\bar u]`,
    :math:`(I - \tfrac12 UV^\top)^{-1} = I + \tfrac12 U (I - \tfrac12 V^\top U)^{-1} V^\top`;
    otherwise by the ``n x n`` system itself, which is then the smaller one."""
    n, p = x.shape[-2:]
    if 2 * p >= n:
        a = u_bar @ x.mH - x @ u_bar.mH
        eye = identity_like(a)
        return _solve_or_nan(eye - 0.5 * a, x + 0.5 * a @ x)
    left = torch.cat([u_bar, x], dim=-1)
    right = torch.cat([x, -u_bar], dim=-1)
    z = x + 0.5 * left @ (right.mH @ x)
    small = right.mH @ left
    system = identity_like(small) - 0.5 * small
    return z + 0.5 * left @ _solve_or_nan(system, right.mH @ z)


def _solve_or_nan(a: Tensor, b: Tensor) -> Tensor:
    """``a^-1 b``, NaN where ``a`` is singular (no host read: ``solve_ex`` does not check)."""
    solution, info = torch.linalg.solve_ex(a, b)
    return torch.where((info == 0)[..., None, None], solution, torch.nan)
