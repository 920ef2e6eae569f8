"""Every optimizer path (fused, in place, composed) equals its update rule written out.

The rules below are the textbook ones composed from the manifold's own methods, one
point at a time in float64/complex128; the optimizers must follow them to rounding over
many steps, whatever path they take (the fused Stiefel step with its tracked ``X^T m``, the
in-place variant of ``nonfinite="skip"``, the composition of ``nonfinite="raise"``).
"""

from __future__ import annotations

import pytest
import torch

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel
from manifold_opt.manifolds import Manifold
from manifold_opt.manifolds.linalg import real_dtype

POINTS = {
    "stiefel-tall": (Stiefel(), (40, 6)),
    "stiefel-wide": (Stiefel(), (6, 40)),
    "stiefel-near-square": (Stiefel(), (12, 10)),
    "stiefel-twice-as-tall": (Stiefel(), (24, 10)),  # 2p <= n < 4p: two triangular solves
    "stiefel-batch-padded": (Stiefel(batch_dims=1), (2, 256, 128)),  # p = 128: a padded Cholesky
    "stiefel-square-large": (Stiefel(), (256, 256)),  # the tracking state by a triangular solve
    "stiefel-batch": (Stiefel(batch_dims=1), (3, 20, 4)),
    "stiefel-polar": (Stiefel(retraction="polar"), (20, 4)),
    "sphere-rows": (Sphere(batch_dims=1), (5, 7)),
}
STEPS = 30


def adam_rule(manifold: Manifold, x: torch.Tensor, grads: list[torch.Tensor], lr: float, amsgrad: bool) -> torch.Tensor:
    r"""m = P_x(b1 m + (1 - b1) r), v = b2 v + (1 - b2) <r, r>, x = R_x(-lr m^ / (sqrt(v^) + eps))."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = torch.zeros_like(x)
    v = v_max = torch.zeros((), dtype=real_dtype(x.dtype))
    for k, g in enumerate(grads, 1):
        r = manifold.riemannian_grad(x, g)
        m = manifold.project_tangent(x, beta1 * m + (1 - beta1) * r)
        v = beta2 * v + (1 - beta2) * manifold.inner(x, r, r)
        v_max = torch.maximum(v_max, v) if amsgrad else v
        t = -(lr / (1 - beta1**k)) / ((v_max / (1 - beta2**k)).sqrt() + eps)
        x = manifold.retract(x, m, t)
    return x


def sgd_rule(manifold: Manifold, x: torch.Tensor, grads: list[torch.Tensor], lr: float, nesterov: bool) -> torch.Tensor:
    r"""m = P_x(mu m + r) (m = r at first), d = r + mu m (Nesterov) or m, x = R_x(-lr d)."""
    mu = 0.9
    m = None
    for g in grads:
        r = manifold.riemannian_grad(x, g)
        m = r if m is None else manifold.project_tangent(x, mu * m + r)
        x = manifold.retract(x, r + mu * m if nesterov else m, -lr)
    return x


OPTIMIZERS = {
    "adam": (lambda ps, policy: RiemannianAdam(ps, lr=0.05, nonfinite=policy), lambda *a: adam_rule(*a, 0.05, False)),
    "amsgrad": (
        lambda ps, policy: RiemannianAdam(ps, lr=0.05, amsgrad=True, nonfinite=policy),
        lambda *a: adam_rule(*a, 0.05, True),
    ),
    "sgd-momentum": (
        lambda ps, policy: RiemannianSGD(ps, lr=0.05, momentum=0.9, nonfinite=policy),
        lambda *a: sgd_rule(*a, 0.05, False),
    ),
    "nesterov": (
        lambda ps, policy: RiemannianSGD(ps, lr=0.05, momentum=0.9, nesterov=True, nonfinite=policy),
        lambda *a: sgd_rule(*a, 0.05, True),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("point", list(POINTS))
def test_the_optimizers_follow_the_update_rule_written_out(
    point: str, optimizer: str, policy: str, dtype: torch.dtype
) -> None:
    manifold, shape = POINTS[point]
    make, rule = OPTIMIZERS[optimizer]
    gen = torch.Generator().manual_seed(0)
    start = ManifoldParameter(torch.randn(shape, dtype=dtype, generator=gen), manifold).detach()
    # large gradients: the momentum grows to ~100 and many steps reach the step limit
    grads = [torch.randn(shape, dtype=dtype, generator=gen) for _ in range(STEPS)]
    param = ManifoldParameter(start.clone(), manifold)
    opt = make([param], policy)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    expected = rule(manifold, manifold.to_points(start), [manifold.to_points(g) for g in grads])
    gap = float((manifold.to_points(param.detach()) - expected).abs().max())
    assert gap < 1e-12, gap
    assert float(manifold.parameter_distance(param.detach())) < 1e-14
