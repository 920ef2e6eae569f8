r"""Steepest descent under the spectral norm: the pieces of Muon and its manifold version.

The steepest unit step of a function with gradient :math:`G` under the spectral norm,
inside a subspace :math:`T` (a tangent space), is the linear minimization oracle

.. math::
    A^\star = \arg\max \{\langle G, A\rangle : \|A\|_2 \le 1,\ A \in T\},

whose value has the dual :math:`\min_{\nu \in T^\perp} \|G - \nu\|_*` (nuclear norm). On
plain matrices :math:`A^\star = \operatorname{msign}(G) = UV^\top` (Muon with an exact
polar factor). This module holds the matrix functions (Newton–Schulz iterations, matmul
only), a generic solver of the oracle for any tangent space given by its projection
(ADMM), and the certificate that bounds how far a direction is from the optimum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import skew

# torch.optim.Muon's quintic Newton–Schulz (Keller Jordan's coefficients): five steps put
# the singular values of a Frobenius-normalized matrix in about [0.5, 1.2], not at 1.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# An odd quintic per step, x -> a x + b x^3 + c x^5 on the singular values, in the
# Polar Express form (Amsel et al. 2025: each step the minimax-optimal quintic for the
# interval the previous ones leave; the first seven divided by 1.01, 1.01^3, 1.01^5 for
# rounding headroom). From a Frobenius-normalized matrix, every singular value in
# [1e-3, 1] ends within 1e-4 of 1 after six steps and at 1 to float32 rounding after
# eight (checked on the scalar map in the tests); smaller ones end between 0 and 1, and
# zero singular values stay zero: the result is a partial isometry.
_POLAR_EXPRESS_STEPS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
POLAR_EXPRESS = (*((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_STEPS), (1.875, -1.25, 0.375))
MSIGN_STEPS = 8


def quintic_newton_schulz(
    a: Tensor,
    coefficients: Sequence[tuple[float, float, float]],
    *,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Odd-polynomial Newton–Schulz iteration toward :math:`\operatorname{msign}(a)`.

    ``a`` is divided by its Frobenius norm (at least ``eps``), then each step maps
    :math:`X \leftarrow aX + (bB + cB^2)X` with :math:`B = XX^\top` on the short side
    (wide orientation), as ``torch.optim.Muon`` does, in ``dtype`` (default: ``a``'s).
    Batched over leading dimensions; matrix products only.

    Shapes: ``a (..., m, n)`` -> ``(..., m, n)`` in ``dtype``.
    """
    x = a.to(dtype) if dtype is not None else a
    shape = x.shape
    tall = shape[-2] > shape[-1]
    x = x.reshape(-1, *shape[-2:])
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for ca, cb, cc in coefficients:
        gram = x @ x.mH
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=cb, alpha=cc), x, beta=ca)
    x = x.mT if tall else x
    return x.reshape(shape)


def msign(a: Tensor, steps: int = MSIGN_STEPS) -> Tensor:
    r"""The polar factor :math:`UV^\top` of ``a`` (a partial isometry: zero singular values
    stay zero), by ``steps`` quintic Newton–Schulz steps of the :data:`POLAR_EXPRESS`
    schedule in ``a``'s dtype (at least float32). Singular values below about 1e-3 of the
    largest are not brought all the way to 1 (they weigh that little in
    :math:`\langle G, \operatorname{msign}(G)\rangle = \|G\|_*`).

    Shapes: ``a (..., m, n)`` -> ``(..., m, n)``.
    """
    schedule = POLAR_EXPRESS[:steps] + POLAR_EXPRESS[-1:] * max(0, steps - len(POLAR_EXPRESS))
    dtype = torch.promote_types(a.dtype, torch.float32)
    return quintic_newton_schulz(a, schedule, eps=torch.finfo(dtype).tiny, dtype=dtype)


def stiefel_steepest_direction(x: Tensor, g: Tensor, steps: int = MSIGN_STEPS) -> Tensor:
    r"""The steepest unit step under the spectral norm in the tangent space of the Stiefel
    manifold at a tall point :math:`X` (:math:`n \ge p`, :math:`X^\mathsf{H} X = I`), in closed form:

    .. math::
        A^\star = \operatorname{msign}(\Xi)\,X, \qquad \Xi = \operatorname{skew}(G X^\mathsf{H}).

    Every tangent vector is :math:`\Xi X` for a skew :math:`n \times n` matrix :math:`\Xi`
    with :math:`\|\Xi\|_2 = \|\Xi X\|_2` at best (Parrott's completion of
    :math:`[\Omega; K]` by a skew block), and :math:`\langle G, \Xi X\rangle = \langle
    \operatorname{skew}(G X^\mathsf{H}), \Xi\rangle`, so the oracle is the one of the
    orthogonal group, :math:`\operatorname{msign}`, read at :math:`X`. The optimum is not a
    partial isometry when :math:`p < n < 2p` (its singular values may lie below 1).

    :math:`\Xi` acts on the span of :math:`X` and :math:`\hat G = G - XC`,
    :math:`C = X^\mathsf{H} G`: for :math:`n > 2p` it is computed there, as the skew
    :math:`2p \times 2p` matrix :math:`\begin{bmatrix} S & -R^\mathsf{H}/2 \\ R/2 & 0\end{bmatrix}`
    with :math:`S = \operatorname{skew}(C)` and :math:`R^\mathsf{H} R = \hat G^\mathsf{H}\hat G
    + \delta I` (Cholesky in double precision, :math:`\delta` = 64 double eps times its mean
    eigenvalue, so a rank-deficient :math:`\hat G` works), and
    :math:`A^\star = X\,\operatorname{skew}(Q_{11}) + \hat G R^{-1} Q_{21}` from
    :math:`Q = \operatorname{msign}` of it; for :math:`n \le 2p`, as the :math:`n \times n`
    matrix itself. Matrix products, one Cholesky factor and one triangular solve of
    :math:`p \times p` matrices; ``steps`` Newton–Schulz steps (:func:`msign`).

    Shapes: ``x, g (..., n, p)`` with ``n >= p`` -> ``(..., n, p)``.
    """
    n, p = x.shape[-2:]
    if n <= 2 * p:
        return skew(msign(skew(g @ x.mH), steps)) @ x  # msign of a skew matrix is skew: exactly, after _skew
    c = x.mH @ g
    residual = g - x @ c
    # the p x p Gram matrix and its factor in double precision (at least), with a shift at
    # double's rounding level: where the residual is rank-deficient (low-rank gradients), a
    # larger shift would give the reduced matrix spurious singular values that msign brings
    # toward 1, and float32 has no room for a smaller one (its rounding makes the Gram
    # matrix indefinite)
    wide = torch.promote_types(residual.dtype, torch.complex128 if residual.is_complex() else torch.float64)
    wide_residual = residual.to(wide)
    gram = wide_residual.mH @ wide_residual
    mean = gram.diagonal(dim1=-2, dim2=-1).real.mean(-1)[..., None, None]
    delta = 64 * torch.finfo(mean.dtype).eps * mean + torch.finfo(mean.dtype).tiny
    eye = torch.eye(p, dtype=wide, device=x.device)
    upper = torch.linalg.cholesky_ex(gram + delta * eye).L.mH
    skew_c = skew(c)
    factor = upper.to(x.dtype)
    reduced = torch.cat(
        [torch.cat([skew_c, factor.mH * -0.5], -1), torch.cat([factor * 0.5, torch.zeros_like(factor)], -1)], -2
    )
    q = msign(reduced, steps)
    k = torch.linalg.solve_triangular(upper, q[..., p:, :p].to(wide), upper=True).to(x.dtype)
    # X^H residual is zero up to rounding, which R^-1 amplifies where the residual is
    # rank-deficient: its symmetric part is removed, so the result is tangent to rounding
    leak = (x.mH @ residual) @ k
    return x @ (skew(q[..., :p, :p]) - 0.5 * (leak + leak.mH)) + residual @ k


def clip_spectrum(z: Tensor) -> Tensor:
    r"""The nearest matrix of spectral norm at most 1: singular values capped at 1 (by SVD).

    Shapes: ``z (..., m, n)`` -> ``(..., m, n)``.
    """
    u, s, vh = torch.linalg.svd(_finite(z), full_matrices=False)
    return (u * s.clamp(max=1.0).unsqueeze(-2).to(u.dtype)) @ vh


def spectral_norm(a: Tensor) -> Tensor:
    """Largest singular value of each matrix, ``(..., 1, 1)`` (NaN where ``a`` is not finite)."""
    poison = torch.where(torch.isfinite(a).flatten(-2).all(-1), 1.0, torch.nan).to(a.dtype)[..., None, None]
    return torch.linalg.matrix_norm(_finite(a), ord=2, keepdim=True) * poison


def _finite(z: Tensor) -> Tensor:
    """``z`` with non-finite entries zeroed: LAPACK's SVD stops on them (a NaN gradient, whose
    step the optimizers then skip, must not raise)."""
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class SteepestDirection:
    """The result of an oracle: the direction (spectral norm at most 1, tangent) and the
    dual variable that certifies it (:func:`duality_gap`), kept to warm-start the next
    solve. ``dual`` is ``None`` for closed forms."""

    direction: Tensor
    dual: Tensor | None = None


def admm_steepest_direction(
    g: Tensor,
    project_tangent: Callable[[Tensor], Tensor],
    *,
    iterations: int,
    dual: Tensor | None = None,
    relaxation: float = 1.6,
) -> SteepestDirection:
    r"""The spectral-norm steepest direction inside the subspace ``project_tangent`` projects
    onto, by ADMM on the split :math:`A` (spectral ball) :math:`= B` (subspace):

    .. math::
        A \leftarrow \operatorname{clip}(B - U), \quad
        \hat A = \alpha A + (1 - \alpha) B, \quad
        B \leftarrow P_T(\hat A + U + G/\rho), \quad
        U \leftarrow U + \hat A - B,

    with :math:`\rho = \|G\|_F / \sqrt{\min(m, n)}` and over-relaxation :math:`\alpha`. After
    each :math:`B` update :math:`P_T(G + \rho U) = 0`, so :math:`\nu = G + \rho U` is in the
    normal space and :math:`\|G - \nu\|_* = \rho\|U\|_*` bounds the optimum from above: the
    returned ``dual`` is :math:`Z = G - \nu = -\rho U` (whose polar factor is the optimal
    direction at convergence; it warm-starts the next solve). A fixed number of
    ``iterations``: no data-dependent control flow. Returns :math:`B` divided by its
    spectral norm (tangent, of spectral norm 1).

    Shapes: ``g (..., m, n)``; ``project_tangent`` maps such a tensor to its projection.
    """
    rho = torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True) / min(g.shape[-2:]) ** 0.5
    rho = rho.clamp(min=torch.finfo(g.dtype).tiny)
    if dual is None:
        u = torch.zeros_like(g)
        b = project_tangent(msign(project_tangent(g)))
    else:
        u = -dual / rho
        b = project_tangent(msign(dual))
    scaled = g / rho
    for _ in range(iterations):
        a = clip_spectrum(b - u)
        a_hat = a.mul(relaxation).add_(b, alpha=1 - relaxation)
        b = project_tangent(a_hat + u + scaled)
        u = u + a_hat - b
    return SteepestDirection(b / spectral_norm(b).clamp(min=torch.finfo(b.dtype).tiny), u * -rho)


def duality_gap(g: Tensor, direction: Tensor, dual: Tensor, project_tangent: Callable[[Tensor], Tensor]) -> Tensor:
    r"""Relative duality gap of a spectral-norm steepest direction, per matrix.

    ``direction`` is projected onto the tangent space and divided by its spectral norm, so
    :math:`\ell = \langle G, A\rangle / \|A\|_2` is the value of a feasible point; ``dual``
    is any matrix :math:`Z` whose tangent part is replaced by that of :math:`G` (so
    :math:`Z = G - \nu` with :math:`\nu` normal) and :math:`u = \|Z\|_*` is an upper bound
    on the optimum. Returns :math:`(u - \ell)/u \ge 0`: the direction's value is within
    that fraction of the true optimum.

    A direction with non-finite entries gets a NaN gap.

    Shapes: ``(..., m, n)`` each -> ``(...)``.
    """
    a = project_tangent(direction)
    lower = (g * a).sum(dim=(-2, -1)) / spectral_norm(a)[..., 0, 0].clamp(min=torch.finfo(a.dtype).tiny)
    z = dual - project_tangent(dual) + project_tangent(g)
    upper = torch.linalg.matrix_norm(_finite(z), ord="nuc")  # NaN comes through lower
    return (upper - lower) / upper.clamp(min=torch.finfo(g.dtype).tiny)
