"""PSISGD: the equivalence property, detection, torch.optim conventions, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from manifold_opt import PSI, PSISGD, ManifoldParameter, declare_psi
from manifold_opt.optim.base import manifold_of

from .cases import generator, seeds

F64 = torch.float64
INVARIANT = ("0.weight", "3.weight", "7.weight")  # the weights feeding a BN channel in cnn()


def cnn(seed: int = 0, dtype: torch.dtype = F64, eps: float = 1e-12) -> nn.Sequential:
    """Conv-BN (with a bias, cancelled by BN), bias-free conv-BN, linear-BN, and a plain head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, eps=eps),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, bias=False),
        nn.BatchNorm2d(6, eps=eps),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 8),
        nn.BatchNorm1d(8, eps=eps),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(dtype)


def batches(steps: int, seed: int = 0, dtype: torch.dtype = F64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = generator(seed)
    return [
        (torch.randn(16, 1, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(steps)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list) -> torch.Tensor:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def rescale_groups(model: nn.Module, seed: int, names: tuple[str, ...] = INVARIANT) -> dict[str, torch.Tensor]:
    """Multiply every invariant row by its own factor in [0.1, 10] (log-uniform); return the factors."""
    gen = generator(seed)
    factors = {}
    with torch.no_grad():
        for name in names:
            w = model.get_parameter(name)
            c = 0.1 * 100 ** torch.rand(w.shape[0], generator=gen, dtype=w.dtype)
            w.mul_(c.reshape(-1, *[1] * (w.dim() - 1)))
            factors[name] = c
    return factors


momentum_options = st.sampled_from(
    [
        {"momentum": 0.0},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.5, "dampening": 0.3, "invariant_weight_decay": 0.1},
    ]
)


# ------------------------------------------------------------------ the defining property


@given(seed=seeds, options=momentum_options)
def test_rescaled_groups_train_along_the_same_trajectory(seed: int, options: dict) -> None:
    """θ'₀ = cθ₀ per invariant row ⇒ identical losses, θ'_t = cθ_t, and identical other parameters."""
    model, rescaled = cnn(), cnn()
    factors = rescale_groups(rescaled, seed)
    data = batches(10, seed)
    initial = {name: model.get_parameter(name).detach().clone() for name in INVARIANT}
    losses = train(model, PSISGD(model.parameters(), lr=0.1, **options), data)
    losses_rescaled = train(rescaled, PSISGD(rescaled.parameters(), lr=0.1, **options), data)
    torch.testing.assert_close(losses_rescaled, losses, rtol=1e-8, atol=0)
    for name in INVARIANT:  # it did train: every layer turned its filters
        turned = PSI().dist(initial[name].flatten(1), model.get_parameter(name).detach().flatten(1))
        assert float(turned.mean()) > 1e-3, name
    for name, param in model.named_parameters():
        other = rescaled.get_parameter(name).detach()
        if name in factors:
            c = factors[name].reshape(-1, *[1] * (param.dim() - 1))
            torch.testing.assert_close(other, c * param.detach(), rtol=1e-6, atol=1e-8)
        else:
            torch.testing.assert_close(other, param.detach(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_euclidean_sgd_breaks_the_equivalence(momentum: float) -> None:
    """The same experiment under torch.optim.SGD: the rescaled network trains differently."""
    model, rescaled = cnn(), cnn()
    rescale_groups(rescaled, 1)
    data = batches(15)
    losses = train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum), data)
    losses_rescaled = train(rescaled, torch.optim.SGD(rescaled.parameters(), lr=0.1, momentum=momentum), data)
    torch.testing.assert_close(losses_rescaled[0], losses[0])  # the same function at the start
    assert float((losses_rescaled - losses).abs().max()) > 1e-2


def test_declared_groups_including_whole_tensor_ones_keep_the_equivalence() -> None:
    """declare_psi (rows for BN, whole tensor for a bias-free linear before LayerNorm)."""

    def model_with_layernorm(scale: float) -> nn.Sequential:
        torch.manual_seed(3)
        net = nn.Sequential(nn.Linear(5, 8, bias=False), nn.LayerNorm(8, eps=1e-12), nn.ReLU(), nn.Linear(8, 3)).to(F64)
        with torch.no_grad():
            net[0].weight.mul_(scale)
        assert declare_psi(net) == {"0.weight": PSI(batch_dims=0)}
        return net

    gen = generator(0)
    data = [(torch.randn(16, 5, generator=gen, dtype=F64), torch.randint(0, 3, (16,), generator=gen))] * 10

    def run(net: nn.Module) -> torch.Tensor:
        losses = []
        opt = PSISGD(net.parameters(), lr=0.1)
        for x, y in data:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    torch.testing.assert_close(run(model_with_layernorm(7.0)), run(model_with_layernorm(1.0)), rtol=1e-9, atol=0)


# ------------------------------------------------------------------ the update itself


def test_one_step_is_the_psi_formula_and_other_parameters_get_torch_sgd() -> None:
    model, reference = cnn(dtype=torch.float32, eps=1e-5), cnn(dtype=torch.float32, eps=1e-5)
    (x, y), *_ = batches(1, dtype=torch.float32)
    opt = PSISGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    ref = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    for net in (model, reference):
        nn.functional.cross_entropy(net(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    ref.step()
    for name, param in model.named_parameters():
        if name in INVARIANT:
            w, g = before[name].flatten(1), grads[name].flatten(1)
            unit = w / w.norm(dim=1, keepdim=True)
            r = w.norm(dim=1, keepdim=True) ** 2 * (g - (g * unit).sum(1, keepdim=True) * unit)
            torch.testing.assert_close(param.detach().flatten(1), w - 0.1 * r)  # no weight decay on PSI groups
        else:  # bit for bit torch.optim.SGD (same gradients at the first step)
            torch.testing.assert_close(param.detach(), reference.get_parameter(name).detach(), rtol=0, atol=0)


@given(options=st.sampled_from([{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, {"maximize": True}]))
def test_equals_torch_sgd_bit_for_bit_without_invariant_parameters(options: dict) -> None:
    """No BN: detection finds nothing and every step is torch.optim.SGD's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    opt = PSISGD(model.parameters(), lr=0.05, **options)
    ref = torch.optim.SGD(reference.parameters(), lr=0.05, fused=True, **{"momentum": 0.9, **options})
    gen = generator(0)
    for _ in range(8):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        for net, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(row["verdict"] == "euclidean" for row in opt.invariance_report())


def test_detect_false_is_torch_sgd_on_a_batchnorm_network() -> None:
    model, reference = cnn(dtype=torch.float32), cnn(dtype=torch.float32)
    data = batches(5, dtype=torch.float32)
    train(model, PSISGD(model.parameters(), lr=0.1, detect=False), data)
    train(reference, torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, fused=True), data)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_invariant_weight_decay_is_a_decoupled_shrink() -> None:
    w = ManifoldParameter(torch.randn(3, 4, dtype=F64), PSI())
    opt = PSISGD([w], lr=0.1, momentum=0.0, invariant_weight_decay=0.5, weight_decay=3.0)
    a = torch.randn(3, 4, dtype=F64)
    before = w.detach().clone()
    (a * w / w.norm(dim=1, keepdim=True)).sum().backward()
    g = w.grad.clone()
    opt.step()
    r = PSI().riemannian_grad(before, g)
    torch.testing.assert_close(w.detach(), (1 - 0.1 * 0.5) * (before - 0.1 * r))  # weight_decay=3 not applied


def test_without_decay_group_norms_never_shrink() -> None:
    model = cnn(dtype=torch.float32, eps=1e-5)
    opt = PSISGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in batches(10, dtype=torch.float32):
        norms = {n: model.get_parameter(n).detach().flatten(1).norm(dim=1) for n in INVARIANT}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for name in INVARIANT:
            assert (model.get_parameter(name).detach().flatten(1).norm(dim=1) >= norms[name] * (1 - 1e-6)).all()


# ------------------------------------------------------------------ detection


class Zoo(nn.Module):
    """Every case the detection rule must get right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)  # -> BN: invariant rows
        self.bn = nn.BatchNorm2d(4)
        self.shared = nn.Linear(16, 6, bias=False)  # read through BN and straight to the output
        self.bn_shared = nn.BatchNorm1d(6)
        self.plain = nn.Linear(16, 6)  # not followed by a normalization
        self.pre_ln = nn.Linear(16, 6, bias=False)  # -> LayerNorm: whole-tensor invariance only
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(16, 6)  # -> BN1d: invariant rows
        self.bn_fc = nn.BatchNorm1d(6)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x))).flatten(1)[:, :16]
        parts = [
            self.bn_shared(self.shared(h)) + 0.5 * self.shared(h),
            self.plain(h),
            self.ln(self.pre_ln(h)),
            torch.relu(self.bn_fc(self.fc(h))),
        ]
        return self.head(torch.cat(parts, dim=1))


def zoo_step(model: nn.Module, opt: PSISGD, seed: int = 0) -> None:
    gen = generator(seed)
    opt.zero_grad()
    x, y = torch.randn(32, 1, 6, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


EXPECTED = {
    "conv.weight": "psi",
    "fc.weight": "psi",
    "shared.weight": "euclidean",
    "plain.weight": "euclidean",
    "pre_ln.weight": "euclidean",
    "head.weight": "euclidean",
}


@given(seed=seeds)
def test_detection_verdicts_on_every_named_case(seed: int) -> None:
    torch.manual_seed(seed % 1000)
    model = Zoo()
    opt = PSISGD(model.named_parameters(), lr=0.05)
    for step in range(6):  # past verify_steps: the verdicts are final
        zoo_step(model, opt, seed + step)
    report = {row["name"]: row for row in opt.invariance_report()}
    for name, row in report.items():
        assert row["verdict"] == EXPECTED.get(name, "euclidean"), (name, row)
        if row["verdict"] == "psi":
            assert row["checks"] == 5 and row["radial_cosine"] < 1e-3
    assert "dim" in report["bn.weight"]["reason"] and "dim" in report["conv.bias"]["reason"]
    assert report["shared.weight"]["radial_cosine"] > 1e-2
    pre_ln = report["pre_ln.weight"]  # whole-tensor invariant: the hint to declare PSI(batch_dims=0)
    assert pre_ln["tensor_cosine"] < 0.1 * pre_ln["radial_cosine"]
    assert manifold_of(model.conv.weight) == manifold_of(model.head.weight)  # detection never touches the params


class GatedSkip(nn.Module):
    """BN(Wx) + α·Wx with α = 0 at the start: W looks invariant until α moves."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.head(torch.relu(self.bn(h) + self.alpha * h))


def verdicts(opt: PSISGD) -> dict[str, str]:
    return {row["name"]: row["verdict"] for row in opt.invariance_report()}


def test_a_group_that_stops_looking_invariant_is_demoted_with_a_warning() -> None:
    torch.manual_seed(0)
    model = GatedSkip()
    opt = PSISGD(model.named_parameters(), lr=0.5)
    gen = generator(0)
    x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert verdicts(opt)["fc.weight"] == "psi"
    assert "momentum_buffer" in opt.state[model.fc.weight]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=r"'fc.weight'.*looked scale invariant for 1 step.*plain SGD"):
        opt.step()
    row = {r["name"]: r for r in opt.invariance_report()}["fc.weight"]
    assert row["verdict"] == "euclidean" and "demoted" in row["reason"]
    # restarted (it held PSI-scaled steps): the first SGD step sets the buffer to the gradient
    torch.testing.assert_close(opt.state[model.fc.weight]["momentum_buffer"], model.fc.weight.grad, rtol=0, atol=0)
    assert manifold_of(model.fc.weight) != PSI()  # still a plain parameter


class ZeroGammaResidual(nn.Module):
    """relu(x + BN(Wx)) with BN's gamma zero-initialized (torchvision's zero_init_residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(x + self.bn(self.fc(x))))


def test_zero_gradients_leave_the_verdict_open_until_evidence_arrives() -> None:
    """W gets a zero gradient until gamma moves; it is stepped as Euclidean meanwhile (a no-op)
    and detected at its first nonzero gradient."""
    torch.manual_seed(0)
    model = ZeroGammaResidual()
    opt = PSISGD(model.named_parameters(), lr=0.1)
    gen = generator(0)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    before = model.fc.weight.detach().clone()
    for step in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 0:
            assert verdicts(opt)["fc.weight"] == "undetermined"
            torch.testing.assert_close(model.fc.weight.detach(), before, rtol=0, atol=0)
    assert verdicts(opt)["fc.weight"] == "psi"
    assert not torch.equal(model.fc.weight.detach(), before)


def test_zero_rows_and_half_precision_fall_back_to_sgd_with_a_reason() -> None:
    model = cnn(dtype=torch.float32, eps=1e-5)
    with torch.no_grad():
        model[3].weight[0] = 0
    half = nn.Linear(4, 4).to(torch.bfloat16)
    opt = PSISGD([*model.named_parameters(), ("half", half.weight)], lr=0.1)
    train(model, opt, batches(1, dtype=torch.float32))
    opt.zero_grad()  # a stale gradient would rightly fail the next check (<g, θ_new> = -η‖θ‖²‖g‖²)
    half(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    report = {row["name"]: row for row in opt.invariance_report()}
    assert report["3.weight"]["verdict"] == "euclidean" and "zero row" in report["3.weight"]["reason"]
    assert report["half"]["verdict"] == "euclidean" and "bfloat16" in report["half"]["reason"]
    assert report["0.weight"]["verdict"] == "psi"


def test_a_declared_group_that_is_not_invariant_gets_a_warning() -> None:
    torch.manual_seed(0)
    head = nn.Linear(5, 3)
    head.weight = ManifoldParameter(head.weight, PSI())
    opt = PSISGD(head.named_parameters(), lr=0.1)
    head(torch.randn(8, 5)).square().sum().backward()
    with pytest.warns(RuntimeWarning, match=r"'weight'.*declared on PSI.*not invariant"):
        opt.step()
    assert opt.invariance_report()[0]["verdict"] == "declared PSI(batch_dims=1)"


# ------------------------------------------------------------------ torch.optim conventions


def test_state_dict_round_trip_keeps_verdicts_and_continues_bit_identically() -> None:
    data = batches(8, dtype=torch.float32)
    model = cnn(dtype=torch.float32, eps=1e-5)
    opt = PSISGD(model.parameters(), lr=0.1, nesterov=True)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[3:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = cnn(seed=1, dtype=torch.float32, eps=1e-5)
    resumed.load_state_dict(saved["model"])
    resumed_opt = PSISGD(resumed.parameters(), lr=0.1, nesterov=True)
    resumed_opt.load_state_dict(saved["opt"])
    assert [r["verdict"] for r in resumed_opt.invariance_report()] == [r["verdict"] for r in opt.invariance_report()]
    train(resumed, resumed_opt, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_param_groups_and_lr_scheduler_reach_the_psi_groups() -> None:
    model = cnn(dtype=torch.float32, eps=1e-5)
    frozen = [p for n, p in model.named_parameters() if n.startswith("7.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("7.")]
    opt = PSISGD([{"params": rest}, {"params": frozen, "lr": 0.0}], lr=0.2, momentum=0.0)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before_frozen = [p.detach().clone() for p in frozen]
    (x, y), *_ = batches(1, dtype=torch.float32)
    for _ in range(3):
        w = model[0].weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grad = model[0].weight.grad.flatten(1)
        expected = w.flatten(1) - opt.param_groups[0]["lr"] * PSI().riemannian_grad(w.flatten(1), grad)
        opt.step()
        scheduler.step()
        torch.testing.assert_close(model[0].weight.detach().flatten(1), expected)
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.0]
    for p, b in zip(frozen, before_frozen):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_bucketed_step_equals_one_optimizer_per_parameter() -> None:
    model = cnn()
    looped = copy.deepcopy(model)
    opt = PSISGD(model.parameters(), lr=0.1, nesterov=True, weight_decay=1e-3)
    singles = [PSISGD([p], lr=0.1, nesterov=True, weight_decay=1e-3) for p in looped.parameters()]
    for x, y in batches(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for single in singles:
            single.zero_grad()
        nn.functional.cross_entropy(looped(x), y).backward()
        for single in singles:
            single.step()
    for a, b in zip(model.parameters(), looped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_closure_and_gradients_are_never_modified() -> None:
    model = cnn(dtype=torch.float32, eps=1e-5)
    opt = PSISGD(model.parameters(), lr=0.1, weight_decay=0.1, invariant_weight_decay=0.1)
    (x, y), *_ = batches(1, dtype=torch.float32)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        loss = closure()
        grads = [p.grad.clone() for p in model.parameters()]
        assert isinstance(opt.step(lambda loss=loss: loss), torch.Tensor)
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_half_precision_declared_groups_use_float32_geometry() -> None:
    model = cnn(dtype=torch.bfloat16, eps=1e-5)
    declare_psi(model)
    opt = PSISGD(model.parameters(), lr=0.1)
    train(model, opt, batches(3, dtype=torch.bfloat16))
    assert model[0].weight.dtype == torch.bfloat16
    assert opt.state[model[0].weight]["momentum_buffer"].dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------ bad input


def test_nonfinite_gradient_never_reaches_a_psi_group() -> None:
    model = cnn(dtype=torch.float32, eps=1e-5)
    opt = PSISGD(model.parameters(), lr=0.1)
    data = batches(2, dtype=torch.float32)
    train(model, opt, data[:1])
    before = model[0].weight.detach().clone()
    buffer = opt.state[model[0].weight]["momentum_buffer"].clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(data[1][0]), data[1][1]).backward()
    model[0].weight.grad[0, 0, 0, 0] = math.nan
    opt.step()
    assert opt.skipped_steps == 1
    torch.testing.assert_close(model[0].weight.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[model[0].weight]["momentum_buffer"], buffer, rtol=0, atol=0)
    assert opt.invariance_report()[0]["verdict"] == "psi"  # a NaN is no evidence against invariance


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_rows_of_extreme_norm_step_without_nan(scale: float) -> None:
    """Float32 rows of norm 1e-25 (‖θ‖² underflows) or 1e25 (it overflows), with the gradients
    an invariant loss has there (∇L(cθ) = ∇L(θ)/c): finite steps, equal to the unit-scale ones."""
    gen = generator(0)
    w0 = torch.randn(4, 6, generator=gen)
    raw = [torch.randn(4, 6, generator=gen) for _ in range(3)]
    reference = ManifoldParameter(w0.clone(), PSI())
    extreme = ManifoldParameter(scale * w0, PSI())
    for param, c in ((reference, 1.0), (extreme, scale)):
        opt = PSISGD([param], lr=0.1, nesterov=True)
        for r in raw:
            param.grad = PSI().project_tangent(param.detach(), r) / c  # horizontal, scaled as ∇L(cθ)
            opt.step()
    assert torch.isfinite(extreme).all()
    torch.testing.assert_close(extreme.detach() / scale, reference.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, "lr"),
        ({"momentum": -0.1}, "momentum"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"tolerance": 2.0}, "tolerance"),
        ({"verify_steps": 0}, "verify_steps"),
        ({"verify_steps": 2.5}, "verify_steps"),
        ({"invariant_weight_decay": -1.0}, "invariant_weight_decay"),
        ({"invariant_weight_decay": math.inf}, "invariant_weight_decay"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_invalid_hyperparameters_raise_value_errors_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        PSISGD([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_a_decay_that_would_flip_the_sign_is_refused_at_the_step() -> None:
    w = ManifoldParameter(torch.randn(3, 4), PSI())
    opt = PSISGD([w], lr=1.0, invariant_weight_decay=1.0)
    (w / w.norm(dim=1, keepdim=True)).sum().backward()
    with pytest.raises(ValueError, match=r"invariant_weight_decay \* lr must be in \[0, 1\)"):
        opt.step()


@given(seed=seeds)
def test_steps_on_an_invariant_group_are_horizontal_and_angular(seed: int) -> None:
    """Without momentum the angular step of a group is atan(η‖∇L(θ̂)‖), whatever ‖θ‖."""
    gen = generator(seed)
    a = torch.randn(4, 6, generator=gen, dtype=F64)
    c = 0.1 * 100 ** torch.rand(4, 1, generator=gen, dtype=F64)
    w = ManifoldParameter(c * torch.randn(4, 6, generator=gen, dtype=F64), PSI())
    opt = PSISGD([w], lr=0.3, momentum=0.0)
    before = w.detach().clone()
    (a * w / w.norm(dim=1, keepdim=True)).sum().backward()
    unit_grad = (w.grad * before.norm(dim=1, keepdim=True)).norm(dim=1)  # ‖∇L(θ̂)‖
    opt.step()
    angle = PSI().dist(before, w.detach())
    torch.testing.assert_close(angle, torch.atan(0.3 * unit_grad))
