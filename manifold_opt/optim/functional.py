r"""Pure update rules on stacked points ``(num_points, *point_shape)``.

They use only manifold methods, write into a :class:`~manifold_opt.manifolds.base.Workspace`
instead of the stored tensors, and never read a value on the host. Transport is lazy
where the manifold allows (:attr:`~manifold_opt.manifolds.Manifold.transport_is_projection`):
the momentum is stored where it was formed and projected at the next step together with
the new gradient, one projection instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..manifolds import Manifold
from ..manifolds.base import Workspace


@dataclass
class Update:
    """New points and the new momentum (stored as the manifold's transport convention asks)."""

    x: Tensor
    momentum: Tensor | None


def _moved(manifold: Manifold, x: Tensor, y: Tensor, m: Tensor) -> Tensor:
    """The momentum to store after a step to ``y``: as it is for lazy (projection) transports,
    transported now otherwise."""
    return m if manifold.transport_is_projection else manifold.transport(x, y, m)


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
    workspace: Workspace,
) -> Update:
    r"""One step of Riemannian SGD (Bonnabel 2013) with momentum transported along the step.

    .. math::
        r = \operatorname{grad} f(x) \text{ of } g + \lambda x, \quad
        m \leftarrow \mu\,\mathcal{T}(m) + (1 - \delta) r \ (m = r \text{ at first}), \quad
        d = r + \mu m \text{ (Nesterov) or } m, \quad
        x' = R_x(-\eta d).

    ``momentum_buffer`` is ``None`` before the first step. With a projection transport the
    combination :math:`\mu\mathcal{T}(m) + (1-\delta) r = P_x(\mu m + (1-\delta) g)` is one
    projection (:meth:`~manifold_opt.manifolds.Manifold.transport_add_grad`), and the new
    momentum is returned as it is, to be projected at the next step.
    """
    g = grad.neg() if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    direction = workspace.like("direction", x)
    if momentum == 0:
        d = manifold.riemannian_grad(x, g, out=direction)
        return Update(manifold.retract(x, d, -lr, workspace=workspace), None)
    if momentum_buffer is None:  # torch.optim's first step: m = r
        m = manifold.riemannian_grad(x, g, out=direction)
        d = m.mul(1 + momentum) if nesterov else m
    else:
        m = manifold.transport_add_grad(x, momentum_buffer, g, momentum, 1 - dampening, out=direction)
        d = (
            manifold.transport_add_grad(x, momentum_buffer, g, momentum * momentum, 1 + momentum * (1 - dampening))
            if nesterov
            else m
        )
    y = manifold.retract(x, d, -lr, workspace=workspace)
    return Update(y, _moved(manifold, x, y, m))


@dataclass
class AdamUpdate(Update):
    """Adam's new points, first moment and per-point second moments."""

    exp_avg_sq: Tensor
    max_exp_avg_sq: Tensor | None


def adam_update(
    manifold: Manifold,
    x: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    *,
    step: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    workspace: Workspace,
) -> AdamUpdate:
    r"""One step of Riemannian Adam (Bécigneul & Ganea, ICLR 2019).

    .. math::
        r = \operatorname{grad} f(x) \text{ of } g + \lambda x, \quad
        m \leftarrow \beta_1 \mathcal{T}(m) + (1-\beta_1) r, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\langle r, r\rangle_x, \\
        x' = R_x\!\Big(-\frac{\eta}{1-\beta_1^k}\,\frac{m}{\sqrt{v/(1-\beta_2^k)} + \epsilon}\Big).

    The second moment ``v`` is one scalar per point (``(num_points, 1, ...)``). ``step`` is
    the step number ``k >= 1`` of each point (a tensor broadcasting against ``v``), so the
    bias corrections are computed on the device. The step size of each point enters the
    retraction as its ``t``: no extra pass over the points.
    """
    g = grad.neg() if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    r = manifold.riemannian_grad(x, g, out=workspace.like("gradient", x))
    v = exp_avg_sq.mul(beta2).add_(manifold.inner(x, r, r), alpha=1 - beta2)
    m = manifold.transport_add(x, exp_avg, r, beta1, 1 - beta1, out=r)
    v_max = None if max_exp_avg_sq is None else torch.maximum(max_exp_avg_sq, v)
    bias_correction1 = 1 - torch.pow(beta1, step)
    bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
    denominator = ((v if v_max is None else v_max).sqrt() / bias_correction2_sqrt).add_(eps)
    step_size = (-lr / bias_correction1) / denominator
    y = manifold.retract(x, m, step_size, workspace=workspace)
    return AdamUpdate(y, _moved(manifold, x, y, m), v, v_max)


def keep_on_manifold(manifold: Manifold, x: Tensor, tangents: list[Tensor]) -> int:
    """Re-project the points whose residual exceeds the manifold's drift tolerance.

    Only for manifolds whose retraction lets errors accumulate
    (:attr:`Manifold.retraction_drifts`: fixed iteration counts); one residual per point is
    measured and only the drifted points are projected, with their tangent vectors
    (``tangents``, stacked like ``x``) projected onto the new tangent spaces. Works in place.
    Choosing which points to project reads one count on the host.

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
