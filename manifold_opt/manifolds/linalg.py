"""Batched linear-algebra helpers shared by the manifolds and the layers.

Every function broadcasts over leading dimensions: a matrix argument has shape
``(..., n, p)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sym(a: Tensor) -> Tensor:
    r"""Symmetric part :math:`(A + A^\top)/2` of a batch of square matrices."""
    return 0.5 * (a + a.mT)


def skew(a: Tensor) -> Tensor:
    r"""Skew-symmetric part :math:`(A - A^\top)/2` of a batch of square matrices."""
    return 0.5 * (a - a.mT)


def identity_like(a: Tensor) -> Tensor:
    """The identity matrix with the trailing size, dtype and device of ``a`` (``(..., p, p)``)."""
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def qr_positive(a: Tensor) -> Tensor:
    r"""The orthonormal factor ``Q`` of ``A = QR`` with :math:`\operatorname{diag}(R) > 0`.

    The sign fix makes the factorization unique (a zero diagonal entry counts as
    positive), so ``Q`` is a smooth function of a full-rank ``A``.

    Shapes: ``a (..., n, p)`` with ``n >= p`` -> ``(..., n, p)``.
    """
    q, r = torch.linalg.qr(a)
    negative = torch.diagonal(r, dim1=-2, dim2=-1).unsqueeze(-2) < 0
    return torch.where(negative, -q, q)


def polar_svd(a: Tensor) -> Tensor:
    r"""The orthonormal polar factor :math:`UV^\top` of ``A = U\Sigma V^\top`` (thin SVD).

    It is the nearest matrix with orthonormal columns (rows, for a wide ``A``) in
    Frobenius norm, for any ``A`` of full rank.

    Shapes: ``a (..., n, p)`` -> ``(..., n, p)``.
    """
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def polar_eigh(a: Tensor) -> Tensor:
    r"""The polar factor :math:`A (A^\top A)^{-1/2}` of a tall ``A`` via ``eigh`` of the Gram matrix.

    Cheaper than :func:`polar_svd` (a ``p x p`` eigendecomposition instead of an SVD
    of ``n x p``) and as accurate when the singular values of ``A`` are near 1, as in a
    retraction step ``A = X + u``. Squaring the condition number makes it a poor choice
    for ill-conditioned ``A``: use :func:`polar_svd` there.

    Shapes: ``a (..., n, p)`` with ``n >= p`` -> ``(..., n, p)``.
    """
    eigenvalues, vectors = torch.linalg.eigh(a.mT @ a)
    inv_sqrt = eigenvalues.clamp_min(torch.finfo(a.dtype).tiny).rsqrt()
    return a @ ((vectors * inv_sqrt.unsqueeze(-2)) @ vectors.mT)


def newton_schulz(y: Tensor, iterations: int) -> Tensor:
    r"""Newton–Schulz iteration toward the orthonormal polar factor of ``y``.

    .. math::
        Y_{t+1} = \tfrac12 Y_t (3I - Y_t^\top Y_t)
        \quad (\tfrac12 (3I - Y_t Y_t^\top) Y_t \text{ for wide } Y),

    with the Gram matrix on the short side. Each singular value follows
    :math:`\sigma \mapsto \tfrac12\sigma(3 - \sigma^2)`: the iteration converges for
    :math:`\sigma \in (0, \sqrt3)`, quadratically near 1, so scale ``y`` into that range
    first. In exact arithmetic :math:`Y_t = Y_0 B_t` where :math:`B_t` is Newton's iterate
    :math:`B_{t+1} = \tfrac32 B_t - \tfrac12 B_t^3 S` for :math:`S^{-1/2}`,
    :math:`S = Y_0^\top Y_0` (the form ONI's paper writes); iterating on ``Y`` instead of
    ``B`` is the numerically stable form (rounding errors in ``B`` grow by up to
    :math:`\tfrac12(r + r^2) - 1` per step when the eigenvalue ratio of ``S`` is
    :math:`r^2 > 2.4`; errors in ``Y`` do not grow). This is the one implementation of the
    iteration in the library: ONI (:func:`manifold_opt.nn.oni`) and the ``"newton"``
    Stiefel retraction both use it.

    Args:
        y: matrices with singular values in ``(0, sqrt(3))``.
        iterations: number of steps ``T >= 0`` (``T = 0`` returns ``y``).

    Shapes: ``y (..., n, p)`` -> ``(..., n, p)``.
    """
    wide = y.shape[-2] < y.shape[-1]
    for _ in range(iterations):
        cubic = (y @ y.mT) @ y if wide else y @ (y.mT @ y)
        y = 1.5 * y - 0.5 * cubic
    return y


def newton_iterations_needed(lambda_low: float, lambda_high: float, tolerance: float, limit: int = 40) -> int:
    r"""Fewest steps of :func:`newton_schulz` that bring every squared singular value
    :math:`\lambda = \sigma^2` in ``[lambda_low, lambda_high]`` to
    :math:`|\lambda b^2 - 1| \le` ``tolerance``.

    The iteration maps :math:`\sigma = \sqrt\lambda\, b` by
    :math:`b \mapsto \tfrac32 b - \tfrac12 b^3 \lambda` from ``b = 1``; the slowest
    value in an interval inside ``(0, 3)`` is one of its ends, so iterating the two ends
    on the host gives the count for the whole spectrum.
    """
    if not 0.0 < lambda_low <= lambda_high < 3.0:
        raise ValueError(
            f"eigenvalue bounds [{lambda_low}, {lambda_high}] must lie inside (0, 3); scale the matrix first"
        )
    ends = [lambda_low, lambda_high]
    values = [1.0, 1.0]
    for count in range(limit + 1):
        if all(abs(lam * b * b - 1.0) <= tolerance for lam, b in zip(ends, values)):
            return count
        values = [1.5 * b - 0.5 * b**3 * lam for lam, b in zip(ends, values)]
    return limit
