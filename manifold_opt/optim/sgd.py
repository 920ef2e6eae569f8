"""Riemannian SGD."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

from torch import Tensor

from .base import Bucket, BucketedOptimizer, check_nonnegative
from .functional import sgd_update


class RiemannianSGD(BucketedOptimizer):
    r"""Stochastic gradient descent on manifolds, with ``torch.optim.SGD``'s interface.

    .. code-block:: text

        input: lr η, momentum μ, dampening δ, weight decay λ, nesterov, maximize
        for each parameter x with gradient g (stacked per bucket):
            r ← grad f(x) of (±g + λx)                   Riemannian gradient
            m ← r at the first step, else μ m + (1 − δ) r
            d ← r + μ m if nesterov else m                (d = r without momentum)
            x ← R_x(−η d);  m ← T_{x→x_new}(m)           retraction, transport

    Plain tensors are Euclidean, where this is exactly ``torch.optim.SGD``. Parameters
    are stepped in buckets of equal (manifold, point shape, dtype, device) with one
    batched call each; ``p.grad`` is never modified.

    Args:
        params: iterable of tensors or of param-group dicts.
        lr: learning rate η (default 1e-3).
        momentum: momentum factor μ (default 0).
        dampening: dampening δ of the momentum (default 0).
        weight_decay: L2 penalty λ (default 0).
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximize the objective instead of minimizing it.
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
        nonfinite: str = "skip",
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            check_nonnegative(name, value)
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
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        return "momentum_buffer" in state

    def _step_bucket(
        self, group: dict[str, Any], bucket: Bucket
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        has_buffer = "momentum_buffer" in bucket.states[0]
        new_x, buffer = sgd_update(
            bucket.manifold,
            bucket.x,
            bucket.grad,
            bucket.stack_state("momentum_buffer") if has_buffer else None,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        return new_x, ({} if buffer is None else {"momentum_buffer": buffer}), {}
