"""Drift: thousands of float32 steps stay at float32 rounding level on the Stiefel manifold."""

from __future__ import annotations

import pytest
import torch

from manifold_opt import ManifoldParameter, RiemannianSGD, Stiefel

STEPS = 2000
# (retraction, iterations, re-projections allowed): exact retractions never need one
# (nor take one: they do not drift); fixed iteration counts lean on the drift check.
RETRACTIONS = [
    ("qr", None, 0),
    ("polar", None, 0),
    ("newton", None, 0),
    ("cayley", None, 0),
    ("cayley", 2, STEPS),
    ("newton", 2, STEPS),
]


@pytest.mark.parametrize(("retraction", "iterations", "allowed"), RETRACTIONS, ids=lambda v: str(v))
def test_float32_training_stays_on_stiefel(retraction: str, iterations: int | None, allowed: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, p = 32, 8
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    a = q @ torch.diag(torch.linspace(0.1, 1.0, n)) @ q.T
    stiefel = Stiefel(retraction=retraction, iterations=iterations)
    w = ManifoldParameter(torch.randn(n, p, generator=gen), stiefel)
    opt = RiemannianSGD([w], lr=0.5, momentum=0.9)
    worst = 0.0
    for _ in range(STEPS):
        opt.zero_grad()
        noise = torch.randn(n, p, generator=gen)
        (-(w * (a @ w)).sum() + 0.1 * (noise * w).sum()).backward()
        opt.step()
        worst = max(worst, float(stiefel.distance_to_manifold(w.detach())))
    assert worst < 3e-6  # max |X^T X - I| at float32 rounding level (eps = 1.2e-7)
    assert opt.reprojected_points <= allowed
