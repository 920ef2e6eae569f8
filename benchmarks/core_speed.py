"""Speed of the core: optimizer steps, training steps and retractions against the anchors.

In one run, on the same machine and tensors:

* **optimizer step** (gradients fixed, ``opt.step()`` only) on a stack of weight matrices
  of several shapes: manifold_opt's batched RiemannianSGD/Adam against geoopt's
  (per-parameter loop), and on Euclidean parameters against ``torch.optim``;
* **training step** (forward + backward + step) of an MLP with orthogonal hidden layers:
  Stiefel + RiemannianAdam against geotorch's and torch's ``orthogonal``
  parametrizations with ``torch.optim.Adam`` and geoopt's RiemannianAdam;
* **retraction** alone, per Stiefel retraction, against geoopt's EuclideanStiefel (QR)
  and canonical Stiefel (exact Cayley, an n x n solve).

Run: ``python -m benchmarks.core_speed [--quick]``. Writes ``benchmarks/results/core_speed.md``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import torch
from torch import nn

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Stiefel

from .common import markdown_table, progress, time_interleaved, write_results

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt
    import geotorch

RETRACTIONS = ("qr", "polar", "cayley", "newton")


def weight_stack(shapes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


def with_gradients(params: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = 0.01 * torch.randn(p.shape, generator=gen)
    return params


MakeOptimizer = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
OURS = {
    "SGD (momentum 0.9)": lambda ps: RiemannianSGD(ps, lr=0.01, momentum=0.9),
    "Adam": lambda ps: RiemannianAdam(ps, lr=0.01),
}
GEOOPT = {
    "SGD (momentum 0.9)": lambda ps: geoopt.optim.RiemannianSGD(ps, lr=0.01, momentum=0.9),
    "Adam": lambda ps: geoopt.optim.RiemannianAdam(ps, lr=0.01),
}


def step_timer(make_optimizer: MakeOptimizer, params: list[torch.Tensor]) -> Callable[[], object]:
    optimizer = make_optimizer(with_gradients(params))
    return optimizer.step


def optimizer_step_table(shapes: list[tuple[int, int]], min_seconds: float) -> list[dict]:
    """opt.step() on Stiefel weights: ours (batched) vs geoopt (per-parameter)."""
    stiefel_ours = {
        r: (lambda ws, r=r: [ManifoldParameter(w.clone(), Stiefel(retraction=r)) for w in ws]) for r in RETRACTIONS
    }

    def geoopt_params(manifold: geoopt.Manifold) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        return lambda ws: [geoopt.ManifoldParameter(manifold.projx(w.clone()), manifold=manifold) for w in ws]

    cases: list[tuple[str, str, Callable, MakeOptimizer]] = []
    for name in OURS:
        cases.append((name, "geoopt EuclideanStiefel (QR)", geoopt_params(geoopt.EuclideanStiefel()), GEOOPT[name]))
        cases.append((name, "geoopt Stiefel (canonical, Cayley)", geoopt_params(geoopt.Stiefel()), GEOOPT[name]))
        for r in RETRACTIONS:
            cases.append((name, f"manifold_opt Stiefel({r})", stiefel_ours[r], OURS[name]))
    steps = {
        (optimizer, method): step_timer(make_opt, make_params(weight_stack(shapes)))
        for optimizer, method, make_params, make_opt in progress(cases, "optimizer steps")
    }
    timings = time_interleaved(steps, min_seconds=min_seconds)
    rows = []
    for optimizer, method, _, _ in cases:
        reference = timings[(optimizer, "geoopt EuclideanStiefel (QR)")]
        seconds = timings[(optimizer, method)]
        rows.append(
            {
                "optimizer": optimizer,
                "parameters": method,
                "ms / step": f"{1e3 * seconds:.2f}",
                "speed-up vs geoopt QR": f"{reference / seconds:.2f}×",
            }
        )
    return rows


def euclidean_step_table(count: int, size: int, min_seconds: float) -> list[dict]:
    """opt.step() on plain tensors: ours vs torch.optim (single-tensor and foreach) vs geoopt."""
    cases = [
        ("SGD (momentum 0.9)", "torch.optim.SGD", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)),
        (
            "SGD (momentum 0.9)",
            "torch.optim.SGD foreach",
            lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
        ),
        ("SGD (momentum 0.9)", "geoopt RiemannianSGD", GEOOPT["SGD (momentum 0.9)"]),
        ("SGD (momentum 0.9)", "manifold_opt RiemannianSGD", OURS["SGD (momentum 0.9)"]),
        ("Adam", "torch.optim.Adam", lambda ps: torch.optim.Adam(ps, lr=0.01)),
        ("Adam", "torch.optim.Adam foreach", lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=True)),
        ("Adam", "geoopt RiemannianAdam", GEOOPT["Adam"]),
        ("Adam", "manifold_opt RiemannianAdam", OURS["Adam"]),
    ]
    steps = {
        method: step_timer(make, [w.requires_grad_() for w in weight_stack([(size,)] * count)])
        for _, method, make in cases
    }
    timings = time_interleaved(steps, min_seconds=min_seconds)
    rows = []
    for optimizer, method, _ in cases:
        reference = timings["torch.optim.SGD" if optimizer.startswith("SGD") else "torch.optim.Adam"]
        rows.append(
            {
                "optimizer": optimizer,
                "implementation": method,
                "ms / step": f"{1e3 * timings[method]:.3f}",
                "time vs torch.optim (single-tensor)": f"{timings[method] / reference:.2f}×",
            }
        )
    return rows


class OrthogonalMLP(nn.Module):
    """64 -> width x depth -> 10 with square hidden layers, to be made orthogonal."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def training_step_table(width: int, depth: int, min_seconds: float) -> list[dict]:
    """forward + backward + step of an MLP whose square hidden layers are orthogonal."""

    def plain() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = OrthogonalMLP(width, depth)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def ours(retraction: str) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer]]:
        def build() -> tuple[nn.Module, torch.optim.Optimizer]:
            model = OrthogonalMLP(width, depth)
            for layer in model.hidden:
                layer.weight = ManifoldParameter(layer.weight, Stiefel(retraction=retraction))
            return model, RiemannianAdam(model.parameters(), lr=1e-3)

        return build

    def geoopt_model() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = OrthogonalMLP(width, depth)
        for layer in model.hidden:
            manifold = geoopt.EuclideanStiefel()
            layer.weight = geoopt.ManifoldParameter(manifold.projx(layer.weight.detach()), manifold=manifold)
        return model, geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-3)

    def torch_parametrized() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = OrthogonalMLP(width, depth)
        for layer in model.hidden:
            nn.utils.parametrizations.orthogonal(layer)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def geotorch_model() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = OrthogonalMLP(width, depth)
        for layer in model.hidden:
            geotorch.orthogonal(layer, "weight")
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    cases = [
        ("unconstrained, torch.optim.Adam", plain),
        ("torch parametrizations.orthogonal + Adam", torch_parametrized),
        ("geotorch.orthogonal + Adam", geotorch_model),
        ("geoopt EuclideanStiefel + RiemannianAdam", geoopt_model),
        *((f"manifold_opt Stiefel({r}) + RiemannianAdam", ours(r)) for r in RETRACTIONS),
    ]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    steps = {}
    for name, build in cases:
        model, optimizer = build()

        def train_step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

        steps[name] = train_step
    timings = time_interleaved(steps, min_seconds=min_seconds)
    reference = timings["geoopt EuclideanStiefel + RiemannianAdam"]
    return [
        {
            "method": name,
            "ms / training step": f"{1e3 * timings[name]:.2f}",
            "speed-up vs geoopt": f"{reference / timings[name]:.2f}×",
        }
        for name, _ in cases
    ]


def retraction_table(shapes: list[tuple[int, ...]], min_seconds: float) -> list[dict]:
    """One retraction call per shape: ours vs geoopt's EuclideanStiefel.retr and canonical Stiefel.retr."""
    rows = []
    for shape in progress(shapes, "retractions"):
        gen = torch.Generator().manual_seed(0)
        stiefel = Stiefel()
        x = stiefel.random_point(shape, generator=gen)
        u = stiefel.random_tangent(x, generator=gen)
        u = 0.05 * u * (x.norm(dim=(-2, -1), keepdim=True) / u.norm(dim=(-2, -1), keepdim=True))  # a 5% step
        retractions = {"geoopt QR": geoopt.EuclideanStiefel().retr, "geoopt canonical": geoopt.Stiefel().retr}
        retractions.update({r: Stiefel(retraction=r).retract for r in RETRACTIONS})
        timings = time_interleaved(
            {name: (lambda f=f, x=x, u=u: f(x, u)) for name, f in retractions.items()}, min_seconds=min_seconds
        )
        row = {"shape (batch, n, p)": str(tuple(shape))}
        row.update({f"{name} ms": f"{1e3 * t:.3f}" for name, t in timings.items()})
        best = min(RETRACTIONS, key=lambda r: timings[r])
        row["fastest of ours vs geoopt QR"] = f"{best}: {timings['geoopt QR'] / timings[best]:.2f}×"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems and shorter timings")
    args = parser.parse_args()
    torch.set_num_threads(1)
    min_seconds = 0.02 if args.quick else 0.2
    # a transformer-like stack: per block four d x d and two 4d x d matrices (tall, as geoopt requires)
    blocks, d = (4, 32) if args.quick else (12, 64)
    layer_shapes = [(d, d)] * 4 * blocks + [(4 * d, d)] * 2 * blocks
    width, depth = (128, 2) if args.quick else (256, 4)
    retraction_shapes = [(64, 16), (256, 64), (512, 512), (32, 64, 16)] if not args.quick else [(64, 16), (8, 64, 16)]
    sections = [
        "All timings: median of 7 repeats, one thread; the methods of a table are timed round-robin "
        "(one repeat of each in turn), so that load changes during the run hit them alike. "
        "Ratios > 1× mean manifold_opt is faster.",
        f"## Optimizer step on {len(layer_shapes)} Stiefel weights ({blocks} blocks of 4 × {d}×{d} and "
        f"2 × {4 * d}×{d})\n\n"
        "`opt.step()` with fixed gradients. manifold_opt stacks equal shapes into one batched "
        "call; geoopt loops over parameters.\n\n" + markdown_table(optimizer_step_table(layer_shapes, min_seconds)),
        "## Optimizer step on 100 Euclidean tensors of 1,000 entries\n\n"
        "The reference is torch.optim's default on CPU (single-tensor).\n\n"
        + markdown_table(euclidean_step_table(100, 1000, min_seconds)),
        f"## Training step of an MLP with {depth} orthogonal {width}×{width} hidden layers (batch 64)\n\n"
        "Forward + backward + step. Parametrizations pay in the forward pass; manifold "
        "optimizers in the step.\n\n" + markdown_table(training_step_table(width, depth, min_seconds)),
        "## One Stiefel retraction (a step of 5% of the point's norm, ‖u‖_F = 0.05·‖X‖_F)\n\n"
        "geoopt canonical = `geoopt.Stiefel()` (its default), whose retraction solves an n×n "
        "system.\n\n" + markdown_table(retraction_table(retraction_shapes, min_seconds)),
    ]
    command = "python -m benchmarks.core_speed" + (" --quick" if args.quick else "")
    path = write_results("core_speed" + ("_quick" if args.quick else ""), "Core speed", sections, command)
    print(path.read_text())


if __name__ == "__main__":
    main()
