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
    """New points, the new momentum (stored as the manifold's transport convention asks) and
    the manifold's tracking state for the next step (see
    :meth:`~manifold_opt.manifolds.Manifold.momentum_step`)."""

    x: Tensor
    momentum: Tensor | None
    tracking: Tensor | None = None
    tracking_used: Tensor | None = None
    finite: Tensor | None = None  # x and momentum finite, when the manifold knows it cheaply


def _retract_keeping(
    manifold: Manifold, x: Tensor, d: Tensor, t: float, m: Tensor, workspace: Workspace
) -> tuple[Tensor, Tensor]:
    """``y = R_x(t d)`` and the momentum ``m`` to store: as it is for lazy (projection)
    transports, else transported along the step in the same call (``retract_transport``:
    some manifolds, e.g. geoopt's canonical Stiefel, transport only along their retraction)."""
    if manifold.transport_is_projection:
        return manifold.retract(x, d, t, workspace=workspace), m
    return manifold.retract_transport(x, d, m, t, workspace=workspace)


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
    momentum_init: str = "torch",
    tracking: Tensor | None = None,
    refresh: bool = False,
    in_place: bool = False,
    workspace: Workspace,
) -> Update:
    r"""One step of Riemannian SGD (Bonnabel 2013) with momentum transported along the step.

    .. math::
        r = \operatorname{grad} f(x) \text{ of } g + \lambda x, \quad
        m \leftarrow \mu\,\mathcal{T}(m) + (1 - \delta) r \ (m = r \text{ at first}), \quad
        d = r + \mu m \text{ (Nesterov) or } m, \quad
        x' = R_x(-\eta d).

    ``momentum_buffer`` is ``None`` before the first step. The momentum and retraction go
    through :meth:`~manifold_opt.manifolds.Manifold.momentum_step` (one projection for a
    projection transport; the fused Stiefel step), except with Nesterov momentum, whose
    direction is not the stored momentum.
    """
    g = grad.neg() if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    if momentum == 0:
        d = manifold.riemannian_grad(x, g, out=workspace.like("direction", x))
        return Update(manifold.retract(x, d, -lr, workspace=workspace), None)
    if momentum_buffer is None and momentum_init == "geoopt":
        # geoopt's first step: the buffer starts as the raw gradient (not tangent), then
        # m = mu * buffer + (1 - dampening) r, and Nesterov's direction is r + mu * m
        raw = grad.neg() if maximize else grad
        r = manifold.riemannian_grad(x, g)
        m = r.mul(1 - dampening).add_(raw, alpha=momentum)
        d = r.add(m, alpha=momentum) if nesterov else m
        return Update(*_retract_keeping(manifold, x, d, -lr, m, workspace))
    if nesterov:
        if momentum_buffer is None:  # torch.optim's first step: m = r
            m = manifold.riemannian_grad(x, g, out=workspace.like("direction", x))
            d = m.mul(1 + momentum)
        else:
            m = manifold.transport_add_grad(x, momentum_buffer, g, momentum, 1 - dampening)
            d = manifold.transport_add_grad(x, momentum_buffer, g, momentum**2, 1 + momentum * (1 - dampening))
        return Update(*_retract_keeping(manifold, x, d, -lr, m, workspace))
    first = momentum_buffer is None  # torch.optim's first step: m = r
    step = manifold.momentum_step(
        x,
        momentum_buffer,
        g,
        0.0 if first else momentum,
        1.0 if first else 1 - dampening,
        step_size=lambda _: -lr,
        needs_grad_norm=False,
        tracking=tracking,
        refresh=refresh,
        workspace=workspace,
        in_place=in_place and not first,
    )
    return Update(step.x, step.momentum, step.tracking, step.tracking_used, step.finite)


@dataclass
class AdamUpdate(Update):
    """Adam's new points, first moment and per-point second moments."""

    exp_avg_sq: Tensor | None = None
    max_exp_avg_sq: Tensor | None = None


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
    tracking: Tensor | None = None,
    refresh: bool = False,
    in_place: bool = False,
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
    retraction as its ``t`` (:meth:`~manifold_opt.manifolds.Manifold.momentum_step`).
    With ``in_place`` the manifold may write into ``x`` and ``exp_avg`` (see there).
    """
    g = grad.neg() if maximize else grad
    if weight_decay != 0:
        g = g.add(x, alpha=weight_decay)
    moments: dict[str, Tensor | None] = {}

    def step_size(norm_sq: Tensor | None) -> Tensor:
        assert norm_sq is not None
        v = exp_avg_sq.mul(beta2).add_(norm_sq, alpha=1 - beta2)
        v_max = None if max_exp_avg_sq is None else torch.maximum(max_exp_avg_sq, v)
        moments.update(v=v, v_max=v_max)
        bias_correction1 = 1 - torch.pow(beta1, step)
        bias_correction2_sqrt = (1 - torch.pow(beta2, step)).sqrt()
        denominator = ((v if v_max is None else v_max).sqrt() / bias_correction2_sqrt).add_(eps)
        return (-lr / bias_correction1) / denominator

    result = manifold.momentum_step(
        x,
        exp_avg,
        g,
        beta1,
        1 - beta1,
        step_size=step_size,
        needs_grad_norm=True,
        tracking=tracking,
        refresh=refresh,
        workspace=workspace,
        in_place=in_place,
    )
    return AdamUpdate(
        result.x,
        result.momentum,
        result.tracking,
        result.tracking_used,
        result.finite,
        exp_avg_sq=moments["v"],
        max_exp_avg_sq=moments["v_max"],
    )


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
