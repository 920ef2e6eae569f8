"""Manifolds declared per param group: ``{"params": [...], "manifold": Stiefel()}``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from manifold_opt import PSI, PSISGD, ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel

MAKERS = {
    "sgd": lambda groups: RiemannianSGD(groups, lr=0.05, momentum=0.9),
    "adam": lambda groups: RiemannianAdam(groups, lr=0.01),
    "psisgd": lambda groups: PSISGD(groups, lr=0.05),
}


def layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 3))


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
    return model(x).square().mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


@pytest.mark.parametrize("name", MAKERS)
def test_a_group_manifold_steps_like_the_same_manifold_parameter(name: str) -> None:
    declared, wrapped = layers(), layers()
    for model in (declared, wrapped):
        with torch.no_grad():  # the same start, already on the manifolds
            model[0].weight.copy_(Stiefel().project_parameter(model[0].weight))
            model[2].weight.copy_(Sphere(batch_dims=1).project_parameter(model[2].weight))
    wrapped[0].weight = ManifoldParameter(wrapped[0].weight, Stiefel())
    wrapped[2].weight = ManifoldParameter(wrapped[2].weight, Sphere(batch_dims=1))
    rest = [p for n, p in declared.named_parameters() if n not in ("0.weight", "2.weight")]
    opt = MAKERS[name](
        [
            {"params": [declared[0].weight], "manifold": Stiefel()},
            {"params": [declared[2].weight], "manifold": Sphere(batch_dims=1)},
            {"params": rest},
        ]
    )
    reference = MAKERS[name](wrapped.parameters())
    train(declared, opt, 8)
    train(wrapped, reference, 8)
    for a, b in zip(declared.parameters(), wrapped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert type(declared[0].weight) is nn.Parameter  # nothing was wrapped
    assert float(Stiefel().distance_to_manifold(declared[0].weight.detach())) < 2e-6


def test_tensors_of_a_group_are_put_on_its_manifold_at_construction() -> None:
    model = layers()
    RiemannianSGD([{"params": [model[0].weight], "manifold": Stiefel()}], lr=0.1)
    assert float(Stiefel().distance_to_manifold(model[0].weight.detach())) < 2e-6


def test_a_group_manifold_survives_a_conversion_that_drops_parameter_attributes() -> None:
    model = layers()
    opt = RiemannianSGD([{"params": [model[0].weight], "manifold": Stiefel()}], lr=0.5)
    weight = model[0].weight
    torch.utils.swap_tensors(weight, nn.Parameter(weight.detach().clone()))
    train(model, opt, 3)
    assert float(Stiefel().distance_to_manifold(weight.detach())) < 2e-6


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"manifold": Stiefel}, TypeError, r"did you mean Stiefel\(\)\?"),
        ({"manifold": "stiefel"}, TypeError, r"manifold_opt.manifolds.Manifold"),
        ({"manifold": PSI(), "shape": (5, 1)}, ValueError, r"1 coordinate"),
        ({"manifold": Stiefel(), "own": Sphere()}, ValueError, r"carries .manifold = Sphere.*declares Stiefel"),
    ],
)
def test_bad_group_manifolds_are_clear_errors(group: dict, error: type, match: str) -> None:
    param = nn.Parameter(torch.randn(*group.get("shape", (5, 3))))
    if "own" in group:
        param = ManifoldParameter(param, group["own"])
    with pytest.raises(error, match=match):
        RiemannianAdam([{"params": [param], "manifold": group["manifold"]}])


def test_the_same_manifold_on_the_parameter_and_the_group_is_fine() -> None:
    param = ManifoldParameter(torch.randn(5, 3), Stiefel())
    RiemannianAdam([{"params": [param], "manifold": Stiefel()}])


@pytest.mark.parametrize("name", MAKERS)
def test_group_manifolds_are_plain_data_in_the_state_dict_and_come_back(name: str) -> None:
    model = layers()
    opt = MAKERS[name]([{"params": [model[0].weight], "manifold": Stiefel(retraction="polar")}, {"params": []}])
    train(model, opt, 3)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["manifold"] == {
        "manifold": "Stiefel",
        "batch_dims": 0,
        "retraction": "polar",
        "iterations": None,
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = MAKERS[name]([{"params": [resumed_model[0].weight]}, {"params": []}])  # no declaration
    resumed.load_state_dict(loaded)
    assert resumed.param_groups[0]["manifold"] == Stiefel(retraction="polar")
    train(model, opt, 2)
    train(resumed_model, resumed, 2)
    torch.testing.assert_close(model[0].weight, resumed_model[0].weight, rtol=0, atol=0)


def test_a_checkpoint_declaring_another_manifold_is_refused_and_nothing_loads() -> None:
    model = layers()
    opt = RiemannianSGD([{"params": [model[2].weight], "manifold": Sphere(batch_dims=1)}], lr=0.1, momentum=0.9)
    train(model, opt, 2)
    other = RiemannianSGD([{"params": [model[2].weight], "manifold": Stiefel()}], lr=0.1, momentum=0.9)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=r"param group 0 declares Stiefel.*checkpoint declares Sphere"):
        other.load_state_dict(opt.state_dict())
    assert other.state_dict()["param_groups"] == before["param_groups"]
    assert not other.state


def test_psisgd_takes_a_declared_psi_group_and_reports_it() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    conv = [net[0].weight]
    rest = [p for p in net.parameters() if p is not net[0].weight]
    opt = PSISGD([{"params": conv, "manifold": PSI()}, {"params": rest}], lr=0.1)
    nn.functional.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    assert opt.invariance_report()[0]["verdict"] == "declared PSI(batch_dims=1)"
