"""Cross-checks against geoopt, and geoopt parameters stepped by our optimizers."""

from __future__ import annotations

import warnings

import pytest
import torch

from manifold_opt import RiemannianAdam, RiemannianSGD, Sphere, Stiefel
from manifold_opt.manifolds import GeooptManifold
from manifold_opt.optim import manifold_of

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt

geoopt_optim = geoopt.optim
assert geoopt_optim.RiemannianAdam is not RiemannianAdam  # geoopt's own, the reference
F64 = torch.float64


def procrustes_loss(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a @ x - b) ** 2).sum()


def trajectories(make_ours, make_geoopt, manifold_geoopt, shape, steps: int = 30):
    gen = torch.Generator().manual_seed(0)
    start = manifold_geoopt.projx(torch.randn(shape, generator=gen, dtype=F64))
    a = torch.randn(shape[-2] + 2, shape[-2], generator=gen, dtype=F64)
    b = torch.randn(shape[-2] + 2, shape[-1], generator=gen, dtype=F64)
    ours = geoopt.ManifoldParameter(start.clone(), manifold=manifold_geoopt)
    theirs = geoopt.ManifoldParameter(start.clone(), manifold=manifold_geoopt)
    opt_ours, opt_theirs = make_ours([ours]), make_geoopt([theirs])
    gaps = []
    for _ in range(steps):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            procrustes_loss(p, a, b).backward()
            opt.step()
        gaps.append(float((ours - theirs).detach().abs().max()))
    return gaps


def test_sgd_on_euclidean_stiefel_follows_geoopts_trajectory() -> None:
    """geoopt's RiemannianSGD on EuclideanStiefel is Stiefel(retraction="qr") in float64.

    Without momentum: geoopt's first momentum step differs from torch.optim.SGD's (it
    starts the buffer at the Euclidean gradient and then adds the Riemannian one), and
    we follow torch.optim.
    """
    gaps = trajectories(
        lambda ps: RiemannianSGD(ps, lr=0.02),
        lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.02),
        geoopt.EuclideanStiefel(),
        (7, 3),
    )
    assert max(gaps) < 1e-12


@pytest.mark.parametrize("manifold", [geoopt.EuclideanStiefel(), geoopt.Sphere()], ids=["stiefel", "sphere"])
def test_adam_follows_geoopts_riemannian_adam(manifold) -> None:
    """Same algorithm, eps placed identically; only rounding differs."""
    gaps = trajectories(
        lambda ps: RiemannianAdam(ps, lr=0.01),
        lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.01),
        manifold,
        (3, 6, 4),
    )
    assert max(gaps) < 1e-10


def test_geoopt_manifolds_map_onto_the_batched_implementations() -> None:
    def mapped(manifold, shape):
        return manifold_of(geoopt.ManifoldParameter(manifold.projx(torch.randn(shape)), manifold=manifold))

    assert mapped(geoopt.EuclideanStiefel(), (2, 5, 3)) == Stiefel(retraction="qr", batch_dims=1)
    assert mapped(geoopt.Sphere(), (4, 6)) == Sphere(batch_dims=1)
    assert mapped(geoopt.SphereExact(), (6,)) == Sphere(retraction="exp")
    assert isinstance(mapped(geoopt.Stiefel(), (5, 3)), GeooptManifold)  # canonical metric: geoopt's own


def test_other_geoopt_manifolds_are_stepped_by_geoopts_methods() -> None:
    """A Poincaré-ball parameter follows geoopt's own RiemannianSGD trajectory."""
    ball = geoopt.PoincareBall()
    gen = torch.Generator().manual_seed(1)
    start = ball.projx(0.3 * torch.randn(5, 2, generator=gen, dtype=F64))
    target = ball.projx(0.3 * torch.randn(5, 2, generator=gen, dtype=F64))
    ours = geoopt.ManifoldParameter(start.clone(), manifold=ball)
    theirs = geoopt.ManifoldParameter(start.clone(), manifold=ball)
    opt_ours = RiemannianSGD([ours], lr=0.1)
    opt_theirs = geoopt.optim.RiemannianSGD([theirs], lr=0.1)
    for _ in range(20):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ball.dist(p, target).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    assert float(ball.dist(ours.detach(), target).max()) < float(ball.dist(start, target).max())


def test_geoopts_canonical_stiefel_steps_with_adam_and_momentum_through_retr_transp() -> None:
    """geoopt's canonical Stiefel has no standalone ``transp``, only ``retr_transp``: the
    generic momentum step transports along the retraction in one call, and follows geoopt."""
    torch.manual_seed(0)
    start = geoopt.Stiefel().projx(torch.randn(8, 4, dtype=torch.float64))
    ours = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.Stiefel())
    theirs = geoopt.ManifoldParameter(start.clone(), manifold=geoopt.Stiefel())
    ours_opt, theirs_opt = RiemannianAdam([ours], lr=1e-2), geoopt.optim.RiemannianAdam([theirs], lr=1e-2)
    momentum = RiemannianSGD(
        [geoopt.ManifoldParameter(start.clone(), manifold=geoopt.Stiefel())], lr=1e-2, momentum=0.9
    )
    for _ in range(20):
        g = torch.randn(8, 4, dtype=torch.float64)
        ours.grad, theirs.grad = g.clone(), g.clone()
        ours_opt.step()
        theirs_opt.step()
        momentum.param_groups[0]["params"][0].grad = g.clone()
        momentum.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    stepped = momentum.param_groups[0]["params"][0].detach()
    assert float((stepped.T @ stepped - torch.eye(4, dtype=torch.float64)).abs().max()) < 1e-12


GEOOPT_TRAJECTORY_CASES = {
    "Sphere": (lambda: geoopt.Sphere(), lambda m: m.projx(torch.randn(5, dtype=torch.float64))),
    "EuclideanStiefel": (lambda: geoopt.EuclideanStiefel(), lambda m: m.projx(torch.randn(6, 3, dtype=torch.float64))),
    "Stiefel": (lambda: geoopt.Stiefel(), lambda m: m.projx(torch.randn(6, 3, dtype=torch.float64))),
    "PoincareBall": (lambda: geoopt.PoincareBall(), lambda m: m.expmap0(0.3 * torch.randn(4, dtype=torch.float64))),
    "Lorentz": (lambda: geoopt.Lorentz(), lambda m: m.projx(torch.randn(4, dtype=torch.float64))),
    "SPD": (lambda: geoopt.SymmetricPositiveDefinite(), lambda m: m.random(3, 3, dtype=torch.float64)),
    "Euclidean(ndim=1)": (lambda: geoopt.Euclidean(ndim=1), lambda m: torch.randn(3, 4, dtype=torch.float64)),
    "ProductManifold": (
        lambda: geoopt.ProductManifold((geoopt.Sphere(), 3), (geoopt.Euclidean(), 2)),
        lambda m: m.projx(torch.randn(5, dtype=torch.float64)),
    ),
    "UpperHalf": (lambda: geoopt.UpperHalf(rank=2), lambda m: m.random(2, 2, dtype=torch.complex128)),
}
GEOOPT_OPTIMIZERS = {
    "adam": ({"lr": 1e-2}, RiemannianAdam, "RiemannianAdam"),
    "adam-amsgrad": ({"lr": 1e-2, "amsgrad": True}, RiemannianAdam, "RiemannianAdam"),
    "sgd": ({"lr": 1e-2}, RiemannianSGD, "RiemannianSGD"),
    "sgd-momentum": ({"lr": 1e-2, "momentum": 0.9, "dampening": 0.1}, RiemannianSGD, "RiemannianSGD"),
    "sgd-nesterov": ({"lr": 1e-2, "momentum": 0.9, "nesterov": True}, RiemannianSGD, "RiemannianSGD"),
}


@pytest.mark.parametrize("optimizer", list(GEOOPT_OPTIMIZERS))
@pytest.mark.parametrize("case", list(GEOOPT_TRAJECTORY_CASES))
def test_geoopt_parameters_follow_geoopts_own_optimizers_for_100_steps(case: str, optimizer: str) -> None:
    """float64, 100 steps, every geoopt manifold (complex ones included): geoopt's second
    moment convention (component_inner) always, geoopt's first momentum step with
    momentum_init="geoopt"."""
    make_manifold, start_on = GEOOPT_TRAJECTORY_CASES[case]
    kwargs, ours_cls, name = GEOOPT_OPTIMIZERS[optimizer]
    if case == "UpperHalf" and kwargs.get("amsgrad"):
        pytest.skip("geoopt's own AMSGrad fails on complex manifolds (torch.maximum of its complex second moment)")
    manifold = make_manifold()
    torch.manual_seed(1)
    start = start_on(manifold)
    ours = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
    theirs = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
    extra = {"momentum_init": "geoopt"} if "momentum" in kwargs else {}
    ours_opt = ours_cls([ours], **kwargs, **extra)
    theirs_opt = getattr(geoopt_optim, name)([theirs], **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(100):
        grad = torch.randn(start.shape, generator=gen, dtype=torch.float64)
        if start.is_complex():
            grad = torch.complex(grad, torch.randn(start.shape, generator=gen, dtype=torch.float64))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    assert float((ours - theirs).detach().abs().max()) < 1e-9
