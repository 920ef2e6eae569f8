"""Points off the manifold: when a step first projects a parameter's points.

A bucket's first step (first ever, after ``add_param_group``, after ``load_state_dict``) and
a step after something wrote into a parameter project the points that are off the manifold
before stepping (``BucketedOptimizer._onto_manifold``); this module holds the bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..manifolds import Euclidean, GeooptManifold, Manifold

# Set in the state of a manifold parameter by every committed step: the parameter's version
# counter after the step wrote it (torch counts every in-place write to a tensor and its
# views; host metadata, no device read). A step whose parameters lack it (before their first
# step, after ``add_param_group``: no state yet; after ``load_state_dict``: it is never saved)
# or carry another count (something wrote into them since: ``copy_`` under ``no_grad``, a
# module's ``load_state_dict``) first projects the points that are off the manifold (see
# ``BucketedOptimizer._onto_manifold``). Writes through ``.data`` (``p.data = t``,
# ``p.data.mul_(2)``) are not counted. Under torch.compile it is ``True`` and only its
# absence counts.
PROJECTED = "points_projected"


def needs_projection(params: list[Tensor], states: list[dict[str, Any]]) -> bool:
    """Whether a bucket's step starts by projecting its points (see ``PROJECTED``)."""
    if torch.compiler.is_compiling():
        return not all(PROJECTED in state for state in states)
    with torch._C.DisableTorchFunctionSubclass():  # a subclass's __torch_function__ costs 0.2 us per read
        return any(state.get(PROJECTED) != p._version for p, state in zip(params, states))


def mark_written(params: list[Tensor], states: list[dict[str, Any]]) -> None:
    if torch.compiler.is_compiling():
        for state in states:
            state[PROJECTED] = True
        return
    with torch._C.DisableTorchFunctionSubclass():
        for param, state in zip(params, states):
            state[PROJECTED] = param._version


def projects_points(manifold: Manifold) -> bool:
    """Whether a bucket's first step projects its points (see ``BucketedOptimizer._onto_manifold``):
    every manifold of the package but Euclidean; geoopt's other manifolds are stepped as
    geoopt steps them."""
    return not isinstance(manifold, (Euclidean, GeooptManifold))
