"""What a GPU needs from a step: no host reads, one compiled graph, any device."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manifold_opt import (
    PSI,
    PSISGD,
    ConditionedSpectrum,
    ManifoldParameter,
    RiemannianAdam,
    RiemannianMuon,
    RiemannianSGD,
    Sphere,
    Stiefel,
)

from .host_reads import reads_during_step


def mixed_model(device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """Stiefel (tall, wide, conv, batched, large enough for its own bucket, tall with p > 32
    whose R^-1 is formed by blocks), oblique rows, a sphere, PSI rows before BatchNorm, and
    plain parameters."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.Tanh(),  # so that the conv bias is not cancelled by the BatchNorm downstream
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 16, bias=False),  # PSI rows: feeds the BatchNorm
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.Linear(12, 3),
    )
    model[0].weight = ManifoldParameter(model[0].weight, Stiefel())  # wide 6 x 27
    model[3].weight = ManifoldParameter(model[3].weight, PSI())
    model[6].weight = ManifoldParameter(model[6].weight, Sphere(batch_dims=1))
    model.register_parameter("tall", ManifoldParameter(torch.randn(300, 220), Stiefel()))  # its own bucket
    model.register_parameter("tall_twins", ManifoldParameter(torch.randn(2, 12, 4), Stiefel(batch_dims=1)))
    model.register_parameter("ball", ManifoldParameter(torch.randn(7), Sphere()))
    model.register_parameter("tall_blocks", ManifoldParameter(torch.randn(2, 160, 40), Stiefel(batch_dims=1)))
    return model.to(device)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    device = model.tall.device
    x = torch.randn(8, 3, 8, 8, generator=gen).to(device)
    extra = (model.tall[:12, :4] * model.tall_twins[0]).sum() + (model.ball * torch.arange(7, device=device)).sum()
    extra = extra + model.tall_blocks.cos().sum()
    return model(x).square().mean() + model.tall.sin().sum() + extra


def train(model: nn.Module, step, steps: range) -> None:
    for i in steps:
        for p in model.parameters():
            p.grad = None
        loss_of(model, i).backward()
        step()


OPTIMIZERS = {
    "sgd": lambda ps: RiemannianSGD(ps, lr=0.01, momentum=0.9),
    "adam": lambda ps: RiemannianAdam(ps, lr=0.01),
    "psisgd": lambda ps: PSISGD(ps, lr=0.01),
    "muon": lambda ps: RiemannianMuon(ps, lr=0.01),
}
COMPILED = [name for name in OPTIMIZERS if name != "muon"]  # muon: one test compiles it once (below)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_default_steps_read_nothing_on_the_host(name: str, device: torch.device) -> None:
    model = mixed_model(device)
    opt = OPTIMIZERS[name](model.parameters())
    for i in range(7):  # past the first steps, a tracking refresh and PSI-SGD's checks
        for p in model.parameters():
            p.grad = None
        loss_of(model, i).backward()
        assert reads_during_step(opt) == [], f"step {i}"


def test_the_counter_sees_reads_and_torch_adam_makes_none() -> None:
    model = mixed_model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_of(model, 0).backward()
    assert reads_during_step(adam) == []

    class Reading(torch.optim.SGD):
        def step(self, closure=None):  # what the first version of this library did per bucket
            float(self.param_groups[0]["params"][0].grad.sum())
            return super().step(closure)

    assert reads_during_step(Reading(model.parameters(), lr=0.1)) == ["_local_scalar_dense"]


def test_raise_policy_reads_once_per_step() -> None:
    model = mixed_model()
    opt = RiemannianAdam(model.parameters(), lr=0.01, nonfinite="raise")
    for i in range(3):
        for p in model.parameters():
            p.grad = None
        loss_of(model, i).backward()
        assert reads_during_step(opt) == ["_local_scalar_dense"]


@pytest.mark.parametrize(
    "manifold",
    [
        Stiefel(retraction="polar"),
        Stiefel(retraction="newton"),
        Stiefel(retraction="cayley"),
        ConditionedSpectrum(kappa=3.0, retraction="newton"),
    ],
    ids=["polar", "newton", "cayley", "spectrum-newton"],
)
def test_other_retractions_read_nothing_either(manifold) -> None:
    """As seen by the dispatcher (torch documents that polar's eigh synchronizes a CUDA device
    inside the kernel, where no counter sees it)."""
    w = ManifoldParameter(torch.randn(10, 4), manifold)
    for opt in (RiemannianSGD([w], lr=0.1, momentum=0.9), RiemannianAdam([w], lr=0.1)):
        for _ in range(3):
            w.grad = torch.randn(10, 4)
            assert reads_during_step(opt) == []


def _graphs_and_breaks(make, steps: int) -> tuple[list[int], int]:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = mixed_model()
    opt = make(model.parameters())
    counter = CompileCounter()
    compiled = torch.compile(opt.step, backend=counter)
    frames = []
    for i in range(steps):
        for p in model.parameters():
            p.grad = None
        loss_of(model, i).backward()
        compiled()
        frames.append(counter.frame_count)
    return frames, sum(counters["graph_break"].values())


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_step_settles_after_two_steps(name: str) -> None:
    _, torch_breaks = _graphs_and_breaks(lambda ps: torch.optim.Adam(ps, lr=0.01), 3)
    frames, breaks = _graphs_and_breaks(OPTIMIZERS[name], 7)
    assert frames[2:] == [frames[1]] * 5, frames  # no new graph after the second step
    assert breaks <= torch_breaks + 2, (breaks, torch_breaks)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_step_matches_eager(name: str) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = mixed_model(), mixed_model()
    opt_eager, opt_compiled = OPTIMIZERS[name](eager.parameters()), OPTIMIZERS[name](compiled.parameters())
    train(eager, opt_eager.step, range(8))
    train(compiled, torch.compile(opt_compiled.step), range(8))
    for (label, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=lambda m, label=label: f"{label}: {m}")


def test_compiled_muon_settles_and_matches_eager() -> None:
    """One compilation (the Newton–Schulz steps unroll into large graphs): no new graph after
    the second step, few breaks, and the eager numbers to float32 rounding amplified by the
    iterations (inductor fuses the elementwise steps with other roundings)."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    _, torch_breaks = _graphs_and_breaks(lambda ps: torch.optim.Adam(ps, lr=0.01), 3)
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = mixed_model(), mixed_model()
    opt_eager, opt_compiled = OPTIMIZERS["muon"](eager.parameters()), OPTIMIZERS["muon"](compiled.parameters())
    counter = CompileCounter()
    step = torch.compile(opt_compiled.step, backend=counter)
    frames = []
    for i in range(6):
        train(eager, opt_eager.step, range(i, i + 1))
        train(compiled, step, range(i, i + 1))
        frames.append(counter.frame_count)
    assert frames[2:] == [frames[1]] * 4, frames
    assert sum(counters["graph_break"].values()) <= torch_breaks + 2
    for (label, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_steps_on_every_device_stay_on_it(name: str, device: torch.device) -> None:
    model = mixed_model(device)
    opt = OPTIMIZERS[name](model.parameters())
    train(model, opt.step, range(3))
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert value.device.type == device.type, key
    assert max(float(Stiefel().distance_to_manifold(model.tall.detach())), 0.0) < 2e-6
    assert math.isfinite(float(loss_of(model, 99).detach()))
