"""What is specific to the Stiefel manifold and its linear-algebra helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from manifold_opt import Stiefel
from manifold_opt.manifolds.base import Workspace
from manifold_opt.manifolds.linalg import (
    cholesky_input,
    cholesky_upper,
    divide_upper,
    invert_upper,
    newton_iterations_needed,
    newton_schulz,
    polar_eigh,
    polar_svd,
    qr_positive,
)

from .cases import generator, seeds

F64 = torch.float64
matrix_sizes = st.tuples(st.integers(1, 8), st.integers(1, 8))


def test_unknown_retraction_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'householder'.*'qr', 'polar', 'cayley', 'newton'"):
        Stiefel(retraction="householder")


@pytest.mark.parametrize("kwargs", [dict(retraction="qr", iterations=2), dict(retraction="newton", iterations=0)])
def test_iterations_are_validated(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="iterations"):
        Stiefel(**kwargs)


def test_conv_kernel_is_one_matrix() -> None:
    stiefel = Stiefel()
    assert stiefel.point_shape((16, 3, 3, 3)) == (16, 27)
    assert Stiefel(batch_dims=1).point_shape((4, 6, 3)) == (6, 3)
    with pytest.raises(ValueError, match=r"at least 2 dimensions.*\(7,\)"):
        stiefel.point_shape((7,))


@given(size=matrix_sizes, seed=seeds)
def test_wide_points_are_transposes_of_tall_ones(size: tuple[int, int], seed: int) -> None:
    size = (min(size), max(size) + 1)  # strictly wide
    for retraction in ("qr", "polar", "cayley", "newton"):
        stiefel = Stiefel(retraction=retraction)
        x = stiefel.random_point(size, generator=generator(seed), dtype=F64)
        u = stiefel.random_tangent(x, generator=generator(seed + 1))
        expected = stiefel.retract(x.mT, u.mT, 0.3).mT
        torch.testing.assert_close(stiefel.retract(x, u, 0.3), expected, atol=1e-13, rtol=0)


@given(size=matrix_sizes, seed=seeds)
def test_qr_retraction_is_geoopts_euclidean_stiefel_map(size: tuple[int, int], seed: int) -> None:
    n, p = max(size), min(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import geoopt
    stiefel = Stiefel(retraction="qr")
    x = stiefel.random_point((n, p), generator=generator(seed), dtype=F64)
    u = stiefel.random_tangent(x, generator=generator(seed + 1))
    u = u * (2.9 / torch.linalg.matrix_norm(u.mT @ u).sqrt()).clamp(max=1)  # below the step limit
    torch.testing.assert_close(stiefel.retract(x, u), geoopt.EuclideanStiefel().retr(x, u), atol=1e-12, rtol=0)


@pytest.mark.parametrize("retraction", ["qr", "polar", "newton"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_long_steps_are_shortened_to_the_limit_and_land_exactly(retraction: str, dtype: torch.dtype) -> None:
    """A step with ||u^T u||_F > 9 is retracted as the step scaled to ||u^T u||_F = 16: the same
    point as the explicitly shortened step, on the manifold to working precision, for steps up
    to 1e6 and rank-1 steps (the worst conditioned)."""
    from manifold_opt.manifolds.stiefel import MAX_STEP

    stiefel = Stiefel(retraction=retraction)
    gen = generator(7)
    x = stiefel.random_point((3, 40, 8), generator=gen, dtype=dtype)
    rank_one = torch.randn(3, 40, 1, generator=gen, dtype=dtype) @ torch.randn(3, 1, 8, generator=gen, dtype=dtype)
    for direction in (stiefel.random_tangent(x, generator=gen), stiefel.project_tangent(x, rank_one)):
        for size in (5.0, 100.0, 1e6):
            u = direction * (size / torch.linalg.matrix_norm(direction.mT @ direction).sqrt())[..., None, None]
            y = stiefel.retract(x, u)
            tolerance = {"qr": 1.5e-6, "polar": 6e-6, "newton": 6e-6}[retraction] if dtype == torch.float32 else 1e-13
            assert float(stiefel.distance_to_manifold(y).max()) < tolerance
            if dtype == F64:
                shortened = u * (MAX_STEP / size)
                torch.testing.assert_close(y, stiefel.retract(x, shortened), atol=1e-9, rtol=0)


@given(size=matrix_sizes, seed=seeds)
def test_projection_is_the_nearest_point(size: tuple[int, int], seed: int) -> None:
    gen = generator(seed)
    stiefel = Stiefel()
    a = torch.randn(size, generator=gen, dtype=F64)
    nearest = stiefel.project(a)
    others = stiefel.random_point((20, *size), generator=gen, dtype=F64)
    assert (a - nearest).norm() <= (a - others).flatten(1).norm(dim=1).min() + 1e-12
    # the polar factor: A = nearest @ P with P symmetric positive semi-definite (tall case)
    tall_a, tall_q = (a, nearest) if size[0] >= size[1] else (a.mT, nearest.mT)
    p = tall_q.mT @ tall_a
    torch.testing.assert_close(p, p.mT, atol=1e-12, rtol=0)
    assert torch.linalg.eigvalsh(p).min() > -1e-12


@given(size=matrix_sizes, seed=seeds)
def test_polar_by_eigh_equals_polar_by_svd(size: tuple[int, int], seed: int) -> None:
    n, p = max(size), min(size)
    stiefel = Stiefel()
    x = stiefel.random_point((n, p), generator=generator(seed), dtype=F64)
    a = x + stiefel.random_tangent(x, generator=generator(seed + 1))  # singular values >= 1
    torch.testing.assert_close(polar_eigh(a), polar_svd(a), atol=1e-12, rtol=0)


def test_qr_positive_has_positive_diagonal_of_r() -> None:
    a = torch.randn(5, 7, 4, generator=generator(0), dtype=F64)
    q = qr_positive(a)
    r = q.mT @ a
    assert (torch.diagonal(r, dim1=-2, dim2=-1) > 0).all()
    torch.testing.assert_close(q @ r, a)


@given(size=matrix_sizes, seed=seeds, scale=st.floats(0.05, 1.7))
def test_newton_schulz_converges_to_the_polar_factor(size: tuple[int, int], seed: int, scale: float) -> None:
    gen = generator(seed)
    u, _, vh = torch.linalg.svd(torch.randn(size, generator=gen, dtype=F64), full_matrices=False)
    sigma = torch.empty(min(size), dtype=F64).uniform_(scale / 2, scale, generator=gen)
    a = u @ torch.diag(sigma) @ vh
    iterations = newton_iterations_needed(float(sigma.min() ** 2), float(sigma.max() ** 2), 1e-14)
    torch.testing.assert_close(newton_schulz(a, iterations), u @ vh, atol=1e-12, rtol=0)


def test_newton_iteration_count_grows_with_the_interval() -> None:
    counts = [newton_iterations_needed(low, 1.0, 1e-7) for low in (0.9, 0.5, 0.1, 0.01)]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    assert newton_iterations_needed(1.0, 1.0, 1e-7) == 0
    with pytest.raises(ValueError, match="inside"):
        newton_iterations_needed(0.5, 3.5, 1e-7)


@pytest.mark.parametrize("t", [0.05, 0.4, 3.0])
def test_cayley_default_is_the_exact_transform_of_the_limited_step(t: float) -> None:
    from manifold_opt.manifolds.stiefel import MAX_STEP, _cayley_exact

    stiefel = Stiefel(retraction="cayley")
    x = stiefel.random_point((4, 9, 3), generator=generator(3), dtype=F64)
    u = t * stiefel.random_tangent(x, generator=generator(4))
    u_bar = u - 0.5 * x @ (x.mT @ u)
    limited = u_bar * (MAX_STEP / torch.linalg.matrix_norm(u_bar)).clamp(max=1)[..., None, None]
    torch.testing.assert_close(stiefel.retract(x, u), _cayley_exact(x, limited), atol=1e-13, rtol=0)
    if t == 3.0:
        assert (torch.linalg.matrix_norm(u_bar) > MAX_STEP).all()  # the limit is exercised


def test_fixed_cayley_iterations_err_by_a_power_of_the_step() -> None:
    """Li et al.'s two iterations: off the exact transform by O(t^4) for steps of size t."""
    exact = Stiefel(retraction="cayley")
    two = Stiefel(retraction="cayley", iterations=2)
    x = exact.random_point((20, 5), generator=generator(5), dtype=F64)
    u = exact.random_tangent(x, generator=generator(6))
    u = u / u.norm()
    gaps = [float((two.retract(x, u, t) - exact.retract(x, u, t)).norm()) for t in (0.1, 0.01)]
    assert 0.5e-4 < gaps[1] / gaps[0] < 2e-4


def test_cholesky_upper_keeps_its_padding_across_batch_sizes() -> None:
    """p = 128 is factored inside diag(G, I): the padding is written when the workspace creates
    the buffer and only leading blocks later, so factors of any batch size, one after the
    other (the buffer grows and is shared), and of Gram matrices written where
    cholesky_input says (no copy), are the factors."""
    work = Workspace()
    gen = generator(7)
    for batch in (3, 1, 5, 3, 1):
        a = torch.randn(batch, 300, 128, generator=gen, dtype=F64)
        gram = a.mT @ a
        for in_place in (False, True):
            target = cholesky_input(gram.shape, gram.dtype, gram.device, work) if in_place else None
            if in_place:
                assert target is not None  # the padded path is exercised
            r = cholesky_upper(gram if target is None else target.copy_(gram), workspace=work)
            torch.testing.assert_close(r, torch.linalg.cholesky(gram, upper=True))
    not_definite = -torch.eye(128, dtype=F64).expand(2, 128, 128)
    assert cholesky_upper(not_definite, workspace=work).isnan().all()


@pytest.mark.parametrize("shape", [(2, 30, 10), (2, 12, 10), (1, 50, 10), (2, 256, 128)])
@pytest.mark.parametrize("dtype", [F64, torch.complex128], ids=str)
def test_divide_upper_solves_with_the_factor_cholesky_upper_returns(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """cholesky_upper returns R = L^H, row-major; divide_upper (from the left, or by the explicit
    inverse for n >= 4p), invert_upper and, for n < 4p, a solve in place all give W R^-1."""
    w = torch.randn(shape, generator=generator(8), dtype=dtype)
    gram = w.mH @ w
    r = cholesky_upper(gram)
    expected = torch.linalg.solve_triangular(torch.linalg.cholesky(gram, upper=True), w, upper=True, left=False)
    torch.testing.assert_close(divide_upper(r, w), expected)
    torch.testing.assert_close(w @ invert_upper(r), expected)
    if shape[-2] < 4 * shape[-1]:
        own = w.clone()
        assert divide_upper(r, own, out=own).data_ptr() == own.data_ptr()
        torch.testing.assert_close(own, expected)


def test_workspace_buffers_keep_the_layout_of_a_transposed_tensor() -> None:
    """The tall view of a wide point gets scratch in its own layout (mixed layouts make
    elementwise passes several times slower)."""
    work = Workspace()
    tall_view = torch.empty(3, 5, 8).mT
    buffer = work.like("scratch", tall_view)
    assert buffer.shape == tall_view.shape and buffer.stride() == tall_view.stride()
    assert work.like("scratch", torch.empty(3, 8, 5)).is_contiguous()


@pytest.mark.parametrize("retraction", ["qr", "polar", "newton", "cayley"])
@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (6, 6), (64, 16)])
def test_a_point_overwritten_off_the_manifold_is_not_taken_farther(retraction: str, shape: tuple[int, int]) -> None:
    """The issue's case, ``p.copy_(torch.randn(...))``: from a Gaussian point (about 1e2 off the
    manifold) ``retract`` used to land 16 to 2e2 off with "qr", "polar" and "newton" (the
    shortened step's Gram matrix was updated by a formula that assumes X^T X = I) and 1e5 to
    1e8 off with "cayley" (its Newton–Schulz step throws singular values above sqrt(5)
    farther). Now "qr" and "polar" land on the manifold, "newton" and "cayley" no farther,
    directly and in the optimizers' fast form (a workspace, a step of ordinary length)."""
    stiefel = Stiefel(retraction=retraction)
    gen = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(shape, generator=gen)
    u = stiefel.project_tangent(x, torch.randn(shape, generator=gen))
    u = u / torch.linalg.vector_norm(u)  # steps of norm 0 to 10
    before = float(stiefel.distance_to_manifold(x))
    for scale, workspace in ((0.0, None), (1e-3, None), (1.0, None), (10.0, None), (1e-3, Workspace())):
        after = float(stiefel.distance_to_manifold(stiefel.retract(x, scale * u, workspace=workspace)))
        if retraction in ("qr", "polar"):
            assert after < 1e-5, (scale, workspace, after)
        else:
            assert after <= before * (1 + 1e-4), (scale, workspace, before, after)  # float32 rounding
