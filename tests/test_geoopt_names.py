"""geoopt's method names on the native manifolds and on ManifoldParameter (the migration page's
class swap runs a geoopt script unchanged otherwise), and geoopt manifolds holding a batch of
points under RiemannianAdam."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import manifold_opt
from manifold_opt import PSI, ConditionedSpectrum, Euclidean, ManifoldParameter, RiemannianAdam, Sphere, Stiefel

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt

F64 = torch.float64

GEOOPT = SimpleNamespace(
    EuclideanStiefel=geoopt.EuclideanStiefel,
    ManifoldParameter=geoopt.ManifoldParameter,
    RiemannianAdam=geoopt.optim.RiemannianAdam,
)
# the swap of the migration page: EuclideanStiefel -> Stiefel, and our ManifoldParameter and RiemannianAdam
SWAPPED = SimpleNamespace(
    EuclideanStiefel=manifold_opt.Stiefel,
    ManifoldParameter=manifold_opt.ManifoldParameter,
    RiemannianAdam=manifold_opt.RiemannianAdam,
)


def geoopt_script(ns: SimpleNamespace) -> dict[str, torch.Tensor]:
    """A small geoopt script: RiemannianAdam on EuclideanStiefel, and its geometry by hand, with
    geoopt's everyday names. Only the classes in ``ns`` change between the two runs."""
    torch.manual_seed(0)
    st = ns.EuclideanStiefel()
    start = st.random(8, 4, dtype=F64)
    assert st.check_point_on_manifold(start)
    p = ns.ManifoldParameter(start.clone(), manifold=st)
    q = ns.ManifoldParameter(torch.randn(8, 4, dtype=F64), manifold=st)
    with torch.no_grad():
        q.proj_()
    st.assert_check_point_on_manifold(q.detach())
    a, b = torch.randn(10, 8, dtype=F64), torch.randn(10, 4, dtype=F64)
    opt = ns.RiemannianAdam([p, q], lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        loss = ((a @ p - b) ** 2).sum() + ((a @ q - b) ** 2).sum()
        loss.backward()
        opt.step()
    x = p.detach()
    g = torch.randn(8, 4, dtype=F64)
    rgrad = st.egrad2rgrad(x, g)
    u = st.proju(x, g)
    y = st.retr(x, -0.1 * u)
    st.assert_check_point_on_manifold(y)
    moved, carried = st.retr_transp(x, -0.1 * u, u)
    return {
        "p": x,
        "q": q.detach(),
        "start": start,
        "rgrad": rgrad,
        "u": u,
        "retr": y,
        "expmap": st.expmap(x, -0.1 * u),
        "transp": st.transp(x, y, u),
        "retr_transp": torch.stack([moved, carried]),
        "inner": st.inner(x, u, rgrad).reshape(()),
        "inner_uu": st.inner(x, u).reshape(()),
        "projx": st.projx(x + 0.1 * g),
        "off": torch.tensor(st.check_point_on_manifold(x + 0.1 * g)),
    }


def test_a_geoopt_script_runs_after_the_class_swap_and_reaches_geoopts_numbers() -> None:
    """The issue's script used to stop at ``'Stiefel' object has no attribute 'random'``, then at
    ``'ManifoldParameter' object has no attribute 'proj_'``; after the swap it runs and every
    number it prints agrees with geoopt's to float64 rounding."""
    theirs = geoopt_script(GEOOPT)
    ours = geoopt_script(SWAPPED)
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key].as_subclass(torch.Tensor), atol=1e-10, rtol=0, msg=key)


def test_retr_of_a_parameter_is_recorded_by_autograd() -> None:
    """``st.retr(p, u)`` on a parameter that requires grad: geoopt's own raises (its QR sign
    fix writes in place), ours is differentiable (see tests/test_autograd.py)."""
    st = Stiefel()
    p = ManifoldParameter(st.random(8, 4, dtype=F64), manifold=st)
    u = st.proju(p.detach(), torch.randn(8, 4, dtype=F64))
    st.retr(p, -0.1 * u).square().sum().backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())


NATIVE = [
    (Stiefel(), (2, 5, 3)),
    (Stiefel(retraction="polar"), (3, 6)),
    (Sphere(), (4, 5)),
    (Euclidean(), (3, 2)),
    (PSI(), (3, 4)),
    (ConditionedSpectrum(kappa=3.0), (5, 3)),
]


@pytest.mark.parametrize("manifold, shape", NATIVE, ids=lambda a: repr(a) if isinstance(a, tuple) else type(a).__name__)
def test_the_aliases_are_the_native_methods(manifold, shape) -> None:
    """Each name calls its native method, in the points layout (geoopt's: the trailing
    dimensions form a point)."""
    gen = torch.Generator().manual_seed(0)
    x = manifold.random(*shape, dtype=F64, generator=gen)
    assert x.shape == shape and x.manifold is manifold
    assert manifold.random(shape, dtype=F64).shape == shape  # a shape tuple, as geoopt's size2shape
    assert manifold.check_point_on_manifold(x)
    g = torch.randn(shape, generator=gen, dtype=F64)
    u = manifold.project_tangent(x, g)
    torch.testing.assert_close(manifold.projx(x + g), manifold.project(x + g))
    torch.testing.assert_close(manifold.proju(x, g), u)
    torch.testing.assert_close(manifold.egrad2rgrad(x, g), manifold.riemannian_grad(x, g))
    y = manifold.retr(x, 0.1 * u)
    torch.testing.assert_close(y, manifold.retract(x, u, 0.1), atol=1e-12, rtol=0)
    torch.testing.assert_close(manifold.transp(x, y, u), manifold.transport(x, y, u))
    moved, carried = manifold.retr_transp(x, 0.1 * u, u)
    torch.testing.assert_close(moved, y)
    torch.testing.assert_close(carried, manifold.transport(x, y, u))
    kept = manifold.inner(x, u, g)
    torch.testing.assert_close(manifold.inner(x, u), manifold.inner(x, u, u))
    dropped = manifold.inner(x, u, g, keepdim=False)
    assert dropped.shape == shape[: len(shape) - manifold.point_ndim]
    torch.testing.assert_close(dropped, kept.reshape(dropped.shape))
    if isinstance(manifold, ConditionedSpectrum):
        with pytest.raises(NotImplementedError, match="no exponential map"):
            manifold.expmap(x, u)
    else:
        torch.testing.assert_close(manifold.expmap(x, 0.1 * u), manifold.exp(x, 0.1 * u))


def test_check_point_on_manifold_explains_and_asserts() -> None:
    stiefel = Stiefel()
    x = stiefel.random(5, 3, dtype=F64)
    assert stiefel.check_point_on_manifold(x, explain=True) == (True, None)
    ok, reason = stiefel.check_point_on_manifold(2 * x, explain=True)
    assert not ok and "off" in reason
    assert not stiefel.check_point_on_manifold(torch.ones(3))  # too few dimensions for a matrix
    stiefel.assert_check_point_on_manifold(x)
    with pytest.raises(ValueError, match="not lying on"):
        stiefel.assert_check_point_on_manifold(2 * x)
    assert not PSI().check_point_on_manifold(torch.zeros(2, 3))  # a zero group is no point


@pytest.mark.parametrize(
    "ours, theirs, size",
    [
        (Stiefel(), geoopt.EuclideanStiefel(), (7, 3)),
        (Stiefel(batch_dims=1), geoopt.EuclideanStiefel(), (2, 7, 3)),
        (Sphere(batch_dims=1), geoopt.Sphere(), (4, 6)),
        (Euclidean(), geoopt.Euclidean(), (3, 2)),
    ],
    ids=["stiefel", "stiefel-batch", "sphere", "euclidean"],
)
def test_random_draws_geoopts_point_for_the_same_seed(ours, theirs, size) -> None:
    torch.manual_seed(3)
    expected = theirs.random(*size, dtype=F64).as_subclass(torch.Tensor)
    torch.manual_seed(3)
    torch.testing.assert_close(ours.random(*size, dtype=F64), expected, atol=1e-14, rtol=0)


def test_a_manifold_parameter_takes_the_manifold_its_data_carries() -> None:
    """geoopt's ``ManifoldParameter(manifold.random(...))`` without ``manifold=``: the point's
    manifold, not Euclidean (also from another ManifoldParameter or a geoopt tensor)."""
    stiefel = Stiefel()
    p = ManifoldParameter(stiefel.random(5, 3))
    assert p.manifold is stiefel
    assert ManifoldParameter(p).manifold is stiefel
    sphere = geoopt.Sphere()
    assert ManifoldParameter(sphere.random(4, 3, dtype=F64)).manifold is sphere
    assert isinstance(ManifoldParameter(torch.randn(3)).manifold, Euclidean)
    assert isinstance(ManifoldParameter(p, manifold=Euclidean()).manifold, Euclidean)  # an explicit one wins


def test_proj_projects_in_place_in_the_parameter_layout() -> None:
    """``proj_()`` projects the parameter as its manifold's optimizer step sees it (a conv kernel
    on ``Stiefel()`` is one ``out x in*kh*kw`` matrix) and returns the parameter itself."""
    stiefel = Stiefel()
    kernel = ManifoldParameter(torch.randn(4, 2, 3, 3), stiefel)
    with torch.no_grad():
        kernel.copy_(torch.randn(4, 2, 3, 3))
    assert kernel.proj_() is kernel
    assert float(stiefel.parameter_distance(kernel.detach())) < 1e-5
    geo = ManifoldParameter(torch.randn(3, 3, dtype=F64), geoopt.SymmetricPositiveDefinite())
    with torch.no_grad():
        geo.copy_(torch.randn(3, 3, dtype=F64))
    geo.proj_()  # a geoopt manifold with no native counterpart: its own projx
    torch.testing.assert_close(geo.detach(), geo.detach().mT)


# ------------------------------------------------------- geoopt manifolds with a batch of points
SIEGEL = {
    "UpperHalf": geoopt.UpperHalf,
    "BoundedDomain": geoopt.BoundedDomain,
}


@pytest.mark.parametrize("points", [2, 3])
@pytest.mark.parametrize("name", list(SIEGEL))
def test_adam_on_a_batch_of_siegel_points_follows_geoopt_point_by_point(name: str, points: int) -> None:
    """``RiemannianAdam`` on a geoopt ``UpperHalf``/``BoundedDomain`` parameter holding a batch of
    ``n x n`` points used to raise ``output with shape [2, 1, 1] doesn't match the broadcast
    shape [2, 2, 1]``: geoopt's ``inner(..., keepdim=True)`` keeps one dimension for these
    manifolds, ``(k, 1)``, which the second moment ``(k, 1, 1)`` broadcast as ``(k, k, 1)``. Each
    point now follows geoopt's own RiemannianAdam run on that point alone, to 1e-9 over 50
    float64 steps (geoopt's run on the whole batch is no reference: its second moment, shaped
    like the point, takes ``(k, 1)`` aligned with the rows of each point, mixing the points'
    norms, and fails for ``k = 3``)."""
    manifold = SIEGEL[name](rank=2)
    torch.manual_seed(1)
    start = manifold.random(points, 2, 2, dtype=torch.complex128).as_subclass(torch.Tensor)
    ours = geoopt.ManifoldParameter(start.clone(), manifold=manifold)
    singles = [geoopt.ManifoldParameter(start[i].clone(), manifold=manifold) for i in range(points)]
    ours_opt = RiemannianAdam([ours], lr=1e-2)
    theirs_opts = [geoopt.optim.RiemannianAdam([single], lr=1e-2) for single in singles]
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        grad = torch.complex(*(torch.randn(start.shape, generator=gen, dtype=F64) for _ in range(2)))
        ours.grad = grad.clone()
        ours_opt.step()
        for i, (single, opt) in enumerate(zip(singles, theirs_opts)):
            single.grad = grad[i].clone()
            opt.step()
    expected = torch.stack([single.detach() for single in singles])
    assert float((ours.detach() - expected).abs().max()) < 1e-9
    assert tuple(ours_opt.state[ours]["exp_avg_sq"].shape) == (points,)  # one per point
