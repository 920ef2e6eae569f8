"""The one list of manifold cases every generic property runs on, and shape strategies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from manifold_opt import Euclidean, Sphere, Stiefel
from manifold_opt.manifolds import ConditionedSpectrum, Manifold
from manifold_opt.manifolds.psi import PSI


@dataclass(frozen=True)
class Case:
    """A manifold under test.

    ``order``: the retraction's order (1 or 2; 0 for the exponential map itself).
    ``exact``: the retraction lands on the manifold to working precision for any step
    (False for fixed iteration counts, which rely on the optimizers' drift check).
    ``complex``: points are complex (unitary matrices, the complex sphere).
    """

    id: str
    manifold: Manifold
    order: int
    exact: bool = True
    complex: bool = False

    def dtype(self, real: torch.dtype = torch.float64) -> torch.dtype:
        """The points' dtype at the precision of ``real``."""
        return {torch.float32: torch.complex64, torch.float64: torch.complex128}[real] if self.complex else real

    def __str__(self) -> str:
        return self.id


CASES = [
    Case("euclidean", Euclidean(), 2),
    Case("sphere", Sphere(), 2),
    Case("sphere-exp", Sphere(retraction="exp"), 0),
    Case("stiefel-qr", Stiefel(retraction="qr"), 1),
    Case("stiefel-polar", Stiefel(retraction="polar"), 2),
    Case("stiefel-cayley", Stiefel(retraction="cayley"), 1),
    Case("stiefel-cayley-2", Stiefel(retraction="cayley", iterations=2), 1, exact=False),
    Case("stiefel-newton", Stiefel(retraction="newton"), 2),
    Case("stiefel-newton-3", Stiefel(retraction="newton", iterations=3), 1, exact=False),
    Case("spectrum-kappa", ConditionedSpectrum(kappa=4.0), 0),  # a set with interior: order 0 = Exp inside
    Case("spectrum-band", ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0), 0),
    Case("spectrum-newton", ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0, retraction="newton"), 0, exact=False),
    Case("psi", PSI(), 1),
    Case("sphere-complex", Sphere(), 2, complex=True),
    Case("sphere-exp-complex", Sphere(retraction="exp"), 0, complex=True),
    Case("stiefel-qr-complex", Stiefel(retraction="qr"), 1, complex=True),
    Case("stiefel-polar-complex", Stiefel(retraction="polar"), 2, complex=True),
    Case("stiefel-cayley-complex", Stiefel(retraction="cayley"), 1, complex=True),
    Case("stiefel-cayley-2-complex", Stiefel(retraction="cayley", iterations=2), 1, exact=False, complex=True),
    Case("stiefel-newton-complex", Stiefel(retraction="newton"), 2, complex=True),
    Case("stiefel-newton-3-complex", Stiefel(retraction="newton", iterations=3), 1, exact=False, complex=True),
]
CURVED = [case for case in CASES if case.id != "euclidean"]
WITH_ORDER = [case for case in CURVED if case.order > 0]
EXACT = [case for case in CASES if case.exact]


def point_shapes(manifold: Manifold) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes of one point: tall, wide and square matrices for Stiefel."""
    if isinstance(manifold, (Stiefel, ConditionedSpectrum)):
        return st.tuples(st.integers(1, 7), st.integers(1, 7))
    if manifold.point_ndim == 1:  # Sphere, PSI: vectors of at least 2 coordinates
        return st.tuples(st.integers(2, 9))
    return st.just(())


def shapes(manifold: Manifold, max_batch_dims: int = 2) -> st.SearchStrategy[tuple[int, ...]]:
    """Points-layout shapes: up to ``max_batch_dims`` batch dimensions, then one point."""
    batch = st.lists(st.integers(1, 3), min_size=0, max_size=max_batch_dims).map(tuple)
    return st.tuples(batch, point_shapes(manifold)).map(lambda pair: pair[0] + pair[1])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**31 - 1)
