"""ONI (manifold_opt.nn.oni) and the per-layer spectrum report."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
from hypothesis import given
from torch import nn
from torch.nn import functional

from manifold_opt.manifolds.linalg import newton_schulz
from manifold_opt.nn import LayerSpectrum, layer_spectra, oni, oni_orthogonalize, spectra_table, weight_as_matrix

from .cases import seeds

F64 = torch.float64


def kaiming_conv(out: int, inp: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(inp, out, k, bias=False).to(dtype)
    nn.init.kaiming_normal_(conv.weight)
    return conv


def singular_values(module: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.linalg.svdvals(weight_as_matrix(module.weight.double(), 0))


def official_oni(v: torch.Tensor, iterations: int, column: bool, normalize_column: bool = True) -> torch.Tensor:
    """The official ONINorm / ONINorm_colum (huangleiBuaa/ONI, NormedConv.py), one group, B-form.

    ``normalize_column=False`` reproduces the official column mode, which forgets S / ||S||_F.
    """
    zc = v - v.mean(dim=-1, keepdim=True)
    s = zc.mT @ zc if column else zc @ zc.mT
    s = s + 1e-5 * torch.eye(s.shape[-1], dtype=v.dtype)
    norm = torch.linalg.matrix_norm(s)
    if not column or normalize_column:
        s = s / norm
    b = torch.eye(s.shape[-1], dtype=v.dtype)
    for _ in range(iterations):
        b = 1.5 * b - 0.5 * (b @ b @ b) @ s
    return (zc @ b if column else b @ zc) / norm.sqrt()


# ------------------------------------------------------------- the ONI map
@pytest.mark.parametrize("column", [False, True], ids=["row-64x576", "column-64x27"])
def test_oni_equals_the_official_b_iteration(column: bool) -> None:
    v = weight_as_matrix(kaiming_conv(64, 3 if column else 64, 3, seed=0, dtype=F64).weight.detach())
    for iterations in (0, 1, 3, 5, 7):
        ours = oni_orthogonalize(v, iterations)
        reference = official_oni(v, iterations, column)
        # equal up to the epsilon inside the iteration (relative O(eps / ||S||_F))
        torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


def test_oni_is_the_librarys_newton_schulz_iteration() -> None:
    """One Newton iteration in the library: ONI is newton_schulz on Zc / sqrt(||S||_F)."""
    v = torch.randn(2 * 16, 40, generator=torch.Generator().manual_seed(1), dtype=F64)
    z = v.reshape(2, 16, 40)
    zc = z - z.mean(-1, keepdim=True)
    norm = torch.linalg.matrix_norm(zc @ zc.mT + 1e-5 * torch.eye(16, dtype=F64))
    expected = newton_schulz(zc / norm.sqrt()[:, None, None], 4).reshape(32, 40)
    assert torch.equal(oni_orthogonalize(v, 4, groups=2), expected)


def test_official_column_mode_diverges_and_ours_does_not() -> None:
    """The reason both modes are normalized: the official column mode explodes on a 64x27 kernel."""
    v = weight_as_matrix(kaiming_conv(64, 3, 3, seed=0, dtype=F64).weight.detach())
    official = torch.linalg.svdvals(official_oni(v, 5, column=True, normalize_column=False))
    ours = torch.linalg.svdvals(oni_orthogonalize(v, 5))
    assert not bool(torch.isfinite(official).all()) or float(official.max()) > 1e10
    assert float(ours.max()) <= 1.0 + 1e-9


# One earlier draw on a 64x576 Kaiming-initialized matrix (min / max singular value).
REFERENCE_TABLE = {0: (0.24, 0.46), 1: (0.35, 0.64), 3: (0.70, 0.96), 5: (0.978, 1.000), 7: (1.000, 1.000)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_singular_values_match_the_table_of_algorithms_md(seed: int) -> None:
    conv = oni(kaiming_conv(64, 64, 3, seed), iterations=0, learn_gain=False, gain=1.0)
    parametrization = conv.parametrizations.weight[0]
    for iterations, (low, high) in REFERENCE_TABLE.items():
        parametrization.iterations = iterations
        s = singular_values(conv)
        # the table is one draw: over 20 seeds sigma_min at T = 3 is 0.683 +- 0.008 (0.666 to 0.699)
        assert float(s.min()) == pytest.approx(low, abs=0.04), iterations
        assert float(s.max()) == pytest.approx(high, abs=0.02), iterations


LAYER_CASES = {
    "conv-row": (lambda seed: kaiming_conv(64, 64, 3, seed), True),  # 64 x 576: row mode
    "conv-column": (lambda seed: kaiming_conv(64, 3, 3, seed), False),  # 64 x 27: column mode, uncentered
    "linear-row": (lambda seed: nn.Linear(576, 64), True),
    "linear-column": (lambda seed: nn.Linear(27, 64), False),
}


def newton_schulz_scalar(sigma: torch.Tensor, iterations: int) -> torch.Tensor:
    for _ in range(iterations):
        sigma = 1.5 * sigma - 0.5 * sigma**3
    return sigma


@pytest.mark.parametrize("case", LAYER_CASES)
@given(seed=seeds)
def test_conditioning_rises_monotonically_with_iterations_as_the_scalar_map_predicts(case: str, seed: int) -> None:
    """ONI acts on each singular value of Y0 = Zc / sqrt(||S||_F) by sigma -> 1.5 sigma - 0.5 sigma^3."""
    make, center = LAYER_CASES[case]
    torch.manual_seed(seed)
    layer = oni(make(seed % 1000), iterations=0, center=center, gain=1.0)
    parametrization = layer.parametrizations.weight[0]
    initial = singular_values(layer)
    ratios = []
    for iterations in range(8):
        parametrization.iterations = iterations
        s = singular_values(layer)
        torch.testing.assert_close(s, newton_schulz_scalar(initial, iterations), atol=2e-6, rtol=0)
        ratios.append(float(s.min() / s.max()))
    assert all(b >= a - 1e-6 for a, b in itertools.pairwise(ratios)), ratios
    if case.endswith("row"):
        assert ratios[7] >= 0.99, ratios


@pytest.mark.parametrize("case", LAYER_CASES)
def test_sigma_ratio_reaches_099_at_seven_iterations_for_almost_every_draw(case: str) -> None:
    """The issue's criterion. Row mode (64 x 576): every draw. Column mode (64 x 27): the draw's
    smallest singular value sets the pace; over 1000 Kaiming draws 1.1% stay below 0.99 (worst 0.947)."""
    make, center = LAYER_CASES[case]
    ratios = []
    for seed in range(100):
        torch.manual_seed(seed)
        layer = oni(make(seed), iterations=7, center=center)
        s = singular_values(layer)
        ratios.append(float(s.min() / s.max()))
    below = sum(r < 0.99 for r in ratios)
    if case.endswith("row"):
        assert below == 0, min(ratios)
    else:
        assert below <= 5 and min(ratios) > 0.9, sorted(ratios)[:6]
    assert ratios[0] >= 0.99  # the seed-0 draw of the example


def test_centered_column_mode_has_one_zero_singular_value_and_the_rest_converge() -> None:
    """Centering makes every row orthogonal to the ones vector: rank <= d - 1 (inherent to centered ONI)."""
    layer = oni(kaiming_conv(64, 3, 3, seed=4), iterations=7, gain=1.0)
    s = singular_values(layer)
    assert float(s[-1]) < 1e-5
    assert float(s[:-1].min()) >= 0.99 and float(s.max()) <= 1.0 + 1e-5


def test_groups_are_orthogonalized_separately() -> None:
    layer = oni(nn.Linear(100, 48), iterations=9, groups=3)
    w = layer.weight.detach().double().reshape(3, 16, 100)
    eye = torch.eye(16, dtype=F64).expand(3, 16, 16)
    torch.testing.assert_close(w @ w.mT, eye, atol=1e-4, rtol=0)
    cross = w[0] @ w[1].mT
    assert float(cross.abs().max()) > 1e-2  # not orthogonal across groups


# --------------------------------------------------------- the parametrization
def test_default_gain_is_sqrt2_for_conv_and_1_for_linear_and_learnable_when_asked() -> None:
    conv = oni(nn.Conv2d(8, 16, 3), iterations=9)
    linear = oni(nn.Linear(30, 10), iterations=9, learn_gain=False)
    conv_gain, linear_gain = conv.parametrizations.weight[0].gain, linear.parametrizations.weight[0].gain
    assert isinstance(conv_gain, nn.Parameter) and conv_gain.shape == (16,)
    torch.testing.assert_close(conv_gain.detach(), torch.full((16,), math.sqrt(2)))
    assert not isinstance(linear_gain, nn.Parameter) and "parametrizations.weight.0.gain" in dict(
        linear.named_buffers()
    )
    torch.testing.assert_close(linear_gain, torch.ones(10))
    w = conv.weight.detach().reshape(16, -1)
    torch.testing.assert_close(w @ w.T, 2 * torch.eye(16), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(20, 12),
        nn.Linear(6, 12),
        nn.Conv1d(4, 8, 3),
        nn.Conv2d(3, 16, 3),
        nn.Conv2d(16, 8, 3, padding=1),
        nn.ConvTranspose2d(8, 6, 3),
    ],
    ids=["linear-row", "linear-column", "conv1d", "conv2d-column", "conv2d-row", "convtranspose2d"],
)
def test_gradients_are_finite_and_reach_the_raw_weight_and_the_gain(layer: nn.Module) -> None:
    torch.manual_seed(0)
    if isinstance(layer, nn.Linear):
        x = torch.randn(5, layer.in_features)
    else:
        x = torch.randn(2, layer.in_channels, *([9] * (layer.weight.dim() - 2)))
    layer = oni(layer, iterations=5)
    raw = layer.parametrizations.weight.original
    gain = layer.parametrizations.weight[0].gain
    layer(x).square().mean().backward()
    for tensor in (raw, gain):
        assert tensor.grad is not None and bool(torch.isfinite(tensor.grad).all())
        assert float(tensor.grad.abs().max()) > 0


def test_transposed_convolution_is_orthogonal_along_its_output_axis() -> None:
    layer = oni(nn.ConvTranspose2d(16, 8, 3), iterations=9, gain=1.0)  # weight (in=16, out=8, 3, 3)
    w = layer.weight.detach().movedim(1, 0).reshape(8, -1)
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="groups=2"):
        oni(nn.ConvTranspose2d(8, 8, 3, groups=2))


def test_gradcheck_through_the_iterations() -> None:
    v = torch.randn(5, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: oni_orthogonalize(m, 3), (v,))
    tall = torch.randn(8, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: oni_orthogonalize(m, 3, center=False), (tall,))


def test_zero_weight_gives_zero_output_and_finite_gradients() -> None:
    layer = oni(nn.Linear(6, 4), iterations=5)
    with torch.no_grad():
        layer.parametrizations.weight.original.zero_()
    assert torch.equal(layer.weight, torch.zeros(4, 6))
    layer(torch.randn(3, 6)).sum().backward()
    assert bool(torch.isfinite(layer.parametrizations.weight.original.grad).all())


def test_forward_uses_the_orthogonalized_weight_and_training_moves_the_raw_one() -> None:
    torch.manual_seed(0)
    conv = oni(nn.Conv2d(3, 8, 3, padding=1), iterations=5)
    x = torch.randn(4, 3, 8, 8)
    expected = functional.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)
    raw_before = conv.parametrizations.weight.original.detach().clone()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    losses = []
    target = torch.randn(4, 8, 8, 8)
    for _ in range(30):
        opt.zero_grad()
        loss = (conv(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(conv.parametrizations.weight.original.detach(), raw_before)
    assert losses[-1] < losses[0]


def test_bfloat16_layer_is_orthogonalized_in_float32() -> None:
    layer = oni(nn.Linear(64, 16).bfloat16(), iterations=7)
    assert layer.weight.dtype == torch.bfloat16
    s = torch.linalg.svdvals(layer.weight.detach().float())
    assert float(s.min()) > 0.97 and float(s.max()) < 1.03  # bf16 rounding of the result


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    source = oni(nn.Linear(12, 6), iterations=4)
    target = oni(nn.Linear(12, 6), iterations=4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(target.weight, source.weight)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(groups=5), ValueError, "groups=5 must be a positive divisor of the 12 output units"),
        (dict(groups=0), ValueError, "groups=0"),
        (dict(iterations=-1), ValueError, "iterations must be an int >= 0"),
        (dict(iterations=2.5), ValueError, "iterations"),
        (dict(gain=0.0), ValueError, "gain must be a finite number > 0"),
        (dict(gain=math.nan), ValueError, "gain"),
        (dict(center=1), TypeError, "center must be a bool"),
        (dict(name="bias"), ValueError, r"at least 2 dimensions.*\(12,\)"),
        (dict(name="kernel"), TypeError, "no tensor attribute 'kernel'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_reason(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        oni(nn.Linear(10, 12), **kwargs)


def test_a_non_module_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        oni(torch.randn(3, 3))


# ------------------------------------------------------------ spectrum report
def test_layer_spectra_reports_the_effective_weights() -> None:
    torch.manual_seed(0)
    rows = torch.logspace(0, 2, 8).unsqueeze(1)
    model = nn.Sequential(
        oni(nn.Conv2d(3, 8, 3), iterations=9, center=False, gain=1.0),
        nn.Flatten(),
        nn.Linear(8, 8, bias=False),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3),
    )
    with torch.no_grad():
        model[2].weight.copy_(torch.eye(8) * rows)
    report = layer_spectra(model)
    assert list(report) == ["0.weight", "2.weight", "4.weight"]
    oni_layer, diagonal, transposed = report.values()
    assert isinstance(oni_layer, LayerSpectrum) and oni_layer.shape == (8, 27)
    assert oni_layer.kappa == pytest.approx(1.0, abs=1e-3)
    assert oni_layer.orthogonality_error < 1e-3 and oni_layer.scaled_orthogonality_error < 1e-3
    assert diagonal.sigma_min == pytest.approx(1.0) and diagonal.sigma_max == pytest.approx(100.0, rel=1e-5)
    assert diagonal.kappa == pytest.approx(100.0, rel=1e-5)
    assert diagonal.orthogonality_error == pytest.approx(100.0**2 - 1, rel=1e-5)
    assert diagonal.scaled_orthogonality_error == pytest.approx((1e4 - 1) / (1e4 + 1), rel=1e-6)
    assert transposed.shape == (2, 36)  # output axis 1
    table = spectra_table(report)
    assert table.splitlines()[2].split()[:2] == ["2.weight", "8x8"]


def test_scaled_orthogonality_error_ignores_a_global_scale_and_singular_kappa_is_inf() -> None:
    q = torch.linalg.qr(torch.randn(10, 6, dtype=F64)).Q
    scaled = LayerSpectrum.of(3.0 * q)
    assert scaled.scaled_orthogonality_error < 1e-12 and scaled.orthogonality_error == pytest.approx(8.0)
    assert LayerSpectrum.of(torch.zeros(3, 4)).kappa == math.inf
