"""Optimizers: the batched bucket path and the update rules built on it."""

from .adam import RiemannianAdam
from .base import BucketedOptimizer, manifold_of
from .muon import RiemannianMuon
from .psi_detection import declare_psi, find_psi_weights
from .psisgd import PSISGD
from .sgd import RiemannianSGD

__all__ = [
    "PSISGD",
    "BucketedOptimizer",
    "RiemannianAdam",
    "RiemannianMuon",
    "RiemannianSGD",
    "declare_psi",
    "find_psi_weights",
    "manifold_of",
]
