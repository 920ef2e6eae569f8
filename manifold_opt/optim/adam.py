"""Riemannian Adam."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..manifolds import Manifold
from .base import Bucket, BucketedOptimizer, check_nonnegative
from .functional import adam_update


class RiemannianAdam(BucketedOptimizer):
    r"""Adam on manifolds (Bécigneul & Ganea, ICLR 2019), with ``torch.optim.Adam``'s interface.

    .. code-block:: text

        input: lr η, betas (β1, β2), eps ε, weight decay λ, amsgrad, maximize
        for each parameter x with gradient g (stacked per bucket), step k:
            r ← grad f(x) of (±g + λx)
            m ← β1 m + (1 − β1) r                         tangent vector at x
            v ← β2 v + (1 − β2) <r, r>_x                   one scalar per point
            v̂ ← max(v̂, v) if amsgrad else v
            x ← R_x(−η/(1 − β1^k) · m / (sqrt(v̂/(1 − β2^k)) + ε));  m ← T_{x→x_new}(m)

    A coordinate-wise second moment would leave the tangent space, so ``v`` is one
    scalar per manifold point; every coordinate of a Euclidean parameter is its own
    point, where this is exactly ``torch.optim.Adam``. Step counts are tensors in the
    state (``state["step"]``), as in ``torch.optim``.

    Args:
        params: iterable of tensors or of param-group dicts.
        lr: learning rate η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to the denominator (default 1e-8).
        weight_decay: L2 penalty λ (default 0).
        amsgrad: keep the running maximum of ``v``.
        maximize: maximize the objective instead of minimizing it.
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient.

    Example:
        >>> import torch
        >>> from manifold_opt import ManifoldParameter, RiemannianAdam, Sphere
        >>> w = ManifoldParameter(torch.randn(4, 5), Sphere(batch_dims=1))
        >>> opt = RiemannianAdam([w], lr=0.01)
        >>> (w.sum() ** 2).backward(); opt.step()
        >>> torch.allclose(w.detach().norm(dim=1), torch.ones(4))
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        nonfinite: str = "skip",
    ) -> None:
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            check_nonnegative(name, value)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            check_nonnegative(f"betas[{index}]", beta)
            if beta >= 1:
                raise ValueError(f"betas[{index}] must be in [0, 1), got {beta!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        return float(state["step"])

    def _init_state(self, group: dict[str, Any], param: Tensor, manifold: Manifold, dtype: torch.dtype) -> None:
        state = self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        second_moment_shape = manifold.batch_shape(param.shape)
        state["exp_avg_sq"] = torch.zeros(second_moment_shape, dtype=dtype, device=param.device)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros(second_moment_shape, dtype=dtype, device=param.device)

    def _step_bucket(
        self, group: dict[str, Any], bucket: Bucket
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        exp_avg_sq = bucket.stack_second_moment("exp_avg_sq")
        max_exp_avg_sq = bucket.stack_second_moment("max_exp_avg_sq") if amsgrad else None
        new_x, exp_avg = adam_update(
            bucket.manifold,
            bucket.x,
            bucket.grad,
            bucket.stack_state("exp_avg"),
            exp_avg_sq,
            max_exp_avg_sq,
            step=float(bucket.states[0]["step"]) + 1,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
        )
        per_point = {"exp_avg_sq": exp_avg_sq}
        if max_exp_avg_sq is not None:
            per_point["max_exp_avg_sq"] = max_exp_avg_sq
        return new_x, {"exp_avg": exp_avg}, per_point

    def _bucket_stepped(self, bucket: Bucket) -> None:
        for state in bucket.states:
            state["step"] += 1
