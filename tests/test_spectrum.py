"""What is specific to ConditionedSpectrum (the generic properties run on its cases in test_manifolds.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manifold_opt import ConditionedSpectrum, ManifoldParameter, RiemannianAdam, RiemannianSGD
from manifold_opt.manifolds.linalg import qr_positive
from manifold_opt.manifolds.spectrum import clip_singular_values, kappa_band_floor, largest_singular_value_estimate

from .cases import generator, seeds

F64 = torch.float64
matrix_sizes = st.tuples(st.integers(1, 8), st.integers(1, 8))
kappas = st.sampled_from([1.0, 1.5, 4.0, 30.0])
bands = st.sampled_from([(0.0, 1.0), (0.5, 2.0), (1.0, 1.0), (0.3, math.inf)])


def spread_matrix(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = F64) -> torch.Tensor:
    """Gaussian matrices cubed entrywise: singular values over several decades."""
    return torch.randn(shape, generator=gen, dtype=dtype) ** 3


def with_singular_values(s: torch.Tensor, n: int, p: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``U diag(s) V^T`` with Haar ``U, V`` (``len(s) == min(n, p)``), and ``U, V``."""
    r = min(n, p)
    u = qr_positive(torch.randn(n, r, generator=gen, dtype=s.dtype))
    v = qr_positive(torch.randn(p, r, generator=gen, dtype=s.dtype))
    return (u * s) @ v.mT, u, v


def kappa_cost(s: torch.Tensor, m: torch.Tensor, kappa: float) -> torch.Tensor:
    """Squared distance of singular values ``s`` (..., r) to the band [m, kappa m] (m broadcast)."""
    return ((s - torch.minimum(torch.maximum(s, m), kappa * m)) ** 2).sum(-1)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "needs kappa"),
        (dict(kappa=0.5), "kappa must be a finite number >= 1"),
        (dict(kappa=math.nan), "kappa must be"),
        (dict(kappa=math.inf), "kappa must be"),
        (dict(kappa=True), "kappa must be"),
        (dict(kappa=2.0, sigma_max=1.0), "either kappa or the band"),
        (dict(sigma_min=-1.0, sigma_max=1.0), "sigma_min must be a finite number >= 0"),
        (dict(sigma_min=2.0, sigma_max=1.0), "exceeds sigma_max"),
        (dict(sigma_max=0.0), "sigma_max must be a number > 0"),
        (dict(sigma_min=0.0), "constrains nothing"),
        (dict(kappa=2.0, retraction="cayley"), "unknown ConditionedSpectrum retraction 'cayley'"),
        (dict(kappa=2.0, iterations=3), "applies only to the 'newton' retraction"),
        (dict(kappa=2.0, retraction="newton", iterations=0), "positive int"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_reason(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConditionedSpectrum(**kwargs)


def test_layout_is_one_matrix_per_parameter() -> None:
    band = ConditionedSpectrum(kappa=3.0)
    assert band.point_shape((16, 3, 3, 3)) == (16, 27)
    assert ConditionedSpectrum(kappa=3.0, batch_dims=1).point_shape((4, 6, 3)) == (6, 3)
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(7,\)"):
        band.point_shape((7,))
    assert ConditionedSpectrum(sigma_max=2.0).band_edges == (0.0, 2.0)
    assert ConditionedSpectrum(sigma_min=0.5).band_edges == (0.5, math.inf)


# ----------------------------------------------------------------- projection
@given(size=matrix_sizes, seed=seeds, band=bands, batch=st.integers(0, 3))
def test_band_projection_is_svd_and_clamp(size: tuple[int, int], seed: int, band: tuple, batch: int) -> None:
    low, high = band
    manifold = ConditionedSpectrum(sigma_min=low, sigma_max=None if math.isinf(high) else high)
    x = spread_matrix(((batch,) if batch else ()) + size, generator(seed))
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    expected = (u * s.clamp(low, high).unsqueeze(-2)) @ vh
    projected = manifold.project(x)
    torch.testing.assert_close(projected, expected, atol=1e-12, rtol=1e-12)
    assert float(manifold.distance_to_manifold(projected).max()) < 1e-12
    scale = 1 + float(x.abs().max())
    torch.testing.assert_close(manifold.project(projected), projected, atol=1e-12 * scale, rtol=0)


@given(size=matrix_sizes, seed=seeds, kappa=kappas)
def test_kappa_projection_is_the_nearest_point(size: tuple[int, int], seed: int, kappa: float) -> None:
    """The nearest band [m, kappa m] beats a fine grid of m and the clamp anchored at sigma_max."""
    manifold = ConditionedSpectrum(kappa=kappa)
    x = spread_matrix(size, generator(seed))
    s = torch.linalg.svdvals(x)
    projected = manifold.project(x)
    distance = float((projected - x).norm() ** 2)
    grid = torch.linspace(0, float(s.max()) * 1.01, 20001, dtype=F64)
    best_on_grid = float(kappa_cost(s, grid[:, None], kappa).min())
    assert distance <= best_on_grid + 1e-9 * (1 + best_on_grid)
    anchored = float(kappa_cost(s, s.max() / kappa, kappa))
    assert distance <= anchored + 1e-9 * (1 + anchored)
    # the same singular vectors, values clamped into one band
    s_new = torch.linalg.svdvals(projected)
    assert float(s_new.max()) <= kappa * float(s_new.min()) * (1 + 1e-10) + 1e-12
    assert float(manifold.distance_to_manifold(projected)) < 1e-10


def test_kappa_projection_beats_the_anchored_clamp_when_many_values_are_small() -> None:
    """sigma = (10, 0.1 x 100), kappa = 10: nearest band [0.55, 5.5] at half the anchored squared distance."""
    s = torch.tensor([10.0] + [0.1] * 100, dtype=F64)
    x, _, _ = with_singular_values(s, 120, 101, generator(0))
    manifold = ConditionedSpectrum(kappa=10.0)
    assert float(kappa_band_floor(s, 10.0)) == pytest.approx(0.55, rel=1e-12)
    nearest = float((manifold.project(x) - x).norm() ** 2)
    anchored = float(kappa_cost(s, torch.tensor(1.0, dtype=F64), 10.0))
    assert nearest == pytest.approx(40.5, rel=1e-9)
    assert anchored == pytest.approx(81.0, rel=1e-9)


@given(seed=seeds, kappa=kappas, batch=st.integers(1, 4), size=matrix_sizes)
def test_kappa_band_floor_is_batched_and_exact(seed: int, kappa: float, batch: int, size: tuple[int, int]) -> None:
    s = torch.rand((batch, min(size)), generator=generator(seed), dtype=F64) ** 4 * 5
    m = kappa_band_floor(s, kappa)
    for i in range(batch):
        assert float(m[i]) == float(kappa_band_floor(s[i], kappa))
        # optimality: no nearby m does better (the cost is convex in m)
        around = m[i] * torch.tensor([0.98, 0.999, 1.001, 1.02], dtype=F64)
        assert float(kappa_cost(s[i], m[i], kappa)) <= float(kappa_cost(s[i], around[:, None], kappa).min()) + 1e-12


def test_points_inside_are_returned_unchanged_and_zero_is_kept() -> None:
    gen = generator(3)
    for manifold in (ConditionedSpectrum(kappa=4.0), ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0)):
        x = manifold.random_point((3, 6, 4), generator=gen, dtype=F64)
        assert torch.equal(manifold.project(x), x)
        assert torch.equal(manifold.retract(x, torch.zeros_like(x)), x)
    zero = torch.zeros(5, 3, dtype=F64)
    assert torch.equal(ConditionedSpectrum(kappa=4.0).project(zero), zero)
    lifted = ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0).project(zero)
    torch.testing.assert_close(torch.linalg.svdvals(lifted), torch.full((3,), 0.5, dtype=F64))


def test_distance_to_manifold_is_a_relative_band_violation() -> None:
    s = torch.tensor([8.0, 2.0, 1.0], dtype=F64)
    x, _, _ = with_singular_values(s, 5, 3, generator(1))
    kappa = ConditionedSpectrum(kappa=4.0)
    assert float(kappa.distance_to_manifold(x)) == pytest.approx((8 - 4) / 8)
    assert float(kappa.distance_to_manifold(1e6 * x)) == pytest.approx((8 - 4) / 8)  # a cone: scale-free
    band = ConditionedSpectrum(sigma_min=1.5, sigma_max=10.0)
    assert float(band.distance_to_manifold(x)) == pytest.approx(0.5 / 10)
    assert float(ConditionedSpectrum(sigma_min=2.0).distance_to_manifold(x)) == pytest.approx(1.0 / 2)
    assert float(kappa.distance_to_manifold(torch.zeros(4, 4))) == 0.0


def test_random_points_are_strictly_inside() -> None:
    gen = generator(5)
    for manifold, low, high in (
        (ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0), 0.5, 2.0),
        (ConditionedSpectrum(sigma_max=3.0), 0.0, 3.0),
        (ConditionedSpectrum(sigma_min=1.0), 1.0, 2.0),
    ):
        s = torch.linalg.svdvals(manifold.random_point((200, 7, 5), generator=gen, dtype=F64))
        margin = 0.1 * (high - low) - 1e-12
        assert float(s.min()) >= low + margin and float(s.max()) <= high - margin
    s = torch.linalg.svdvals(ConditionedSpectrum(kappa=10.0).random_point((200, 6, 6), generator=gen, dtype=F64))
    assert float((s[:, 0] / s[:, -1]).max()) <= 10.0**0.8 + 1e-9


# ------------------------------------------------------- matmul-only clipping
@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
def test_clipping_acts_on_each_singular_value_as_documented(shape: tuple[int, int]) -> None:
    """Far from the edges: clamped to working precision; near them: at most half-way off."""
    n, p = shape
    s = torch.tensor([3.0, 2.05, 1.99, 1.2, 0.8, 0.45], dtype=F64)  # band [0.5, 2]
    x, u, v = with_singular_values(s, n, p, generator(2))
    for iterations, far_tolerance in ((12, 1e-3), (30, 1e-12)):
        clipped = clip_singular_values(x, 0.5, 2.0, iterations)
        core = u.mT @ clipped @ v  # diagonal in x's singular vectors
        values = torch.diagonal(core)
        assert float((core - torch.diag(values)).abs().max()) < 1e-12
        target = s.clamp(0.5, 2.0)
        assert float((values - target).abs()[[0, 3, 4]].max()) < far_tolerance  # 3.0 and the inside values
        # near an edge c the value lies between sigma and c, at most half-way: |error| <= |sigma - c| / 2
        for i in (1, 2, 5):
            edge = 2.0 if float(s[i]) > 1.0 else 0.5
            low, high = sorted((float(s[i]), edge))
            assert low - 1e-12 <= float(values[i]) <= high + 1e-12
            assert abs(float(values[i] - target[i])) <= 0.5 * abs(float(s[i]) - edge) + 1e-12


def test_clipping_keeps_tiny_values_under_an_upper_clip_and_cannot_lift_zero() -> None:
    s = torch.tensor([5.0, 1.0, 1e-6, 0.0], dtype=F64)
    x, u, v = with_singular_values(s, 6, 4, generator(4))
    upper = torch.diagonal(u.mT @ clip_singular_values(x, 0.0, 2.0, 30) @ v)
    torch.testing.assert_close(upper, torch.tensor([2.0, 1.0, 1e-6, 0.0], dtype=F64), atol=1e-12, rtol=0)
    lower = torch.diagonal(u.mT @ clip_singular_values(x, 0.5, 2.0, 30) @ v)
    assert float(lower[-1]) == pytest.approx(0.0, abs=1e-10)  # documented: no direction to lift along


@given(seed=seeds, batch=st.integers(1, 3))
def test_clipping_is_batched_with_per_matrix_edges(seed: int, batch: int) -> None:
    gen = generator(seed)
    x = torch.randn(batch, 7, 5, generator=gen, dtype=F64)
    low = torch.rand(batch, generator=gen, dtype=F64)
    high = low + 1 + torch.rand(batch, generator=gen, dtype=F64)
    together = clip_singular_values(x, low, high, 14)
    for i in range(batch):
        torch.testing.assert_close(together[i], clip_singular_values(x[i], low[i], high[i], 14), atol=1e-12, rtol=0)


@given(seed=seeds)
def test_largest_singular_value_estimate_is_a_close_lower_bound(seed: int) -> None:
    x = torch.randn(4, 30, 20, generator=generator(seed), dtype=F64)
    estimate, exact = largest_singular_value_estimate(x), torch.linalg.svdvals(x)[:, 0]
    assert bool((estimate <= exact * (1 + 1e-12)).all())
    assert bool((estimate >= 0.95 * exact).all())


@given(seed=seeds, step=st.sampled_from([0.01, 0.1]))
def test_newton_retraction_matches_svd_retraction_for_steps_from_the_band(seed: int, step: float) -> None:
    gen = generator(seed)
    for kwargs in (dict(sigma_min=0.5, sigma_max=2.0), dict(kappa=4.0)):
        exact = ConditionedSpectrum(**kwargs)
        approx = ConditionedSpectrum(**kwargs, retraction="newton", iterations=30)
        x = exact.random_point((48, 32), generator=gen, dtype=F64)
        u = torch.randn(x.shape, generator=gen, dtype=F64)
        y = approx.retract(x, u, step)
        assert float(exact.distance_to_manifold(y)) < 1e-3
        if "sigma_min" in kwargs:  # the fixed band: the same point
            torch.testing.assert_close(y, exact.retract(x, u, step), atol=1e-9, rtol=0)


# ------------------------------------------------------------------ optimizers
def fit_target(
    manifold: ConditionedSpectrum, shape: tuple[int, ...], optimizer: str, steps: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Minimize ||W - A||^2 over the set from a random start; A has a spread spectrum, ||A||_F = 5.

    (RiemannianAdam keeps one second moment per matrix, so its step is about ``lr`` in
    Frobenius norm per matrix: the distance to travel is kept moderate.)
    """
    gen = generator(seed)
    target = spread_matrix(shape, gen, torch.float32)
    target = 5 * target / target.norm()
    start = torch.randn(shape, generator=gen) / math.sqrt(shape[0])
    w = ManifoldParameter(start, manifold)
    opt = RiemannianSGD([w], lr=0.2, momentum=0.5) if optimizer == "sgd" else RiemannianAdam([w], lr=0.2)
    losses, residuals = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((w - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        residuals.append(float(manifold.parameter_distance(w.detach())))
    return w.detach(), target, losses, residuals


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("shape", [(24, 40), (16, 3, 3, 3)], ids=["linear", "conv2d"])
@pytest.mark.parametrize(
    "manifold",
    [ConditionedSpectrum(kappa=5.0), ConditionedSpectrum(sigma_min=0.5, sigma_max=1.5)],
    ids=["kappa", "band"],
)
def test_band_holds_after_every_optimizer_step_and_the_fit_reaches_the_projection(
    manifold: ConditionedSpectrum, shape: tuple[int, ...], optimizer: str
) -> None:
    w, target, losses, residuals = fit_target(manifold, shape, optimizer, steps=200)
    assert max(residuals) < 1e-5
    assert losses[-1] < losses[0]
    # the minimizer of ||W - A|| over the set is the projection of A
    best = manifold.project_parameter(target.double()).float()
    assert float((w - best).norm() / best.norm()) < (0.02 if optimizer == "sgd" else 0.05)


def test_newton_retraction_keeps_the_band_without_accumulating_error() -> None:
    manifold = ConditionedSpectrum(sigma_min=0.5, sigma_max=1.5, retraction="newton")
    w, target, losses, residuals = fit_target(manifold, (24, 40), "adam", steps=200)
    assert losses[-1] < losses[0]
    best = manifold.project_parameter(target.double()).float()
    assert float((w - best).norm() / best.norm()) < 0.05
    assert max(residuals) < 5e-3  # each step clips x + t u afresh: bounded by the step, no drift
    assert max(residuals[-100:]) <= max(residuals[:100]) + 1e-3


def test_bucketed_step_equals_one_parameter_at_a_time() -> None:
    manifold = ConditionedSpectrum(kappa=3.0)
    gen = generator(7)
    data = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    targets = [spread_matrix((8, 5), gen, torch.float32) for _ in range(3)]

    def run(groups: list[list[int]]) -> list[torch.Tensor]:
        params = [ManifoldParameter(d.clone(), manifold) for d in data]
        optimizers = [RiemannianAdam([params[i] for i in group], lr=0.1) for group in groups]
        for _ in range(5):
            for opt in optimizers:
                opt.zero_grad()
            sum(((p - t) ** 2).sum() for p, t in zip(params, targets)).backward()
            for opt in optimizers:
                opt.step()
        return [p.detach() for p in params]

    for together, alone in zip(run([[0, 1, 2]]), run([[0], [1], [2]])):
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def test_batch_dims_projects_each_slice_separately() -> None:
    manifold = ConditionedSpectrum(kappa=2.0, batch_dims=1)
    x = spread_matrix((3, 6, 4), generator(8))
    together = manifold.project_parameter(x)
    for i in range(3):
        torch.testing.assert_close(together[i], ConditionedSpectrum(kappa=2.0).project(x[i]), atol=1e-12, rtol=0)


def test_nonfinite_gradient_never_reaches_the_parameter() -> None:
    w = ManifoldParameter(torch.randn(6, 4), ConditionedSpectrum(kappa=3.0))
    before = w.detach().clone()
    opt = RiemannianSGD([w], lr=0.1)
    w.grad = torch.full_like(w, math.nan)
    opt.step()
    assert torch.equal(w.detach(), before) and opt.skipped_steps == 1
    batch = torch.stack([before, before])
    step = torch.stack([torch.ones_like(before), torch.full_like(before, math.inf)])
    for retraction in ("svd", "newton"):
        # an overflowing step gives NaN (which the optimizers' policy catches), never a LAPACK
        # error or a finite guess; the other matrices of the batch are unaffected
        y = ConditionedSpectrum(kappa=3.0, retraction=retraction).retract(batch, step, 1.0)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()
    with pytest.raises(RuntimeError):  # LAPACK refuses: never a silent NaN
        ConditionedSpectrum(kappa=3.0).project(torch.full((3, 3), math.inf))


def test_bfloat16_parameter_is_stepped_in_float32_and_stays_in_the_band() -> None:
    manifold = ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0)
    w = ManifoldParameter(torch.randn(16, 8).bfloat16(), manifold)
    opt = RiemannianAdam([w], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        (w.float() ** 3).sum().backward()
        opt.step()
    assert w.dtype == torch.bfloat16
    assert float(manifold.parameter_distance(w.detach().float())) < 1e-2  # bf16 rounding of the write-back


def test_manifold_parameter_checkpoint_loads_with_weights_only() -> None:
    w = ManifoldParameter(torch.randn(5, 4), ConditionedSpectrum(kappa=2.5, retraction="newton", iterations=8))
    buffer = io.BytesIO()
    torch.save({"w": w}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]
    assert isinstance(loaded, ManifoldParameter) and loaded.manifold == w.manifold
    assert torch.equal(loaded.detach(), w.detach())
