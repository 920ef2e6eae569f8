r"""OIALR: orthogonality-informed adaptive low-rank training (Coquelin et al., arXiv 2401.08505).

:class:`OIALR` drives a model and its optimizer the way an LR scheduler does: after
``delay`` optimizer steps it replaces every eligible ``nn.Linear``/``nn.Conv*d`` by a
:class:`~manifold_opt.lowrank.LowRankLinear`/:class:`~manifold_opt.lowrank.LowRankConv`
(:math:`W = U\Sigma V^\top`, frozen orthonormal bases, dense trainable :math:`\Sigma`), and
every ``frequency`` steps it re-diagonalizes :math:`\Sigma`, rotates the bases and cuts the
rank. The optimizer's param groups hold :math:`\Sigma` in place of ``W`` and its state is
carried through every change (see :mod:`manifold_opt.lowrank.optimizer_state`).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..manifolds import Euclidean, Stiefel
from ..optim.base import BucketedOptimizer, manifold_of
from ..optim.sharded import is_sharded
from .layers import CONV_TYPES, LowRankConv, LowRankLayer, LowRankLinear, geometry_dtype, thin_svd, weight_matrix
from .optimizer_state import (
    DEFAULT_STATE_KINDS,
    STATE_KINDS,
    contains,
    replace_parameter,
    slice_state,
    transform_state,
)

STATE_TRANSFERS = ("rotate", "slice")
NONFINITE_POLICIES = ("skip", "raise")
_STIEFEL = Stiefel()


def oialr_rank(singular_values: Tensor, *, tau: float, min_rank: int, max_cut: float = 0.5) -> int:
    r"""The OIALR rank rule: the new rank of a layer whose core has the given singular values.

    With :math:`\sigma_0 \ge \sigma_1 \ge \dots \ge \sigma_{r-1}` and current rank ``r``:

    .. math::
        k = \min\{i : \sigma_i < \tau\sigma_0\} \ (k = r \text{ if none}), \qquad
        r' = \min\big(r, \max(k, \lfloor (1 - c)\, r\rfloor, r_{\min})\big),

    with ``c = max_cut`` (at most half the rank goes in one check by default) and the floor
    ``min_rank``. The rank never grows. [code: the official ``_update_inner_dim_and_shapes``]

    Args:
        singular_values: ``(r,)``, in descending order.
        tau: the cut-off fraction τ of the largest singular value.
        min_rank: the floor :math:`r_{\min} \ge 1`.
        max_cut: the largest fraction of the rank removed in one check.

    Returns:
        The new rank ``r'`` (``1 <= r' <= r``).

    Example:
        >>> import torch
        >>> oialr_rank(torch.tensor([4.0, 2.0, 0.5, 0.3]), tau=0.1, min_rank=1)  # 0.3 < 0.1 * 4
        3
        >>> oialr_rank(torch.tensor([4.0, 0.1, 0.1, 0.1]), tau=0.1, min_rank=1)  # at most half goes
        2
    """
    current = singular_values.shape[0]
    below = torch.nonzero(singular_values < tau * singular_values[0])
    keep = int(below[0, 0]) if below.numel() else current
    lower = max(int(min_rank), math.floor(round((1 - max_cut) * current, 9)))  # round: 0.1 * 100 = 9.99..
    return max(1, min(current, max(keep, lower)))


@dataclass
class _Layer:
    """One eligible layer: where it lives and what it is now."""

    name: str
    parent: nn.Module
    attribute: str
    dense: nn.Module | None
    low_rank: LowRankLayer | None
    shape: tuple[int, int]  # (m, d) of the weight matrix
    min_rank: int

    @property
    def module(self) -> nn.Module:
        return self.dense if self.low_rank is None else self.low_rank

    @property
    def rank(self) -> int:
        return min(self.shape) if self.low_rank is None else self.low_rank.rank


class OIALR:
    r"""Orthogonality-informed adaptive low-rank training, used like an LR scheduler.

    .. code-block:: text

        input: model, optimizer, delay D, frequency F, cut-off τ, floor fraction ρ, max cut c
        after optimizer step t (oialr.step()):
            if t = D: for each eligible layer, W = U diag(s) Vᵀ (thin SVD);
                      W := U Σ Vᵀ with Σ = diag(s) trainable, U, V frozen;
                      the optimizer holds Σ where it held W, state mapped to Σ's coordinates
            if t ≥ D and (t − D) mod F = 0: for each low-rank layer:
                Σ = P diag(σ) Qᵀ (SVD);  U ← U P,  V ← V Q,  Σ ← diag(σ)      (W unchanged)
                r' = min(r, max(first i with σ_i < τ σ_0, ⌊(1 − c) r⌋, max(1, ⌊ρ min(m, d)⌋)))
                keep the first r' columns of U, V and the top-left r'×r' of Σ and of its state

    Eligible layers [code]: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (exact types; subclasses
    such as ``MultiheadAttention.out_proj`` may read ``.weight`` directly and are left
    alone) whose weight matrix ``(m, d)`` has ``min(m, d) > max(m, d)/10``, is trainable, is
    in the optimizer, lies on no manifold and is not shared. The network's first
    Linear/Conv layer (registration order) stays dense with ``keep_first_layer``, its last
    one (the classifier head) with ``keep_last_layer`` (default). :attr:`eligibility` says
    why each layer was or was not factored.

    Optimizer state (``state_transfer``):

    * ``"rotate"`` (default): every state tensor follows the change of coordinates,
      :math:`W \to U^\top W V` at the conversion and :math:`\Sigma \to P^\top \Sigma Q` at a
      check, then is cut to the new rank. First moments (momentum, ``exp_avg``) map exactly,
      so SGD with momentum is unaffected by a re-diagonalization; second moments map by
      :math:`v \to (P\circ P)^\top v (Q\circ Q)` (an approximation; see
      :mod:`manifold_opt.lowrank.optimizer_state`). Step counts are kept.
    * ``"slice"`` (the official code): fresh state for :math:`\Sigma` at the conversion,
      and the top-left ``r' × r'`` block of the unrotated state at a check.

    With ``train_bases=True`` the states of ``U`` and ``V`` are always rotated (``ξ → ξP``
    keeps a tangent vector tangent; an unrotated slice would not be).

    Distributed data parallel: with ``torch.distributed`` initialized, the SVD factors are
    broadcast from rank 0, so every rank makes the same rank decisions. Pass the *inner*
    module, and rebuild the ``DistributedDataParallel`` wrapper whenever :meth:`step`
    returns ``True`` (the parameters changed shape or identity).

    Args:
        model: the network (not a ``DistributedDataParallel`` wrapper).
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters (SGD, Adam,
            AdamW, :class:`~manifold_opt.RiemannianSGD`, :class:`~manifold_opt.RiemannianAdam`, ...).
        delay: optimizer steps of full-rank training before the conversion (``D``).
        frequency: steps between two checks (``F``); the first check is at ``delay``.
        tau: cut-off fraction τ in ``[0, 1]`` (``0`` never cuts).
        keep_first_layer: leave the network's first Linear/Conv layer dense.
        keep_last_layer: leave the network's last Linear/Conv layer dense.
        min_rank_fraction: the rank floor is ``max(1, int(min_rank_fraction * min(m, d)))``.
        max_cut: largest fraction of a layer's rank removed in one check, in ``(0, 1]``.
        state_transfer: ``"rotate"`` or ``"slice"`` (see above).
        train_bases: make ``U`` and ``V`` trainable :class:`~manifold_opt.ManifoldParameter`
            on the Stiefel manifold; they join ``W``'s param group, which needs a
            Riemannian optimizer (:class:`~manifold_opt.optim.BucketedOptimizer`).
        exclude: qualified module names (as in ``model.named_modules()``) to leave dense.
        state_kinds: extra or overriding optimizer-state kinds, key -> ``"linear"``,
            ``"quadratic"`` or ``"reset"``, for optimizers beyond the built-in list.
        nonfinite: a NaN/Inf weight or core at a conversion or check: ``"skip"`` (default:
            that layer is left as it is until the next check, with a ``RuntimeWarning``) or
            ``"raise"`` (``FloatingPointError``).
        process_group: the ``torch.distributed`` group to agree within (default: the world).

    Attributes:
        history: one record per conversion or check: ``{"step", "ranks", "trainable_fraction"}``.
        eligibility: qualified name -> ``"low-rank"`` or the reason the layer stays dense.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from manifold_opt.lowrank import OIALR
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> oialr = OIALR(model, optimizer, delay=2, frequency=2, tau=0.5)
        >>> for _ in range(6):
        ...     model(torch.randn(8, 16)).square().mean().backward()
        ...     optimizer.step(); changed = oialr.step(); optimizer.zero_grad()
        >>> type(model[0]).__name__, model[0].rank < 16
        ('LowRankLinear', True)
        >>> oialr.trainable_fraction() < 1
        True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        delay: int = 1000,
        frequency: int = 100,
        tau: float = 0.1,
        keep_first_layer: bool = False,
        keep_last_layer: bool = True,
        min_rank_fraction: float = 0.01,
        max_cut: float = 0.5,
        state_transfer: str = "rotate",
        train_bases: bool = False,
        exclude: Iterable[str] = (),
        state_kinds: Mapping[str, str] | None = None,
        nonfinite: str = "skip",
        process_group: Any = None,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "model is a DistributedDataParallel wrapper: pass its inner module (ddp.module) to OIALR and rebuild "
                "the wrapper whenever oialr.step() returns True"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        sharded = [name for name, p in model.named_parameters() if is_sharded(p)]
        if sharded:
            raise NotImplementedError(
                f"OIALR does not support FSDP2-sharded models (parameter {sharded[0]!r} is a DTensor): its "
                "conversions replace layers and re-factor whole weights. Use DistributedDataParallel (supported) "
                "rather than fully_shard"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        _check_int("delay", delay, 0)
        _check_int("frequency", frequency, 1)
        _check_fraction("tau", tau, low_open=False)
        _check_fraction("min_rank_fraction", min_rank_fraction, low_open=False)
        _check_fraction("max_cut", max_cut, low_open=True)
        for flag_name, flag in (
            ("keep_first_layer", keep_first_layer),
            ("keep_last_layer", keep_last_layer),
            ("train_bases", train_bases),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be a bool, got {flag!r}")
        if state_transfer not in STATE_TRANSFERS:
            raise ValueError(f"state_transfer must be one of {STATE_TRANSFERS}, got {state_transfer!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if train_bases and not isinstance(optimizer, BucketedOptimizer):
            raise TypeError(
                f"train_bases=True puts U and V on the Stiefel manifold, which {type(optimizer).__name__} would step "
                "off it: use manifold_opt.RiemannianSGD or RiemannianAdam, or keep train_bases=False"
            )
        kinds = dict(DEFAULT_STATE_KINDS)
        for key, kind in dict(state_kinds or {}).items():
            if kind not in STATE_KINDS:
                raise ValueError(f"state_kinds[{key!r}] must be one of {STATE_KINDS}, got {kind!r}")
            kinds[key] = kind
        if isinstance(exclude, str):
            exclude = (exclude,)
        exclude = set(exclude)
        known = {name for name, _ in model.named_modules()}
        unknown = sorted(exclude - known)
        if unknown:
            raise ValueError(f"exclude names modules the model does not have: {unknown}; see model.named_modules()")

        self.model = model
        self.optimizer = optimizer
        self.delay = delay
        self.frequency = frequency
        self.tau = float(tau)
        self.keep_first_layer = keep_first_layer
        self.keep_last_layer = keep_last_layer
        self.min_rank_fraction = float(min_rank_fraction)
        self.max_cut = float(max_cut)
        self.state_transfer = state_transfer
        self.train_bases = train_bases
        self.state_kinds = kinds
        self.nonfinite = nonfinite
        self.process_group = process_group

        self._step = 0
        self.history: list[dict[str, Any]] = []
        self.eligibility: dict[str, str] = {}
        self._layers: dict[str, _Layer] = {}
        self._find_layers(exclude)
        if not self._layers:
            raise ValueError(
                "OIALR found no layer to factor: "
                + "; ".join(f"{name}: {reason}" for name, reason in self.eligibility.items())
                + " (eligible: nn.Linear/nn.Conv*d with min(m, d) > max(m, d)/10, trainable and in the optimizer)"
            )
        self.full_rank_parameters = _count_trainable(model)
        self._record()
        self._maybe_update()

    # ------------------------------------------------------------ eligibility
    def _find_layers(self, exclude: set[str]) -> None:
        module_uses = Counter(id(module) for _, module in self.model.named_modules(remove_duplicate=False))
        param_uses = Counter(id(param) for _, param in self.model.named_parameters(remove_duplicate=False))
        candidates = [
            (name, module)
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, *CONV_TYPES)) and not isinstance(module, LowRankLayer)
        ]
        for index, (name, module) in enumerate(candidates):
            weight = module.weight
            m, d = weight.shape[0], math.prod(weight.shape[1:])
            reason = "low-rank"
            if type(module) not in (nn.Linear, *CONV_TYPES):
                reason = f"subclass {type(module).__name__} of a Linear/Conv layer (its users may read .weight)"
            elif name in exclude:
                reason = "excluded by name"
            elif index == 0 and self.keep_first_layer:
                reason = "first layer (keep_first_layer=True)"
            elif index == len(candidates) - 1 and self.keep_last_layer:
                reason = "last layer (keep_last_layer=True)"
            elif not min(m, d) > max(m, d) / 10:
                reason = f"too thin: weight matrix {m}x{d} has min(m, d) <= max(m, d)/10"
            elif not weight.requires_grad:
                reason = "frozen weight (requires_grad=False)"
            elif manifold_of(weight) != Euclidean():
                reason = f"weight lies on {manifold_of(weight)!r}"
            elif module_uses[id(module)] > 1 or param_uses[id(weight)] > 1:
                reason = "module or weight shared with another part of the model"
            elif not contains(self.optimizer, weight):
                reason = "weight not in the optimizer"
            self.eligibility[name] = reason
            if reason != "low-rank":
                continue
            parent_name, _, attribute = name.rpartition(".")
            self._layers[name] = _Layer(
                name=name,
                parent=self.model.get_submodule(parent_name),
                attribute=attribute,
                dense=module,
                low_rank=None,
                shape=(m, d),
                min_rank=max(1, int(self.min_rank_fraction * min(m, d))),
            )

    # ---------------------------------------------------------------- queries
    @property
    def step_count(self) -> int:
        """How many times :meth:`step` has been called (restored by :meth:`load_state_dict`)."""
        return self._step

    @property
    def layers(self) -> dict[str, nn.Module]:
        """Qualified name -> the layer now in the model (dense or low-rank), for every eligible layer."""
        return {name: layer.module for name, layer in self._layers.items()}

    def ranks(self) -> dict[str, int]:
        """Qualified name -> current rank of every eligible layer (``min(m, d)`` while dense)."""
        return {name: layer.rank for name, layer in self._layers.items()}

    def trainable_fraction(self) -> float:
        """Trainable parameters of the model now over those of the full-rank model (at construction)."""
        return _count_trainable(self.model) / max(self.full_rank_parameters, 1)

    def _record(self) -> None:
        self.history.append(
            {"step": self._step, "ranks": self.ranks(), "trainable_fraction": self.trainable_fraction()}
        )

    # --------------------------------------------------------------- stepping
    def step(self) -> bool:
        """Advance the schedule by one optimizer step; call it right after ``optimizer.step()``.

        Returns:
            ``True`` when parameters were replaced or changed shape (rebuild a DDP wrapper or a
            compiled model then), else ``False``.
        """
        self._step += 1
        return self._maybe_update()

    def _maybe_update(self) -> bool:
        if self._step < self.delay or (self._step - self.delay) % self.frequency != 0:
            return False
        changed = self._convert(names=[n for n, layer in self._layers.items() if layer.low_rank is None])
        changed |= self._check(names=[n for n, layer in self._layers.items() if layer.low_rank is not None], cut=True)
        self._record()
        return changed

    @torch.no_grad()
    def rediagonalize(self, cut: bool = True) -> bool:
        """Run a check now on every low-rank layer: re-diagonalize Σ, rotate the bases and
        (with ``cut``) apply the rank rule. Without a cut the network's function is unchanged
        up to rounding. Returns ``True`` if a rank changed."""
        changed = self._check(names=[n for n, layer in self._layers.items() if layer.low_rank is not None], cut=cut)
        self._record()
        return changed

    def _nonfinite(self, name: str, what: str) -> None:
        message = f"OIALR: {what} of layer {name!r} is not finite (or its SVD failed)"
        if self.nonfinite == "raise":
            raise FloatingPointError(message + "; pass nonfinite='skip' to leave such layers unchanged instead")
        warnings.warn(message + ": layer left unchanged until the next check", RuntimeWarning, stacklevel=4)

    @torch.no_grad()
    def _convert(self, names: list[str]) -> bool:
        """Factor the dense layers ``names`` (thin SVD, broadcast from rank 0) and swap them in."""
        if not names:
            return False
        factors = []
        for name in names:
            matrix = weight_matrix(self._layers[name].dense.weight.detach())
            factors.append(_safe_svd(matrix))
        factors = self._broadcast(factors)
        changed = False
        for name, (u, s, v) in zip(names, factors):
            if not bool(torch.isfinite(s).all()):
                self._nonfinite(name, "the weight")
                continue
            self._swap_in(self._layers[name], u, s, v)
            changed = True
        return changed

    def _swap_in(self, layer: _Layer, u: Tensor, s: Tensor, v: Tensor) -> None:
        dense = layer.dense
        cls = LowRankLinear if isinstance(dense, nn.Linear) else LowRankConv
        low_rank = cls(dense, train_bases=self.train_bases, factors=(u, s, v))
        weight = dense.weight
        new_state = None
        old_state = self.optimizer.state.get(weight)
        if old_state and self.state_transfer == "rotate":
            new_state = transform_state(
                old_state,
                old_shape=tuple(weight.shape),
                left=u,
                right=v,
                kinds=self.state_kinds,
                name=f"{layer.name}.weight",
            )
        extra = (low_rank.u, low_rank.v) if self.train_bases else ()
        replace_parameter(self.optimizer, weight, low_rank.sigma, new_state, extra)
        setattr(layer.parent, layer.attribute, low_rank)
        layer.low_rank, layer.dense = low_rank, None

    @torch.no_grad()
    def _check(self, names: list[str], cut: bool) -> bool:
        if not names:
            return False
        decompositions = [_safe_svd(self._layers[name].low_rank.sigma.detach()) for name in names]
        decompositions = self._broadcast(decompositions)
        changed = False
        for name, (p, s, q) in zip(names, decompositions):
            layer = self._layers[name]
            if not bool(torch.isfinite(s).all()):
                self._nonfinite(name, "the core Σ")
                continue
            old_rank = layer.low_rank.rank
            new_rank = old_rank
            if cut:
                new_rank = oialr_rank(s, tau=self.tau, min_rank=layer.min_rank, max_cut=self.max_cut)
            self._rotate(layer, p[:, :new_rank], s[:new_rank], q[:, :new_rank])
            changed |= new_rank != old_rank
        return changed

    def _rotate(self, layer: _Layer, p: Tensor, s: Tensor, q: Tensor) -> None:
        r"""``U ← U P``, ``V ← V Q``, ``Σ ← diag(s)`` (``P, Q`` with ``k`` orthonormal columns), and
        the optimizer state of Σ (and of trainable bases) carried along."""
        low_rank = layer.low_rank
        rank, new_rank = low_rank.rank, p.shape[1]
        sigma = low_rank.sigma
        dtype = geometry_dtype(sigma.dtype)
        u = _keep_orthonormal(low_rank.u.detach().to(dtype) @ p.to(dtype))
        v = _keep_orthonormal(low_rank.v.detach().to(dtype) @ q.to(dtype))
        states = {}
        old = self.optimizer.state.get(sigma)
        if old:
            if self.state_transfer == "rotate":
                states[sigma] = transform_state(
                    old, old_shape=(rank, rank), left=p, right=q, kinds=self.state_kinds, name=f"{layer.name}.sigma"
                )
            else:
                states[sigma] = slice_state(old, old_shape=(rank, rank), rows=new_rank, cols=new_rank)
        if self.train_bases:
            for basis, rotation, label in ((low_rank.u, p, "u"), (low_rank.v, q, "v")):
                old = self.optimizer.state.get(basis)
                if old:
                    states[basis] = transform_state(
                        old,
                        old_shape=tuple(basis.shape),
                        left=None,
                        right=rotation,
                        kinds=self.state_kinds,
                        name=f"{layer.name}.{label}",
                    )
        replaced = dict(low_rank.set_factors(u, torch.diag(s), v))
        self._swap_parameters(replaced, states)

    def _swap_parameters(self, replaced: dict[Tensor, Tensor], states: dict[Tensor, dict[str, Any]]) -> None:
        """Put the replacement parameters in the optimizer and give every touched parameter its new state."""
        for old, new in replaced.items():
            replace_parameter(self.optimizer, old, new, states.pop(old, None))
        for param, state in states.items():
            self.optimizer.state[param] = state

    def _truncate(self, layer: _Layer, rank: int) -> None:
        """Cut a low-rank layer to ``rank`` without re-diagonalizing (used when restoring a checkpoint)."""
        low_rank = layer.low_rank
        u, sigma, v = low_rank.u.detach(), low_rank.sigma.detach(), low_rank.v.detach()
        for param in (low_rank.sigma, low_rank.u, low_rank.v):
            self.optimizer.state.pop(param, None)
        replaced = dict(low_rank.set_factors(u[:, :rank], sigma[:rank, :rank], v[:, :rank]))
        self._swap_parameters(replaced, {})

    # ------------------------------------------------------------ distributed
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def _broadcast(self, items: list[tuple[Tensor, ...]]) -> list[tuple[Tensor, ...]]:
        """Replace every rank's tensors by rank 0's (one collective for all of them)."""
        if not self._distributed() or not items:
            return items
        tensors = [t for item in items for t in item]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        source = 0 if self.process_group is None else dist.get_global_rank(self.process_group, 0)
        dist.broadcast(flat, src=source, group=self.process_group)
        pieces = torch.split(flat, [t.numel() for t in tensors])
        restored = [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, tensors)]
        sizes = [len(item) for item in items]
        out, start = [], 0
        for size in sizes:
            out.append(tuple(restored[start : start + size]))
            start += size
        return out

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state: step count, per-layer ranks (``None`` while dense), history and
        options. Plain Python values, so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "step": self._step,
            "ranks": {name: None if layer.low_rank is None else layer.rank for name, layer in self._layers.items()},
            "history": copy.deepcopy(self.history),
            "options": {
                "delay": self.delay,
                "frequency": self.frequency,
                "tau": self.tau,
                "min_rank_fraction": self.min_rank_fraction,
                "max_cut": self.max_cut,
                "state_transfer": self.state_transfer,
                "train_bases": self.train_bases,
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the schedule and reshape the model and the optimizer's param groups to the
        saved ranks. Call it on a fresh model + optimizer + OIALR **before**
        ``model.load_state_dict`` and ``optimizer.load_state_dict``:

        .. code-block:: python

            oialr.load_state_dict(checkpoint["oialr"])
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])

        Raises:
            ValueError: if the saved layers differ from this model's eligible layers, or a
                saved rank cannot be reached (a dense layer from a low-rank one, or a rank
                larger than the current one).
        """
        for key in ("step", "ranks", "history"):
            if key not in state_dict:
                raise ValueError(f"not an OIALR state dict: missing {key!r} (keys: {sorted(state_dict)})")
        saved = dict(state_dict["ranks"])
        if set(saved) != set(self._layers):
            raise ValueError(
                f"the checkpoint's low-rank layers {sorted(saved)} differ from this model's eligible layers "
                f"{sorted(self._layers)}: build the model and OIALR with the same options as when it was saved"
            )
        options = state_dict.get("options", {})
        if "train_bases" in options and options["train_bases"] != self.train_bases:
            raise ValueError(
                f"the checkpoint was saved with train_bases={options['train_bases']}, this OIALR has "
                f"train_bases={self.train_bases}: the parameter layout differs"
            )
        for name, rank in saved.items():
            layer = self._layers[name]
            if rank is None:
                if layer.low_rank is not None:
                    raise ValueError(
                        f"layer {name!r} is dense in the checkpoint but already low-rank here: load into a fresh "
                        "model and OIALR (a larger delay)"
                    )
                continue
            _check_int(f"ranks[{name!r}]", rank, 1)
            if layer.low_rank is None:
                matrix = weight_matrix(layer.dense.weight.detach())
                self._swap_in(layer, *thin_svd(matrix))
            if rank > layer.low_rank.rank:
                raise ValueError(
                    f"layer {name!r} has rank {rank} in the checkpoint but {layer.low_rank.rank} here; ranks only "
                    "decrease: load into a fresh model and OIALR"
                )
            if rank < layer.low_rank.rank:
                self._truncate(layer, rank)
        self._step = int(state_dict["step"])
        self.history = copy.deepcopy(list(state_dict["history"]))

    # -------------------------------------------------------------- inference
    def compact(self) -> nn.Module:
        """A copy of the model with every low-rank layer replaced by plain ``nn.Linear``/``nn.Conv*d``
        modules (two thin ones, or one dense one when that is smaller); see
        :func:`compact_model`. The training model is left untouched."""
        return compact_model(self.model)


def compact_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`LowRankLinear`/:class:`LowRankConv` replaced by its
    :meth:`~LowRankLinear.compact` form, for inference and export.

    Example:
        >>> import torch
        >>> from manifold_opt.lowrank import LowRankLinear, compact_model
        >>> model = torch.nn.Sequential(LowRankLinear(torch.nn.Linear(32, 32), rank=4))
        >>> compact_model(model)[0]
        Sequential(
          (0): Linear(in_features=32, out_features=4, bias=False)
          (1): Linear(in_features=4, out_features=32, bias=True)
        )
    """
    if isinstance(model, LowRankLayer):
        return model.compact()
    result = copy.deepcopy(model)
    targets = [(name, module) for name, module in result.named_modules() if isinstance(module, LowRankLayer)]
    for name, module in targets:
        parent_name, _, attribute = name.rpartition(".")
        setattr(result.get_submodule(parent_name), attribute, module.compact())
    return result


# ---------------------------------------------------------------- helpers
def _safe_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD, or NaN singular values when the matrix is not finite or the SVD fails."""
    if bool(torch.isfinite(matrix).all()):
        try:
            return thin_svd(matrix)
        except torch.linalg.LinAlgError:
            pass
    dtype = geometry_dtype(matrix.dtype)
    k = min(matrix.shape)
    eye = torch.eye(max(matrix.shape), dtype=dtype, device=matrix.device)
    nan = torch.full((k,), math.nan, dtype=dtype, device=matrix.device)
    return eye[: matrix.shape[0], :k], nan, eye[: matrix.shape[1], :k]


def _keep_orthonormal(basis: Tensor) -> Tensor:
    """Re-project a rotated basis onto the Stiefel manifold when rounding has moved it off."""
    if float(_STIEFEL.distance_to_manifold(basis)) > _STIEFEL.drift_tolerance(basis.dtype):
        return _STIEFEL.project(basis)
    return basis


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_fraction(name: str, value: Any, *, low_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
