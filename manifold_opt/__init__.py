"""manifold_opt: optimizers on Riemannian manifolds for PyTorch."""

import torch as _torch

from . import nn
from .manifolds import ConditionedSpectrum, Euclidean, Manifold, Sphere, Stiefel
from .manifolds.psi import PSI
from .optim import PSISGD, RiemannianAdam, RiemannianMuon, RiemannianSGD, declare_psi
from .parameter import ManifoldParameter, _rebuild_manifold_parameter

__version__ = "0.1.0"

# Checkpoints that pickle ManifoldParameters (e.g. state_dict(keep_vars=True) or a whole
# module) load with torch.load(..., weights_only=True).
_torch.serialization.add_safe_globals(
    [ManifoldParameter, _rebuild_manifold_parameter, Euclidean, Sphere, Stiefel, PSI, ConditionedSpectrum]
)

__all__ = [
    "PSI",
    "PSISGD",
    "ConditionedSpectrum",
    "Euclidean",
    "Manifold",
    "ManifoldParameter",
    "RiemannianAdam",
    "RiemannianMuon",
    "RiemannianSGD",
    "Sphere",
    "Stiefel",
    "__version__",
    "declare_psi",
    "nn",
]
