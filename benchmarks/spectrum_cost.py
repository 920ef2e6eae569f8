"""Cost of ONI, weight conditioning and ConditionedSpectrum against plain layers and the anchors.

In one run, on the same machine and tensors:

* **layer forward + backward**: ONI (T = 1, 3, 5) and weight conditioning (row, both)
  against the plain layer, torch's own parametrizations (``weight_norm``,
  ``spectral_norm``, ``orthogonal``) and geotorch's (``orthogonal``,
  ``almost_orthogonal``), on Linear and Conv2d layers;
* **optimizer step**: RiemannianAdam on ConditionedSpectrum parameters (SVD and
  Newton–Schulz retractions, kappa and band forms) against ``torch.optim.Adam`` and
  RiemannianAdam on plain tensors;
* **training step** of a small MLP whose hidden weights keep their singular values in
  [0.5, 1.5]: ConditionedSpectrum + RiemannianAdam against geotorch's
  ``almost_orthogonal(lam=0.5)`` + Adam (the closest prior art) and an unconstrained MLP.

Run: ``python -m benchmarks.spectrum_cost [--quick]``. Writes ``benchmarks/results/spectrum_cost.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrizations

from manifold_opt import ConditionedSpectrum, ManifoldParameter, RiemannianAdam
from manifold_opt.nn import oni, weight_conditioning

from .common import markdown_table, progress, time_call, topic_parser, write_results

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geotorch

Wrap = Callable[[nn.Module], nn.Module]
LAYER_VARIANTS: dict[str, tuple[Wrap, bool]] = {  # name: (wrap, applies to conv kernels as one matrix)
    "plain": (lambda m: m, True),
    "torch weight_norm": (lambda m: parametrizations.weight_norm(m), True),
    "torch spectral_norm": (lambda m: parametrizations.spectral_norm(m), True),
    "torch orthogonal": (lambda m: parametrizations.orthogonal(m), False),
    "geotorch orthogonal": (lambda m: _geotorch(geotorch.orthogonal, m), False),
    "geotorch almost_orthogonal": (lambda m: _geotorch(geotorch.almost_orthogonal, m, lam=0.5), False),
    "ONI T=1": (lambda m: oni(m, iterations=1), True),
    "ONI T=3": (lambda m: oni(m, iterations=3), True),
    "ONI T=5": (lambda m: oni(m, iterations=5), True),
    "weight conditioning (row)": (lambda m: weight_conditioning(m, mode="row"), True),
    "weight conditioning (both)": (lambda m: weight_conditioning(m, mode="both"), True),
}


def _geotorch(constraint: Callable, module: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        constraint(module, "weight", **kwargs)
    return module


def layer_cases(quick: bool) -> list[tuple[str, Callable[[], nn.Module], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    cases = [
        ("Linear 256x256, batch 128", lambda: nn.Linear(256, 256), torch.randn(128, 256, generator=gen)),
        ("Conv2d 64->64 3x3, 16x16, batch 8", lambda: nn.Conv2d(64, 64, 3, padding=1), torch.randn(8, 64, 16, 16)),
    ]
    if not quick:
        cases.insert(1, ("Linear 1024x1024, batch 128", lambda: nn.Linear(1024, 1024), torch.randn(128, 1024)))
    return cases


def layer_rows(quick: bool) -> list[dict]:
    rows = []
    for label, make, x in progress(layer_cases(quick), "layers"):
        conv = "Conv2d" in label
        times = {}
        for name, (wrap, conv_ok) in LAYER_VARIANTS.items():
            if conv and not conv_ok:
                continue
            torch.manual_seed(0)
            layer = wrap(make())

            def forward_backward(layer: nn.Module = layer, x: torch.Tensor = x) -> None:
                layer.zero_grad(set_to_none=True)
                layer(x).square().mean().backward()

            times[name] = time_call(forward_backward, repeats=5)
        for name in LAYER_VARIANTS:
            if name in times:
                rows.append(
                    {
                        "layer": label,
                        "parametrization": name,
                        "ms": 1e3 * times[name],
                        "x plain": times[name] / times["plain"],
                    }
                )
            else:
                rows.append(
                    {"layer": label, "parametrization": name, "ms": "n/a", "x plain": "orthogonalizes each 3x3 slice"}
                )
    return rows


def optimizer_rows(quick: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    stacks = {"8 x (256, 256)": [(256, 256)] * 8, "1 x (512, 512)": [(512, 512)]}
    if quick:
        stacks = {"4 x (128, 128)": [(128, 128)] * 4}
    variants: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "torch.optim.Adam (plain tensors)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "RiemannianAdam (plain tensors)": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "RiemannianAdam, ConditionedSpectrum(kappa=10), svd": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "RiemannianAdam, ConditionedSpectrum(0.5, 1.5), svd": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "RiemannianAdam, ConditionedSpectrum(0.5, 1.5), newton (T=16)": lambda ps: RiemannianAdam(ps, lr=1e-3),
        "RiemannianAdam, ConditionedSpectrum(kappa=10), newton (T=16)": lambda ps: RiemannianAdam(ps, lr=1e-3),
    }
    manifolds = {
        "svd": {
            "kappa=10": ConditionedSpectrum(kappa=10.0),
            "(0.5, 1.5)": ConditionedSpectrum(sigma_min=0.5, sigma_max=1.5),
        },
        "newton": {
            "kappa=10": ConditionedSpectrum(kappa=10.0, retraction="newton"),
            "(0.5, 1.5)": ConditionedSpectrum(sigma_min=0.5, sigma_max=1.5, retraction="newton"),
        },
    }
    rows = []
    for label, shapes in progress(list(stacks.items()), "optimizer"):
        base = [torch.randn(shape, generator=gen) / shape[0] ** 0.5 for shape in shapes]
        grads = [0.01 * torch.randn(shape, generator=gen) for shape in shapes]
        times = {}
        for name, make in variants.items():
            if "ConditionedSpectrum" in name:
                kind = "newton" if "newton" in name else "svd"
                form = "kappa=10" if "kappa" in name else "(0.5, 1.5)"
                params = [ManifoldParameter(b.clone(), manifolds[kind][form]) for b in base]
            else:
                params = [b.clone().requires_grad_() for b in base]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer = make(params)
            times[name] = time_call(optimizer.step, repeats=5)
        reference = times["torch.optim.Adam (plain tensors)"]
        for name, seconds in times.items():
            rows.append(
                {
                    "parameters": label,
                    "optimizer": name,
                    "ms / step": 1e3 * seconds,
                    "x torch Adam": seconds / reference,
                }
            )
    return rows


def training_rows(quick: bool) -> list[dict]:
    width, depth, batch = (128, 3, 64) if quick else (256, 4, 128)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(batch, width, generator=gen), torch.randn(batch, 10, generator=gen)

    def mlp() -> nn.Sequential:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width, 10))

    def plain() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    def band(retraction: str) -> Callable[[], tuple[nn.Module, torch.optim.Optimizer]]:
        def build() -> tuple[nn.Module, torch.optim.Optimizer]:
            model = mlp()
            manifold = ConditionedSpectrum(sigma_min=0.5, sigma_max=1.5, retraction=retraction)
            for layer in list(model)[:-1:2]:
                layer.weight = ManifoldParameter(layer.weight.detach(), manifold)
            return model, RiemannianAdam(model.parameters(), lr=1e-3)

        return build

    def almost_orthogonal() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        for layer in list(model)[:-1:2]:
            _geotorch(geotorch.almost_orthogonal, layer, lam=0.5)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    variants = {
        "unconstrained MLP, torch Adam": plain,
        "ConditionedSpectrum(0.5, 1.5) svd + RiemannianAdam": band("svd"),
        "ConditionedSpectrum(0.5, 1.5) newton + RiemannianAdam": band("newton"),
        "geotorch almost_orthogonal(lam=0.5) + torch Adam": almost_orthogonal,
    }
    times = {}
    for name, build in progress(list(variants.items()), "training"):
        model, optimizer = build()

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            optimizer.step()

        times[name] = time_call(step, repeats=5)
    label = f"MLP {depth} x Linear({width}, {width}) + head, batch {batch}"
    return [
        {
            "model": label,
            "variant": name,
            "ms / step": 1e3 * s,
            "x unconstrained": s / times["unconstrained MLP, torch Adam"],
        }
        for name, s in times.items()
    ]


def main() -> None:
    parser = topic_parser("spectrum_cost", __doc__)
    parser.add_argument("--quick", action="store_true", help="smaller layers and stacks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = layer_rows(args.quick)
    optimizers = optimizer_rows(args.quick)
    training = training_rows(args.quick)
    command = "python -m benchmarks.spectrum_cost" + (" --quick" if args.quick else "")
    sections = [
        "## Layer forward + backward (median time per call)\n\n"
        "ONI and weight conditioning recompute the weight in every forward pass, like torch's and geotorch's "
        "parametrizations. torch's and geotorch's orthogonal constraints treat a conv kernel (out, in, kh, kw) as "
        "a batch of kh x kw matrices, a different constraint from ONI's one (out, in*kh*kw) matrix, so they are "
        "not timed on the conv layer.\n\n" + markdown_table(layers),
        "## Optimizer step only (gradients fixed)\n\n" + markdown_table(optimizers),
        "## Training step (forward + backward + step), singular values kept in [0.5, 1.5]\n\n"
        "geotorch's almost_orthogonal keeps them in [1 - lam, 1 + lam] by a parametrization (a matrix "
        "exponential and a sine of the singular values in every forward pass); ConditionedSpectrum keeps the "
        "weight itself in the band and projects after each optimizer step.\n\n" + markdown_table(training),
    ]
    path = write_results(
        "spectrum_cost" + ("_quick" if args.quick else ""),
        "Cost of ONI, weight conditioning and ConditionedSpectrum",
        sections,
        command,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
