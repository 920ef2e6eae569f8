"""ManifoldParameter: an ``nn.Parameter`` that says which manifold it lives on."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .manifolds import Euclidean, Manifold, is_geoopt_manifold


class ManifoldParameter(torch.nn.Parameter):
    """A ``torch.nn.Parameter`` that carries ``.manifold`` and nothing else.

    The data is projected onto the manifold at construction. Operations on it return
    plain tensors (as for ``nn.Parameter``) and the optimizers read ``.manifold`` to pick
    the geometry; a ``state_dict`` holds plain tensors, so a checkpoint loads into the
    same model built again (the manifold stays on the parameter) or into a plain model.
    It survives ``copy.deepcopy``, pickling, ``module.to(...)`` and
    ``torch.load(..., weights_only=True)`` (the class is registered as a safe global).

    Args:
        data: initial value, in the parameter layout (e.g. a conv kernel).
        manifold: a :class:`~manifold_opt.manifolds.Manifold` (default :class:`Euclidean`).
        requires_grad: as for ``nn.Parameter``.

    Raises:
        ValueError: if the shape cannot lie on the manifold, or the data has no nearest
            point on it (e.g. an all-zero point of a sphere).

    Example:
        >>> import torch
        >>> from manifold_opt import ManifoldParameter, Stiefel
        >>> layer = torch.nn.Linear(8, 4)
        >>> layer.weight = ManifoldParameter(layer.weight, Stiefel())
        >>> w = layer.weight.detach()
        >>> torch.allclose(w @ w.T, torch.eye(4), atol=1e-6)
        True
    """

    manifold: Manifold

    def __new__(
        cls, data: Tensor | None = None, manifold: Manifold | None = None, requires_grad: bool = True
    ) -> ManifoldParameter:
        if manifold is None:
            manifold = Euclidean()
        if not isinstance(manifold, Manifold) and not is_geoopt_manifold(manifold):
            raise TypeError(
                "manifold must be a manifold_opt.manifolds.Manifold (or a geoopt manifold), "
                f"got {type(manifold).__name__}"
            )
        if data is None:
            data = torch.empty(0)
        with torch.no_grad():
            data = torch.as_tensor(data).detach()
            if isinstance(manifold, Manifold):
                data = _project_checked(data, manifold)
        instance = torch.Tensor._make_subclass(cls, data, requires_grad)
        instance.manifold = manifold
        return instance

    def __deepcopy__(self, memo: dict[int, Any]) -> ManifoldParameter:
        if id(self) in memo:
            return memo[id(self)]
        result = _rebuild_manifold_parameter(
            self.data.clone(memory_format=torch.preserve_format), self.manifold, self.requires_grad
        )
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, protocol: int) -> tuple:
        return (_rebuild_manifold_parameter, (self.data, self.manifold, self.requires_grad))

    def __repr__(self) -> str:
        return f"ManifoldParameter on {self.manifold!r} containing:\n{torch.Tensor.__repr__(self.data)}"


def _project_checked(data: Tensor, manifold: Manifold) -> Tensor:
    """Project ``data`` onto ``manifold`` or raise a ValueError that says why it cannot."""
    if not data.is_floating_point():
        raise ValueError(f"a ManifoldParameter needs floating-point data, got dtype {data.dtype}")
    manifold.point_shape(data.shape)  # raises a ValueError naming the shape
    if data.numel() == 0:
        return data
    geometry_dtype = torch.promote_types(data.dtype, torch.float32)
    projected = manifold.project_parameter(data.to(geometry_dtype))
    residual = float(manifold.parameter_distance(projected))
    if not residual <= 1e-3:
        raise ValueError(
            f"data of shape {tuple(data.shape)} has no nearest point on {manifold!r} (residual {residual:.3g} after "
            f"projection); it is zero, rank-deficient or not finite: initialize it with a random full-rank tensor"
        )
    return projected.to(data.dtype)


def _rebuild_manifold_parameter(data: Tensor, manifold: Manifold, requires_grad: bool) -> ManifoldParameter:
    """Unpickling hook: rebuild without projecting again (the data is already on the manifold)."""
    instance = torch.Tensor._make_subclass(ManifoldParameter, data, requires_grad)
    instance.manifold = manifold
    return instance
