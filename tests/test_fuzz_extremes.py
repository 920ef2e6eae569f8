"""Fuzzing every manifold x optimizer x dtype at extreme scales: a step leaves every point
finite and on its manifold, or it is skipped (nothing written) or raises per the policy;
never another exception."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from manifold_opt import PSISGD, ManifoldParameter, RiemannianAdam, RiemannianSGD
from manifold_opt.manifolds import Euclidean, Sphere
from manifold_opt.manifolds.linalg import real_dtype

from .cases import CASES, Case, generator, seeds

OPTIMIZERS = {
    "sgd": lambda ps, lr, policy: RiemannianSGD(ps, lr=lr, nonfinite=policy),
    "sgd-momentum": lambda ps, lr, policy: RiemannianSGD(ps, lr=lr, momentum=0.9, nesterov=True, nonfinite=policy),
    "adam": lambda ps, lr, policy: RiemannianAdam(ps, lr=lr, nonfinite=policy),
    "adam-amsgrad": lambda ps, lr, policy: RiemannianAdam(ps, lr=lr, amsgrad=True, nonfinite=policy),
    "psisgd": lambda ps, lr, policy: PSISGD(ps, lr=lr, momentum=0.9, nonfinite=policy),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# distance to the manifold a stored point may have: rounding of the stored dtype
ON_MANIFOLD = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 5e-2}
SHAPES = [(6, 3), (3, 6), (5, 5), (2, 4, 3)]


def gradient(shape: tuple[int, ...], kind: str, scale: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
    elif kind == "rank1":  # a b^T in every matrix
        a = torch.randn(*shape[:-1], 1, generator=gen, dtype=torch.float64)
        g = a * torch.randn(*shape[:-2], 1, shape[-1], generator=gen, dtype=torch.float64)
    else:  # entries over 20 orders of magnitude
        exponents = torch.randint(-10, 10, shape, generator=gen)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**exponents
    return g / g.abs().max() * scale


@pytest.mark.filterwarnings("ignore:PSISGD.*is declared on")  # random gradients are not scale-invariant
@given(
    case=st.sampled_from(CASES),
    optimizer=st.sampled_from(list(OPTIMIZERS)),
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from(SHAPES),
    log_scale=st.integers(-30, 30),
    lr=st.sampled_from([0.0, 1e-6, 1e-3, 1.0, 1e3, 1e6]),
    kind=st.sampled_from(["gaussian", "rank1", "ill"]),
    policy=st.sampled_from(["skip", "raise"]),
    seed=seeds,
)
def test_a_step_at_extreme_scales_stays_on_the_manifold_or_is_skipped(
    case: Case,
    optimizer: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    log_scale: int,
    lr: float,
    kind: str,
    policy: str,
    seed: int,
) -> None:
    manifold = case.manifold
    if isinstance(manifold, Sphere):
        manifold = type(manifold)(**{**vars(manifold), "batch_dims": len(shape) - 1})
    elif manifold.point_ndim == 2 and len(shape) == 3:
        manifold = type(manifold)(**{**vars(manifold), "batch_dims": 1})
    if case.complex:  # complex points at the precision drawn (bfloat16 has no complex form: complex64)
        dtype = case.dtype(torch.float64 if dtype == torch.float64 else torch.float32)
    gen = generator(seed)
    start_dtype = dtype if dtype.is_complex else torch.float32
    params = [
        ManifoldParameter(torch.randn(shape, generator=gen, dtype=start_dtype).to(dtype), manifold) for _ in range(2)
    ]
    opt = OPTIMIZERS[optimizer](params, lr, policy)
    scale = 10.0**log_scale
    for step in range(3):
        for p in params:
            p.grad = gradient(shape, kind, scale, gen).to(dtype)
            if dtype.is_complex:
                p.grad.imag = gradient(shape, kind, scale, gen)
        before = [p.detach().clone() for p in params]
        skipped = opt.skipped_steps
        note(f"step {step}: |grad| max {float(params[0].grad.abs().max()):.3g}")
        try:
            opt.step()
        except FloatingPointError:
            assert policy == "raise"
            for p, old in zip(params, before):
                torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
            continue
        if opt.skipped_steps > skipped:
            assert policy == "skip"
            for p, old in zip(params, before):
                torch.testing.assert_close(p.detach(), old, rtol=0, atol=0)
            continue
        for p in params:
            assert torch.isfinite(p).all(), f"step {step} wrote a non-finite value"
            if not isinstance(manifold, Euclidean):
                distance = float(manifold.parameter_distance(p.detach().to(case.dtype())))
                bound = ON_MANIFOLD[real_dtype(dtype)] * max(1.0, math.sqrt(p.numel()))
                if case.id == "spectrum-newton":  # documented as approximate, worst at huge steps
                    bound = math.inf
                assert distance <= bound, distance


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_fuzz_reaches_both_outcomes(optimizer: str) -> None:
    # the property above must see steps taken and steps skipped, else it tests nothing
    params = [ManifoldParameter(torch.randn(6, 3), CASES[3].manifold)]
    opt = OPTIMIZERS[optimizer](params, 1e-3, "skip")
    params[0].grad = torch.full((6, 3), 1.0)
    opt.step()
    params[0].grad = torch.full((6, 3), math.inf)
    opt.step()
    assert opt.skipped_steps == 1
