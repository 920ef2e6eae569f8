"""Riemannian Adam."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from ..manifolds import Euclidean, Manifold
from ..manifolds.base import Workspace
from ..manifolds.linalg import all_finite_small
from .base import BucketedOptimizer, check_nonnegative, check_stabilize
from .buckets import Bucket, BucketUpdate, StateWrite, all_finite, flat_base, mark_flat, state_dtype
from .functional import adam_update
from .plain import adam_kernel_options, check_implementation_options, plain_implementation
from .tracking import tracking_inputs, tracking_key, tracking_outputs

FUSED_KERNEL = "_fused_adam_"


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
        stabilize: every ``stabilize`` steps, project the group's manifold parameters onto
            their manifolds and ``exp_avg`` onto the tangent spaces (geoopt's argument; default
            None: never).
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
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        stabilize: int | None = None,
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
        if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
            raise ValueError(f"betas must be either both floats or both Tensors (as in torch.optim), got {betas!r}")
        for name, value in (("lr", lr), ("betas[0]", betas[0])):
            if isinstance(value, Tensor) and foreach:
                raise ValueError(
                    f"{name} as a Tensor is not supported for capturable=False and foreach=True (as in torch.optim): "
                    "pass a float, or leave foreach=None for torch's fused kernel"
                )
        check_implementation_options(foreach, fused, capturable=capturable, differentiable=differentiable)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=False,
            differentiable=False,
        )
        defaults["stabilize"] = check_stabilize(stabilize)
        super().__init__(params, defaults, nonfinite=nonfinite)

    def _init_state(self, group: dict[str, Any], param: Tensor, manifold: Manifold, dtype: torch.dtype) -> None:
        state = self.state[param]
        plain = isinstance(manifold, Euclidean)
        # torch keeps step counts on the host for its foreach/single kernels, on the device otherwise
        on_host = plain and plain_implementation(group, [param], FUSED_KERNEL) != "fused"
        state["step"] = torch.zeros((), dtype=torch.float32, device="cpu" if on_host else param.device)
        # like the parameter (a DTensor of FSDP2 gives DTensor state, sharded like it), as torch.optim
        state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        names = ["exp_avg_sq", "max_exp_avg_sq"] if group["amsgrad"] else ["exp_avg_sq"]
        for name in names:
            if plain or manifold.second_moment_layout == "tangent":
                state[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            else:  # one number per point, replicated on every rank of a sharded parameter
                shape, real = manifold.batch_shape(param.shape), state_dtype(dtype, "scalar")
                state[name] = torch.zeros(shape, dtype=real, device=param.device)

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        return tracking_key(state, "exp_avg")

    def _tangent_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)

    def _replicated_state_names(self, group: dict[str, Any], manifold: Manifold) -> tuple[str, ...]:
        return ("step", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("step", "exp_avg_sq")

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket, workspace: Workspace) -> BucketUpdate:
        beta1, beta2 = (float(beta) for beta in group["betas"])  # tensor betas: host numbers, not data
        tracking, refresh = tracking_inputs(bucket, "exp_avg")
        steps = [state["step"] for state in bucket.states]
        step = _points_steps(bucket, steps) + 1
        update = adam_update(
            bucket.manifold,
            bucket.x,
            bucket.grad,
            bucket.state("exp_avg"),
            bucket.state("exp_avg_sq", bucket.manifold.second_moment_layout),
            bucket.state("max_exp_avg_sq", bucket.manifold.second_moment_layout) if group["amsgrad"] else None,
            step=step,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            tracking=tracking,
            refresh=refresh,
            # writing into the bucket's own tensors is safe when each bucket is written at once
            in_place=self.nonfinite == "skip" and not torch.compiler.is_compiling(),
            workspace=workspace,
        )
        layout = bucket.manifold.second_moment_layout
        writes = [StateWrite("exp_avg", update.momentum), StateWrite("exp_avg_sq", update.exp_avg_sq, layout)]
        if update.max_exp_avg_sq is not None:
            writes.append(StateWrite("max_exp_avg_sq", update.max_exp_avg_sq, layout))
        tracked, drop, on_commit = tracking_outputs(bucket, "exp_avg", update.tracking, update.tracking_used, refresh)
        if update.finite is not None:  # the manifold checked x and m on its small intermediates
            ok = update.finite & all_finite_small(update.exp_avg_sq)
        else:
            ok = all_finite(update.x, update.momentum, update.exp_avg_sq)
        return BucketUpdate(update.x, writes + tracked, ok, drop, on_commit)

    def load_state_dict(self, state_dict: dict[str, Any], *, second_moments: str | None = None) -> None:
        """As :meth:`BucketedOptimizer.load_state_dict`.

        Args:
            state_dict: a state dict of this optimizer (or of one for the same parameters).
            second_moments: ``None`` (default): load as it is. ``"sum"``: start from a
                coordinate-wise Adam's checkpoint (``torch.optim.Adam``'s, for the same
                model): the per-entry ``exp_avg_sq`` (and ``max_exp_avg_sq``) of each manifold
                parameter are summed over each point's entries, the one second moment per
                point this optimizer keeps (the running average of the Euclidean gradient's
                squared norm, of which the Riemannian gradient's is a part). Without it such a
                checkpoint is a ``ValueError`` that says so. ``exp_avg`` is loaded as it is and
                projected onto the tangent space by the next step.
        """
        if second_moments not in (None, "sum"):
            raise ValueError(f"second_moments must be None or 'sum', got {second_moments!r}")
        if second_moments == "sum":
            state_dict = self._per_point_second_moments(state_dict)
        super().load_state_dict(state_dict)

    def _per_point_second_moments(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with each per-entry second moment of a manifold parameter summed per point."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return state_dict  # the usual error follows
        states = dict(state_dict.get("state", {}))
        for group, saved in zip(self.param_groups, saved_groups):
            for index, param in zip(saved["params"], group["params"]):
                manifold = self._manifold(group, param)
                if index not in states or isinstance(manifold, Euclidean) or manifold.second_moment_layout != "scalar":
                    continue
                state = states[index] = dict(states[index])
                batch = manifold.batch_shape(param.shape)
                for key in ("exp_avg_sq", "max_exp_avg_sq"):
                    value = state.get(key)
                    if isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape) != tuple(batch):
                        points = manifold.to_points(value)
                        state[key] = points.sum(dim=tuple(range(1, points.dim()))).reshape(batch)
                if isinstance(state.get("step"), Tensor):  # torch keeps it on the host; we keep it with the points
                    state["step"] = state["step"].to(param.device)
        return {**state_dict, "state": states}

    def _bucket_committed(self, bucket: Bucket, ok: Tensor) -> None:
        steps = [state["step"] for state in bucket.states]
        base = flat_base(steps) if len(steps) > 1 and not torch.compiler.is_compiling() else None
        if base is not None:
            base.add_(ok)
        elif len(steps) > 1 and not torch.compiler.is_compiling():
            stacked = torch.stack(steps).add_(ok)  # the counts become pieces of one buffer
            pieces = list(stacked.unbind(0))
            for state, piece in zip(bucket.states, pieces):
                state["step"] = piece
            mark_flat(pieces)
        else:
            torch._foreach_add_(steps, [ok.to(steps[0].dtype)] * len(steps))

    # ------------------------------------------------------------ plain tensors
    def _plain_is_fused(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        return plain_implementation(group, params, FUSED_KERNEL) == "fused"

    def _plain_needs_check(self, group: dict[str, Any]) -> bool:
        return group["eps"] == 0  # 0/0 for a zero gradient: torch writes NaN

    def _plain_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        found_inf: Tensor | None,
    ) -> None:
        """``torch.optim.adam.adam`` (the functional form of ``torch.optim.Adam``) on plain tensors."""
        implementation, capturable = adam_kernel_options(group, params, states, FUSED_KERNEL)
        beta1, beta2 = group["betas"]
        torch_adam(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [state["max_exp_avg_sq"] for state in states] if group["amsgrad"] else [],
            [state["step"] for state in states],
            foreach=implementation == "foreach",
            fused=implementation == "fused",
            capturable=capturable,
            found_inf=found_inf if implementation == "fused" else None,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


def _points_steps(bucket: Bucket, steps: list[Tensor]) -> Tensor:
    """The step count of every point of a bucket, ``(num_points, 1, ..., 1)``."""
    trailing = (1,) * bucket.manifold.point_ndim
    if len(steps) == 1:
        return steps[0].to(state_dtype(bucket.dtype, "scalar")).reshape(1, *trailing)
    base = None if torch.compiler.is_compiling() else flat_base(steps)
    per_param = (torch.stack(steps) if base is None else base).to(state_dtype(bucket.dtype, "scalar"))
    if bucket.same_shapes and per_param.numel() == bucket.x.shape[0]:  # one point per parameter
        return per_param.reshape(-1, *trailing)
    counts = [math.prod(bucket.manifold.batch_shape(p.shape)) for p in bucket.params]
    repeated = per_param.repeat_interleave(torch.tensor(counts, device=per_param.device), output_size=sum(counts))
    return repeated.reshape(-1, *trailing)
