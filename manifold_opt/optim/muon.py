r"""Muon: orthogonalized momentum for matrix weights, on plain matrices and on manifolds."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw

from ..manifolds import Euclidean, Manifold
from ..manifolds.base import StepSize, Workspace, add_step, unsupported_steepest_direction
from ..manifolds.spectral import MUON_COEFFICIENTS, SteepestDirection, msign, quintic_newton_schulz
from .base import EUCLIDEAN, BucketedOptimizer, check_nonnegative
from .buckets import Bucket, BucketUpdate, StateWrite, all_finite
from .plain import adam_kernel_options, plain_implementation

ALGORITHMS = ("auto", "muon", "adamw")
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
FUSED_KERNEL = "_fused_adamw_"
# ADMM iterations of the oracle on manifolds without a closed form: a cold solve (the
# first step of a parameter), then a solve warm-started from the previous step's dual
DEFAULT_ORACLE_ITERATIONS = (100, 10)


@dataclass(frozen=True, kw_only=True)
class PlainMatrices(Manifold):
    """Unconstrained matrices: the geometry :class:`RiemannianMuon` steps plain weights on.

    A weight of shape ``(*batch, out, *rest)`` (``batch_dims`` leading dimensions) is a
    batch of ``(out, prod(rest))`` matrices: a conv kernel is one matrix, a stack of
    expert weights ``(experts, out, in)`` with ``batch_dims=1`` is one matrix per expert.
    """

    @property
    def point_ndim(self) -> int:
        return 2

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return self._matrix_point_shape(shape)

    def steepest_direction(
        self, x: Tensor, g: Tensor, shape: Sequence[int], *, iterations: int, dual: Tensor | None = None
    ) -> SteepestDirection:
        """Unconstrained: :math:`\\operatorname{msign}(g)` of each matrix, exactly (the
        optimizer's own step uses torch's Newton–Schulz instead, for torch's numbers)."""
        return SteepestDirection(msign(g))

    def project(self, x: Tensor) -> Tensor:
        return x

    def project_tangent(self, x: Tensor, u: Tensor, *, out: Tensor | None = None) -> Tensor:
        return u if out is None else out.copy_(u)

    def riemannian_grad(self, x: Tensor, g: Tensor, *, out: Tensor | None = None) -> Tensor:
        return self.project_tangent(x, g, out=out)

    def retract(self, x: Tensor, u: Tensor, t: StepSize = 1.0, *, workspace: Workspace | None = None) -> Tensor:
        return add_step(x, u, t)

    def transport(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v

    def inner(self, x: Tensor, u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(dim=(-2, -1), keepdim=True)

    def distance_to_manifold(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-2])


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """``torch.optim.Muon``'s learning rate for a ``rows x cols`` matrix: ``lr sqrt(max(1,
    rows/cols))`` ("original", the default) or ``0.2 lr sqrt(max(rows, cols))``
    ("match_rms_adamw": the update's RMS matches AdamW's, so AdamW's lr carries over)."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


class RiemannianMuon(BucketedOptimizer):
    r"""Muon (orthogonalized momentum) for a whole model, with ``torch.optim.Muon``'s interface.

    .. code-block:: text

        input: lr η, weight decay λ, momentum μ, nesterov, NS coefficients and steps
        for each matrix parameter W with gradient g (one batched call per bucket of equal shapes):
            B ← μ B + (1 − μ) g                           (torch's lerp form)
            u ← g + μ (B − g) if nesterov else B
            plain W:     O ← NS(u);  W ← W (1 − η λ) − η' O        (η' = AdjustLR(η, shape))
            W on a manifold M:  A ← argmax {⟨u, A⟩ : ‖A‖₂ ≤ 1, A ∈ T_W M};  W ← R_W(−η' A)
        every other parameter: AdamW (torch.optim.adamw's kernels) with the group's adamw_* settings

    **Routing** (per parameter, shown by :meth:`routing_report`): a group's ``"algorithm"``
    decides: ``"muon"``, ``"adamw"``, or ``"auto"`` (the default): parameters declared on a
    manifold (``ManifoldParameter``, a group's ``"manifold"``) and parameters with at least
    two dimensions take Muon, the rest (biases, norms, scalars) take AdamW. Embeddings
    and output heads are matrices but are usually kept on AdamW: put them in a group with
    ``"algorithm": "adamw"``. The rule reads only the parameter's global shape and what is
    declared, so it is the same for an FSDP2-sharded parameter.

    **Plain matrices** get ``torch.optim.Muon``'s update: a weight ``(out, *rest)`` is one
    ``(out, prod(rest))`` matrix (a conv kernel too; ``torch.optim.Muon`` accepts only
    2-D), or with the group's ``"matrix_batch_dims": k`` its first ``k`` dimensions index a
    batch of matrices (e.g. ``(experts, out, in)`` with ``k = 1``). Newton–Schulz runs in
    ``ns_dtype``: bfloat16 by default, as torch (its numbers to bfloat16 rounding; on
    this project's CPU a bfloat16 product also ran faster than a float32 one).

    **Manifold parameters** (Stiefel, Sphere, PSI, ConditionedSpectrum, and any manifold
    through its tangent projection) get the steepest unit step under the spectral norm
    inside the tangent space (:meth:`~manifold_opt.manifolds.Manifold.steepest_direction`:
    closed forms on Stiefel points of every shape and on ConditionedSpectrum, otherwise
    ADMM warm started from the previous step's dual), then the manifold's retraction. Weight decay
    is not applied to them (their norm is fixed by the manifold).

    Args:
        params: tensors, named tensors or param-group dicts, as for ``torch.optim``.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as ``torch.optim.Muon`` (defaults 1e-3, 0.1, 0.95, True, (3.4445, -4.775, 2.0315),
            1e-7, 5, None = "original").
        ns_dtype: precision of the Newton–Schulz iteration on plain matrices (None:
            bfloat16, as ``torch.optim.Muon``; e.g. ``torch.float32`` for more accuracy).
        adamw_lr: AdamW's learning rate for the parameters routed to it (None: ``lr``).
        adamw_betas, adamw_eps, adamw_weight_decay: AdamW's other settings (defaults
            (0.9, 0.999), 1e-8, 0.01, as ``torch.optim.AdamW``).
        oracle_iterations: ``(cold, warm)`` iterations of the manifold oracle's solver on the
            first step of a parameter and on later steps (default (100, 10)).
        nonfinite: ``"skip"`` or ``"raise"`` on a NaN/Inf gradient (see
            :class:`~manifold_opt.optim.base.BucketedOptimizer`).

    Example:
        >>> import torch
        >>> from manifold_opt import ManifoldParameter, RiemannianMuon, Stiefel
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> model[0].weight = ManifoldParameter(model[0].weight, Stiefel())
        >>> opt = RiemannianMuon(model.parameters(), lr=0.02)
        >>> model(torch.randn(4, 8)).square().sum().backward(); opt.step()
        >>> [row.algorithm for row in opt.routing_report()]
        ['muon', 'adamw', 'muon', 'adamw']
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype | None = None,
        adamw_lr: float | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
        oracle_iterations: tuple[int, int] = DEFAULT_ORACLE_ITERATIONS,
        nonfinite: str = "skip",
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            check_nonnegative(name, value)
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
        if not isinstance(ns_steps, int) or not 0 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be an int in [0, 100) (as torch.optim.Muon), got {ns_steps!r}")
        if len(tuple(ns_coefficients)) != 3:
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
        if ns_dtype is not None and not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
            raise ValueError(f"ns_dtype must be None or a floating torch.dtype (e.g. torch.bfloat16), got {ns_dtype!r}")
        cold, warm = _check_oracle_iterations(oracle_iterations)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            adamw_lr=adamw_lr,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
            oracle_iterations=(cold, warm),
            algorithm="auto",
            matrix_batch_dims=0,
            foreach=None,
            fused=None,
            maximize=False,
            differentiable=False,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    # ------------------------------------------------------------------ routing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim``; checks the group's ``"algorithm"`` and ``"matrix_batch_dims"``
        and routes every tensor now, so that a parameter Muon cannot step raises here."""
        algorithm = param_group.get("algorithm", "auto")
        if algorithm not in ALGORITHMS:
            raise ValueError(f'a param group\'s "algorithm" must be one of {ALGORITHMS}, got {algorithm!r}')
        batch_dims = param_group.get("matrix_batch_dims", 0)
        if not isinstance(batch_dims, int) or isinstance(batch_dims, bool) or batch_dims < 0:
            raise ValueError(f'a param group\'s "matrix_batch_dims" must be a non-negative int, got {batch_dims!r}')
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for param in group["params"]:
            self._route(group, param)

    def _route(self, group: dict[str, Any], param: Tensor) -> tuple[str, Manifold, str]:
        """(algorithm, manifold, why) for a parameter of a group."""
        declared = self.declared_manifold(group, param)
        on_manifold = declared is not None and not isinstance(declared, Euclidean)
        algorithm = group.get("algorithm", "auto")
        shape = param.shape  # for the error messages
        if algorithm == "adamw":
            if on_manifold:
                raise ValueError(
                    f"a parameter of shape {tuple(shape)} is declared on {declared!r} but its param group routes it to "
                    "AdamW, which does not keep it on the manifold: use algorithm 'muon' or 'auto' for it (or "
                    "RiemannianAdam)"
                )
            return "adamw", EUCLIDEAN, 'group "algorithm": "adamw"'
        if on_manifold:
            if not declared.steepest_direction_supported:
                raise TypeError(unsupported_steepest_direction(declared, shape))
            return "muon", declared, "declared manifold"
        batch_dims = group.get("matrix_batch_dims", 0)
        if param.dim() - batch_dims >= 2 and param.numel() > 0:
            manifold = self._plain_matrices(batch_dims)
            return "muon", manifold, 'group "algorithm": "muon"' if algorithm == "muon" else "a matrix (>= 2-D)"
        if algorithm == "muon":
            raise ValueError(
                f"a parameter of shape {tuple(shape)} cannot be stepped by Muon: it needs at least {batch_dims + 2} "
                f"dimensions (matrix_batch_dims={batch_dims} batch + 2 matrix); put it in a group with "
                "algorithm 'auto' or 'adamw'"
            )
        return "adamw", EUCLIDEAN, "not a matrix (< 2-D)" if param.numel() else "empty"

    def _plain_matrices(self, batch_dims: int) -> PlainMatrices:
        """One :class:`PlainMatrices` per ``batch_dims``, made when a group is added (eagerly:
        ``torch.compile`` cannot build one inside a traced step)."""
        cache = self.__dict__.setdefault("_plain", {})
        manifold = cache.get(batch_dims)
        if manifold is None:
            manifold = cache[batch_dims] = PlainMatrices(batch_dims=batch_dims)
        return manifold

    def _manifold(self, group: dict[str, Any], param: Tensor) -> Manifold:
        return self._route(group, param)[1]

    def routing_report(self) -> list[Route]:
        """One row per parameter: its name (when the optimizer was given named parameters),
        shape, algorithm, manifold and why (a list whose ``str()`` is a table)."""
        rows = RoutingReport()
        for index, group in enumerate(self.param_groups):
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"]):
                algorithm, manifold, why = self._route(group, param)
                rows.append(Route(name, index, tuple(param.shape), algorithm, manifold, why))
        return rows

    # ------------------------------------------------------------------ buckets
    def _group_buckets(self, group: dict[str, Any]) -> dict[Hashable, list[Tensor]]:
        """The base buckets, split by parameter shape where Muon steps them (its matrices are
        whole parameters, whose spectral norm depends on the shape, not only the points')."""
        buckets: dict[Hashable, list[Tensor]] = {}
        for key, (static, *params) in super()._group_buckets(group).items():
            if isinstance(static.manifold, Euclidean):
                buckets[key] = [static, *params]
                continue
            for param in params:
                buckets.setdefault((key, tuple(param.shape)), [static]).append(param)
        return buckets

    def _bucket_key(self, state: dict[str, Any]) -> Hashable:
        return "momentum_buffer" in state, "oracle_dual" in state

    def _tangent_state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        # the buffer averages Euclidean gradients; projecting it onto the tangent space changes
        # no direction (the oracle's value <u, A> sees only the tangent part of u)
        return ("momentum_buffer",)

    def _sharded_state_names(self, group: dict[str, Any], manifold: Manifold) -> tuple[str, ...]:
        return ("momentum_buffer", "oracle_dual") if manifold.steepest_direction_warm_starts else ("momentum_buffer",)

    def _init_state(self, group: dict[str, Any], param: Tensor, manifold: Manifold, dtype: torch.dtype) -> None:
        if not isinstance(manifold, Euclidean):
            return  # the momentum buffer is written by the first step (zeros where it is skipped)
        state = self.state[param]
        fused = plain_implementation(group, [param], FUSED_KERNEL) == "fused"
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _step_bucket(self, group: dict[str, Any], bucket: Bucket, workspace: Workspace) -> BucketUpdate:
        x, g = bucket.x, bucket.grad
        shape = tuple(bucket.params[0].shape)
        momentum = group["momentum"]
        old = bucket.state("momentum_buffer")
        buffer = torch.lerp(torch.zeros_like(g) if old is None else old, g, 1 - momentum)
        u = g.lerp(buffer, momentum) if group["nesterov"] else buffer
        rows, cols = bucket.manifold.spectral_matrix_shape(shape)
        lr = adjusted_lr(group["lr"], group["adjust_lr_fn"], rows, cols)
        writes = [StateWrite("momentum_buffer", buffer)]
        if isinstance(bucket.manifold, PlainMatrices):
            steps = [tuple(group["ns_coefficients"])] * group["ns_steps"]
            ns_dtype = group["ns_dtype"] or torch.bfloat16
            direction = quintic_newton_schulz(u.reshape(-1, rows, cols), steps, eps=group["eps"], dtype=ns_dtype)
            new_x = x.mul(1 - group["lr"] * group["weight_decay"]).add_(direction.reshape(x.shape), alpha=-lr)
            return BucketUpdate(new_x, writes, all_finite(new_x, buffer))
        dual = bucket.state("oracle_dual")
        cold, warm = group["oracle_iterations"]
        result = bucket.manifold.steepest_direction(x, u, shape, iterations=cold if dual is None else warm, dual=dual)
        new_x = bucket.manifold.retract(x, result.direction, -lr, workspace=workspace)
        checked = [new_x, buffer]
        if result.dual is not None:
            writes.append(StateWrite("oracle_dual", result.dual))
            checked.append(result.dual)
        return BucketUpdate(new_x, writes, all_finite(*checked))

    # ------------------------------------------------------------ plain tensors
    def _plain_is_fused(self, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        return plain_implementation(group, params, FUSED_KERNEL) == "fused"

    def _plain_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        found_inf: Tensor | None,
    ) -> None:
        """``torch.optim.adamw.adamw`` (the functional form of ``torch.optim.AdamW``) with the
        group's ``adamw_*`` settings on the parameters routed to AdamW."""
        implementation, capturable = adam_kernel_options(group, params, states, FUSED_KERNEL)
        beta1, beta2 = group["adamw_betas"]
        lr = group["adamw_lr"] if group["adamw_lr"] is not None else group["lr"]
        torch_adamw(
            params,
            grads,
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            foreach=implementation == "foreach",
            fused=implementation == "fused",
            capturable=capturable,
            found_inf=found_inf if implementation == "fused" else None,
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=group["adamw_weight_decay"],
            eps=group["adamw_eps"],
            maximize=False,
        )


@dataclass(frozen=True)
class Route:
    """One row of :meth:`RiemannianMuon.routing_report`."""

    name: str | None
    group: int
    shape: tuple[int, ...]
    algorithm: str
    manifold: Manifold
    why: str


class RoutingReport(list):
    """The rows of :meth:`RiemannianMuon.routing_report`; ``str()`` is a table."""

    def __str__(self) -> str:
        header = ("parameter", "group", "shape", "algorithm", "geometry", "why")
        rows = [
            (
                row.name if row.name is not None else f"#{index}",
                str(row.group),
                "x".join(map(str, row.shape)) or "scalar",
                row.algorithm,
                "plain" if isinstance(row.manifold, (Euclidean, PlainMatrices)) else type(row.manifold).__name__,
                row.why,
            )
            for index, row in enumerate(self)
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _check_oracle_iterations(value: Any) -> tuple[int, int]:
    try:
        cold, warm = value
    except (TypeError, ValueError):
        cold = warm = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (cold, warm)):
        raise ValueError(
            f"oracle_iterations must be two non-negative ints (cold, warm), e.g. {DEFAULT_ORACLE_ITERATIONS}, "
            f"got {value!r}"
        )
    return cold, warm
