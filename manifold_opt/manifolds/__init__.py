"""Geometry: manifolds with projections, retractions, transports and metrics.

Nothing here knows about optimizers.
"""

from .base import EmbeddedManifold, Manifold
from .euclidean import Euclidean
from .geoopt_adapter import GeooptManifold, from_geoopt, is_geoopt_manifold
from .psi import PSI
from .spectrum import ConditionedSpectrum
from .sphere import Sphere
from .stiefel import Stiefel

__all__ = [
    "PSI",
    "ConditionedSpectrum",
    "EmbeddedManifold",
    "Euclidean",
    "GeooptManifold",
    "Manifold",
    "Sphere",
    "Stiefel",
    "from_geoopt",
    "is_geoopt_manifold",
]
