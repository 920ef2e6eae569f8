r"""ONI: orthogonalization by Newton's iteration, as a forward-pass reparametrization.

Huang, Liu, Zhu, Wan, Yuan, Li, Shao, "Controllable Orthogonalization in Training DNNs"
(CVPR 2020, arXiv 2004.00917); official code ``huangleiBuaa/ONI``
(``extension/normalization/NormedConv.py``, ``ONINorm`` and ``ONINorm_colum``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..manifolds.linalg import newton_schulz
from .spectra import checked_weight, matrix_as_weight, output_axis, weight_as_matrix

ONI_EPS = 1e-5


def oni_orthogonalize(
    matrix: Tensor, iterations: int = 5, groups: int = 1, center: bool = True, eps: float = ONI_EPS
) -> Tensor:
    r"""ONI's map :math:`V \mapsto \hat W` on a matrix, differentiable (no gain).

    The ``out`` rows are split into ``groups`` groups of ``out/groups`` rows; in each group
    ``Z`` (``k x d``):

    .. math::
        Z_c = Z - Z\mathbf{1}\mathbf{1}^\top/d \ \text{(if center)}, \quad
        S = Z_c Z_c^\top + \epsilon I \ (\text{or } Z_c^\top Z_c + \epsilon I \text{ when } k > d), \\
        Y_0 = Z_c / \sqrt{\|S\|_F}, \quad Y_{t+1} = \tfrac12 Y_t (3I - Y_t^\top Y_t), \quad \hat W = Y_T.

    :math:`Y_t` is :func:`~manifold_opt.manifolds.linalg.newton_schulz` (the library's one
    Newton iteration, shared with ``Stiefel(retraction="newton")``); in exact arithmetic
    :math:`Y_T = B_T Z_c/\sqrt{\|S\|_F}` with ONI's :math:`B_{t+1} = \tfrac32 B_t - \tfrac12
    B_t^3 S_N`, :math:`S_N = S/\|S\|_F` [code], up to the :math:`\epsilon` inside the
    iteration (our Gram matrix omits it: a relative difference of order
    :math:`\epsilon/\|S\|_F`, about 5e-7 for a Kaiming-initialized 64x576 matrix).
    Row mode (``k <= d``, orthonormal rows) and column mode (``k > d``, orthonormal
    columns) both divide by :math:`\sqrt{\|S\|_F}` (the official column mode does not and
    diverges). The singular values of :math:`Y_0` are at most 1, so every iteration
    stays in the convergence region :math:`(0, \sqrt3)`.

    Args:
        matrix: the proxy ``V``, one row per output unit.
        iterations: ``T >= 0``; larger is closer to orthogonal (``T = 0`` is the scaled,
            centered proxy).
        groups: number of row groups (a divisor of ``out``), each orthogonalized alone.
        center: subtract each row's mean first (the paper's centering). It makes every row
            orthogonal to the all-ones vector, so ``rank <= d - 1``: with ``k >= d`` one
            singular value is 0.
        eps: the :math:`\epsilon` added to ``S`` (keeps a zero proxy finite).

    Returns:
        :math:`\hat W`, same shape as ``matrix``.

    Shapes: ``matrix (out, d)`` -> ``(out, d)``.
    """
    out, d = matrix.shape
    z = matrix.reshape(groups, out // groups, d)
    if center:
        z = z - z.mean(dim=-1, keepdim=True)
    gram = z @ z.mT if z.shape[-2] <= z.shape[-1] else z.mT @ z
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    norm = torch.linalg.matrix_norm(gram + eps * eye)
    y = newton_schulz(z / norm.sqrt()[..., None, None], iterations)
    return y.reshape(out, d)


class ONI(nn.Module):
    r"""The ONI parametrization of one weight: :math:`W = \hat W(V) \odot g` (see :func:`oni`).

    Args:
        out_features: number of output units (rows of the matrix view).
        iterations: Newton iterations ``T``.
        groups: row groups.
        center: centering of each row.
        gain: initial per-output gain.
        learn_gain: make the gain an ``nn.Parameter`` (else a buffer).
        axis: the weight's output dimension (1 for transposed convolutions).
        eps: the :math:`\epsilon` of ``S``.
        dtype: dtype of the gain.
        device: device of the gain.

    Shapes: ``forward(weight)`` maps a weight to a tensor of the same shape.
    """

    def __init__(
        self,
        out_features: int,
        *,
        iterations: int = 5,
        groups: int = 1,
        center: bool = True,
        gain: float = 1.0,
        learn_gain: bool = True,
        axis: int = 0,
        eps: float = ONI_EPS,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.iterations = iterations
        self.groups = groups
        self.center = center
        self.axis = axis
        self.eps = eps
        initial = torch.full((out_features,), float(gain), dtype=dtype, device=device)
        if learn_gain:
            self.gain = nn.Parameter(initial)
        else:
            self.register_buffer("gain", initial)

    def forward(self, weight: Tensor) -> Tensor:
        matrix = weight_as_matrix(weight, self.axis)
        # half precision: iterate in float32 (the Gram matrices lose too much otherwise)
        compute = torch.promote_types(matrix.dtype, torch.float32)
        w_hat = oni_orthogonalize(matrix.to(compute), self.iterations, self.groups, self.center, self.eps)
        w = w_hat * self.gain.to(compute).unsqueeze(-1)
        return matrix_as_weight(w.to(weight.dtype), weight.shape, self.axis)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, groups={self.groups}, center={self.center}"


def oni(
    module: nn.Module,
    name: str = "weight",
    iterations: int = 5,
    groups: int = 1,
    center: bool = True,
    gain: float | None = None,
    learn_gain: bool = True,
) -> nn.Module:
    r"""Reparametrize ``module.<name>`` by ONI (orthogonalization by Newton's iteration).

    The raw weight ``V`` stays the trainable parameter (at
    ``module.parametrizations.<name>.original``); the layer uses

    .. math::
        W = \hat W(V) \odot g, \qquad \hat W = \text{ONI}_T(V)\ \ (\text{see } oni\_orthogonalize),

    an approximately orthogonal matrix (orthonormal rows when ``out <= d``, columns
    otherwise) scaled by a per-output gain ``g``. ``iterations`` controls how orthogonal
    it is (σ_min/σ_max of :math:`\hat W` for a Kaiming-initialized 64x576 weight: 0.51,
    0.54, 0.71, 0.97, 1.00 at T = 0, 1, 3, 5, 7; mean of 20 seeds). Gradients flow through the iterations by
    autograd.

    .. code-block:: text

        Z  = V viewed as (groups, out/groups, d)         conv kernels flattened per output
        Zc = Z - row means                               if center
        S  = Zc Zcᵀ + εI  (Zcᵀ Zc + εI in column mode)    ε = 1e-5
        Y  = Zc / sqrt(‖S‖_F)
        repeat T times: Y = 1.5 Y - 0.5 Y Yᵀ Y           newton_schulz, shared with Stiefel
        W  = Y * g                                       per-output gain

    Differences from the official code, on purpose: the column mode also divides ``S`` by
    its norm (the official one diverges: σ_max = 6.8e79 at T = 5 on a Kaiming 64x27
    kernel); the iteration runs on ``Y`` (the stable Newton–Schulz form, equal in exact
    arithmetic); with ``groups > 1`` the mode is chosen per group (row when
    ``out/groups <= d``); the gain is learnable by default.

    Args:
        module: a layer with a weight of at least 2 dimensions: ``nn.Linear``,
            ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose*d`` (``groups=1``; output axis 1), or
            any module whose ``name`` weight has its output units on dimension 0.
        name: the weight's attribute name.
        iterations: ``T >= 0`` Newton iterations (the official scripts use 2–5).
        groups: orthogonalize ``groups`` blocks of ``out/groups`` rows separately.
        center: subtract each row's mean first (makes ``rank <= d - 1``; pass ``False`` for
            a full-rank square or column-mode weight).
        gain: initial per-output gain; ``None`` means √2 for convolutions (as the official
            code, for ReLU) and 1 otherwise.
        learn_gain: train the gain (an ``nn.Parameter`` of shape ``(out,)`` on the
            parametrization) or keep it fixed (a buffer).

    Returns:
        ``module``, reparametrized in place.

    Raises:
        TypeError: if ``module`` is not an ``nn.Module`` or ``name`` is not a tensor of it.
        ValueError: for a weight of fewer than 2 dimensions, ``groups`` not dividing the
            output units, ``iterations < 0`` or a non-positive ``gain``.

    Shapes: the weight keeps its shape, e.g. ``(out, in, kh, kw)`` viewed as ``(out, in*kh*kw)``.

    Example:
        >>> import torch
        >>> from manifold_opt.nn import oni
        >>> conv = oni(torch.nn.Conv2d(16, 32, 3), iterations=7)
        >>> w = conv.weight.reshape(32, -1) / 2**0.5   # the default conv gain is sqrt(2)
        >>> torch.allclose(w @ w.T, torch.eye(32), atol=1e-4)
        True
        >>> sorted(n for n, _ in conv.named_parameters())
        ['bias', 'parametrizations.weight.0.gain', 'parametrizations.weight.original']
    """
    weight = checked_weight(module, name, "oni")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    for flag, value in (("center", center), ("learn_gain", learn_gain)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    axis = output_axis(module)
    out = weight.shape[axis]
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or out % groups:
        raise ValueError(
            f"groups={groups!r} must be a positive divisor of the {out} output units of {name} "
            f"(shape {tuple(weight.shape)})"
        )
    if gain is None:
        gain = math.sqrt(2.0) if isinstance(module, nn.modules.conv._ConvNd) else 1.0
    elif isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain) or gain <= 0:
        raise ValueError(f"gain must be a finite number > 0 (or None for the default), got {gain!r}")
    parametrization = ONI(
        out,
        iterations=iterations,
        groups=groups,
        center=center,
        gain=gain,
        learn_gain=learn_gain,
        axis=axis,
        dtype=weight.dtype,
        device=weight.device,
    )
    parametrize.register_parametrization(module, name, parametrization)
    return module
