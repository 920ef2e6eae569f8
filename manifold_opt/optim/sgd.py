"""Riemannian SGD."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as torch_sgd

from ..manifolds.base import Workspace
from .base import BucketedOptimizer, check_nonnegative, check_stabilize
from .buckets import Bucket, BucketUpdate, StateWrite, all_finite
from .functional import sgd_update
from .plain import check_implementation_options, plain_implementation
from .tracking import tracking_inputs, tracking_key, tracking_outputs

MOMENTUM_INITS = ("torch", "geoopt")
FUSED_KERNEL = "_fused_sgd_"


class RiemannianSGD(BucketedOptimizer):
    r"""Stochastic gradient descent on manifolds, with ``torch.optim.SGD``'s interface.

    .. code-block:: text

        input: lr η, momentum μ, dampening δ, weight decay λ, nesterov, maximize
        for each parameter x with gradient g (stacked per bucket):
            r ← grad f(x) of (±g + λx)                   Riemannian gradient
            m ← r at the first step, else μ T(m) + (1 − δ) r     T: transport to x
            d ← r + μ m if nesterov else m                (d = r without momentum)
            x ← R_x(−η d)                                 retraction

    Plain tensors are Euclidean, stepped by ``torch.optim.SGD``'s own kernels (bit for
    bit with ``torch.optim.SGD`` given the same ``foreach``/``fused``). Other parameters
    are stepped in buckets of equal (manifold, point shape, dtype, device) with one
    batched call each. When the transport is the tangent projection (every manifold of
    this package), ``μ T(m) + (1 − δ) r`` is one projection ``P_x(μ m + (1 − δ) g)``: the
    momentum is stored where it was formed and projected at the next step. ``p.grad`` is
    never modified.

    Args:
        params: iterable of tensors or of param-group dicts.
        lr: learning rate η (default 1e-3).
        momentum: momentum factor μ (default 0).
        dampening: dampening δ of the momentum (default 0).
        weight_decay: L2 penalty λ (default 0).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximize the objective instead of minimizing it.
        foreach, fused: torch.optim's implementation options, for plain tensors (see
            :mod:`manifold_opt.optim.plain`): ``None`` (default) uses torch's fused kernel
            where it exists, else its ``foreach`` one.
        differentiable: accepted for torch.optim's signature; only ``False``.
        momentum_init: the first momentum step: ``"torch"`` (default; ``m = r``, as
            ``torch.optim.SGD``) or ``"geoopt"`` (``m = mu g + (1 - dampening) r`` with ``g`` the
            raw gradient, as ``geoopt.optim.RiemannianSGD``), to follow geoopt's trajectories.
        stabilize: project every manifold parameter of the group back onto its manifold
            (and its momentum onto the tangent space) every ``stabilize`` steps, as geoopt's
            argument of the same name (default None: never; the retractions are exact).
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see
            :class:`~manifold_opt.optim.base.BucketedOptimizer`).

    Example:
        >>> import torch
        >>> from manifold_opt import ManifoldParameter, RiemannianSGD, Stiefel
        >>> w = ManifoldParameter(torch.randn(6, 3), Stiefel())
        >>> opt = RiemannianSGD([w], lr=0.1, momentum=0.9)
        >>> (w.sum() ** 2).backward(); opt.step()
        >>> bool(Stiefel().distance_to_manifold(w.detach()) < 1e-5)
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        stabilize: int | None = None,
        momentum_init: str = "torch",
        nonfinite: str = "skip",
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            check_nonnegative(name, value)
        check_implementation_options(foreach, fused, differentiable=differentiable)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening = 0, "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            differentiable=False,
        )
        defaults["stabilize"] = check_stabilize(stabilize)
        if momentum_init not in MOMENTUM_INITS:
            raise ValueError(f"momentum_init must be one of {MOMENTUM_INITS}, got {momentum_init!r}")
        defaults["momentum_init"] = momentum_init
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        return "momentum_buffer" in state, tracking_key(state, "momentum_buffer")

    def _tangent_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] else ()

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket, workspace: Workspace) -> BucketUpdate:
        tracking, refresh = tracking_inputs(bucket, "momentum_buffer")
        update = sgd_update(
            bucket.manifold,
            bucket.x,
            bucket.grad,
            bucket.state("momentum_buffer"),
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            momentum_init=group.get("momentum_init", "torch"),
            tracking=tracking,
            refresh=refresh,
            in_place=self.nonfinite == "skip" and not torch.compiler.is_compiling(),
            workspace=workspace,
        )
        if update.momentum is None:
            return BucketUpdate(update.x, [], all_finite(update.x))
        writes, drop, on_commit = tracking_outputs(
            bucket, "momentum_buffer", update.tracking, update.tracking_used, refresh
        )
        writes.insert(0, StateWrite("momentum_buffer", update.momentum))
        ok = update.finite if update.finite is not None else all_finite(update.x, update.momentum)
        return BucketUpdate(update.x, writes, ok, drop, on_commit)

    # ------------------------------------------------------------ plain tensors
    def _plain_is_fused(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        first = group["momentum"] != 0 and "momentum_buffer" not in states[0]
        # a skipped first step with dampening would leave the fused kernel's buffers unset
        return plain_implementation(group, params, FUSED_KERNEL) == "fused" and not (first and group["dampening"])

    def _plain_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        found_inf: Tensor | None,
    ) -> None:
        """``torch.optim.sgd.sgd`` (the functional form of ``torch.optim.SGD``) on plain tensors."""
        implementation = plain_implementation(group, params, FUSED_KERNEL)
        buffers = [state.get("momentum_buffer") for state in states]
        first = all(b is None for b in buffers)
        if first and group["momentum"] != 0 and group.get("momentum_init", "torch") == "geoopt":
            # geoopt's first step: the buffer starts as the raw gradient, then mu * buf + (1 - d) * grad
            buffers = [(g.neg() if group["maximize"] else g).clone() for g in grads]
        elif implementation == "fused" and group["momentum"] != 0 and group["dampening"] == 0 and first:
            # zero buffers make the fused kernel's general step equal its first one
            # (0 * momentum + grad), and leave nothing uninitialized if the step is skipped
            buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        torch_sgd(
            params,
            grads,
            buffers,
            foreach=implementation == "foreach",
            fused=implementation == "fused",
            found_inf=found_inf if implementation == "fused" else None,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if group["momentum"] != 0:
            for state, buffer in zip(states, buffers):
                state["momentum_buffer"] = buffer
