"""Every public geometry method works on tensors that require grad and is differentiable.

``torch.autograd.gradcheck`` in float64 (complex128 where the manifold takes complex points)
for each manifold, shape and retraction option: points and directions are random and
well conditioned (distinct singular values, steps of moderate length), where the QR, SVD and
eigendecompositions the methods use are differentiable. gradcheck perturbs the points off the
manifold, so the methods are differentiated there too.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from manifold_opt import PSI, ConditionedSpectrum, Euclidean, Sphere, Stiefel
from manifold_opt.manifolds import Manifold

F64 = torch.float64
C128 = torch.complex128

# (manifold factory over the retraction option, points-layout shape, dtypes, retraction options)
STIEFEL_OPTIONS = [
    {"retraction": "qr"},
    {"retraction": "polar"},
    {"retraction": "newton"},
    {"retraction": "newton", "iterations": 5},
    {"retraction": "cayley"},
    {"retraction": "cayley", "iterations": 3},
]
SPECTRUM_OPTIONS = [
    {"kappa": 3.0, "retraction": "svd"},
    {"kappa": 3.0, "retraction": "newton"},
    {"sigma_min": 0.8, "sigma_max": 1.5, "retraction": "svd"},
    {"sigma_min": 0.8, "sigma_max": 1.5, "retraction": "newton", "iterations": 12},
]


def cases() -> list[tuple[str, Manifold, tuple[int, ...], torch.dtype]]:
    out = []
    for options in STIEFEL_OPTIONS:
        name = "-".join(str(v) for v in options.values())
        for label, shape in (("tall", (5, 3)), ("wide", (3, 5)), ("square", (4, 4)), ("batch", (2, 4, 2))):
            out.append((f"stiefel-{name}-{label}", Stiefel(**options), shape, F64))
        out.append((f"stiefel-{name}-complex", Stiefel(**options), (4, 2), C128))
    for retraction in ("projection", "exp"):
        out.append((f"sphere-{retraction}-whole", Sphere(retraction=retraction), (6,), F64))
        out.append((f"sphere-{retraction}-rows", Sphere(retraction=retraction, batch_dims=1), (3, 4), F64))
        out.append((f"sphere-{retraction}-complex", Sphere(retraction=retraction, batch_dims=1), (2, 3), C128))
    out.append(("psi-rows", PSI(), (3, 4), F64))
    out.append(("psi-whole", PSI(batch_dims=0), (5,), F64))
    for options in SPECTRUM_OPTIONS:
        name = "-".join(str(v) for v in options.values())
        out.append((f"spectrum-{name}", ConditionedSpectrum(**options), (5, 3), F64))
        out.append((f"spectrum-{name}-wide", ConditionedSpectrum(**options), (3, 4), F64))
    out.append(("euclidean", Euclidean(), (3, 2), F64))
    out.append(("euclidean-complex", Euclidean(), (3,), C128))
    return out


CASES = {name: (manifold, shape, dtype) for name, manifold, shape, dtype in cases()}


def draw(manifold: Manifold, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """A point on the manifold, a nearby point, a tangent direction and a Euclidean gradient."""
    gen = torch.Generator().manual_seed(seed)

    def gaussian() -> torch.Tensor:
        real = torch.randn(shape, generator=gen, dtype=F64)
        return torch.complex(real, torch.randn(shape, generator=gen, dtype=F64)) if dtype.is_complex else real

    if isinstance(manifold, ConditionedSpectrum):
        # singular values spread inside the set (distinct, away from its edges)
        left = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=gen, dtype=F64))[0]
        right = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=gen, dtype=F64))[0]
        s = torch.linspace(0.9, 1.4, min(shape), dtype=F64)
        x = (left * s) @ right.mT
    elif isinstance(manifold, PSI):
        x = gaussian()
    else:
        x = manifold.project(gaussian())
    u = manifold.project_tangent(x, gaussian())
    u = 0.4 * u / torch.linalg.vector_norm(u)  # moderate steps: distinct singular values of x + u
    y = manifold.retract(x, manifold.project_tangent(x, gaussian()), 0.2)
    return x, y, u, gaussian()


def gradcheck(function: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> None:
    leaves = tuple(a.detach().clone().requires_grad_(True) for a in inputs)
    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_is_differentiable(case: str) -> None:
    manifold, shape, dtype = CASES[case]
    x, y, u, g = draw(manifold, shape, dtype)
    off = x + 0.05 * g  # a nearby point off the manifold (gradcheck moves off it anyway)
    if not isinstance(manifold, ConditionedSpectrum):  # its projection's kink: test it off the set below
        gradcheck(manifold.project, off)
    gradcheck(manifold.project_tangent, x, g)
    gradcheck(manifold.riemannian_grad, x, g)
    gradcheck(lambda a, b: manifold.retract(a, b, 0.7), x, u)
    gradcheck(lambda a, b, t: manifold.retract(a, b, t), x, u, torch.tensor(0.7, dtype=F64))
    gradcheck(manifold.transport, x, y, u)
    gradcheck(manifold.inner, x, u, g)
    gradcheck(lambda a, b: manifold.inner(a, b, keepdim=False), x, u)
    if not isinstance(manifold, (Euclidean, PSI)):  # constant there (0, or 0/1 for PSI)
        gradcheck(manifold.distance_to_manifold, 1.2 * off if isinstance(manifold, ConditionedSpectrum) else off)
    if isinstance(manifold, ConditionedSpectrum):
        gradcheck(manifold.project, 1.5 * x)  # outside the set: the singular values are clamped
    exp = getattr(manifold, "exp", None)
    if exp is not None:
        gradcheck(exp, x, u)


@pytest.mark.parametrize("retraction", ["qr", "polar", "newton"])
def test_a_step_of_a_parameter_that_requires_grad(retraction: str) -> None:
    """The issue's case: ``retract`` on a tensor that requires grad (a geoopt script's
    ``st.retr(X, u)`` on a parameter) used to raise ``addcmul(): functions with out=...
    arguments don't support automatic differentiation``; the result is the same point as
    the optimizers' fast form gives under ``no_grad``, and gradients flow to the point."""
    stiefel = Stiefel(retraction=retraction)
    x = torch.nn.Parameter(stiefel.random_point((8, 4), dtype=F64))
    u = stiefel.project_tangent(x.detach(), torch.randn(8, 4, dtype=F64))
    y = stiefel.retract(x, u, 0.1)
    assert y.requires_grad
    y.square().sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    from manifold_opt.manifolds.base import Workspace

    with torch.no_grad():
        fast = stiefel.retract(x, u, 0.1, workspace=Workspace())
    torch.testing.assert_close(y.detach(), fast, atol=1e-13, rtol=0)


def test_a_zero_step_has_finite_gradients() -> None:
    """The step's norm has no derivative at 0: the exact form guards it."""
    stiefel = Stiefel()
    x = stiefel.random_point((6, 3), dtype=F64).requires_grad_(True)
    u = torch.zeros(6, 3, dtype=F64, requires_grad=True)
    stiefel.retract(x, u, 0.5).sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(u.grad).all())


def test_the_optimizers_fast_form_is_kept_under_no_grad() -> None:
    """Under ``torch.no_grad`` with a workspace (the optimizers' calls) the result is one of the
    workspace's buffers, as before: the fast form, not the exact one."""
    from manifold_opt.manifolds.base import Workspace

    stiefel = Stiefel()
    work = Workspace()
    x = stiefel.random_point((8, 4), dtype=F64).requires_grad_(True)
    u = stiefel.project_tangent(x.detach(), torch.randn(8, 4, dtype=F64))
    with torch.no_grad():
        y = stiefel.retract(x, u, 0.1, workspace=work)
    buffer = work.like("stiefel_point", x.detach())
    assert y.data_ptr() == buffer.data_ptr()
