"""Misuse, checkpoints, conversions and torch.optim's conventions at their edges: one test per
defect that was found, each failing before its fix."""

from __future__ import annotations

import copy
import io
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from manifold_opt import PSISGD, ConditionedSpectrum, ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel
from manifold_opt.checks import manifold_residuals

F64 = torch.float64


def stiefel_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    model[0].weight = ManifoldParameter(model[0].weight, Stiefel())
    model[2].weight = ManifoldParameter(model[2].weight, Sphere(batch_dims=1))
    return model


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen).to(next(model.parameters()).dtype)
    return model(x).square().mean()


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()


MAKERS = {
    "sgd": lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9, nonfinite="raise"),
    "adam": lambda ps: RiemannianAdam(ps, lr=0.01, amsgrad=True, nonfinite="raise"),
    "psisgd": lambda ps: PSISGD(ps, lr=0.05, tolerance=0.01, verify_steps=3, nonfinite="raise"),
}


# ------------------------------------------------------------------ copies of an optimizer
@pytest.mark.parametrize("name", MAKERS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_every_attribute_and_steps_like_the_original(name: str, how: str) -> None:
    model = stiefel_model()
    opt = MAKERS[name](model.parameters())
    train(model, opt, 3)
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    else:
        model_copy, opt_copy = pickle.loads(pickle.dumps((model, opt)))
    public = {key: value for key, value in vars(opt).items() if not key.startswith("_")}
    assert public, "nothing public to compare"
    for key, value in public.items():
        assert key in vars(opt_copy), key
        if not isinstance(value, (dict, list)):
            assert vars(opt_copy)[key] == value, key
    assert opt_copy.nonfinite == "raise"
    if name == "psisgd":
        assert (opt_copy.tolerance, opt_copy.verify_steps) == (0.01, 3)
    train(model, opt, 3, start=3)
    train(model_copy, opt_copy, 3, start=3)
    for a, b in zip(model.parameters(), model_copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt_copy.skipped_steps == opt.skipped_steps == 0


# ------------------------------------------------------------------ ManifoldParameter
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_data_at_construction_is_a_value_error_naming_the_shape(bad: float) -> None:
    data = torch.randn(5, 3)
    data[1, 2] = bad
    with pytest.raises(ValueError, match=r"shape \(5, 3\).*NaN or Inf.*finite values"):
        ManifoldParameter(data, Stiefel())
    with pytest.raises(ValueError, match=r"shape \(5, 3\)"):
        ManifoldParameter(data, Sphere(batch_dims=1))


def test_pickle_and_deepcopy_of_a_manifold_parameter_keep_user_attributes() -> None:
    param = ManifoldParameter(torch.randn(6, 3), Stiefel())
    param.tag, param.lr_scale = "encoder", 0.5
    buffer = io.BytesIO()
    torch.save(param, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(param), pickle.loads(pickle.dumps(param)), torch.load(buffer, weights_only=True)):
        assert isinstance(copied, ManifoldParameter)
        assert (copied.tag, copied.lr_scale, copied.manifold) == ("encoder", 0.5, param.manifold)
        torch.testing.assert_close(copied, param, rtol=0, atol=0)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict_keeps_the_manifold_with_assign_and_with_swap_tensors(swap: bool, assign: bool) -> None:
    saved = copy.deepcopy(stiefel_model(seed=1).state_dict())
    model = stiefel_model(seed=0)
    model[0].weight.note = "kept"
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        model.load_state_dict(saved, assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    weight = model[0].weight
    assert isinstance(weight, ManifoldParameter) and weight.manifold == Stiefel()
    assert weight.note == "kept" and weight.requires_grad
    assert isinstance(model[2].weight, ManifoldParameter) and model[2].weight.manifold == Sphere(batch_dims=1)
    assert type(model[0].bias) is nn.Parameter
    torch.testing.assert_close(weight.detach(), saved["0.weight"], rtol=0, atol=0)
    opt = RiemannianAdam(model.parameters(), lr=0.01)
    train(model, opt, 2)
    assert max(manifold_residuals(model).values()) < 2e-6


def test_plain_assignment_outside_load_state_dict_is_left_to_the_user() -> None:
    model = stiefel_model()
    model[0].weight = nn.Parameter(torch.randn(12, 6))  # a deliberate replacement stays plain
    assert type(model[0].weight) is nn.Parameter


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize(
    "convert",
    [lambda m: m.to(torch.float32), lambda m: m.double(), lambda m: m.to("cpu", torch.bfloat16), lambda m: m.cpu()],
    ids=["to-same", "double", "to-bf16", "cpu"],
)
def test_module_conversions_keep_the_manifold_with_and_without_swap_tensors(swap: bool, convert) -> None:
    model = stiefel_model()
    model[0].weight.note = "kept"
    weight = model[0].weight
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        convert(model)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert model[0].weight is weight  # the same object, converted in place (set_data or swap)
    assert isinstance(weight, ManifoldParameter) and weight.manifold == Stiefel() and weight.note == "kept"
    assert weight.is_leaf and weight.requires_grad
    assert isinstance(model[2].weight, ManifoldParameter)
    assert type(ManifoldParameter(torch.randn(4, 2), Stiefel()).detach()) is torch.Tensor  # elsewhere: plain


def test_a_parameter_that_lost_its_manifold_makes_the_next_step_raise() -> None:
    model = stiefel_model()
    opt = RiemannianSGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, 1)
    weight = model[0].weight
    torch.utils.swap_tensors(weight, nn.Parameter(weight.detach().clone()))  # e.g. a third-party wrapper
    assert type(model[0].weight) is nn.Parameter
    before = model[0].weight.detach().clone()
    opt.zero_grad()
    loss_of(model, 1).backward()
    with pytest.raises(RuntimeError, match=r"shape \(12, 6\) was stepped on Stiefel.*param.manifold ="):
        opt.step()
    torch.testing.assert_close(model[0].weight.detach(), before, rtol=0, atol=0)
    model[0].weight.manifold = Stiefel()  # the fix the message gives
    opt.step()
    assert max(manifold_residuals(model).values()) < 2e-6


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("manifold", [Stiefel(), Sphere(batch_dims=1)], ids=str)
def test_values_loaded_off_the_manifold_are_projected_with_a_warning(manifold, assign: bool, swap: bool) -> None:
    layer = nn.Linear(6, 4)
    layer.weight = ManifoldParameter(layer.weight, manifold)
    off = {"weight": 3.0 * torch.randn(4, 6), "bias": torch.zeros(4)}
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        with pytest.warns(UserWarning, match=r"shape \(4, 6\) lies .* off .*projected"):
            layer.load_state_dict(off, assign=assign)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert isinstance(layer.weight, ManifoldParameter)
    assert manifold_residuals(layer)["weight"] < 2e-6
    torch.testing.assert_close(layer.weight.detach(), manifold.project_parameter(off["weight"]))


def test_values_on_the_manifold_load_bit_for_bit_and_user_writes_are_the_users() -> None:
    layer = nn.Linear(6, 4)
    layer.weight = ManifoldParameter(layer.weight, Stiefel())
    saved = {"weight": Stiefel().random_point((4, 6)), "bias": torch.zeros(4)}
    layer.load_state_dict(saved)
    torch.testing.assert_close(layer.weight.detach(), saved["weight"], rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.copy_(2 * saved["weight"])  # not a load: kept, and the check reports it
    assert manifold_residuals(layer)["weight"] > 1


# ------------------------------------------------------------------ optimizer state loading
@pytest.mark.parametrize("name", MAKERS)
def test_state_dict_of_another_model_raises_naming_the_parameter_and_loads_nothing(name: str) -> None:
    other = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    other_opt = MAKERS[name](other.parameters())
    train(other, other_opt, 2)
    model = stiefel_model()
    opt = MAKERS[name](model.parameters())
    train(model, opt, 2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"saved parameter 0 has shape \(7, 6\).*shape \(12, 6\).*another model"):
        opt.load_state_dict(other_opt.state_dict())
    after = opt.state_dict()
    for index, state in before["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(after["state"][index][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("reference", ["torch", "ours"])
def test_loaded_state_of_plain_parameters_is_cast_to_their_dtype_as_torch_does(reference: str) -> None:
    make = {"torch": lambda ps: torch.optim.Adam(ps, lr=0.01), "ours": lambda ps: RiemannianAdam(ps, lr=0.01)}
    saved_model = nn.Linear(4, 3)  # float32 state
    saved_opt = make[reference](saved_model.parameters())
    saved_model(torch.randn(2, 4)).sum().backward()
    saved_opt.step()
    ours_model, torch_model = nn.Linear(4, 3).to(F64), nn.Linear(4, 3).to(F64)
    ours, theirs = RiemannianAdam(ours_model.parameters(), lr=0.01), torch.optim.Adam(torch_model.parameters(), lr=0.01)
    ours.load_state_dict(saved_opt.state_dict())
    theirs.load_state_dict(saved_opt.state_dict())
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert ours.state[p]["exp_avg"].dtype == theirs.state[q]["exp_avg"].dtype == F64
        assert ours.state[p]["exp_avg_sq"].dtype == F64


def test_loaded_state_of_half_precision_manifold_parameters_stays_float32() -> None:
    model = stiefel_model(dtype=torch.bfloat16)
    opt = RiemannianAdam(model.parameters(), lr=0.01)
    train(model, opt, 2)
    fresh = stiefel_model(seed=3, dtype=torch.bfloat16)
    fresh_opt = RiemannianAdam(fresh.parameters(), lr=0.01)
    fresh_opt.load_state_dict(opt.state_dict())
    assert fresh_opt.state[fresh[0].weight]["exp_avg"].dtype == torch.float32
    assert fresh_opt.state[fresh[4].weight]["exp_avg"].dtype == torch.bfloat16  # plain: as torch.optim


# ------------------------------------------------------------------ torch.optim's conventions
@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("lr", [torch.tensor(0.01), np.float32(0.01), np.float64(0.01)], ids=["tensor", "np32", "np64"])
def test_lr_as_a_tensor_or_a_numpy_number_steps_like_a_float(name: str, lr) -> None:
    make = {
        "sgd": lambda ps, lr: RiemannianSGD(ps, lr=lr, momentum=0.9),
        "adam": lambda ps, lr: RiemannianAdam(ps, lr=lr),
    }[name]
    reference, model = stiefel_model(), stiefel_model()
    train(reference, make(reference.parameters(), 0.01), 4)
    train(model, make(model.parameters(), lr), 4)
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # a float32 lr rounds the step size


def test_plain_parameters_with_a_tensor_lr_follow_torch_fused_adam() -> None:
    ours_model, torch_model = nn.Linear(4, 3), nn.Linear(4, 3)
    torch_model.load_state_dict(ours_model.state_dict())
    ours = RiemannianAdam(ours_model.parameters(), lr=torch.tensor(0.01), fused=True)
    theirs = torch.optim.Adam(torch_model.parameters(), lr=torch.tensor(0.01), fused=True)
    for step in range(3):
        for model, opt in ((ours_model, ours), (torch_model, theirs)):
            opt.zero_grad()
            model(torch.full((2, 4), float(step + 1))).square().sum().backward()
            opt.step()
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdam, PSISGD], ids=lambda c: c.__name__)
def test_torch_keyword_arguments_at_their_defaults_are_accepted(make) -> None:
    param = nn.Parameter(torch.randn(3, 2))
    keywords = {"foreach": None, "fused": None, "differentiable": False}  # torch.optim.SGD's
    if make is RiemannianAdam:
        keywords["capturable"] = False
    make([param], lr=0.01, **keywords)
    for name in keywords.keys() & {"capturable", "differentiable"}:
        with pytest.raises(ValueError, match=rf"{name}=True is not supported.*leave {name}=False"):
            make([param], lr=0.01, **{name: True})


@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdam, PSISGD], ids=lambda c: c.__name__)
def test_zero_size_parameters_are_stepped_as_torch_steps_them(make) -> None:
    empty, weight = nn.Parameter(torch.zeros(0, 3)), nn.Parameter(torch.randn(4, 3))
    opt = make([empty, weight], lr=0.01)
    for _ in range(2):
        empty.grad, weight.grad = torch.zeros(0, 3), torch.ones(4, 3)
        opt.step()
    assert empty.shape == (0, 3) and torch.isfinite(weight).all()


# ------------------------------------------------------------------ overflow
@pytest.mark.parametrize("scale", [1e29, 1e35])
def test_a_sphere_step_near_the_float32_maximum_lands_on_the_sphere_or_is_skipped(scale: float) -> None:
    point = ManifoldParameter(torch.randn(2, 16), Sphere(batch_dims=1))
    opt = RiemannianSGD([point], lr=1.0)
    before = point.detach().clone()
    point.grad = scale * torch.randn(2, 16)
    opt.step()
    if opt.skipped_steps:
        torch.testing.assert_close(point.detach(), before, rtol=0, atol=0)
    else:
        norms = point.detach().norm(dim=1)
        torch.testing.assert_close(norms, torch.ones(2), rtol=0, atol=1e-6)  # never a zero vector


@pytest.mark.parametrize("retraction", ["polar", "newton", "qr"])
def test_an_overflowing_stiefel_step_is_skipped_not_a_linalg_error(retraction: str) -> None:
    weight = ManifoldParameter(torch.randn(6, 3), Stiefel(retraction=retraction))
    opt = RiemannianSGD([weight], lr=1e6)
    before = weight.detach().clone()
    weight.grad = torch.full((6, 3), 1e30) * torch.randn(6, 3)  # x + t u overflows the Gram matrix
    opt.step()
    if opt.skipped_steps:
        torch.testing.assert_close(weight.detach(), before, rtol=0, atol=0)
    else:
        assert float(Stiefel().distance_to_manifold(weight.detach())) < 2e-6
    strict = RiemannianSGD([weight], lr=1e6, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        strict.step()
    torch.testing.assert_close(weight.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(5, 5), (6, 4), (4, 6), (24, 3)], ids=str)  # near-square, wide, tall
@pytest.mark.parametrize("lr", [1e-3, 1.0, 1e6, 1e20, 1e36])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e15, 1e30])
def test_momentum_sgd_in_place_lands_on_stiefel_or_skips_at_any_lr_and_scale(
    shape: tuple[int, int], lr: float, scale: float
) -> None:
    # the in-place momentum step (nonfinite="skip"), untracked on near-square points and
    # tracked on tall ones: W = X + t m' must stay finite for every step size
    gen = torch.Generator().manual_seed(0)
    weight = ManifoldParameter(torch.randn(shape, generator=gen), Stiefel())
    opt = RiemannianSGD([weight], lr=lr, momentum=0.9)
    for step in range(6):  # the first step makes the momentum, the 5th refreshes a tracked one
        before = weight.detach().clone()
        momentum = opt.state[weight].get("momentum_buffer")
        momentum = None if momentum is None else momentum.clone()
        skipped = opt.skipped_steps
        weight.grad = scale * torch.randn(shape, generator=gen)
        opt.step()
        if opt.skipped_steps > skipped:
            torch.testing.assert_close(weight.detach(), before, rtol=0, atol=0)
            if momentum is not None:
                torch.testing.assert_close(opt.state[weight]["momentum_buffer"], momentum, rtol=0, atol=0)
            continue
        assert torch.isfinite(weight).all(), f"step {step}"
        # a gradient below 1e-19 has a squared norm that underflows float32, so the step is not
        # shortened before W = X + t m is formed (documented in stiefel._pre_limit): still on
        # the manifold, to the accuracy of the plain composition
        bound = 1e-5 if scale < 1e-19 and lr * scale > 1 else 2e-6
        assert float(Stiefel().distance_to_manifold(weight.detach())) < bound, f"step {step}"


# ------------------------------------------------------------------ the first hour
def test_a_manifold_class_instead_of_an_instance_asks_did_you_mean() -> None:
    with pytest.raises(TypeError, match=r"got the class Stiefel: did you mean Stiefel\(\)\?"):
        ManifoldParameter(torch.randn(4, 2), Stiefel)


def test_the_invariance_report_prints_as_a_table_with_the_parameter_names() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    opt = PSISGD(net.named_parameters())
    nn.functional.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    report = opt.invariance_report()
    lines = str(report).splitlines()
    assert lines[0].split() == ["name", "shape", "verdict", "checks", "radial_cosine", "reason"]
    assert len(lines) == 2 + len(report) == 8
    assert lines[2].split()[:3] == ["0.weight", "4×1×3×3", "psi"]
    assert report[0]["verdict"] == "psi"  # still a list of dicts


# ------------------------------------------------------------------ complex parameters
@pytest.mark.parametrize("name", ["sgd", "adam"])
@pytest.mark.parametrize("foreach", [None, True, False])
def test_plain_complex_parameters_follow_torch_optim(name: str, foreach) -> None:
    ours_cls, torch_cls = {"sgd": (RiemannianSGD, torch.optim.SGD), "adam": (RiemannianAdam, torch.optim.Adam)}[name]
    kwargs = {"lr": 0.01, "momentum": 0.9} if name == "sgd" else {"lr": 0.01, "amsgrad": True}
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
    ours_param, torch_param = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    ours = ours_cls([ours_param], foreach=foreach, **kwargs)
    theirs = torch_cls([torch_param], foreach=foreach, **kwargs)
    for _ in range(5):
        grad = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
        ours_param.grad, torch_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(ours_param, torch_param, rtol=0, atol=0)


def test_complex_parameters_on_a_real_only_manifold_are_a_clear_error() -> None:
    param = nn.Parameter(torch.randn(4, 2, dtype=torch.complex64))
    param.manifold = ConditionedSpectrum(kappa=2.0)
    opt = RiemannianSGD([param], lr=0.1)
    param.grad = torch.ones_like(param)
    with pytest.raises(TypeError, match=r"complex parameters on ConditionedSpectrum.*plain .*on Stiefel or Sphere"):
        opt.step()
    assert param.grad is not None and torch.equal(param.grad, torch.ones_like(param))
    with pytest.raises(TypeError, match=r"holds real points only, got complex data of shape \(4, 2\)"):
        ManifoldParameter(torch.randn(4, 2, dtype=torch.complex64), ConditionedSpectrum(kappa=2.0))


@pytest.mark.parametrize("make", [RiemannianSGD, RiemannianAdam], ids=lambda c: c.__name__)
def test_stabilize_reprojects_every_n_steps_of_its_group(make) -> None:
    weight = ManifoldParameter(torch.randn(8, 3), Stiefel())
    other = ManifoldParameter(torch.randn(8, 3), Stiefel())
    kwargs = {"momentum": 0.9} if make is RiemannianSGD else {}
    opt = make([{"params": [weight], "stabilize": 3}, {"params": [other]}], lr=1e-3, **kwargs)
    assert opt.param_groups[1]["stabilize"] is None
    with pytest.raises(ValueError, match="stabilize must be None or an int >= 1"):
        make([weight], stabilize=0)
    weight.grad, other.grad = torch.zeros(8, 3), torch.zeros(8, 3)
    opt.step()  # the first step (which projects points that are off the manifold) is behind us
    for step in range(2, 8):
        # knocked off the manifold through a .data alias, which the next step does not see (an
        # in-place write to the parameter itself would be projected by the next step)
        weight.data.mul_(1.01)
        other.data.mul_(1.01)
        # skipped steps (NaN gradients): only the stabilization can bring the points back
        weight.grad, other.grad = torch.full((8, 3), math.nan), torch.full((8, 3), math.nan)
        opt.step()
        on = float(Stiefel().distance_to_manifold(weight.detach())) < 1e-5
        assert on == (step % 3 == 0), step
    assert float(Stiefel().distance_to_manifold(other.detach())) > 1e-3  # its group has no stabilize
