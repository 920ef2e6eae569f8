"""Optimizers: the batched bucket path and the update rules built on it."""

from .adam import RiemannianAdam
from .base import BucketedOptimizer, manifold_of
from .sgd import RiemannianSGD

__all__ = ["BucketedOptimizer", "RiemannianAdam", "RiemannianSGD", "manifold_of"]
