"""torch.optim's own contract, run on our optimizers.

The configurations and the invalid inputs come from torch's test harness itself
(``torch.testing._internal.common_optimizers``: ``optim_inputs_func_sgd/adam`` and
``optim_error_inputs_func_sgd/adam``, the ``OptimizerInput`` entries of ``optim_db``). The
checks are those of torch's ``test/test_optim.py``, written here for pytest because that
file is not shipped with torch and runs on torch's own ``TestCase`` machinery: every
configuration steps plain parameters bit for bit like ``torch.optim``, survives a
``state_dict`` round trip (also of older checkpoints without ``foreach``/``maximize`` and
with Python-number steps) and a ``deepcopy`` with every public attribute, runs with
torch's schedulers and hooks, and handles non-contiguous parameters and param-group edits;
the same contract holds on manifold parameters with ``torch.optim`` replaced by its
definition (stepping each parameter alone).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    optim_error_inputs_func_adam,
    optim_error_inputs_func_sgd,
    optim_inputs_func_adam,
    optim_inputs_func_sgd,
)

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel

PAIRS = {"sgd": (RiemannianSGD, torch.optim.SGD), "adam": (RiemannianAdam, torch.optim.Adam)}
INPUTS = {"sgd": optim_inputs_func_sgd, "adam": optim_inputs_func_adam}
ERRORS = {"sgd": optim_error_inputs_func_sgd, "adam": optim_error_inputs_func_adam}


def configurations() -> list[Any]:
    cases = []
    for name, inputs in INPUTS.items():
        for entry in inputs("cpu"):
            cases.append(pytest.param(name, entry.kwargs, id=f"{name}-{entry.desc.replace(' ', '_')}"))
    return cases


def error_inputs() -> list[Any]:
    cases = []
    for name, errors in ERRORS.items():
        for entry in errors("cpu", torch.float32):
            desc = entry.optimizer_error_input.desc.replace(" ", "_")
            cases.append(pytest.param(name, entry, id=f"{name}-{desc}"))
    return cases


def weight_bias(seed: int = 0, contiguous: bool = True) -> tuple[nn.Parameter, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        return nn.Parameter(torch.randn(10, 5, generator=gen)), nn.Parameter(torch.randn(10, generator=gen))
    weight = nn.Parameter(torch.randn(10, 5, 2, generator=gen)[..., 0])  # torch's non-contiguous case
    return weight, nn.Parameter(torch.randn(10, 2, generator=gen)[..., 0])


def loss_fn(weight: torch.Tensor, bias: torch.Tensor, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(5, generator=gen)
    return (weight.mv(x) + bias).pow(2).sum()


def closure(opt: torch.optim.Optimizer, params: tuple[torch.Tensor, ...], step: int) -> Callable[[], torch.Tensor]:
    def evaluate() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(*params, step)
        loss.backward()
        return loss

    return evaluate


def fresh_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Tensor hyperparameters are copied: torch's entries share them between optimizers."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


# our default runs torch's fused kernel where it exists (else foreach); torch's own default
# on CPU is its single-tensor loop: parity is per implementation
IMPLEMENTATIONS = {
    "default": ({}, {"fused": True}),
    "foreach": ({"foreach": True},) * 2,
    "single": ({"foreach": False},) * 2,
}


@pytest.mark.parametrize(("name", "kwargs"), configurations())
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("contiguous", [True, False])
def test_plain_parameters_step_bit_for_bit_like_torch(
    name: str, kwargs: dict, implementation: str, contiguous: bool
) -> None:
    ours_cls, torch_cls = PAIRS[name]
    ours_options, torch_options = IMPLEMENTATIONS[implementation]
    if name == "adam" and implementation == "foreach" and isinstance(kwargs.get("lr"), torch.Tensor):
        pytest.skip("torch rejects a tensor lr with foreach=True and capturable=False (tested with the errors)")
    ours_params, torch_params = weight_bias(contiguous=contiguous), weight_bias(contiguous=contiguous)
    ours = ours_cls(list(ours_params), **fresh_kwargs(kwargs), **ours_options)
    theirs = torch_cls(list(torch_params), **fresh_kwargs(kwargs), **torch_options)
    repr(ours)  # torch checks that an optimizer prints
    for step in range(20):
        ours.step(closure(ours, ours_params, step))
        theirs.step(closure(theirs, torch_params, step))
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "kwargs"), configurations())
def test_state_dict_round_trip_as_torch_tests_it(name: str, kwargs: dict) -> None:
    ours_cls, _ = PAIRS[name]
    params = weight_bias()
    opt = ours_cls(list(params), **fresh_kwargs(kwargs))
    for step in range(10):
        opt.step(closure(opt, params, step))
    params_c = tuple(nn.Parameter(p.detach().clone()) for p in params)
    opt_c = ours_cls(list(params_c), **fresh_kwargs(kwargs))
    state_dict, state_dict_c = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.state_dict())
    opt_c.load_state_dict(state_dict_c)
    for step in range(10, 20):
        opt.step(closure(opt, params, step))
        opt_c.step(closure(opt_c, params_c, step))
        for a, b in zip(params, params_c):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_nested_equal(state_dict, state_dict_c)  # loading does not modify the state_dict
    _assert_nested_equal(opt.state_dict(), opt_c.state_dict())  # deterministic
    # older checkpoints: without the maximize / foreach keys, with steps as Python numbers
    for key in ("maximize", "foreach"):
        old = opt.state_dict()
        for group in old["param_groups"]:
            group.pop(key, None)
        opt.load_state_dict(old)
        opt.step(closure(opt, params, 0))
    old = opt.state_dict()
    for state in old["state"].values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].item()
    opt.load_state_dict(old)
    opt.step(closure(opt, params, 1))
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copy.deepcopy(opt)) if not k.startswith("_")}


def _assert_nested_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_nested_equal(x, y)
    else:
        assert a == b


@pytest.mark.parametrize(("name", "entry"), error_inputs())
def test_invalid_inputs_raise_what_torch_raises(name: str, entry: Any) -> None:
    ours_cls, torch_cls = PAIRS[name]
    spec = entry.optimizer_error_input
    params = spec.params if spec.params is not None else [nn.Parameter(torch.randn(1, 1))]

    def run(cls: type) -> None:
        opt = cls(params, **spec.kwargs)
        if entry.error_on == OptimizerErrorEnum.STEP_ERROR:
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()

    if issubclass(entry.error_type, Warning):
        with pytest.warns(entry.error_type):
            run(ours_cls)
    else:
        with pytest.raises(entry.error_type):
            run(ours_cls)
        with pytest.raises(entry.error_type, match=entry.error_regex):  # the harness is torch's
            run(torch_cls)


@pytest.mark.parametrize("name", PAIRS)
def test_schedulers_hooks_and_param_group_edits_behave_as_in_torch(name: str) -> None:
    ours_cls, torch_cls = PAIRS[name]
    runs = {}
    for label, cls, options in (("ours", ours_cls, {}), ("torch", torch_cls, {"fused": True})):
        weight, bias = weight_bias()
        opt = cls([{"params": [weight]}, {"params": [bias], "lr": 1e-2}], lr=1e-3, **options)
        calls: list[str] = []
        record = calls.append
        opt.register_step_pre_hook(lambda *_, record=record: record("pre"))
        opt.register_step_post_hook(lambda *_, record=record: record("post"))
        opt.register_state_dict_pre_hook(lambda *_, record=record: record("sd-pre"))
        opt.register_load_state_dict_post_hook(lambda *_, record=record: record("load-post"))
        schedulers = [StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)]
        first = float(loss_fn(weight, bias, 0).detach())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. scheduler.step() before optimizer.step()
            for step in range(60):
                loss = opt.step(closure(opt, (weight, bias), step % 5))
                schedulers[0].step()
                schedulers[1].step(loss.detach())
                if step == 30:
                    opt.param_groups[1]["lr"] = 5e-3
                    extra = nn.Parameter(torch.ones(3))
                    opt.add_param_group({"params": [extra], "lr": 0.1})
                    extra.grad = torch.ones(3)
        opt.load_state_dict(opt.state_dict())
        assert float(loss_fn(weight, bias, 0).detach()) < first
        runs[label] = (weight, bias, calls, [g["lr"] for g in opt.param_groups])
    for a, b in zip(runs["ours"][:2], runs["torch"][:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert runs["ours"][2:] == runs["torch"][2:]


@pytest.mark.parametrize(("name", "kwargs"), configurations())
def test_manifold_parameters_keep_the_contract(name: str, kwargs: dict) -> None:
    ours_cls, _ = PAIRS[name]
    kwargs = fresh_kwargs(kwargs)

    def model(seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return (
            ManifoldParameter(torch.randn(10, 5, generator=gen), Stiefel()),
            ManifoldParameter(torch.randn(10, generator=gen), Sphere()),
        )

    params = model(0)
    opt = ours_cls(list(params), **kwargs)
    for step in range(10):
        opt.step(closure(opt, params, step))
    resumed = tuple(copy.deepcopy(p) for p in params)
    resumed_opt = ours_cls(list(resumed), **fresh_kwargs(kwargs))
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    copied_params, copied_opt = copy.deepcopy((params, opt))
    for step in range(10, 20):
        for p, o in ((params, opt), (resumed, resumed_opt), (copied_params, copied_opt)):
            o.step(closure(o, p, step))
    for a, b, c in zip(params, resumed, copied_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert float(Stiefel().distance_to_manifold(params[0].detach())) < 2e-6
    assert abs(float(params[1].detach().norm()) - 1) < 2e-6
