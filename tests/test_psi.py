"""The PSI manifold (what the generic tests of test_manifolds.py do not cover) and the graph walk."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from manifold_opt import PSI, ManifoldParameter, Stiefel, declare_psi
from manifold_opt.optim.psi_detection import find_psi_weights, radial_statistics

from .cases import generator, seeds

F64 = torch.float64
scales = st.floats(0.1, 10.0)


def draw(data: st.DataObject, count: int = 3) -> tuple[torch.Tensor, ...]:
    rows = data.draw(st.integers(1, 5), label="rows")
    dim = data.draw(st.integers(2, 9), label="dim")
    gen = generator(data.draw(seeds, label="seed"))
    return tuple(torch.randn(rows, dim, generator=gen, dtype=F64) for _ in range(count))


# ------------------------------------------------------------------ layout and bad input


def test_layout_rows_and_whole_tensor() -> None:
    w = torch.randn(4, 3, 2, 2)
    assert PSI().point_shape(w.shape) == (12,)
    assert PSI().to_points(w).shape == (4, 12)
    assert PSI(batch_dims=0).point_shape(w.shape) == (48,)
    assert PSI(batch_dims=0).to_points(w).shape == (1, 48)
    assert PSI() == PSI(batch_dims=1) and hash(PSI()) == hash(PSI(batch_dims=1))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PSI().point_shape(()), "0-dim"),
        (lambda: PSI(batch_dims=0).point_shape(()), "0-dim"),
        (lambda: PSI().point_shape((5,)), r"1 coordinate.*shape \(5,\).*batch_dims=0"),
        (lambda: PSI().point_shape((5, 1)), r"1 coordinate"),
        (lambda: PSI(batch_dims=2), "batch_dims=2"),
        (lambda: PSI(batch_dims=-1), "batch_dims"),
        (lambda: ManifoldParameter(torch.tensor(1.0), PSI(batch_dims=0)), "0-dim"),
        (lambda: ManifoldParameter(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), PSI()), "no nearest point.*zero"),
        (lambda: ManifoldParameter(torch.tensor([[1.0, math.nan]]), PSI()), "NaN or Inf"),
    ],
)
def test_bad_input_gets_clear_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_manifold_parameter_keeps_the_scale_and_survives_checkpoints() -> None:
    data = 7.0 * torch.randn(3, 2, 2)
    w = ManifoldParameter(data, PSI())
    torch.testing.assert_close(w.detach(), data, rtol=0, atol=0)  # never normalized
    buffer = io.BytesIO()
    torch.save({"w": w}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]
    assert loaded.manifold == PSI()
    torch.testing.assert_close(loaded.detach(), data, rtol=0, atol=0)


# ------------------------------------------------------------------ geometry


@given(data=st.data(), c=scales)
def test_every_operation_is_scale_equivariant(data: st.DataObject, c: float) -> None:
    """The quotient structure: grad(cθ) = c grad(θ) for an invariant loss (∇L(cθ) = ∇L(θ)/c),
    R_{cθ}(cξ) = c R_θ(ξ), transport and the metric descend to the quotient."""
    psi = PSI()
    x, g, v = draw(data)
    u = psi.project_tangent(x, g)
    torch.testing.assert_close(psi.riemannian_grad(c * x, g / c), c * psi.riemannian_grad(x, g))
    torch.testing.assert_close(psi.retract(c * x, c * u, 0.3), c * psi.retract(x, u, 0.3))
    y = psi.retract(x, u, 0.3)
    torch.testing.assert_close(psi.transport(c * x, c * y, c * v), c * psi.transport(x, y, v))
    torch.testing.assert_close(psi.inner(c * x, c * u, c * v), psi.inner(x, u, v))
    torch.testing.assert_close(psi.dist(c * x, y), psi.dist(x, y))
    torch.testing.assert_close(psi.project_tangent(c * x, v), psi.project_tangent(x, v))


@given(data=st.data())
def test_riemannian_gradient_of_an_invariant_function(data: st.DataObject) -> None:
    """For f(θ) = h(θ/‖θ‖) per row, ∇f is horizontal and grad f = ‖θ‖² ∇f, which satisfies
    the defining identity <grad f, u>_θ = <∇f, u> for every horizontal u."""
    psi = PSI()
    x, a, u = draw(data)

    def f(y: torch.Tensor) -> torch.Tensor:
        unit = y / y.norm(dim=-1, keepdim=True)
        return (a * unit).sum() + (unit**3).sum()

    point = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(point), point)
    torch.testing.assert_close((g * x).sum(-1), torch.zeros(x.shape[0], dtype=F64), atol=1e-12, rtol=0)
    r = psi.riemannian_grad(x, g)
    torch.testing.assert_close(r, x.norm(dim=-1, keepdim=True) ** 2 * g, atol=1e-12, rtol=1e-12)
    u = psi.project_tangent(x, u)
    torch.testing.assert_close(psi.inner(x, r, u).sum(), (g * u).sum(), atol=1e-12, rtol=1e-12)


@given(data=st.data(), t=st.floats(1e-3, 50.0))
def test_horizontal_steps_never_shrink_a_group(data: st.DataObject, t: float) -> None:
    psi = PSI()
    x, g, _ = draw(data)
    y = psi.retract(x, psi.project_tangent(x, g), t)
    assert (y.norm(dim=-1) >= x.norm(dim=-1) * (1 - 1e-12)).all()


@given(data=st.data(), t=st.floats(1e-3, 3.0))
def test_exp_keeps_the_norm_and_moves_by_the_geodesic_length(data: st.DataObject, t: float) -> None:
    psi = PSI()
    x, g, _ = draw(data)
    u = psi.project_tangent(x, g)
    u = u / psi.inner(x, u, u).sqrt()  # unit Riemannian length: the geodesic exp(x, t u) has length t < π
    y = psi.exp(x, t * u)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(psi.dist(x, y), torch.full((x.shape[0],), t, dtype=F64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_tiny_and_huge_rows_are_handled_without_underflow(dtype: torch.dtype, scale: float) -> None:
    """‖θ‖² of a row of norm 1e-30 underflows in float32; the scale-safe norm and the
    ‖θ‖(‖θ‖P(g)) order give the exact equivariant result instead of 0 or NaN."""
    psi = PSI()
    gen = generator(0)
    x = torch.randn(3, 5, generator=gen, dtype=F64)
    g = psi.project_tangent(x, torch.randn(3, 5, generator=gen, dtype=F64))
    expected = psi.riemannian_grad(x, g).to(dtype)
    r = psi.riemannian_grad((scale * x).to(dtype), (g / scale).to(dtype))
    assert torch.isfinite(r).all()
    torch.testing.assert_close(r / scale, expected, rtol=1e-5, atol=0)
    assert (psi.distance_to_manifold((scale * x).to(dtype)) == 0).all()


def test_zero_rows_give_zero_steps_not_nan() -> None:
    psi = PSI()
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    g = torch.ones(2, 3)
    r = psi.riemannian_grad(x, g)
    assert torch.isfinite(r).all() and (r[0] == 0).all()
    assert torch.isfinite(psi.project_tangent(x, g)).all()
    torch.testing.assert_close(psi.distance_to_manifold(x), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(psi.dist(x[1:], 5 * x[1:]), torch.zeros(1))


def test_radial_statistics_see_rows_zero_rows_and_nonfinite_gradients() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    max_cos, determined, zero_rows, _ = radial_statistics(w, g).tolist()
    assert max_cos == pytest.approx(2**-0.5) and determined == 2 and zero_rows == 1
    g[0, 0] = math.inf
    assert torch.isnan(radial_statistics(w, g)).all()


# ------------------------------------------------------------------ graph walk


class TwoPaths(nn.Module):
    """One conv read twice: through BN, and straight into the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + 0.1 * self.conv(x)


class Residual(nn.Module):
    """The conv output feeds BN and a skip connection (two users of one node)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Tied(nn.Module):
    """One Parameter registered in two Linear layers, only one followed by BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6, bias=False)
        self.b = nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.b(x)


class Branchy(nn.Module):
    """Data-dependent control flow: not traceable by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else x


ROWS, TENSOR = PSI(batch_dims=1), PSI(batch_dims=0)
GRAPH_CASES = {
    "conv-bn, linear-bn, head and affine params excluded": (
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 3),
        ),
        {"0.weight": ROWS, "4.weight": ROWS},
    ),
    "bias before relu then bn breaks it": (
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
        {},
    ),
    "bias-free conv, relu, pool, bn": (
        nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(4)),
        {"0.weight": ROWS},
    ),
    "bias before max pool then bn is cancelled": (
        nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.BatchNorm2d(4)),
        {"0.weight": ROWS},
    ),
    "flatten then batchnorm1d keeps rows": (
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.BatchNorm1d(18)),
        {"0.weight": ROWS},
    ),
    "layer not followed by normalization": (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), {}),
    "weight read by two paths": (TwoPaths(), {}),
    "output read by two paths": (Residual(), {}),
    "tied weights": (Tied(), {}),
    "layernorm after a bias-free linear: whole tensor": (
        nn.Sequential(nn.Linear(5, 6, bias=False), nn.LayerNorm(6)),
        {"0.weight": TENSOR},
    ),
    "layernorm after a linear with bias: not invariant": (nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6)), {}),
    "groupnorm: whole tensor": (
        nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.GroupNorm(2, 4)),
        {"0.weight": TENSOR},
    ),
    "instancenorm keeps rows": (nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4)), {"0.weight": ROWS}),
    "conv transpose: whole tensor": (
        nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)),
        {"0.weight": TENSOR},
    ),
    "single-entry rows are skipped": (nn.Sequential(nn.Linear(1, 4), nn.BatchNorm1d(4)), {}),
}


@pytest.mark.parametrize("name", list(GRAPH_CASES))
def test_graph_walk_finds_exactly_the_invariant_weights(name: str) -> None:
    torch.manual_seed(0)
    model, expected = GRAPH_CASES[name]
    assert find_psi_weights(model) == expected


INPUTS = {
    "conv-bn, linear-bn, head and affine params excluded": (1, 5, 5),
    "bias-free conv, relu, pool, bn": (1, 6, 6),
    "bias before max pool then bn is cancelled": (1, 6, 6),
    "flatten then batchnorm1d keeps rows": (1, 5, 5),
    "layernorm after a bias-free linear: whole tensor": (5,),
    "groupnorm: whole tensor": (1, 5, 5),
    "instancenorm keeps rows": (1, 5, 5),
    "conv transpose: whole tensor": (3, 4, 4),
}


@pytest.mark.parametrize("name", list(INPUTS))
@given(seed=seeds)
def test_found_weights_really_are_invariant(name: str, seed: int) -> None:
    """Rescaling the groups the graph walk found by random factors in [0.1, 10] leaves the
    training-mode output unchanged (float64, BN eps shrunk to 1e-12)."""
    model, _ = GRAPH_CASES[name]
    model = model.to(F64).train()
    for module in model.modules():
        if hasattr(module, "eps"):
            module.eps = 1e-12
    gen = generator(seed)
    x = torch.randn(8, *INPUTS[name], generator=gen, dtype=F64)
    with torch.no_grad():
        before = model(x)
        saved = {n: p.clone() for n, p in model.named_parameters()}
        for param_name, manifold in find_psi_weights(model).items():
            w = model.get_parameter(param_name)
            groups = w.shape[0] if manifold.batch_dims == 1 else 1
            factors = 0.1 * 100 ** torch.rand(groups, generator=gen, dtype=F64)
            w.mul_(factors.reshape(-1, *[1] * (w.dim() - 1)) if groups > 1 else factors)
        after = model(x)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    torch.testing.assert_close(after, before, rtol=1e-7, atol=1e-7)


def test_untraceable_model_gets_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"torch.fx cannot trace Branchy.*ManifoldParameter\(w, PSI\(\)\)"):
        find_psi_weights(Branchy())


def test_numerical_check_drops_a_structural_false_positive() -> None:
    """Linear on (N, 4, 4) followed by BatchNorm1d(4): the sizes match, so the graph says
    "rows", but BN normalizes dim 1 (the sequence), not the linear's outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert find_psi_weights(model) == {"0.weight": ROWS}
    with pytest.warns(RuntimeWarning, match=r"\['0.weight'\].*left out"):
        assert find_psi_weights(model, (torch.randn(8, 4, 4),)) == {}
    good = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    buffers = {n: b.clone() for n, b in good.named_buffers()}
    assert find_psi_weights(good.eval(), (torch.randn(8, 4),)) == {"0.weight": ROWS}
    assert not good.training  # mode and running statistics are restored
    for n, b in good.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)


def test_declare_psi_replaces_parameters_in_place_of_the_old_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5, bias=False), nn.BatchNorm1d(5)
    )
    model[0].weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model[3].weight = ManifoldParameter(model[3].weight, Stiefel())  # an existing declaration wins
    assert declare_psi(model) == {"0.weight": ROWS}
    assert isinstance(model[0].weight, ManifoldParameter) and model[0].weight.manifold == ROWS
    assert model[0].weight.requires_grad is False
    assert model[3].weight.manifold == Stiefel()
    torch.testing.assert_close(model[0].weight.detach(), before["0.weight"], rtol=0, atol=0)
    assert declare_psi(model) == {}  # idempotent
