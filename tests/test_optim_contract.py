"""The optimizer contract: torch.optim conventions, parity, bucketing, checkpoints, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianMuon, RiemannianSGD, Sphere, Stiefel
from manifold_opt.checks import manifold_residuals

F64 = torch.float64


def quadratic_loss(params: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    return sum((((p - t) ** 2).sum() + (3 * p).sin().sum()) for p, t in zip(params, targets))


def assert_same(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Bit-identical: plain tensors are stepped by torch.optim's own kernels."""
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# our implementation options -> the torch.optim options that must give the same bits
IMPLEMENTATIONS = {
    "default": ({}, dict(fused=True)),
    "fused": (dict(fused=True), dict(fused=True)),
    "foreach": (dict(foreach=True), dict(foreach=True)),
    "single": (dict(foreach=False), dict(foreach=False)),
}


def run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], targets: list[torch.Tensor], steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        quadratic_loss(params, targets).backward()
        optimizer.step()


def euclidean_problem(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (5, 3), (2, 3, 4), ()]
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    return params, targets


sgd_options = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.01, 0.1, 0.3]),
        "momentum": st.sampled_from([0.0, 0.5, 0.9]),
        "dampening": st.sampled_from([0.0, 0.1]),
        "weight_decay": st.sampled_from([0.0, 0.01]),
        "nesterov": st.booleans(),
        "maximize": st.booleans(),
    }
).filter(lambda o: not o["nesterov"] or (o["momentum"] > 0 and o["dampening"] == 0))
adam_options = st.fixed_dictionaries(
    {
        "lr": st.sampled_from([0.001, 0.01, 0.1]),
        "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
        "eps": st.sampled_from([1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "amsgrad": st.booleans(),
        "maximize": st.booleans(),
    }
)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@given(options=sgd_options)
def test_sgd_equals_torch_sgd_bit_for_bit(options: dict, dtype: torch.dtype, implementation: str) -> None:
    ours_kw, torch_kw = IMPLEMENTATIONS[implementation]
    ours, targets = euclidean_problem(dtype)
    reference = [p.detach().clone().requires_grad_() for p in ours]
    run(RiemannianSGD(ours, **options, **ours_kw), ours, targets, 8)
    run(torch.optim.SGD(reference, **options, **torch_kw), reference, targets, 8)
    assert_same(ours, reference)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
@given(options=adam_options)
def test_adam_equals_torch_adam_bit_for_bit(options: dict, dtype: torch.dtype, implementation: str) -> None:
    ours_kw, torch_kw = IMPLEMENTATIONS[implementation]
    ours, targets = euclidean_problem(dtype)
    reference = [p.detach().clone().requires_grad_() for p in ours]
    opt = RiemannianAdam(ours, **options, **ours_kw)
    ref = torch.optim.Adam(reference, **options, **torch_kw)
    run(opt, ours, targets, 8)
    run(ref, reference, targets, 8)
    assert_same(ours, reference)
    for p, q in zip(ours, reference):  # the state too, step counts where torch keeps them
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=0, atol=0)


def test_param_groups_and_lr_scheduler_follow_torch() -> None:
    ours, targets = euclidean_problem(torch.float32)
    reference = [p.detach().clone().requires_grad_() for p in ours]

    def groups(params: list[torch.Tensor]) -> list[dict]:
        return [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "momentum": 0.9}]

    opt = RiemannianSGD(groups(ours), lr=0.1)
    ref = torch.optim.SGD(groups(reference), lr=0.1, fused=True)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for _ in range(6):
        for o, params in ((opt, ours), (ref, reference)):
            o.zero_grad()
            quadratic_loss(params, targets).backward()
            o.step()
        for scheduler in schedulers:
            scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_hooks_and_zero_grad() -> None:
    w = ManifoldParameter(torch.randn(6, 2), Stiefel())
    opt = RiemannianSGD([w], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append("pre"))
    opt.register_step_post_hook(lambda *args: calls.append("post"))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**3).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == ["pre", "post"]
    opt.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: RiemannianSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
        lambda ps: RiemannianAdam(ps, lr=0.1, weight_decay=0.1, amsgrad=True, maximize=True),
    ],
)
def test_gradients_are_never_modified(make) -> None:
    params = [ManifoldParameter(torch.randn(6, 3), Stiefel()), torch.randn(4, requires_grad=True)]
    opt = make(params)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        before = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, before):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: RiemannianSGD([torch.zeros(1, requires_grad=True)], lr=-1.0), "lr"),
        (lambda: RiemannianSGD([torch.zeros(1, requires_grad=True)], momentum=-0.1), "momentum"),
        (lambda: RiemannianSGD([torch.zeros(1, requires_grad=True)], weight_decay=math.nan), "weight_decay"),
        (lambda: RiemannianSGD([torch.zeros(1, requires_grad=True)], nesterov=True), "nesterov"),
        (lambda: RiemannianAdam([torch.zeros(1, requires_grad=True)], betas=(0.9, 1.0)), r"betas\[1\]"),
        (lambda: RiemannianAdam([torch.zeros(1, requires_grad=True)], betas=(0.9,)), "betas"),
        (lambda: RiemannianAdam([torch.zeros(1, requires_grad=True)], eps=-1e-8), "eps"),
        (lambda: RiemannianAdam([torch.zeros(1, requires_grad=True)], nonfinite="ignore"), "nonfinite"),
    ],
)
def test_invalid_hyperparameters_raise_value_errors_naming_them(make, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        make()


def mixed_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Stiefel (tall, wide, conv, batched) + oblique + sphere + Euclidean parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),  # wide 6x27 Stiefel
        nn.ReLU(),
        nn.Conv2d(6, 6, 3),  # 6x54, same point shape class as nothing else
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),  # oblique rows
        nn.ReLU(),
        nn.Linear(10, 10),  # square Stiefel
        nn.Linear(10, 4),  # Euclidean head
    ).to(dtype)
    model[0].weight = ManifoldParameter(model[0].weight, Stiefel())
    model[2].weight = ManifoldParameter(model[2].weight, Stiefel(retraction="cayley"))
    model[4].weight = ManifoldParameter(model[4].weight, Sphere(batch_dims=1))
    model[6].weight = ManifoldParameter(model[6].weight, Stiefel(retraction="polar"))
    model.register_parameter("tall", ManifoldParameter(torch.randn(12, 4, dtype=dtype), Stiefel()))
    model.register_parameter("tall_twin", ManifoldParameter(torch.randn(12, 4, dtype=dtype), Stiefel()))
    model.register_parameter("groups", ManifoldParameter(torch.randn(3, 5, 2, dtype=dtype), Stiefel(batch_dims=1)))
    model.register_parameter("ball", ManifoldParameter(torch.randn(7, dtype=dtype), Sphere()))
    return model


def model_loss(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    dtype = model.tall.dtype
    x = torch.randn(4, 3, 8, 8, generator=gen).to(dtype)
    out = model(x)
    extra = (model.tall * model.tall_twin).sum() + model.groups.sin().sum() + (model.ball * torch.arange(7)).sum()
    return out.square().mean() + extra


def train_model(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        model_loss(model, step).backward()
        opt.step()


OPTIMIZERS = {
    "sgd": lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda ps: RiemannianAdam(ps, lr=0.01, amsgrad=True, weight_decay=1e-3),
    "muon": lambda ps: RiemannianMuon(ps, lr=0.02, adamw_lr=0.01, oracle_iterations=(10, 3)),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bucketed_step_equals_one_optimizer_per_parameter(name: str) -> None:
    bucketed = mixed_model(F64)
    looped = copy.deepcopy(bucketed)
    opt = OPTIMIZERS[name](bucketed.parameters())
    singles = [OPTIMIZERS[name]([p]) for p in looped.parameters()]
    for step in range(5):
        opt.zero_grad()
        model_loss(bucketed, step).backward()
        opt.step()
        for single in singles:
            single.zero_grad()
        model_loss(looped, step).backward()
        for single in singles:
            single.step()
    for a, b in zip(bucketed.parameters(), looped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_of_a_stacked_bucket_edited_or_replaced_by_the_user_is_used(name: str) -> None:
    # after its first step a bucket keeps its parameters' states as pieces of one buffer;
    # an in-place edit or a replaced tensor must be seen by the next step as by torch.optim
    momentum = "exp_avg" if name == "adam" else "momentum_buffer"
    stepped = {}
    for layout in ("bucketed", "looped"):
        model = mixed_model(F64)
        opts = [OPTIMIZERS[name](model.parameters())]
        if layout == "looped":
            opts = [OPTIMIZERS[name]([p]) for p in model.parameters()]
        for step in range(6):
            for opt in opts:
                opt.zero_grad()
            model_loss(model, step).backward()
            for opt in opts:
                opt.step()
            if step == 2:
                state = next(opt.state[model.tall_twin] for opt in opts if model.tall_twin in opt.state)
                state[momentum] = torch.zeros_like(state[momentum])
            if step == 3:
                state = next(opt.state[model.tall] for opt in opts if model.tall in opt.state)
                state[momentum].mul_(-2.0)
        stepped[layout] = model
    for a, b in zip(stepped["bucketed"].parameters(), stepped["looped"].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_mixed_model_stays_on_its_manifolds(name: str) -> None:
    model = mixed_model()
    opt = OPTIMIZERS[name](model.parameters())
    train_model(model, opt, 100)
    residuals = manifold_residuals(model)
    assert len(residuals) == 8
    assert max(residuals.values()) < 2e-6, residuals


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_continues_bit_identically(name: str, dtype: torch.dtype) -> None:
    model = mixed_model(dtype)
    opt = OPTIMIZERS[name](model.parameters())
    train_model(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_model(model, opt, 4, start=3)

    resumed = mixed_model(dtype, seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = OPTIMIZERS[name](resumed.parameters())
    resumed_opt.load_state_dict(saved_opt)
    train_model(resumed, resumed_opt, 4, start=3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_half_precision_points_use_float32_geometry_and_state() -> None:
    model = mixed_model(torch.bfloat16)
    opt = RiemannianAdam(model.parameters(), lr=0.01)
    train_model(model, opt, 20)
    assert opt.state[model.tall]["exp_avg"].dtype == torch.float32
    assert opt.state[model[7].weight]["exp_avg"].dtype == torch.bfloat16  # Euclidean: as torch.optim
    assert model.tall.dtype == torch.bfloat16
    assert max(manifold_residuals(model).values()) < 2e-2  # bf16 rounding of the stored weights


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_never_reaches_parameters_or_state(policy: str) -> None:
    model = mixed_model()
    opt = RiemannianAdam(model.parameters(), lr=0.01, nonfinite=policy)
    train_model(model, opt, 2)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    model_loss(model, 9).backward()
    model.tall.grad[0, 0] = math.nan
    model[7].weight.grad[0, 0] = math.inf
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            opt.step()
    else:
        opt.step()  # decided on the device: no warning, a counter
        assert opt.skipped_steps == 1  # one step, however many buckets it skipped
        assert opt.skipped_buckets == 2  # the tall Stiefel bucket and the Euclidean bucket with the head
    for name in ("tall", "7.weight", "7.bias"):
        torch.testing.assert_close(model.get_parameter(name).detach(), params_before[name], rtol=0, atol=0)
    state_after = opt.state_dict()["state"]
    index = [id(p) for p in model.parameters()].index(id(model.tall))
    for key, value in state_before["state"][index].items():
        if key.endswith("_xtm_age"):  # a host-side schedule: it counts steps, skipped or not
            continue
        torch.testing.assert_close(state_after[index][key], value, rtol=0, atol=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_update_from_finite_gradients_is_not_written() -> None:
    """Adam with eps=0 and a zero gradient computes 0/0: torch.optim.Adam writes NaN into the
    parameter; we skip the bucket and leave parameters, state and step count as they were."""
    w = torch.randn(4, requires_grad=True)
    before = w.detach().clone()
    opt = RiemannianAdam([w], lr=0.1, eps=0.0)
    w.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
    assert float(opt.state[w]["step"]) == 0 and opt.skipped_steps == 1
    reference = before.clone().requires_grad_()
    torch_opt = torch.optim.Adam([reference], lr=0.1, eps=0.0)
    reference.grad = torch.zeros(4)
    torch_opt.step()
    assert torch.isnan(reference).all()  # what we protect against


def test_sparse_gradients_are_rejected() -> None:
    embedding = nn.Embedding(5, 3, sparse=True)
    opt = RiemannianSGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("scale", [1e17, 1e30, math.inf])
@pytest.mark.parametrize("refresh_due", [False, True])
def test_huge_gradients_on_stiefel_are_stepped_or_skipped_never_written_as_garbage(
    scale: float, refresh_due: bool
) -> None:
    """Adam normalizes a 1e17 gradient into an ordinary step; a 1e30 one (whose square overflows
    float32) and an infinite one skip the step, parameters and moments bit for bit unchanged,
    both on the fused step that writes in place and on the refreshing step."""
    w = ManifoldParameter(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), Stiefel())
    opt = RiemannianAdam([w], lr=0.01)
    for _ in range(3):
        w.grad = torch.randn(40, 6)
        opt.step()
    opt.state[w]["exp_avg_xtm_age"] = 99 if refresh_due else 0
    before = w.detach().clone()
    moments = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    w.grad = torch.randn(40, 6) * scale
    opt.step()
    assert torch.isfinite(w).all()
    assert float(Stiefel().distance_to_manifold(w.detach())) < 2e-6
    if scale == 1e17:
        assert not torch.equal(w.detach(), before) and opt.skipped_steps == 0
    else:
        assert opt.skipped_steps == 1
        torch.testing.assert_close(w.detach(), before, rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt.state[w][key], moments[key], rtol=0, atol=0)
