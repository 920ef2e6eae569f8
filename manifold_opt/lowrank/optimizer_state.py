r"""Carrying an optimizer's parameters and state through a change of basis or rank.

A low-rank parameter :math:`X` (a weight ``W``, a core ``Σ`` or a basis ``U``) is replaced by
:math:`X' = L^\top X R` with ``L`` and ``R`` having orthonormal columns (``None`` stands for
the identity). A gradient transforms the same way, :math:`G' = L^\top G R` (the chain rule
for :math:`W = U\Sigma V^\top`), so each state tensor is mapped according to its kind:

* ``"linear"`` (first moments: ``momentum_buffer``, ``exp_avg``, ``grad_avg``):
  :math:`m' = L^\top m R`, exact: it is the state the optimizer would hold had it
  accumulated the transformed gradients [derived].
* ``"quadratic"`` (second moments: ``exp_avg_sq``, ``max_exp_avg_sq``, ``square_avg``, ``sum``):
  :math:`v' = (L\circ L)^\top v\,(R\circ R)`, the expected squares of the transformed
  gradient entries if the old entries are uncorrelated; it keeps ``v' >= 0`` and, for
  square ``L, R``, the total :math:`\sum v` [derived; an approximation: Adam's coordinate-wise
  second moment is not rotation equivariant].
* ``"reset"``: zeros of the new shape.

Scalars (step counts) and ``None`` entries are kept. A manifold's tracking state (keys
ending in ``_xtm``, e.g. Stiefel's :math:`X^\top m`; see
:meth:`~manifold_opt.manifolds.Manifold.momentum_step`) is dropped: the optimizer rebuilds it
from the data at the next step. A state tensor of any other shape, or of
the parameter's shape under an unknown key, raises a ``ValueError`` rather than being
guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..optim.tracking import TRACKING, TRACKING_AGE

STATE_KINDS = ("linear", "quadratic", "reset")

DEFAULT_STATE_KINDS: dict[str, str] = {
    "momentum_buffer": "linear",
    "exp_avg": "linear",
    "grad_avg": "linear",
    "exp_avg_sq": "quadratic",
    "max_exp_avg_sq": "quadratic",
    "square_avg": "quadratic",
    "sum": "quadratic",
}


def change_basis(value: Tensor, left: Tensor | None, right: Tensor | None, kind: str) -> Tensor:
    r"""Map a matrix-shaped state tensor to new coordinates.

    .. math::
        \text{linear: } L^\top m R, \qquad \text{quadratic: } (L\circ L)^\top v\,(R\circ R).

    Computed in the promoted dtype of ``value`` and the bases, returned in ``value``'s dtype.

    Shapes: ``value (a, b)``, ``left (a, a')``, ``right (b, b')`` -> ``(a', b')``.
    """
    out_shape = (
        value.shape[0] if left is None else left.shape[1],
        value.shape[1] if right is None else right.shape[1],
    )
    if kind == "reset":
        return value.new_zeros(out_shape)
    dtype = torch.promote_types(value.dtype, torch.float32)
    x = value.to(dtype)
    if kind == "quadratic":
        left = None if left is None else left.to(dtype).square()
        right = None if right is None else right.to(dtype).square()
    elif kind == "linear":
        left = None if left is None else left.to(dtype)
        right = None if right is None else right.to(dtype)
    else:
        raise ValueError(f"state kind must be one of {STATE_KINDS}, got {kind!r}")
    if left is not None:
        x = left.mT @ x
    if right is not None:
        x = x @ right
    return x.to(value.dtype).contiguous()


def without_tracking(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` without the manifold tracking states (and their ages), which a change of basis
    invalidates and the optimizer rebuilds."""
    return {k: v for k, v in state.items() if not (k.endswith(TRACKING) or k.endswith(TRACKING_AGE))}


def _find(optimizer: torch.optim.Optimizer, param: Tensor) -> tuple[dict[str, Any], int] | None:
    for group in optimizer.param_groups:
        for index, p in enumerate(group["params"]):
            if p is param:
                return group, index
    return None


def contains(optimizer: torch.optim.Optimizer, param: Tensor) -> bool:
    """Whether ``param`` is in one of the optimizer's param groups."""
    return _find(optimizer, param) is not None


def transform_state(
    state: Mapping[str, Any],
    *,
    old_shape: tuple[int, ...],
    left: Tensor | None,
    right: Tensor | None,
    kinds: Mapping[str, str],
    name: str,
) -> dict[str, Any]:
    """A new state dict with every parameter-shaped tensor mapped by :func:`change_basis`.

    Args:
        state: the optimizer's state of the old parameter.
        old_shape: the old parameter's shape (states of this shape are transformed; a
            shape ``(out, *rest)`` is read as the ``(out, prod(rest))`` matrix).
        left, right: the change of basis (``None``: identity).
        kinds: state key -> ``"linear"``, ``"quadratic"`` or ``"reset"``.
        name: the parameter's name, for error messages.

    Raises:
        ValueError: for a tensor of the parameter's shape under a key missing from ``kinds``,
            or a non-scalar tensor of another shape.
    """
    new_state: dict[str, Any] = {}
    for key, value in without_tracking(state).items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            new_state[key] = value
            continue
        if tuple(value.shape) != tuple(old_shape):
            raise ValueError(
                f"optimizer state {key!r} of {name} has shape {tuple(value.shape)}, neither a scalar nor the "
                f"parameter's shape {tuple(old_shape)}: OIALR cannot carry it through a change of rank; use an "
                "optimizer whose state is per-coordinate (SGD, Adam, AdamW, RiemannianSGD, RiemannianAdam)"
            )
        if key not in kinds:
            raise ValueError(
                f"unknown optimizer state {key!r} of {name}: OIALR does not know how to carry it through a change "
                f"of basis; pass state_kinds={{{key!r}: 'linear' | 'quadratic' | 'reset'}} (first moments are "
                "'linear', second moments 'quadratic')"
            )
        matrix = value.reshape(value.shape[0], -1)
        new_state[key] = change_basis(matrix, left, right, kinds[key])
    return new_state


def slice_state(state: Mapping[str, Any], *, old_shape: tuple[int, ...], rows: int, cols: int) -> dict[str, Any]:
    """A new state dict with every parameter-shaped tensor cut to its top-left ``rows × cols`` block
    (the official OIALR code's treatment of the optimizer state at a rank cut)."""
    new_state: dict[str, Any] = {}
    for key, value in without_tracking(state).items():
        if isinstance(value, Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(old_shape):
            value = value.reshape(value.shape[0], -1)[:rows, :cols].contiguous()
        new_state[key] = value
    return new_state


def replace_parameter(
    optimizer: torch.optim.Optimizer,
    old: Tensor,
    new: Tensor,
    new_state: dict[str, Any] | None,
    extra: tuple[Tensor, ...] = (),
) -> None:
    """Put ``new`` where ``old`` is in the optimizer's param groups, followed by ``extra``.

    The old parameter's state is dropped; ``new`` gets ``new_state`` (``None`` or empty: no
    state, so the optimizer initializes it on its next step). The ``extra`` parameters
    (e.g. trainable bases) join the same group with no state.

    Raises:
        ValueError: if ``old`` is not in the optimizer.
    """
    found = _find(optimizer, old)
    if found is None:
        raise ValueError(f"parameter of shape {tuple(old.shape)} is not in the optimizer's param groups")
    group, index = found
    group["params"][index : index + 1] = [new, *extra]
    optimizer.state.pop(old, None)
    for param in extra:
        optimizer.state.pop(param, None)
    if new_state:
        optimizer.state[new] = new_state
    else:
        optimizer.state.pop(new, None)
