"""Weight conditioning (manifold_opt.nn.weight_conditioning)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

from manifold_opt.nn import condition_weight, weight_as_matrix, weight_conditioning

from .cases import generator, seeds

F64 = torch.float64


def kappa(matrix: torch.Tensor) -> float:
    s = torch.linalg.svdvals(matrix.detach().double())
    return float(s[0] / s[-1])


def row_scaled(layer: nn.Module, seed: int, spread: float = 1.5) -> nn.Module:
    """Give each output unit a log-normal scale (ill-conditioning caused by rows of different sizes)."""
    gen = generator(seed)
    with torch.no_grad():
        w = layer.weight
        scales = torch.exp(spread * torch.randn(w.shape[0], generator=gen))
        w.copy_(torch.randn(w.shape, generator=gen) * scales.view(-1, *([1] * (w.dim() - 1))))
    return layer


LAYERS = {
    "linear": lambda: nn.Linear(256, 128),
    "conv2d": lambda: nn.Conv2d(16, 64, 3),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_norms_are_equalized(make, mode: str) -> None:
    layer = weight_conditioning(row_scaled(make(), seed=0), mode=mode)
    w = weight_as_matrix(layer.weight.detach())
    rows, columns = w.norm(dim=1), w.norm(dim=0)
    if mode == "row":
        torch.testing.assert_close(rows, torch.ones_like(rows))
    else:  # "column" and "both" end with the column scaling
        torch.testing.assert_close(columns, torch.ones_like(columns))
    if mode == "both":  # the row pass evened out the rows first: far more even than the raw rows
        raw = weight_as_matrix(layer.parametrizations.weight.original.detach()).norm(dim=1)
        assert float(rows.max() / rows.min()) < 0.1 * float(raw.max() / raw.min())


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
@given(seed=seeds)
def test_row_mode_lowers_kappa_of_row_scaled_weights(make, seed: int) -> None:
    layer = row_scaled(make(), seed)
    before = kappa(weight_as_matrix(layer.weight))
    after = kappa(weight_as_matrix(weight_conditioning(layer, mode="row").weight))
    assert before > 20
    assert after < before / 5 and after < 10


@given(seed=seeds)
def test_column_mode_lowers_kappa_of_column_scaled_weights(seed: int) -> None:
    gen = generator(seed)
    w = torch.randn(256, 128, generator=gen, dtype=F64) * torch.exp(1.5 * torch.randn(128, generator=gen, dtype=F64))
    assert kappa(condition_weight(w, "column")) < kappa(w) / 5
    both = w * torch.exp(torch.randn(256, 1, generator=gen, dtype=F64))
    assert kappa(condition_weight(both, "both")) < kappa(both) / 5


@given(seed=seeds, out=st.integers(2, 12), extra=st.integers(0, 10))
def test_row_equilibration_is_within_sqrt_m_of_every_row_scaling(seed: int, out: int, extra: int) -> None:
    """van der Sluis: for a full-row-rank W (m rows), kappa(D_r^-1 W) <= sqrt(m) * kappa(D W) for every diagonal D."""
    gen = generator(seed)
    w = torch.randn(out, out + extra, generator=gen, dtype=F64)
    equilibrated = kappa(condition_weight(w, "row"))
    for _ in range(5):
        d = torch.exp(2 * torch.randn(out, 1, generator=gen, dtype=F64))
        assert equilibrated <= math.sqrt(out) * kappa(d * w) * (1 + 1e-9)


def test_intrinsic_low_rank_is_not_fixed() -> None:
    """Documented limitation: a rank-8 weight plus small noise stays ill-conditioned."""
    gen = generator(1)
    w = torch.randn(128, 8, generator=gen, dtype=F64) @ torch.randn(8, 256, generator=gen, dtype=F64)
    w = w + 0.01 * torch.randn(128, 256, generator=gen, dtype=F64)
    assert kappa(condition_weight(w, "row")) > 0.5 * kappa(w) > 100


@given(seed=seeds, scale=st.floats(1e-3, 1e3))
def test_row_mode_is_scale_invariant_per_row_and_its_gradient_is_orthogonal_to_each_row(seed: int, scale: float):
    gen = generator(seed)
    w = torch.randn(6, 10, generator=gen, dtype=F64)
    row_scales = scale * torch.exp(torch.randn(6, 1, generator=gen, dtype=F64))
    torch.testing.assert_close(condition_weight(row_scales * w, "row"), condition_weight(w, "row"))
    w.requires_grad_(True)
    x = torch.randn(4, 10, generator=gen, dtype=F64)
    (functional.linear(x, condition_weight(w, "row")) ** 3).sum().backward()
    euler = (w.grad * w.detach()).sum(dim=1)  # <grad_i, w_i> = 0: the loss does not see a row's scale
    assert float(euler.abs().max()) < 1e-10 * (1 + float(w.grad.abs().max()))


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(12, 5), nn.Conv1d(3, 6, 3), nn.Conv2d(4, 8, 3), nn.ConvTranspose2d(6, 4, 3)],
    ids=["linear", "conv1d", "conv2d", "convtranspose2d"],
)
@pytest.mark.parametrize("mode", ["row", "column", "both"])
def test_gradients_are_finite_even_with_a_zero_row(layer: nn.Module, mode: str) -> None:
    torch.manual_seed(0)
    if isinstance(layer, nn.Linear):
        x = torch.randn(3, layer.in_features)
    else:
        x = torch.randn(2, layer.in_channels, *([7] * (layer.weight.dim() - 2)))
    with torch.no_grad():
        layer.weight[0].zero_()
    layer = weight_conditioning(layer, mode=mode)
    raw = layer.parametrizations.weight.original
    layer(x).square().mean().backward()
    assert bool(torch.isfinite(raw.grad).all()) and float(raw.grad.abs().max()) > 0
    assert bool(torch.isfinite(layer.weight).all())


def test_transposed_convolution_equalizes_its_output_units() -> None:
    layer = weight_conditioning(row_scaled(nn.ConvTranspose2d(6, 4, 3), seed=2))  # weight (in=6, out=4, 3, 3)
    per_output = layer.weight.detach().movedim(1, 0).reshape(4, -1).norm(dim=1)
    torch.testing.assert_close(per_output, torch.ones(4))


def test_the_raw_weight_stays_trainable_and_the_forward_uses_the_conditioned_one() -> None:
    torch.manual_seed(0)
    layer = weight_conditioning(nn.Conv2d(3, 8, 3, padding=1), mode="both")
    assert [name for name, _ in layer.named_parameters()] == ["bias", "parametrizations.weight.original"]
    x = torch.randn(2, 3, 6, 6)
    conditioned = condition_weight(weight_as_matrix(layer.parametrizations.weight.original), "both")
    expected = functional.conv2d(x, conditioned.reshape(8, 3, 3, 3), layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.randn(2, 8, 6, 6)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(mode="rows"), ValueError, "unknown weight-conditioning mode 'rows'"),
        (dict(name="bias"), ValueError, r"at least 2 dimensions.*\(5,\)"),
        (dict(name="missing"), TypeError, "no tensor attribute 'missing'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_reason(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        weight_conditioning(nn.Linear(4, 5), **kwargs)
    with pytest.raises(ValueError, match="unknown weight-conditioning mode"):
        condition_weight(torch.randn(3, 3), "diagonal")
