"""Edge cases of the optimizer driver: off-manifold starting points, skipped and refused
steps, zero-size parameters, what ``skipped_steps`` counts, and torch.optim.Adam checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from manifold_opt import (
    PSI,
    PSISGD,
    ConditionedSpectrum,
    ManifoldParameter,
    RiemannianAdam,
    RiemannianSGD,
    Sphere,
    Stiefel,
)

# every native manifold and retraction (PSI has no off-manifold points but zero rows)
MANIFOLDS = {
    "stiefel-qr": (Stiefel(), (9, 4)),
    "stiefel-qr-wide": (Stiefel(), (4, 9)),
    "stiefel-polar": (Stiefel(retraction="polar"), (9, 4)),
    "stiefel-cayley": (Stiefel(retraction="cayley"), (9, 4)),
    "stiefel-cayley-iterations": (Stiefel(retraction="cayley", iterations=3), (9, 4)),
    "stiefel-newton": (Stiefel(retraction="newton"), (9, 4)),
    "stiefel-newton-iterations": (Stiefel(retraction="newton", iterations=6), (9, 4)),
    "stiefel-batched": (Stiefel(batch_dims=1), (3, 9, 4)),
    "sphere": (Sphere(), (7,)),
    "sphere-exp": (Sphere(retraction="exp"), (7,)),
    "oblique": (Sphere(batch_dims=1), (5, 6)),
    "spectrum-svd": (ConditionedSpectrum(kappa=2.0), (6, 4)),
    "spectrum-newton": (ConditionedSpectrum(kappa=2.0, retraction="newton"), (6, 4)),
    "spectrum-band": (ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0), (6, 4)),
}
OPTIMIZERS = {
    "sgd": lambda params: RiemannianSGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: RiemannianAdam(params, lr=0.05),
    "psisgd": lambda params: PSISGD(params, lr=0.05),
}
ROUNDING = 4e-6  # float32: a few units of roundoff of XᵀX (the Newton–Schulz retractions' floor)
# ConditionedSpectrum's "newton" retraction is approximate by design (a singular value d outside
# the band ends at most d/2 outside it): from a point on the band's edge a step lands ~1e-4 off
APPROXIMATE = {"spectrum-newton": 1e-3}


def tolerance(case: str) -> float:
    return APPROXIMATE.get(case, ROUNDING)


def distance(param: torch.Tensor) -> float:
    manifold = param.manifold
    return float(manifold.parameter_distance(param.detach()))


def off_manifold(manifold, shape, seed: int = 0) -> ManifoldParameter:
    """A ManifoldParameter overwritten off its manifold (``p.copy_``) before any optimizer exists."""
    gen = torch.Generator().manual_seed(seed)
    param = ManifoldParameter(manifold.random_point(manifold_points_shape(manifold, shape), generator=gen), manifold)
    param = ManifoldParameter(param.detach().reshape(shape), manifold)
    with torch.no_grad():
        param.copy_(3 * torch.randn(shape, generator=gen) + 0.5)
    assert distance(param) > 1e-2
    return param


def manifold_points_shape(manifold, shape):
    return (math.prod(manifold.batch_shape(shape)), *manifold.point_shape(shape))


def step_with_random_gradient(opt, params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    opt.step()


# ---------------------------------------------------------------- first step onto the manifold
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", MANIFOLDS)
def test_first_step_leaves_an_off_manifold_point_on_the_manifold(case: str, optimizer: str) -> None:
    manifold, shape = MANIFOLDS[case]
    param = off_manifold(manifold, shape)
    opt = OPTIMIZERS[optimizer]([param])
    step_with_random_gradient(opt, [param], 1)
    assert distance(param) <= tolerance(case)
    step_with_random_gradient(opt, [param], 2)
    assert distance(param) <= tolerance(case)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("case", MANIFOLDS)
def test_first_step_after_load_state_dict_and_add_param_group_projects(case: str, optimizer: str) -> None:
    manifold, shape = MANIFOLDS[case]
    param = off_manifold(manifold, shape)
    opt = OPTIMIZERS[optimizer]([param])
    for seed in range(3):
        step_with_random_gradient(opt, [param], seed)
    saved = copy.deepcopy(opt.state_dict())
    with torch.no_grad():  # overwritten again, then the checkpoint is loaded
        param.copy_(3 * torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    opt.load_state_dict(saved)
    step_with_random_gradient(opt, [param], 3)
    assert distance(param) <= tolerance(case)
    assert all(torch.isfinite(v).all() for v in opt.state[param].values() if isinstance(v, torch.Tensor))

    newcomer = off_manifold(manifold, shape, seed=7)
    opt.add_param_group({"params": [newcomer]})
    step_with_random_gradient(opt, [param, newcomer], 4)
    assert distance(newcomer) <= tolerance(case) and distance(param) <= tolerance(case)


@pytest.mark.parametrize("how", ["copy_", "add_"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("case", MANIFOLDS)
def test_an_overwrite_between_steps_is_projected_by_the_next_step(case: str, optimizer: str, how: str) -> None:
    """The step compares each parameter's version counter with the one its last step left (host
    metadata): an in-place write since is projected."""
    manifold, shape = MANIFOLDS[case]
    param = off_manifold(manifold, shape)
    opt = OPTIMIZERS[optimizer]([param])
    for seed in range(6):
        step_with_random_gradient(opt, [param], seed)
        value = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(10 + seed))
        with torch.no_grad():
            if how == "copy_":
                param.copy_(value)
            else:
                param.add_(value)
        assert distance(param) > 1e-2
    step_with_random_gradient(opt, [param], 7)
    assert distance(param) <= tolerance(case)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["EuclideanStiefel", "Sphere"])
def test_geoopt_parameters_from_randn_are_on_the_manifold_after_one_step(kind: str, optimizer: str) -> None:
    geoopt = pytest.importorskip("geoopt")
    shape = (8, 4) if kind == "EuclideanStiefel" else (5, 6)
    data = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    param = geoopt.ManifoldParameter(data, getattr(geoopt, kind)())
    reference = Stiefel() if kind == "EuclideanStiefel" else Sphere(batch_dims=1)
    assert float(reference.parameter_distance(param.detach())) > 1e-1
    opt = OPTIMIZERS[optimizer]([param])
    step_with_random_gradient(opt, [param], 1)
    assert float(reference.parameter_distance(param.detach())) <= ROUNDING


def test_points_on_the_manifold_are_kept_bit_for_bit_by_the_first_step_after_loading() -> None:
    """Resuming from a checkpoint continues exactly: the projection leaves points (and the
    momentum and tracking states) that are on the manifold untouched."""
    gen = torch.Generator().manual_seed(0)
    params = [ManifoldParameter(torch.randn(40, 6, generator=gen), Stiefel()) for _ in range(2)]
    grads = [[torch.randn(40, 6, generator=gen) for _ in params] for _ in range(8)]
    opt = RiemannianAdam(params, lr=0.01)

    def steps(opt, params, indices) -> None:
        for i in indices:
            for param, grad in zip(params, grads[i]):
                param.grad = grad.clone()
            opt.step()

    steps(opt, params, range(3))
    saved_params = [p.detach().clone() for p in params]
    saved = copy.deepcopy(opt.state_dict())
    steps(opt, params, range(3, 8))
    resumed = [ManifoldParameter(p.clone(), Stiefel()) for p in saved_params]
    for param, value in zip(resumed, saved_params):
        with torch.no_grad():
            param.copy_(value)
    opt2 = RiemannianAdam(resumed, lr=0.01)
    opt2.load_state_dict(saved)
    steps(opt2, resumed, range(3, 8))
    for a, b in zip(params, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_refused_first_step_projects_nothing_and_the_next_one_does() -> None:
    param = off_manifold(Stiefel(), (9, 4))
    before = param.detach().clone()
    opt = RiemannianAdam([param], lr=0.05, nonfinite="raise")
    param.grad = torch.full((9, 4), math.nan)
    with pytest.raises(FloatingPointError):
        opt.step()
    assert torch.equal(param.detach(), before)
    step_with_random_gradient(opt, [param], 1)
    assert distance(param) <= ROUNDING


# ------------------------------------------------------------ skipped and refused steps
def run_with_bad_gradient(make, shape, policy: str, bad_at: int | None, steps: int = 12) -> tuple:
    gen = torch.Generator().manual_seed(3)
    start = Stiefel().random_point(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(steps)]
    param = ManifoldParameter(start.clone(), Stiefel())
    opt = make([param], policy)
    for i, grad in enumerate(grads):
        if i == bad_at:
            param.grad = grad.clone()
            param.grad[0, 0] = math.nan
            if policy == "raise":
                with pytest.raises(FloatingPointError):
                    opt.step()
            else:
                opt.step()
        param.grad = grad.clone()
        opt.step()
    return param.detach(), opt


STEPPERS = {
    "adam": lambda params, policy: RiemannianAdam(params, lr=0.02, nonfinite=policy),
    "sgd-momentum": lambda params, policy: RiemannianSGD(params, lr=0.05, momentum=0.9, nonfinite=policy),
}


@pytest.mark.parametrize("bad_at", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(40, 6), (9, 4), (4, 9)], ids=["tall", "square", "wide"])
@pytest.mark.parametrize("name", STEPPERS)
def test_a_refused_step_changes_nothing(name: str, shape: tuple[int, int], bad_at: int) -> None:
    """nonfinite="raise": the run that met a NaN gradient at step ``bad_at`` continues bit for bit
    as the run that never saw it (parameters, moments and the tracking schedule)."""
    good, good_opt = run_with_bad_gradient(STEPPERS[name], shape, "raise", None)
    bad, bad_opt = run_with_bad_gradient(STEPPERS[name], shape, "raise", bad_at)
    torch.testing.assert_close(bad, good, rtol=0, atol=0)
    (good_state,), (bad_state,) = good_opt.state_dict()["state"].values(), bad_opt.state_dict()["state"].values()
    assert good_state.keys() == bad_state.keys()
    for key, value in good_state.items():
        assert torch.equal(bad_state[key], value) if isinstance(value, torch.Tensor) else bad_state[key] == value, key


@pytest.mark.parametrize("bad_at", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(9, 4), (4, 9)], ids=["square", "wide"])
def test_a_skipped_step_changes_nothing_where_no_tracking_state_is_kept(shape: tuple[int, int], bad_at: int) -> None:
    """nonfinite="skip", SGD with momentum on near-square points (no tracking state, no schedule)."""
    good, _ = run_with_bad_gradient(STEPPERS["sgd-momentum"], shape, "skip", None)
    bad, opt = run_with_bad_gradient(STEPPERS["sgd-momentum"], shape, "skip", bad_at)
    torch.testing.assert_close(bad, good, rtol=0, atol=0)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", STEPPERS)
def test_a_skipped_step_keeps_every_tensor_and_stays_within_rounding_of_the_clean_run(name: str) -> None:
    """nonfinite="skip" with a tracking state (Adam; SGD on tall points): the skipped step writes
    nothing, but the host-side refresh schedule counts it (knowing it was skipped would need a
    host read), so later steps refresh one call later than the clean run: equal to rounding."""
    shape = (40, 6)
    good, _ = run_with_bad_gradient(STEPPERS[name], shape, "skip", None)
    bad, opt = run_with_bad_gradient(STEPPERS[name], shape, "skip", 3)
    torch.testing.assert_close(bad, good, rtol=0, atol=1e-5)
    assert opt.skipped_steps == 1


@pytest.mark.xfail(
    strict=True,
    reason="the tracking refresh schedule counts skipped calls: exact only with a host read per step or "
    "a refresh at every step (+19-28% on a tall 30000x50 point); see docs/design.md, the non-finite policy",
)
@pytest.mark.parametrize("name", STEPPERS)
def test_a_skipped_step_with_a_tracking_state_is_bit_for_bit_invisible(name: str) -> None:
    good, _ = run_with_bad_gradient(STEPPERS[name], (40, 6), "skip", None)
    bad, _ = run_with_bad_gradient(STEPPERS[name], (40, 6), "skip", 3)
    torch.testing.assert_close(bad, good, rtol=0, atol=0)


# ------------------------------------------------------------------ zero-size parameters
ZERO_SIZE = {
    "stiefel": (Stiefel(batch_dims=1), (0, 5, 3)),
    "sphere": (Sphere(batch_dims=1), (0, 4)),
    "psi": (PSI(batch_dims=1), (0, 4)),
    "spectrum": (ConditionedSpectrum(kappa=2.0, batch_dims=1), (0, 4, 3)),
    "euclidean": (None, (0, 4)),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("case", ZERO_SIZE)
def test_zero_size_parameters_step_as_no_ops(case: str, optimizer: str) -> None:
    manifold, shape = ZERO_SIZE[case]
    data = torch.zeros(shape)
    empty = torch.nn.Parameter(data) if manifold is None else ManifoldParameter(data, manifold)
    other = ManifoldParameter(torch.randn(6, 3), Stiefel())
    opt = OPTIMIZERS[optimizer]([empty, other])
    before = other.detach().clone()
    for seed in range(2):
        empty.grad = torch.zeros(shape)
        other.grad = torch.randn(6, 3, generator=torch.Generator().manual_seed(seed))
        opt.step()
    assert empty.shape == shape and not torch.equal(other.detach(), before)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.step()


# ------------------------------------------------------------------ what skipped_steps counts
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_steps_counts_steps_and_skipped_buckets_counts_buckets(policy: str) -> None:
    stiefel = ManifoldParameter(torch.randn(8, 3), Stiefel())
    plain = torch.nn.Parameter(torch.randn(5))
    opt = RiemannianAdam([stiefel, plain], lr=0.01, nonfinite=policy)
    for bad in (True, False, True):
        stiefel.grad = torch.full((8, 3), math.nan) if bad else torch.randn(8, 3)
        plain.grad = torch.full((5,), math.nan) if bad else torch.randn(5)
        if policy == "raise" and bad:
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
    expected = (2, 4) if policy == "skip" else (0, 0)  # two steps, each with two buckets skipped
    assert (opt.skipped_steps, opt.skipped_buckets) == expected


# ------------------------------------------------------------ torch.optim.Adam checkpoints
def adam_checkpoint() -> tuple[list[torch.Tensor], dict]:
    gen = torch.Generator().manual_seed(0)
    values = [Stiefel().random_point((8, 4), generator=gen), Sphere(batch_dims=1).random_point((3, 5), generator=gen)]
    plain = [torch.nn.Parameter(v.clone()) for v in values] + [torch.nn.Parameter(torch.randn(4, generator=gen))]
    torch_adam = torch.optim.Adam(plain, lr=0.01)
    for _ in range(3):
        for p in plain:
            p.grad = torch.randn(p.shape, generator=gen)
        torch_adam.step()
    params = [
        ManifoldParameter(plain[0].detach().clone(), Stiefel()),
        ManifoldParameter(plain[1].detach().clone(), Sphere(batch_dims=1)),
        torch.nn.Parameter(plain[2].detach().clone()),
    ]
    return params, torch_adam.state_dict()


def test_a_torch_adam_checkpoint_is_refused_with_the_reason_and_the_fix() -> None:
    params, state_dict = adam_checkpoint()
    opt = RiemannianAdam(params, lr=0.01)
    with pytest.raises(ValueError) as error:
        opt.load_state_dict(state_dict)
    message = str(error.value)
    for part in (
        "'exp_avg_sq'",
        "saved parameter 0",
        "(8, 4)",
        "per entry",
        "one per point",
        "expected shape ()",
        "second_moments='sum'",
        "nothing was loaded",
    ):
        assert part in message, (part, message)
    assert "another model" not in message
    assert not opt.state


def test_a_torch_adam_checkpoint_loads_with_per_point_sums() -> None:
    params, state_dict = adam_checkpoint()
    opt = RiemannianAdam(params, lr=0.01)
    opt.load_state_dict(state_dict, second_moments="sum")
    saved = state_dict["state"]
    torch.testing.assert_close(opt.state[params[0]]["exp_avg_sq"], saved[0]["exp_avg_sq"].sum())
    torch.testing.assert_close(opt.state[params[1]]["exp_avg_sq"], saved[1]["exp_avg_sq"].sum(1))
    assert torch.equal(opt.state[params[2]]["exp_avg_sq"], saved[2]["exp_avg_sq"])  # plain: as torch.optim
    assert float(opt.state[params[0]]["step"]) == 3
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert float(Stiefel().distance_to_manifold(params[0].detach())) < ROUNDING
    with pytest.raises(ValueError, match="second_moments must be None or 'sum'"):
        opt.load_state_dict(state_dict, second_moments="mean")
