r"""Pure update rules on stacked points ``(num_points, *point_shape)``.

They use only manifold methods and follow ``torch.optim``'s operation order, so that on
Euclidean points (where every manifold method is the identity or a plain add) the
results equal ``torch.optim.SGD`` and ``torch.optim.Adam`` bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..manifolds import Manifold


def sgd_update(
    manifold: Manifold,
    x: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[Tensor, Tensor | None]:
    r"""One step of Riemannian SGD (Bonnabel 2013) with momentum transported along the step.

    .. math::
        r = \operatorname{grad} f(x) \text{ of } g + \lambda x, \quad
        m \leftarrow \mu m + (1 - \delta) r \ (m = r \text{ at first}), \quad
        d = r + \mu m \text{ (Nesterov) or } m, \quad
        x' = R_x(-\eta d), \quad m \leftarrow \mathcal{T}_{x \to x'}(m).

    ``momentum_buffer`` (in the tangent space at ``x``, ``None`` before the first step)
    is updated in place. Returns the new points and the transported buffer (``None``
    without momentum).
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    r = manifold.riemannian_grad(x, g)
    if momentum == 0:
        return manifold.retract(x, r, t=-lr), None
    if momentum_buffer is None:
        momentum_buffer = r.clone()
    else:
        momentum_buffer.mul_(momentum).add_(r, alpha=1 - dampening)
    direction = r.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    return manifold.retract_transport(x, direction, momentum_buffer, t=-lr)


def adam_update(
    manifold: Manifold,
    x: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    r"""One step of Riemannian Adam (Bécigneul & Ganea, ICLR 2019).

    .. math::
        r = \operatorname{grad} f(x) \text{ of } g + \lambda x, \quad
        m \leftarrow \beta_1 m + (1-\beta_1) r, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\langle r, r\rangle_x, \\
        x' = R_x\!\Big(-\frac{\eta}{1-\beta_1^k}\,\frac{m}{\sqrt{v/(1-\beta_2^k)} + \epsilon}\Big), \quad
        m \leftarrow \mathcal{T}_{x\to x'}(m).

    The second moment ``v`` is one scalar per point (``(num_points, 1, ...)``); for
    Euclidean points it is coordinate-wise, as in Adam. ``step`` is the step number
    ``k >= 1``. ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` are updated in place.
    Returns the new points and the transported first moment.
    """
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    r = manifold.riemannian_grad(x, g)
    exp_avg.lerp_(r, 1 - beta1)
    if manifold.point_ndim == 0:  # coordinate-wise: torch's exact operation
        exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).add_(manifold.inner(x, r, r), alpha=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        assert max_exp_avg_sq is not None
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    # x + (-step_size * m) / denom: the rounding of torch's addcdiv_
    u = exp_avg.mul(-step_size).div_(denom)
    return manifold.retract_transport(x, u, exp_avg)


def keep_on_manifold(manifold: Manifold, x: Tensor, tangents: list[Tensor]) -> int:
    """Re-project the points whose residual exceeds the manifold's drift tolerance.

    Only for manifolds whose retraction lets errors accumulate
    (:attr:`Manifold.retraction_drifts`); one residual per point is measured and only
    the drifted points are projected, with their tangent vectors (``tangents``, stacked
    like ``x``) projected onto the new tangent spaces. Works in place.

    Returns:
        The number of points re-projected.
    """
    if not manifold.retraction_drifts or x.numel() == 0:
        return 0
    drifted = manifold.distance_to_manifold(x) > manifold.drift_tolerance(x.dtype)
    index = drifted.nonzero().squeeze(-1)
    if index.numel() == 0:
        return 0
    fixed = manifold.project(x[index])
    x[index] = fixed
    for tangent in tangents:
        tangent[index] = manifold.project_tangent(fixed, tangent[index])
    return int(index.numel())
