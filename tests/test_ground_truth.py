"""Problems with known optima, for every retraction."""

from __future__ import annotations

import pytest
import torch

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel

F64 = torch.float64
STIEFEL_CASES = [
    Stiefel(retraction="qr"),
    Stiefel(retraction="polar"),
    Stiefel(retraction="cayley"),
    Stiefel(retraction="newton"),
    Stiefel(retraction="cayley", iterations=2),
    Stiefel(retraction="newton", iterations=3),
]
# Adam's step is normalized, so it takes its own learning rate: (SGD's, Adam's)
OPTIMIZERS = {
    "sgd": lambda ps, lrs: RiemannianSGD(ps, lr=lrs[0], momentum=0.9),
    "adam": lambda ps, lrs: RiemannianAdam(ps, lr=lrs[1]),
}


def symmetric_with_spectrum(eigenvalues: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=F64))
    return q @ torch.diag(eigenvalues) @ q.T, q


def minimize(opt: torch.optim.Optimizer, loss_fn, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("retraction", ["projection", "exp"])
def test_rayleigh_quotient_reaches_the_smallest_eigenvalue(optimizer: str, retraction: str) -> None:
    eigenvalues = torch.linspace(1.0, 4.0, 25, dtype=F64)
    a, q = symmetric_with_spectrum(eigenvalues, seed=0)
    x = ManifoldParameter(torch.randn(25, dtype=F64), Sphere(retraction=retraction))
    minimize(OPTIMIZERS[optimizer]([x], (0.1, 0.1)), lambda: x @ a @ x, 600)
    assert float(x.detach() @ a @ x.detach()) == pytest.approx(1.0, abs=1e-8)
    assert abs(float(x.detach() @ q[:, 0])) == pytest.approx(1.0, abs=1e-6)  # the eigenvector, up to sign


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("stiefel", STIEFEL_CASES, ids=repr)
def test_pca_finds_the_top_eigenspace(stiefel: Stiefel, optimizer: str) -> None:
    eigenvalues = torch.linspace(4.0, 1.0, 20, dtype=F64)
    a, q = symmetric_with_spectrum(eigenvalues, seed=1)
    x = ManifoldParameter(torch.randn(20, 4, dtype=F64, generator=torch.Generator().manual_seed(2)), stiefel)
    minimize(OPTIMIZERS[optimizer]([x], (0.1, 0.1)), lambda: -torch.trace(x.T @ a @ x), 600)
    assert float(torch.trace(x.detach().T @ a @ x.detach())) == pytest.approx(float(eigenvalues[:4].sum()), abs=1e-8)
    top = q[:, :4]
    assert float((x @ x.T - top @ top.T).detach().norm()) < 1e-4  # same span


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("stiefel", STIEFEL_CASES, ids=repr)
def test_orthogonal_procrustes_reaches_the_polar_factor(stiefel: Stiefel, optimizer: str) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 6
    a = torch.randn(10, n, generator=gen, dtype=F64)
    b = a @ Stiefel().random_point((n, n), generator=gen, dtype=F64) + 0.1 * torch.randn(
        10, n, generator=gen, dtype=F64
    )
    u, _, vh = torch.linalg.svd(a.T @ b)
    optimum = u @ vh
    start = Stiefel().random_point((n, n), generator=gen, dtype=F64)
    if torch.linalg.det(start) * torch.linalg.det(optimum) < 0:  # O(n) has two components
        start[:, 0] = -start[:, 0]
    x = ManifoldParameter(start, stiefel)
    scale = float(torch.linalg.matrix_norm(a, ord=2) ** 2)
    minimize(OPTIMIZERS[optimizer]([x], (0.2 / scale, 0.1)), lambda: ((a @ x - b) ** 2).sum(), 600)
    torch.testing.assert_close(x.detach(), optimum, atol=1e-6, rtol=0)
