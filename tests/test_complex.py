"""Complex parameters on Stiefel (unitary matrices) and Sphere (the complex unit sphere).

The generic properties (projection, tangent spaces, retraction orders, gradients,
transports, batching, dtypes) run on the complex cases in tests/test_manifolds.py; the
fused optimizer steps follow their written-out rules in tests/test_update_rules.py. Here:
the maps that are specific to complex points, problems with known optima, a unitary RNN,
checkpoints and host reads.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel
from manifold_opt.manifolds.linalg import qr_positive

from .cases import generator, seeds
from .host_reads import reads_during_step

C128 = torch.complex128
sizes = st.tuples(st.integers(1, 8), st.integers(1, 8)).map(lambda s: (max(s), min(s)))  # tall


def random_step(x: torch.Tensor, gen: torch.Generator, scale: float = 0.5) -> torch.Tensor:
    u = Stiefel().random_tangent(x, generator=gen)
    return scale * u / u.norm()


@given(size=sizes, seed=seeds)
def test_qr_retraction_is_the_q_factor_with_real_positive_diagonal(size: tuple[int, int], seed: int) -> None:
    gen = generator(seed)
    x = Stiefel().random_point(size, generator=gen, dtype=C128)
    w = x + random_step(x, gen)
    y = Stiefel(retraction="qr").retract(x, w - x)
    r = y.mH @ w  # W = Y R
    assert float(r.tril(-1).abs().sum()) < 1e-12
    assert float(r.diagonal().imag.abs().max()) < 1e-12 and bool((r.diagonal().real > 0).all())
    torch.testing.assert_close(y, qr_positive(w), atol=1e-12, rtol=0)


@given(size=sizes, seed=seeds)
def test_polar_retraction_is_the_nearest_unitary_factor(size: tuple[int, int], seed: int) -> None:
    gen = generator(seed)
    x = Stiefel().random_point(size, generator=gen, dtype=C128)
    w = x + random_step(x, gen)
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    for retraction in ("polar", "newton"):
        torch.testing.assert_close(Stiefel(retraction=retraction).retract(x, w - x), u @ vh, atol=1e-12, rtol=0)


@given(size=sizes, seed=seeds)
def test_tangent_vectors_make_x_h_u_skew_hermitian_and_the_metric_is_real(size: tuple[int, int], seed: int) -> None:
    gen = generator(seed)
    stiefel = Stiefel()
    x = stiefel.random_point(size, generator=gen, dtype=C128)
    u, v = stiefel.random_tangent(x, generator=gen), stiefel.random_tangent(x, generator=gen)
    a = x.mH @ u
    assert float((a + a.mH).abs().max()) < 1e-12
    realified = (torch.view_as_real(u) * torch.view_as_real(v)).sum()  # Re tr(u^H v) on R^{2np}
    torch.testing.assert_close(stiefel.inner(x, u, v).reshape(()), realified, atol=1e-12, rtol=0)


def test_a_random_complex_point_is_unitary_and_uses_the_imaginary_part() -> None:
    for manifold, shape in ((Stiefel(), (6, 4)), (Stiefel(), (4, 6)), (Sphere(batch_dims=1), (3, 5))):
        x = manifold.random_point(shape, generator=generator(0), dtype=torch.complex64)
        assert x.dtype == torch.complex64 and float(x.imag.abs().max()) > 0.1
        assert float(manifold.distance_to_manifold(x).max()) < 1e-6
    param = ManifoldParameter(torch.randn(5, 3, dtype=torch.complex64), Stiefel())
    torch.testing.assert_close(param.mH @ param, torch.eye(3, dtype=torch.complex64), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ known optima
def hermitian(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, dtype=C128, generator=gen)
    return (a + a.mH) / 2


@pytest.mark.parametrize("make", [RiemannianAdam, RiemannianSGD], ids=lambda c: c.__name__)
def test_brockett_on_unitary_frames_reaches_the_top_eigenvalues(make) -> None:
    r"""min -Re tr(X^H A X N), N = diag(3, 2, 1), over St(10, 3, C): the optimum is
    -sum_i N_i lambda_i with the top eigenvalues in order (the columns are eigenvectors up to phase)."""
    gen = generator(0)
    a = hermitian(10, gen)
    weights = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    optimum = -(weights * torch.linalg.eigvalsh(a).flip(0)[:3]).sum()
    x = ManifoldParameter(torch.randn(10, 3, dtype=C128, generator=gen), Stiefel())
    opt = make([x], lr=0.02) if make is RiemannianAdam else make([x], lr=0.05, momentum=0.5)
    for _ in range(1500):
        opt.zero_grad()
        loss = -(torch.diagonal(x.mH @ a @ x).real * weights).sum()
        loss.backward()
        opt.step()
    gap = float(loss.detach() - optimum)
    assert abs(gap) < 1e-6 * abs(float(optimum)), gap
    assert float(Stiefel().parameter_distance(x.detach())) < 1e-13


def test_rayleigh_quotient_on_the_complex_sphere_reaches_the_smallest_eigenvalue() -> None:
    gen = generator(1)
    a = hermitian(12, gen)
    x = ManifoldParameter(torch.randn(12, dtype=C128, generator=gen), Sphere())
    opt = RiemannianSGD([x], lr=0.1, momentum=0.5)
    for _ in range(800):
        opt.zero_grad()
        loss = (x.conj() @ a @ x).real
        loss.backward()
        opt.step()
    assert abs(float(loss.detach()) - float(torch.linalg.eigvalsh(a)[0])) < 1e-8
    assert float(Sphere().parameter_distance(x.detach())) < 1e-14


# ------------------------------------------------------------------ a unitary RNN
class UnitaryRNN(nn.Module):
    r""":math:`h_{t+1} = W h_t + B x_t`, :math:`y_t = \operatorname{Re}(C h_t)` with unitary ``W``
    (norm-preserving recurrence: no exploding or vanishing state)."""

    def __init__(self, hidden: int, inputs: int, gen: torch.Generator) -> None:
        super().__init__()
        cfloat = torch.complex64
        self.recurrent = ManifoldParameter(torch.randn(hidden, hidden, dtype=cfloat, generator=gen), Stiefel())
        self.input = nn.Parameter(torch.randn(hidden, inputs, dtype=cfloat, generator=gen) / hidden**0.5)
        self.output = nn.Parameter(torch.randn(1, hidden, dtype=cfloat, generator=gen) / hidden**0.5)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:  # (time, batch, inputs) -> (time, batch)
        h = torch.zeros(sequence.shape[1], self.recurrent.shape[0], dtype=self.recurrent.dtype)
        outputs = []
        for x_t in sequence.to(h.dtype):
            h = h @ self.recurrent.mT + x_t @ self.input.mT
            outputs.append((h @ self.output.mT).real[:, 0])
        return torch.stack(outputs)


def test_a_unitary_rnn_learns_a_teachers_sequence_map_and_stays_unitary() -> None:
    gen = generator(2)
    teacher, student = UnitaryRNN(8, 2, gen), UnitaryRNN(8, 2, gen)
    sequences = torch.randn(30, 64, 2, generator=gen)  # 30 time steps, a batch of 64
    with torch.no_grad():
        targets = teacher(sequences)
    opt = RiemannianAdam(student.parameters(), lr=0.01)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = (student(sequences) - targets).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    w = student.recurrent.detach()
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    assert float((w.mH @ w - torch.eye(8)).abs().max()) < 1e-6  # unitary to complex64 rounding
    assert opt.state[student.recurrent]["exp_avg_sq"].dtype == torch.float32  # one real moment per matrix


# ------------------------------------------------------------------ state, checkpoints, host reads
def complex_model(seed: int) -> nn.ParameterList:
    gen = generator(seed)
    cfloat = torch.complex64
    return nn.ParameterList(
        [
            ManifoldParameter(torch.randn(16, 4, dtype=cfloat, generator=gen), Stiefel()),
            ManifoldParameter(torch.randn(3, 6, 5, dtype=cfloat, generator=gen), Stiefel(batch_dims=1)),
            ManifoldParameter(torch.randn(4, 9, dtype=cfloat, generator=gen), Sphere(batch_dims=1)),
            nn.Parameter(torch.randn(7, dtype=cfloat, generator=gen)),
        ]
    )


def fill_grads(params: nn.ParameterList, step: int) -> None:
    gen = generator(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)


@pytest.mark.parametrize("make", [RiemannianAdam, RiemannianSGD], ids=lambda c: c.__name__)
def test_a_checkpoint_of_complex_parameters_resumes_bit_for_bit(make) -> None:
    kwargs = {"lr": 0.01, "amsgrad": True} if make is RiemannianAdam else {"lr": 0.01, "momentum": 0.9}
    straight, resumed = complex_model(0), complex_model(0)
    opt_straight, opt_first = make(straight, **kwargs), make(resumed, **kwargs)
    for step in range(3):
        for params, opt in ((straight, opt_straight), (resumed, opt_first)):
            fill_grads(params, step)
            opt.step()
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt_first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = complex_model(5)
    again.load_state_dict(saved["model"])
    opt_again = make(again, **kwargs)
    opt_again.load_state_dict(saved["opt"])
    for p in again:
        for key, value in opt_again.state[p].items():
            if key in ("exp_avg_sq", "max_exp_avg_sq") and getattr(p, "manifold", None) is not None:
                assert value.dtype == torch.float32, key  # real second moments stay real
            elif key in ("exp_avg", "momentum_buffer"):
                assert value.dtype == torch.complex64, key
    for step in range(3, 6):
        for params, opt in ((straight, opt_straight), (again, opt_again)):
            fill_grads(params, step)
            opt.step()
    for a, b in zip(straight, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make", [RiemannianAdam, RiemannianSGD], ids=lambda c: c.__name__)
def test_a_complex_step_reads_nothing_on_the_host(make) -> None:
    params = complex_model(0)
    opt = make(params, lr=0.01, **({} if make is RiemannianAdam else {"momentum": 0.9}))
    for step in range(6):  # past the first steps and a refresh of the fused Stiefel step
        fill_grads(params, step)
        assert reads_during_step(opt) == [], step


def test_a_non_finite_complex_gradient_is_skipped_and_changes_nothing() -> None:
    params = complex_model(0)
    opt = RiemannianAdam(params, lr=0.01)
    fill_grads(params, 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    fill_grads(params, 1)
    params[0].grad[0, 0] = complex(0.0, float("nan"))
    opt.step()
    assert opt.skipped_steps == 1
    torch.testing.assert_close(params[0].detach(), before[0], rtol=0, atol=0)
