"""ManifoldParameter: an ``nn.Parameter`` that says which manifold it lives on."""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

from .manifolds import Euclidean, GeooptManifold, Manifold, from_geoopt, is_geoopt_manifold


class ManifoldParameter(torch.nn.Parameter):
    """A ``torch.nn.Parameter`` that carries ``.manifold`` and nothing else.

    The data is projected onto the manifold at construction. Operations on it return
    plain tensors (as for ``nn.Parameter``) and the optimizers read ``.manifold`` to pick
    the geometry; a ``state_dict`` holds plain tensors, so a checkpoint loads into the
    same model built again (the manifold stays on the parameter) or into a plain model.
    It survives ``copy.deepcopy`` and pickling (with any attribute set on it, as
    ``nn.Parameter``), ``module.to(...)``, ``torch.load(..., weights_only=True)`` (the class
    is registered as a safe global) and ``module.load_state_dict(...)``, also with
    ``assign=True`` and with torch's swap-tensors loading
    (``torch.__future__.set_swap_module_params_on_conversion(True)``). Values that
    ``load_state_dict`` brings in are kept as they are when they lie on the manifold (to
    :func:`load_tolerance`, so a checkpoint resumes bit for bit); values farther off are
    projected onto it with a warning naming the shape. Other writes (``param.copy_(...)``,
    ``param.data = ...``) are the user's: :func:`~manifold_opt.checks.manifold_residuals`
    tells how far off each parameter is.
    Should anything else replace it by a plain ``nn.Parameter``, the next optimizer step
    raises rather than step it without its manifold.

    A geoopt manifold is accepted too (the optimizers step it as geoopt does), and its data is
    projected at construction as well: by this package's batched projection for the geoopt
    manifolds that map onto a native one (``Euclidean``, ``Sphere``, ``SphereExact``,
    ``EuclideanStiefel``), by the manifold's own ``projx`` for the others. geoopt's names
    work: ``ManifoldParameter(data, manifold=...)``, ``proj_()``, and without ``manifold``
    the one ``data`` carries (a ``ManifoldParameter``'s, geoopt's ``ManifoldTensor``'s, or
    that of a point drawn by ``manifold.random(...)``).

    Args:
        data: initial value, in the parameter layout (e.g. a conv kernel).
        manifold: a :class:`~manifold_opt.manifolds.Manifold` or a geoopt manifold (default:
            the ``.manifold`` that ``data`` carries, else :class:`Euclidean`).
        requires_grad: as for ``nn.Parameter``.

    Raises:
        ValueError: if the shape cannot lie on the manifold, the data is not finite, or it
            has no nearest point on it (e.g. an all-zero point of a sphere).

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
            carried = getattr(data, "manifold", None)
            manifold = carried if isinstance(carried, Manifold) or is_geoopt_manifold(carried) else Euclidean()
        check_manifold_argument(manifold, "manifold")
        if data is None:
            data = torch.empty(0)
        with torch.no_grad():
            data = torch.as_tensor(data).detach()
            if isinstance(manifold, Manifold):
                data = _project_checked(data, manifold)
            elif data.numel() > 0:
                data = _project_geoopt(data, manifold)
        instance = torch.Tensor._make_subclass(cls, data, requires_grad)
        instance.manifold = manifold
        return instance

    def __deepcopy__(self, memo: dict[int, Any]) -> ManifoldParameter:
        if id(self) in memo:
            return memo[id(self)]
        data = self.data.clone(memory_format=torch.preserve_format)
        result = _rebuild_manifold_parameter(data, self.manifold, self.requires_grad)
        memo[id(self)] = result
        for key, value in self.__dict__.items():
            if key != "manifold":
                setattr(result, key, copy.deepcopy(value, memo))
        return result

    def __reduce_ex__(self, protocol: int) -> tuple:
        extra = {key: value for key, value in self.__dict__.items() if key != "manifold"}
        return (_rebuild_manifold_parameter, (self.data, self.manifold, self.requires_grad, extra))

    # torch's swap-tensors conversions (Module._apply) wrap ``fn(param)`` in nn.Parameter, which
    # for a subclass calls ``detach()`` and wants the same type back: inside those calls, and
    # only there, conversions and detach return a ManifoldParameter on the same manifold
    def detach(self) -> Tensor:
        out = torch.Tensor.detach(self)
        return self._keep_manifold(out) if _called_from(_PARAMETER_NEW, 1) else out

    def to(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.to(self, *args, **kwargs))

    def cuda(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.cuda(self, *args, **kwargs))

    def cpu(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.cpu(self, *args, **kwargs))

    def float(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.float(self, *args, **kwargs))

    def double(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.double(self, *args, **kwargs))

    def half(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.half(self, *args, **kwargs))

    def bfloat16(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._converted(torch.Tensor.bfloat16(self, *args, **kwargs))

    def _converted(self, out: Tensor) -> Tensor:
        if out is self or isinstance(out, ManifoldParameter) or not _called_from(_MODULE_APPLY, 2):
            return out
        return self._keep_manifold(out)

    def _keep_manifold(self, data: Tensor) -> ManifoldParameter:
        extra = {key: value for key, value in self.__dict__.items() if key != "manifold"}
        return _rebuild_manifold_parameter(data, self.manifold, data.requires_grad, extra)

    def module_load(self, other: Tensor, assign: bool = False) -> ManifoldParameter:
        """``load_state_dict`` under swap-tensors loading: a ManifoldParameter on the same
        manifold holding ``other``'s values (``assign=True``: ``other``'s tensor itself)."""
        with torch.no_grad():
            data = other.detach() if assign else torch.Tensor.detach(self).clone().copy_(other)
            data = _onto_manifold_when_loaded(data, self.manifold)
        extra = {key: value for key, value in self.__dict__.items() if key != "manifold"}
        return _rebuild_manifold_parameter(data, self.manifold, self.requires_grad, extra)

    def copy_(self, src: Tensor, non_blocking: bool = False) -> Tensor:
        out = torch.Tensor.copy_(self, src, non_blocking)
        if _called_from(_LOAD_FROM_STATE_DICT, 1, depth=1):  # load_state_dict's default path
            with torch.no_grad():
                projected = _onto_manifold_when_loaded(torch.Tensor.detach(self), self.manifold)
                if projected is not None and projected.data_ptr() != self.data_ptr():
                    torch.Tensor.copy_(self, projected)
        return out

    def proj_(self) -> ManifoldParameter:
        """geoopt's ``proj_``: project the data onto the manifold in place (in the parameter
        layout, as the constructor does) and return the parameter itself."""
        with torch.no_grad():
            data = torch.Tensor.detach(self)
            if isinstance(self.manifold, Manifold):
                projected = _project_checked(data, self.manifold)
            else:
                projected = _project_geoopt(data, self.manifold) if data.numel() > 0 else data
            if projected.data_ptr() != data.data_ptr():
                torch.Tensor.copy_(self, projected)
        return self

    def __repr__(self) -> str:
        return f"ManifoldParameter on {self.manifold!r} containing:\n{torch.Tensor.__repr__(self.data)}"


def check_manifold_argument(manifold: Any, what: str) -> None:
    """Raise a TypeError unless ``manifold`` is a manifold instance (ours or geoopt's); a
    class given for an instance is asked about ("did you mean Stiefel()?")."""
    if isinstance(manifold, type) and _is_manifold_class(manifold):
        raise TypeError(
            f"{what} must be a manifold instance, got the class {manifold.__name__}: "
            f"did you mean {manifold.__name__}()?"
        )
    if not isinstance(manifold, Manifold) and not is_geoopt_manifold(manifold):
        raise TypeError(
            f"{what} must be a manifold_opt.manifolds.Manifold (or a geoopt manifold), got {type(manifold).__name__}"
        )


def _is_manifold_class(cls: type) -> bool:
    return any(base is Manifold or base.__module__.startswith("geoopt.") for base in cls.__mro__)


def _project_checked(data: Tensor, manifold: Manifold) -> Tensor:
    """Project ``data`` onto ``manifold`` or raise a ValueError that says why it cannot."""
    if data.is_complex() and not manifold.supports_complex:
        raise TypeError(
            f"{manifold!r} holds real points only, got complex data of shape {tuple(data.shape)} ({data.dtype}): "
            "Stiefel and Sphere take complex parameters; for others put torch.view_as_real(...) of it on the manifold"
        )
    if not (data.is_floating_point() or data.is_complex()):
        raise ValueError(f"a ManifoldParameter needs floating-point or complex data, got dtype {data.dtype}")
    manifold.point_shape(data.shape)  # raises a ValueError naming the shape
    if data.numel() == 0:
        return data
    if not bool(torch.isfinite(data).all()):
        raise ValueError(
            f"data of shape {tuple(data.shape)} for a ManifoldParameter on {manifold!r} has NaN or Inf entries: "
            "initialize it with finite values (e.g. a random full-rank tensor)"
        )
    geometry_dtype = torch.promote_types(data.dtype, torch.float32)
    projected = manifold.project_parameter(data.to(geometry_dtype))
    residual = float(manifold.parameter_distance(projected))
    if not residual <= 1e-3:
        raise ValueError(
            f"data of shape {tuple(data.shape)} has no nearest point on {manifold!r} (residual {residual:.3g} after "
            f"projection); it is zero, rank-deficient or not finite: initialize it with a random full-rank tensor"
        )
    return projected.to(data.dtype)


def _project_geoopt(data: Tensor, manifold: Any) -> Tensor:
    """``data`` projected onto a geoopt manifold: by the native manifold it maps onto (checked as
    :func:`_project_checked` does), else by geoopt's ``projx``."""
    native = from_geoopt(manifold, data.dim())
    if not isinstance(native, GeooptManifold):
        return _project_checked(data, native)
    if not (data.is_floating_point() or data.is_complex()):
        raise ValueError(f"a ManifoldParameter needs floating-point or complex data, got dtype {data.dtype}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError(
            f"data of shape {tuple(data.shape)} for a ManifoldParameter on {manifold!r} has NaN or Inf entries"
        )
    return torch.as_tensor(manifold.projx(data)).detach().to(data.dtype)


def load_tolerance(dtype: torch.dtype) -> float:
    """Distance to its manifold below which a loaded value is kept as it is: ``1e-5``, or
    ``64 eps`` in half precision (whose rounding alone moves a point that far)."""
    return max(1e-5, 64 * torch.finfo(dtype).eps)


def _onto_manifold_when_loaded(
    data: Tensor, manifold: Any, quiet: bool = False, what: str = "load_state_dict"
) -> Tensor:
    """``data`` itself when it lies on ``manifold`` (to :func:`load_tolerance`), else its
    projection, with a warning unless ``quiet``; non-finite values raise."""
    if not isinstance(manifold, Manifold) or data.numel() == 0 or not (data.is_floating_point() or data.is_complex()):
        return data
    if not bool(torch.isfinite(data).all()):
        raise ValueError(
            f"{what}: the value for a parameter of shape {tuple(data.shape)} on {manifold!r} has NaN or Inf entries"
        )
    distance = float(manifold.parameter_distance(data.to(torch.promote_types(data.dtype, torch.float32))))
    if distance <= load_tolerance(data.dtype):
        return data
    if quiet:
        return _project_checked(data, manifold)
    warnings.warn(
        f"load_state_dict: the value for a ManifoldParameter of shape {tuple(data.shape)} lies {distance:.3g} off "
        f"{manifold!r}; it was projected onto the manifold",
        stacklevel=4,
    )
    return _project_checked(data, manifold)


def _rebuild_manifold_parameter(
    data: Tensor, manifold: Manifold, requires_grad: bool, extra: dict[str, Any] | None = None
) -> ManifoldParameter:
    """Unpickling hook: rebuild without projecting again (the data is already on the manifold),
    with the attributes ``extra`` a user set on the parameter."""
    instance = torch.Tensor._make_subclass(ManifoldParameter, data, requires_grad)
    instance.manifold = manifold
    for key, value in (extra or {}).items():
        setattr(instance, key, value)
    return instance


def _keep_manifold_on_assign(module: torch.nn.Module, name: str, param: Tensor | None) -> Tensor | None:
    """Global parameter-registration hook: ``load_state_dict(..., assign=True)`` replaces each
    parameter by an ``nn.Parameter`` of the loaded tensor; where the replaced one was a
    ManifoldParameter, the new one is a ManifoldParameter on the same manifold."""
    old = module._parameters.get(name)
    if not isinstance(old, ManifoldParameter) or param is None or isinstance(param, ManifoldParameter):
        return None
    if type(param) is not torch.nn.Parameter or not _inside_load_from_state_dict():
        return None
    extra = {key: value for key, value in old.__dict__.items() if key != "manifold"}
    with torch.no_grad():
        data = _onto_manifold_when_loaded(param.detach(), old.manifold)
    return _rebuild_manifold_parameter(data, old.manifold, param.requires_grad, extra)


def _inside_load_from_state_dict() -> bool:
    return _called_from(_LOAD_FROM_STATE_DICT, 2, depth=8)


def _called_from(code: Any, skip: int, depth: int = 3) -> bool:
    """Whether one of the ``depth`` frames above the caller's ``skip``-th runs ``code``."""
    frame = sys._getframe(skip + 1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


_LOAD_FROM_STATE_DICT = torch.nn.Module._load_from_state_dict.__code__
_MODULE_APPLY = torch.nn.Module._apply.__code__
_PARAMETER_NEW = torch.nn.Parameter.__new__.__code__
torch.nn.modules.module.register_module_parameter_registration_hook(_keep_manifold_on_assign)
