"""OIALR: rank schedule, rank rule, function invariance, optimizer state, checkpoints, DDP, errors."""

from __future__ import annotations

import datetime
import io
import itertools
import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Stiefel
from manifold_opt.lowrank import OIALR, LowRankConv, LowRankLayer, LowRankLinear, compact_model, oialr_rank
from manifold_opt.lowrank.optimizer_state import change_basis

F64 = torch.float64

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01),
    "riemannian-sgd": lambda params: RiemannianSGD(params, lr=0.05, momentum=0.9),
    "riemannian-adam": lambda params: RiemannianAdam(params, lr=1e-2, amsgrad=True),
}


# ------------------------------------------------------------------ fixtures
def mlp(seed: int, widths: tuple[int, ...] = (12, 24, 24, 5), dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Conv layers with reflect padding, groups and a stride, then a linear head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, stride=2)
        self.conv3 = nn.Conv2d(8, 12, 2)
        self.head = nn.Linear(12 * 3 * 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        x = torch.tanh(self.conv3(x))
        return self.head(x.flatten(1))


def batch(step: int, model: nn.Module, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch for ``step`` (images for ConvNet, vectors otherwise)."""
    gen = torch.Generator().manual_seed(1000 + step)
    if isinstance(model, ConvNet):
        x = torch.randn(size, 3, 8, 8, generator=gen)
        return x, torch.randint(0, 4, (size,), generator=gen)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, LowRankLinear)))
    dtype = next(model.parameters()).dtype
    x = torch.randn(size, first.in_features, generator=gen, dtype=dtype)
    out = [m for m in model.modules() if isinstance(m, (nn.Linear, LowRankLinear))][-1].out_features
    return x, torch.randint(0, out, (size,), generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, oialr: OIALR | None, steps: range) -> list[bool]:
    changes = []
    for step in steps:
        x, y = batch(step, model)
        loss = functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if oialr is not None:
            changes.append(oialr.step())
        optimizer.zero_grad()
    return changes


def model_params(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters()}


def assert_optimizer_consistent(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer holds exactly the model's trainable parameters, and no state for anything else."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len({id(p) for p in held}) == len(held)
    assert {id(p) for p in held} == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(map(id, optimizer.state)) <= model_params(model)
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if key.endswith("_xtm"):  # Stiefel's tracked X^T m: one p x p matrix (short side)
                assert value.shape == (min(param.shape),) * 2, (key, value.shape, param.shape)
            elif isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.shape == param.shape, (key, value.shape, param.shape)


# ------------------------------------------------------------------ rank rule
def official_rank(s: torch.Tensor, prevk: int, tau: float, min_dim: int) -> int:
    """The branches of the official ``_update_inner_dim_and_shapes``, floor ``max(1, ...)`` applied."""
    nz = torch.nonzero(s < s[0] * tau)
    if len(nz) == 0:
        return s.shape[0]
    first = int(nz[0])
    if first < prevk * 0.5 and prevk * 0.5 > min_dim:
        return int(prevk * 0.5)
    if first < min_dim:
        return min_dim
    return first


@given(
    values=st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=40),
    tau=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5, 1.0]),
    short_side=st.integers(1, 500),
)
def test_rank_rule_matches_the_official_branches(values: list[float], tau: float, short_side: int) -> None:
    s = torch.tensor(sorted(values, reverse=True), dtype=F64)
    rank = s.shape[0]
    floor = min(max(1, int(0.01 * max(short_side, rank))), rank)
    new = oialr_rank(s, tau=tau, min_rank=floor)
    assert new == official_rank(s, rank, tau, floor)
    assert max(1, min(floor, rank), rank // 2) <= new <= rank
    below = torch.nonzero(s < tau * s[0])
    if below.numel() == 0:
        assert new == rank
    elif new > rank // 2 and new > floor:
        assert new == int(below[0, 0])  # cut exactly at the first small singular value


def test_rank_rule_max_cut_and_floor() -> None:
    s = torch.tensor([1.0] + [1e-3] * 99)
    assert oialr_rank(s, tau=0.1, min_rank=1) == 50
    assert oialr_rank(s, tau=0.1, min_rank=1, max_cut=0.9) == 10
    assert oialr_rank(s, tau=0.1, min_rank=1, max_cut=1.0) == 1
    assert oialr_rank(s, tau=0.1, min_rank=70) == 70
    assert oialr_rank(s, tau=0.0, min_rank=1) == 100


# ------------------------------------------------------------------ schedule
def test_schedule_delay_frequency_half_cut_and_floor() -> None:
    """τ = 1 asks for rank 1 at every check: the rank halves per check down to the 1% floor,
    conversions and cuts happen exactly at delay + k·frequency, and the rank never grows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Tanh(), nn.Linear(300, 7))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    oialr = OIALR(model, optimizer, delay=5, frequency=3, tau=1.0)
    assert oialr.eligibility == {"0": "low-rank", "2": "last layer (keep_last_layer=True)"}
    ranks, changed_at = [], []
    for step in range(1, 33):
        changed = oialr.step()
        ranks.append(oialr.ranks()["0"])
        if changed:
            changed_at.append(step)
        assert isinstance(model[0], nn.Linear if step < 5 else LowRankLinear)
    assert changed_at == [5, 8, 11, 14, 17, 20, 23]
    # floor max(1, int(0.01 * 200)) = 2; the first check runs at the conversion itself
    expected = {5: 100, 8: 50, 11: 25, 14: 12, 17: 6, 20: 3, 23: 2, 26: 2, 29: 2, 32: 2}
    for step, rank in expected.items():
        assert ranks[step - 1] == rank
    assert all(b <= a for a, b in itertools.pairwise(ranks))
    assert [record["step"] for record in oialr.history] == [0, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32]
    assert oialr.history[1]["ranks"] == {"0": 100}
    assert oialr.step_count == 32


def test_delay_zero_converts_at_construction_and_tau_zero_never_cuts() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=0, frequency=2, tau=0.0)
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], LowRankLinear)
    assert isinstance(model[4], nn.Linear)  # the head
    train(model, optimizer, oialr, range(10))
    assert oialr.ranks() == {"0": 12, "2": 24}


@given(seed=st.integers(0, 2**16), tau=st.sampled_from([0.1, 0.3, 0.6]))
def test_rank_cut_follows_the_rule_on_trained_cores(seed: int, tau: float) -> None:
    """At every check the new rank is the rule applied to the core's singular values then."""
    model = mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    oialr = OIALR(model, optimizer, delay=3, frequency=3, tau=tau)
    checks = 0
    for step in range(15):
        x, y = batch(step, model)
        functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        singular = {  # of Σ, or of W at the conversion
            name: torch.linalg.svdvals(layer.sigma if isinstance(layer, LowRankLayer) else layer.weight).detach()
            for name, layer in oialr.layers.items()
        }
        before = oialr.ranks()
        oialr.step()
        optimizer.zero_grad()
        if (step + 1) % 3 == 0:
            checks += 1
            for name, values in singular.items():
                layer = oialr.layers[name]
                floor = max(1, int(0.01 * layer.full_rank))
                assert layer.rank == oialr_rank(values, tau=tau, min_rank=floor) <= before[name]
        else:
            assert oialr.ranks() == before
    assert checks == 5


# ------------------------------------------------------------------ invariance
@given(seed=st.integers(0, 2**16), conv=st.booleans())
def test_rediagonalization_without_cut_keeps_the_function(seed: int, conv: bool) -> None:
    model = ConvNet(seed) if conv else mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=1000, tau=0.0)
    train(model, optimizer, oialr, range(8))  # Σ is now dense, no longer diagonal
    layer = next(iter(oialr.layers.values()))
    assert (layer.sigma - torch.diag(torch.diagonal(layer.sigma))).abs().max() > 1e-4
    x, _ = batch(99, model)
    with torch.no_grad():
        before = model(x)
        ranks = oialr.ranks()
        assert not oialr.rediagonalize(cut=False)
        after = model(x)
    assert oialr.ranks() == ranks
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    for layer in oialr.layers.values():
        sigma = layer.sigma.detach()
        assert torch.equal(sigma, torch.diag(torch.diagonal(sigma)))  # diagonal again
        assert Stiefel().distance_to_manifold(layer.u) < 1e-5
        assert Stiefel().distance_to_manifold(layer.v) < 1e-5


@given(seed=st.integers(0, 2**16))
def test_rotated_state_makes_sgd_momentum_blind_to_oialr_on_square_layers(seed: int) -> None:
    """On square layers with τ = 0, ``W ↦ Σ`` is an orthogonal change of coordinates and SGD with
    momentum and weight decay is equivariant under it: with rotated state the trajectory is the
    full-rank one (to rounding); the official slicing does not have this property."""
    widths = (10, 10, 10, 3)
    reference = mlp(seed, widths, F64)
    optimizer = OPTIMIZERS["sgd"](reference.parameters())
    train(reference, optimizer, None, range(25))
    results = {}
    for transfer in ("rotate", "slice"):
        model = mlp(seed, widths, F64)
        optimizer = OPTIMIZERS["sgd"](model.parameters())
        oialr = OIALR(model, optimizer, delay=4, frequency=5, tau=0.0, state_transfer=transfer)
        train(model, optimizer, oialr, range(25))
        x, _ = batch(99, model)
        with torch.no_grad():
            results[transfer] = (model(x) - reference(x)).abs().max().item()
    assert results["rotate"] < 1e-9
    assert results["slice"] > 1e-6


def test_conversion_maps_the_first_moment_exactly() -> None:
    model = mlp(3)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    oialr = OIALR(model, optimizer, delay=3, frequency=100, tau=0.0)
    train(model, optimizer, oialr, range(2))
    weight = model[2].weight
    x, y = batch(2, model)
    functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    momentum = optimizer.state[weight]["momentum_buffer"].clone()
    assert oialr.step()  # step 3 = delay: converted
    layer = model[2]
    torch.testing.assert_close(optimizer.state[layer.sigma]["momentum_buffer"], layer.u.mT @ momentum @ layer.v)
    assert weight not in optimizer.state


def test_quadratic_change_of_basis_is_the_variance_of_independent_entries() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b, k = 5, 4, 3
    left = torch.linalg.qr(torch.randn(a, a, generator=gen, dtype=F64))[0][:, :k]
    right = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=F64))[0][:, :k]
    variance = torch.rand(a, b, generator=gen, dtype=F64)
    # Jacobian of vec(G) -> vec(Lᵀ G R); for independent entries Var(G') = diag(J diag(V) Jᵀ)
    jacobian = torch.kron(left.mT, right.mT)
    expected = (jacobian @ torch.diag(variance.flatten()) @ jacobian.mT).diagonal().reshape(k, k)
    torch.testing.assert_close(change_basis(variance, left, right, "quadratic"), expected)
    m = torch.randn(a, b, generator=gen, dtype=F64)
    torch.testing.assert_close(change_basis(m, left, right, "linear"), left.mT @ m @ right)
    square = torch.linalg.qr(torch.randn(a, a, generator=gen, dtype=F64))[0]  # mass is kept by a rotation
    torch.testing.assert_close(change_basis(variance, square, None, "quadratic").sum(), variance.sum())
    assert torch.equal(change_basis(m, left, right, "reset"), torch.zeros(k, k, dtype=F64))


# ------------------------------------------------------------------ optimizer state
@pytest.mark.parametrize("transfer", ["rotate", "slice"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_follows_sigma_through_every_cut(name: str, transfer: str) -> None:
    model = ConvNet(1)
    optimizer = OPTIMIZERS[name](model.parameters())
    oialr = OIALR(model, optimizer, delay=4, frequency=3, tau=0.5, state_transfer=transfer)
    history = []
    for step in range(22):
        train(model, optimizer, oialr, range(step, step + 1))
        assert_optimizer_consistent(model, optimizer)
        history.append(oialr.ranks())
    assert all(isinstance(layer, LowRankConv) for layer in oialr.layers.values())
    assert history[-1] != history[3], "no rank was cut: the test exercises nothing"
    for layer in oialr.layers.values():
        state = optimizer.state[layer.sigma]
        expected_keys = {"momentum_buffer"} if "sgd" in name else {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        if name in ("adam", "adamw"):
            expected_keys.discard("max_exp_avg_sq")
        assert set(state) == expected_keys
        if "step" in state:
            # rotate keeps W's step count through the conversion; slice starts Σ afresh
            assert float(state["step"]) == (22 if transfer == "rotate" else 22 - 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_param_group_options_carry_over() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(
        [{"params": list(model[0].parameters()), "lr": 0.5}, {"params": list(model[2:].parameters())}],
        lr=0.1,
        momentum=0.9,
    )
    OIALR(model, optimizer, delay=0, frequency=1, tau=0.0)
    assert any(p is model[0].sigma for p in optimizer.param_groups[0]["params"])
    assert any(p is model[2].sigma for p in optimizer.param_groups[1]["params"])
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert_optimizer_consistent(model, optimizer)


def test_unknown_state_is_refused_not_guessed() -> None:
    model = mlp(0)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    train(model, optimizer, None, range(2))
    with pytest.raises(ValueError, match="exp_inf"):
        OIALR(model, optimizer, delay=0, frequency=1)
    model = mlp(0)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=2, tau=0.5, state_kinds={"exp_inf": "quadratic"})
    train(model, optimizer, oialr, range(9))
    assert_optimizer_consistent(model, optimizer)


# ------------------------------------------------------------------ trainable bases
def test_trainable_bases_stay_orthonormal_with_tangent_state() -> None:
    model = mlp(2)
    optimizer = RiemannianSGD(model.parameters(), lr=0.05, momentum=0.9)
    oialr = OIALR(model, optimizer, delay=3, frequency=4, tau=0.4, train_bases=True)
    train(model, optimizer, oialr, range(20))
    assert_optimizer_consistent(model, optimizer)
    for layer in oialr.layers.values():
        assert isinstance(layer.u, ManifoldParameter) and isinstance(layer.u.manifold, Stiefel)
        assert layer.rank < layer.full_rank
        for basis in (layer.u, layer.v):
            assert Stiefel().distance_to_manifold(basis.detach()) < 1e-5
            xi = optimizer.state[basis]["momentum_buffer"]
            assert xi.shape == basis.shape
            # stored where it was formed (the rotated basis of the previous step) and projected at
            # the next step: one step of lr 0.05 away from tangent at the current basis
            projected = Stiefel().project_tangent(basis.detach(), xi)
            assert (projected - xi).norm() < 0.05 * xi.norm()
    with pytest.raises(TypeError, match="RiemannianSGD"):
        OIALR(mlp(0), torch.optim.SGD(mlp(0).parameters(), lr=0.1), train_bases=True)


# ------------------------------------------------------------------ checkpoints
def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, oialr: OIALR) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "oialr": oialr.state_dict()}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "train_bases", "net"),
    [("adamw", False, "mlp"), ("sgd", False, "conv"), ("riemannian-adam", True, "mlp")],
)
def test_checkpoint_after_cuts_restores_and_continues_bit_identically(name: str, train_bases: bool, net: str) -> None:
    def build():
        model = ConvNet(5) if net == "conv" else mlp(5)
        optimizer = OPTIMIZERS[name](model.parameters())
        oialr = OIALR(model, optimizer, delay=3, frequency=4, tau=0.4, train_bases=train_bases)
        return model, optimizer, oialr

    model, optimizer, oialr = build()
    train(model, optimizer, oialr, range(12))
    assert any(rank < layer.full_rank for rank, layer in zip(oialr.ranks().values(), oialr.layers.values()))
    saved = snapshot(model, optimizer, oialr)

    fresh_model, fresh_optimizer, fresh_oialr = build()
    checkpoint = torch.load(io.BytesIO(saved), weights_only=True)
    fresh_oialr.load_state_dict(checkpoint["oialr"])
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    assert fresh_oialr.ranks() == oialr.ranks() and fresh_oialr.step_count == 12
    assert_optimizer_consistent(fresh_model, fresh_optimizer)

    train(model, optimizer, oialr, range(12, 24))
    train(fresh_model, fresh_optimizer, fresh_oialr, range(12, 24))
    assert fresh_oialr.ranks() == oialr.ranks()
    assert fresh_oialr.history == oialr.history
    for (key, a), (key_b, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert key == key_b
        assert torch.equal(a, b), key


def test_checkpoint_errors_are_clear() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=0, frequency=1, tau=0.9)
    other_model = mlp(0, (12, 30, 24, 5))
    other = OIALR(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1), delay=5)
    with pytest.raises(ValueError, match="missing"):
        oialr.load_state_dict({"ranks": {}})
    state = other.state_dict()
    state["ranks"] = {"0": 3, "2": 30}
    with pytest.raises(ValueError, match="rank 30 in the checkpoint"):
        oialr.load_state_dict(state)
    state["ranks"] = {"0": None, "2": 3}
    with pytest.raises(ValueError, match="dense in the checkpoint"):
        oialr.load_state_dict(state)
    state["ranks"] = {"9": 3}
    with pytest.raises(ValueError, match="differ"):
        oialr.load_state_dict(state)


def test_module_to_dtype_keeps_training() -> None:
    model = mlp(4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    oialr = OIALR(model, optimizer, delay=2, frequency=3, tau=0.4)
    train(model, optimizer, oialr, range(4))
    model.to(F64)
    for group in optimizer.param_groups:  # momentum buffers follow the parameters' dtype
        for p in group["params"]:
            if "momentum_buffer" in optimizer.state[p]:
                optimizer.state[p]["momentum_buffer"] = optimizer.state[p]["momentum_buffer"].to(F64)
    train(model, optimizer, oialr, range(4, 12))
    for layer in oialr.layers.values():
        assert layer.u.dtype == layer.sigma.dtype == layer.v.dtype == F64
    assert_optimizer_consistent(model, optimizer)


# ------------------------------------------------------------------ layers and compact
@given(
    seed=st.integers(0, 2**16),
    dims=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    stride=st.sampled_from([1, 2]),
    rank_fraction=st.sampled_from([0.25, 1.0]),
)
def test_low_rank_conv_and_compact_compute_the_dense_function(
    seed: int, dims: int, groups: int, padding_mode: str, stride: int, rank_fraction: float
) -> None:
    torch.manual_seed(seed)
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    dense = cls(4, 6, 3, stride=stride, padding=1, groups=groups, padding_mode=padding_mode, dtype=F64)
    full = min(6, 4 // groups * 3**dims)
    rank = max(1, int(rank_fraction * full))
    layer = LowRankConv(dense, rank=rank)
    x = torch.randn(2, 4, *([5] * dims), dtype=F64)
    with torch.no_grad():
        expected = cls(4, 6, 3, stride=stride, padding=1, groups=groups, padding_mode=padding_mode, dtype=F64)
        expected.weight.copy_(layer.dense_weight())
        expected.bias.copy_(dense.bias)
        torch.testing.assert_close(layer(x), expected(x))
        torch.testing.assert_close(layer.compact()(x), expected(x))
        if rank == full:
            torch.testing.assert_close(layer(x), dense(x))


@given(seed=st.integers(0, 2**16), rows=st.sampled_from([1, 3, 200]), rank=st.integers(1, 6))
def test_low_rank_linear_paths_and_compact_agree(seed: int, rows: int, rank: int) -> None:
    torch.manual_seed(seed)
    dense = nn.Linear(7, 6, dtype=F64)
    layer = LowRankLinear(dense, rank=rank)
    x = torch.randn(rows, 7, dtype=F64)
    with torch.no_grad():
        expected = x @ layer.dense_weight().mT + dense.bias
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.compact()(x), expected)
        if rank == 6:
            torch.testing.assert_close(layer(x), dense(x))
    assert layer.bias is dense.bias


def test_compact_model_is_plain_and_smaller() -> None:
    model = mlp(0, (16, 64, 64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=2, tau=0.9)
    train(model, optimizer, oialr, range(12))
    compact = oialr.compact()
    assert not any(isinstance(m, LowRankLayer) for m in compact.modules())
    assert all(isinstance(m, LowRankLayer) for m in oialr.layers.values())  # the training model is untouched
    x, _ = batch(0, model)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    dense_count = sum(p.numel() for p in mlp(0, (16, 64, 64, 4)).parameters())
    assert sum(p.numel() for p in compact.parameters()) < dense_count
    assert compact_model(model[2]).__class__ is nn.Sequential


def test_trainable_fraction_counts_cores_biases_and_dense_layers() -> None:
    model = mlp(0, (16, 64, 64, 4))
    full = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=0, frequency=1, tau=1.0)  # halves per check
    assert oialr.ranks() == {"0": 8, "2": 32}
    expected = 8**2 + 64 + 32**2 + 64 + 64 * 4 + 4
    assert oialr.trainable_fraction() == pytest.approx(expected / full)
    assert oialr.history[-1]["trainable_fraction"] == pytest.approx(expected / full)


# ------------------------------------------------------------------ eligibility and errors
def test_eligibility_rules() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(32, 32)
            self.thin = nn.Linear(32, 3)
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)
            self.attention = nn.MultiheadAttention(32, 4)
            self.tied_a = nn.Linear(32, 32)
            self.tied_b = nn.Linear(32, 32)
            self.tied_b.weight = self.tied_a.weight
            self.skipped = nn.Linear(32, 32)
            self.not_optimized = nn.Linear(32, 32)
            self.good = nn.Conv2d(8, 16, 3)
            self.head = nn.Linear(32, 32)

    net = Net()
    params = [p for n, p in net.named_parameters() if not n.startswith("not_optimized")]
    oialr = OIALR(net, torch.optim.SGD(params, lr=0.1), keep_first_layer=True, exclude=["skipped"])
    reasons = oialr.eligibility
    assert reasons["first"].startswith("first layer")
    assert reasons["thin"].startswith("too thin")
    assert reasons["attention.out_proj"].startswith("subclass")
    assert reasons["tied_a"].startswith("module or weight shared")
    assert reasons["skipped"] == "excluded by name"
    assert reasons["not_optimized"] == "weight not in the optimizer"
    assert reasons["head"].startswith("last layer")
    assert reasons["good"] == "low-rank"
    assert "frozen" not in oialr.layers and reasons["frozen"].startswith(("too thin", "frozen"))
    assert list(oialr.layers) == ["good"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delay": -1}, "delay"),
        ({"frequency": 0}, "frequency"),
        ({"tau": 1.5}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"max_cut": 0.0}, "max_cut"),
        ({"min_rank_fraction": -0.1}, "min_rank_fraction"),
        ({"state_transfer": "copy"}, "state_transfer"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"exclude": ["nope"]}, "nope"),
        ({"state_kinds": {"exp_avg": "cubic"}}, "state_kinds"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(kwargs: dict, match: str) -> None:
    model = mlp(0)
    with pytest.raises(ValueError, match=match):
        OIALR(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_bad_inputs_raise_type_errors() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="keep_last_layer"):
        OIALR(model, optimizer, keep_last_layer=1)
    with pytest.raises(TypeError, match="optimizer"):
        OIALR(model, [optimizer])
    with pytest.raises(ValueError, match="no layer to factor"):
        OIALR(nn.Sequential(nn.Linear(100, 2)), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 6\]"):
        LowRankLinear(nn.Linear(7, 6), rank=7)
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        LowRankLinear(nn.Conv1d(2, 2, 1))
    layer = LowRankLinear(nn.Linear(7, 6), rank=3)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_factors(torch.zeros(6, 3), torch.zeros(2, 2), torch.zeros(7, 3))


def test_nonfinite_weights_never_reach_the_factors() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    oialr = OIALR(model, optimizer, delay=2, frequency=2, tau=0.3)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    oialr.step()
    with pytest.warns(RuntimeWarning, match="'0' is not finite"):
        oialr.step()  # step 2: conversion of layer 0 skipped, layer 2 converted
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], LowRankLinear)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    oialr.step()
    assert oialr.step()  # step 4: converted now
    assert isinstance(model[0], LowRankLinear)
    u_before = model[0].u.clone()
    with torch.no_grad():
        model[0].sigma[0, 1] = float("inf")
    oialr.step()
    with pytest.warns(RuntimeWarning, match="core"):
        oialr.step()
    assert torch.equal(model[0].u, u_before) and torch.isfinite(model[0].u).all()
    strict_model = mlp(0)
    strict = OIALR(strict_model, torch.optim.SGD(strict_model.parameters(), lr=0.1), delay=1, nonfinite="raise")
    with torch.no_grad():
        strict.model[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="not finite"):
        strict.step()


def test_warnings_are_not_issued_in_normal_training() -> None:
    model = ConvNet(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    oialr = OIALR(model, optimizer, delay=2, frequency=2, tau=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, optimizer, oialr, range(8))


# ------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world_size: int, port: int, results: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # a timeout turns a rank disagreement (mismatched collectives) into an error instead of a hang
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        model = mlp(7)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        oialr = OIALR(model, optimizer, delay=3, frequency=3, tau=0.3)
        ddp = DistributedDataParallel(model)
        for step in range(14):
            x, y = batch(step * world_size + rank, model)  # each rank its own shard
            if oialr.step_count == 8 and rank == 1:
                # make rank 1's local SVD disagree with rank 0's: the broadcast must win
                with torch.no_grad():
                    for layer in oialr.layers.values():
                        layer.sigma.mul_(torch.rand(layer.sigma.shape) < 0.5)
            functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
            if oialr.step():
                ddp = DistributedDataParallel(model)
            optimizer.zero_grad()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(world_size)]
        dist.all_gather(gathered, flat)
        results[rank] = {
            "ranks": oialr.ranks(),
            "same_params": all(torch.equal(g, gathered[0]) for g in gathered),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_agree_across_processes() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    assert results[0]["ranks"] == results[1]["ranks"]
    assert results[0]["same_params"] and results[1]["same_params"]
    assert any(rank < full for rank, full in zip(results[0]["ranks"].values(), (12, 24)))
