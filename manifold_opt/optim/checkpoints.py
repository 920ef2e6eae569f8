"""Checkpoints of the bucketed optimizers: ``state_dict``, ``load_state_dict``, pickling.

Per-parameter state is ``torch.optim``'s (parameter layout), so checkpoints are those of
``torch.optim``; a param group's ``"manifold"`` is saved as plain data, and every loaded state
tensor is checked against its parameter before anything is loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..manifolds import Euclidean, Manifold
from ..manifolds.base import manifold_from_spec, manifold_spec
from ..manifolds.linalg import real_dtype
from .buckets import geometry_dtype
from .projection import PROJECTED
from .tracking import TRACKING


class Checkpoints(torch.optim.Optimizer):
    """``torch.optim.Optimizer``'s checkpoint methods for :class:`~manifold_opt.optim.base.BucketedOptimizer`
    (a base class of it). Subclasses provide ``_manifold(group, param)`` and
    ``_rebuild_caches()``."""

    # caches rebuilt on demand; torch.optim's hooks are not pickled (as in torch.optim)
    _NOT_PICKLED: ClassVar[tuple[str, ...]] = ()  # rebuilt by _rebuild_caches after unpickling

    def __getstate__(self) -> dict[str, Any]:
        """Everything but caches and hooks, so that ``copy.deepcopy`` and pickling keep every
        attribute (``nonfinite``, the counters, subclass settings), as torch's tests require."""
        return {
            key: value
            for key, value in self.__dict__.items()
            if key not in self._NOT_PICKLED and not (key.startswith("_optimizer_") and key.endswith("_hooks"))
        }

    # hyperparameters added after a group's keys were first saved: what an older checkpoint
    # without them meant (as torch.optim's __setstate__ does)
    _GROUP_KEYS_OF_OLDER_CHECKPOINTS: ClassVar[dict[str, Any]] = {
        "maximize": False,
        "foreach": None,
        "fused": None,
        "differentiable": False,
        "amsgrad": False,
        "nesterov": False,
        "capturable": False,
        "stabilize": None,
    }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._GROUP_KEYS_OF_OLDER_CHECKPOINTS.items():
                if key in self.defaults:
                    group.setdefault(key, value)
            for param in group["params"]:  # steps saved as Python numbers (old torch.optim)
                state = self.state.get(param)
                if state and "step" in state and not isinstance(state["step"], Tensor):
                    state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=param.device)
        self._rebuild_caches()

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``; a group's ``"manifold"`` is saved as plain data (a dict naming
        the class and its fields), so the checkpoint loads with ``weights_only=True``."""
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {k: v for k, v in state.items() if k != PROJECTED} if PROJECTED in state else state
            for index, state in state_dict["state"].items()
        }
        for group in state_dict["param_groups"]:
            if isinstance(group.get("manifold"), Manifold):
                group["manifold"] = manifold_spec(group["manifold"])
        return state_dict

    def _manifold(self, group: dict[str, Any], param: Tensor) -> Manifold:
        raise NotImplementedError

    def _rebuild_caches(self) -> None:
        """Recreate what ``__getstate__`` leaves out (``_NOT_PICKLED``) and attributes that
        older pickles lack."""

    def _manifolds_from_checkpoint(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with each group's manifold as a Manifold: the saved one (from its
        plain-data form), or this optimizer's where the checkpoint declares none."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return state_dict  # torch's own error follows
        groups = []
        for index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            saved = dict(saved)
            ours, theirs = group.get("manifold"), saved.get("manifold")
            if isinstance(theirs, dict):
                theirs = manifold_from_spec(theirs)
            if theirs is None and ours is not None:
                theirs = ours
            elif ours is not None and theirs != ours:
                raise ValueError(
                    f"load_state_dict: param group {index} declares {ours!r} but the checkpoint declares {theirs!r}; "
                    "nothing was loaded"
                )
            if theirs is not None:
                saved["manifold"] = theirs
            groups.append(saved)
        return {**state_dict, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, with every state tensor checked against
        its parameter first (a checkpoint of another model raises a ValueError naming the
        parameter, and nothing is loaded). Floating-point state is cast as torch does, to the
        parameter's dtype, except that half-precision manifold parameters keep float32
        state (their geometry dtype); step counts stay where this optimizer keeps them."""
        state_dict = self._manifolds_from_checkpoint(state_dict)
        groups = self.param_groups
        saved_groups = state_dict.get("param_groups", [])
        if len(groups) == len(saved_groups):  # else torch's own error below
            for group, saved in zip(groups, saved_groups):
                for index, param in zip(saved["params"], group["params"]):
                    for key, value in state_dict["state"].get(index, {}).items():
                        if isinstance(value, Tensor):
                            self._check_loaded_state(saved, param, index, key, value)
        super().load_state_dict(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            for index, param in zip(saved["params"], group["params"]):
                self._cast_loaded_state(group, param, state_dict["state"].get(index, {}))

    def _cast_loaded_state(self, group: dict[str, Any], param: Tensor, saved: dict[str, Any]) -> None:
        manifold = self._manifold(group, param)
        dtype = geometry_dtype(manifold, param.dtype)
        state = self.state[param]
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                continue
            if key != "step" and value.is_floating_point():  # real state of a complex point stays real
                state[key] = value.to(device=param.device, dtype=real_dtype(dtype), copy=True)
            elif key != "step" and value.is_complex() and not isinstance(manifold, Euclidean):
                state[key] = value.to(device=param.device, dtype=dtype, copy=True)
            elif state.get(key) is value:  # a loaded state_dict is never written by later steps
                state[key] = value.clone()

    def _check_loaded_state(self, group: dict[str, Any], param: Tensor, index: Any, key: str, value: Tensor) -> None:
        """Raise a ValueError unless ``value`` can be ``state[key]`` of ``param`` (in ``group``)."""
        manifold = self._manifold(group, param)
        batch = tuple(param.shape) if isinstance(manifold, Euclidean) else manifold.batch_shape(param.shape)
        expected: tuple[int, ...] | None = None
        if key in ("momentum_buffer", "exp_avg"):
            expected = tuple(param.shape)
        elif key in ("exp_avg_sq", "max_exp_avg_sq"):
            expected = tuple(param.shape) if manifold.second_moment_layout == "tangent" else batch
        elif key == "step":
            expected = ()
        shape = tuple(value.shape)
        if key.endswith(TRACKING):  # (*batch, p, p)
            fits = shape[: len(batch)] == batch and len(shape) == len(batch) + 2 and shape[-1] == shape[-2]
        else:
            fits = expected is None or shape == expected or (key == "step" and value.numel() == 1)
        per_entry = key in ("exp_avg_sq", "max_exp_avg_sq") and expected == batch and shape == tuple(param.shape)
        if not fits and per_entry:
            raise ValueError(
                f"load_state_dict: state {key!r} of saved parameter {index} has shape {shape}, one second moment "
                f"per entry (as torch.optim.Adam keeps it), but {type(self).__name__} keeps one per point of "
                f"{manifold!r} for this parameter of shape {tuple(param.shape)} (expected shape {batch}): the "
                "checkpoint was saved by a coordinate-wise Adam. To start from it, pass "
                "load_state_dict(state_dict, second_moments='sum'), which sums each point's entries (the squared "
                "norm of the Euclidean gradient's running average); nothing was loaded"
            )
        if not fits:
            raise ValueError(
                f"load_state_dict: state {key!r} of saved parameter {index} has shape {shape}, but the parameter "
                f"it loads into has shape {tuple(param.shape)} on {manifold!r} (expected "
                f"{expected if expected is not None else 'a matching shape'}): the state_dict was saved for "
                "another model or another order of parameters; nothing was loaded"
            )
