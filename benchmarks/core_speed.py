"""Speed (and accuracy) of manifold_opt's Stiefel optimizers against geoopt and torch.optim, in Gram units.

Every cost is reported in milliseconds and in **Gram units**: the time of one batched
``X^T X`` over every matrix of the same workload, timed in the same run, round-robin with
the methods, so that the numbers carry over between machines and survive load changes.
Sections of ``benchmarks/results/core_speed.md``, in order:

1. **Workloads** (the headline): ``opt.step()`` with fixed gradients on four parameter sets
   (``model``, ``large``, ``tall``, ``small``), SGD with momentum and Adam: manifold_opt's
   ``Stiefel()`` against geoopt's EuclideanStiefel and canonical Stiefel and against
   ``torch.optim`` (foreach) on the same shapes unconstrained;
2. **Every retraction** of ``Stiefel`` (qr, polar, cayley, newton) on the same workloads;
3. **Size sweep**: square, tall (8n x n) and wide (n x 8n) matrices, one matrix or 32 of
   them, with plots ``core_speed_sweep_{square,tall,wide}.png``; for one small matrix also
   the step compiled with ``torch.compile(opt.step)``;
4. **Training step** (forward + backward + step) of an MLP with orthogonal hidden layers,
   against torch's and geotorch's ``orthogonal`` parametrizations and geoopt;
5. **Primitives** behind the ``qr`` retraction (triangular solve, Cholesky, Householder QR),
   supporting the library's choice of solver;
6. **Accuracy** of every retraction at large steps (float32), against geoopt's QR.

Run: ``python -m benchmarks.core_speed [--quick] [--device cpu|cuda]`` (or ``python -m
benchmarks core_speed [--quick]``, on the CPU). ``--quick``: fewer repeats, shorter timings,
a smaller sweep and MLP; writes ``core_speed_quick.md`` and ``*_quick.png`` instead.
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from torch import Tensor, nn

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Stiefel
from manifold_opt.manifolds.linalg import cholesky_upper, invert_upper

from .common import (
    markdown_table,
    matrix_view,
    median_ratio,
    number,
    progress,
    save_figure,
    time_interleaved_samples,
    topic_parser,
    write_results,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt
    import geotorch

LR = 1e-3
RETRACTIONS = ("qr", "polar", "cayley", "newton")
OPTIMIZERS = ("SGD", "Adam")
OPTIMIZER_LABELS = {"SGD": "SGD (momentum 0.9)", "Adam": "Adam"}
GEOOPT_CANONICAL_MAX_N = 1024  # geoopt's canonical Stiefel solves an n x n system per matrix
GRAM = "Gram"

OURS = "manifold_opt Stiefel()"
OURS_NEWTON = "manifold_opt Stiefel(newton)"
OURS_COMPILED = "manifold_opt Stiefel(), torch.compile(opt.step)"
GEOOPT_QR = "geoopt EuclideanStiefel"
GEOOPT_CANONICAL = "geoopt Stiefel (canonical)"
TORCH = "torch.optim foreach (unconstrained)"

WORKLOADS: dict[str, tuple[str, list[tuple[int, ...]]]] = {
    "model": (
        "20 × 256×128 + 4 × 512×512 + 10 conv kernels 64×32×3×3 (64×288 matrices)",
        [(256, 128)] * 20 + [(512, 512)] * 4 + [(64, 32, 3, 3)] * 10,
    ),
    "large": ("one 2048×1024 matrix", [(2048, 1024)]),
    "tall": ("one 30000×50 matrix", [(30000, 50)]),
    "small": ("200 × 16×16", [(16, 16)] * 200),
}


# ---------------------------------------------------------------------------- settings, timing
@dataclass(frozen=True)
class Settings:
    """What the command line chose: sizes, timing budget and device."""

    quick: bool
    device: torch.device
    repeats: int
    min_seconds: float
    warmup: int = 2

    @property
    def suffix(self) -> str:
        return "_quick" if self.quick else ""

    @property
    def synchronize(self) -> Callable[[], None] | None:
        return torch.cuda.synchronize if self.device.type == "cuda" else None


@dataclass(frozen=True)
class Timing:
    """Seconds per call in every repeat, and the Gram time of the same repeats."""

    seconds: tuple[float, ...]
    gram: tuple[float, ...] | None = None

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def units(self) -> float:
        """Median over repeats of (this time / the Gram time of the same repeat)."""
        if self.gram is None:
            raise ValueError("timed without a Gram reference")
        return median_ratio(self.seconds, self.gram)

    def speedup_over(self, reference: Timing) -> float:
        """How many times faster than ``reference``: median over repeats of its time / this time."""
        return median_ratio(reference.seconds, self.seconds)

    def time_vs(self, reference: Timing) -> float:
        """Median over repeats of this time / ``reference``'s time."""
        return median_ratio(self.seconds, reference.seconds)


Result = Timing | str  # a string says why a method could not be timed
Step = Callable[[], object]


def measure(
    settings: Settings,
    builders: dict[Hashable, Callable[[], Step]],
    gram: Step | None = None,
    *,
    repeats: int | None = None,
    min_seconds: float | None = None,
    warmup: int | None = None,
) -> dict[Hashable, Result]:
    """Build every function, then time them and the Gram product round-robin.

    The first warm-up call doubles as a check: a method that raises (e.g. out of memory)
    is reported as ``"failed (...)"`` instead of ending the run.
    """
    warmup = settings.warmup if warmup is None else warmup
    functions: dict[Hashable, Step] = {} if gram is None else {GRAM: gram}
    results: dict[Hashable, Result] = {}
    for key, build in builders.items():
        try:
            function = build()
            if warmup:
                function()
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:
            print(f"core_speed: {key} failed: {type(error).__name__}: {error}", file=sys.stderr)
            results[key] = f"failed ({type(error).__name__})"
            continue
        functions[key] = function
    if gram is not None and warmup:
        gram()
    samples = time_interleaved_samples(
        functions,
        repeats=repeats or settings.repeats,
        min_seconds=settings.min_seconds if min_seconds is None else min_seconds,
        warmup=max(warmup - 1, 0),
        synchronize=settings.synchronize,
    )
    gram_samples = None if gram is None else tuple(samples.pop(GRAM))
    for key, values in samples.items():
        results[key] = Timing(tuple(values), gram_samples)
    return {key: results[key] for key in builders}


def gram_ms(results: dict[Hashable, Result]) -> str:
    timing = next((r for r in results.values() if isinstance(r, Timing)), None)
    return "–" if timing is None or timing.gram is None else number(1e3 * statistics.median(timing.gram))


def units_and_ms(result: Result | None) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return result
    return f"{number(result.units)} ({number(result.ms)})"


def ratio(result: Result, reference: Result | None, how: Callable[[Timing, Timing], float]) -> str:
    if not isinstance(result, Timing) or not isinstance(reference, Timing):
        return "–"
    return f"{how(result, reference):.2f}×"


# ---------------------------------------------------------------------------- problems and methods
def tall_view(t: Tensor) -> Tensor:
    """:func:`matrix_view`, transposed when wide (the layout of geoopt and of the Gram units)."""
    m = matrix_view(t)
    return m.mT if m.shape[0] < m.shape[1] else m


def tall_shape(shape: Sequence[int]) -> tuple[int, int]:
    n, p = shape[0], math.prod(shape[1:])
    return (max(n, p), min(n, p))


@dataclass
class Problem:
    """Starting points on the Stiefel manifold and fixed gradients, in the parameter layout."""

    shapes: list[tuple[int, ...]]
    device: torch.device
    seed: int = 0
    _templates: list[ManifoldParameter] = field(default_factory=list, init=False, repr=False)
    _grads: list[Tensor] = field(default_factory=list, init=False, repr=False)

    def _build(self) -> None:
        if self._templates:
            return
        gen = torch.Generator().manual_seed(self.seed)
        stiefel = Stiefel()
        for shape in self.shapes:
            matrix = stiefel.random_point((shape[0], math.prod(shape[1:])), generator=gen).reshape(shape)
            # projected once; every method copies this point (ManifoldParameter projects by SVD)
            self._templates.append(ManifoldParameter(matrix.to(self.device), Stiefel()))
        gen = torch.Generator().manual_seed(self.seed + 1)
        self._grads = [(0.01 * torch.randn(shape, generator=gen)).to(self.device) for shape in self.shapes]

    @property
    def max_n(self) -> int:
        return max(tall_shape(shape)[0] for shape in self.shapes)

    def ours(self, retraction: str) -> list[Tensor]:
        self._build()
        params = []
        for template, grad in zip(self._templates, self._grads):
            param = copy.deepcopy(template)  # no second projection
            param.manifold = Stiefel(retraction=retraction)
            param.grad = grad.clone()
            params.append(param)
        return params

    def geoopt(self, manifold: geoopt.Manifold) -> list[Tensor]:
        """Tall 2-D matrices (geoopt works on the last two dimensions and wants n >= p).

        The points are on the manifold already, so ``manifold.projx`` (an SVD) is skipped."""
        self._build()
        params = []
        for template, grad in zip(self._templates, self._grads):
            param = geoopt.ManifoldParameter(tall_view(template.detach()).contiguous(), manifold=manifold)
            param.grad = tall_view(grad).contiguous()
            params.append(param)
        return params

    def plain(self) -> list[Tensor]:
        self._build()
        params = []
        for template, grad in zip(self._templates, self._grads):
            param = nn.Parameter(template.detach().clone())
            param.grad = grad.clone()
            params.append(param)
        return params

    def gram(self) -> Step:
        """One Gram unit: ``s.mT @ s`` over the (k, n, p) stacks of the equal tall shapes."""
        self._build()
        groups: dict[tuple[int, int], list[Tensor]] = {}
        for template in self._templates:
            view = tall_view(template.detach())
            groups.setdefault(tuple(view.shape), []).append(view)
        stacks = [torch.stack(views).contiguous() for views in groups.values()]
        return lambda: [s.mT @ s for s in stacks]


def ours_optimizer(name: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if name == "SGD":
        return RiemannianSGD(params, lr=LR, momentum=0.9)
    return RiemannianAdam(params, lr=LR)


def geoopt_optimizer(name: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if name == "SGD":
        return geoopt.optim.RiemannianSGD(params, lr=LR, momentum=0.9)
    return geoopt.optim.RiemannianAdam(params, lr=LR)


def torch_optimizer(name: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if name == "SGD":
        return torch.optim.SGD(params, lr=LR, momentum=0.9, foreach=True)
    return torch.optim.Adam(params, lr=LR, foreach=True)


def ours_method(retraction: str) -> str:
    return OURS if retraction == "qr" else f"manifold_opt Stiefel({retraction})"


def _ours(retraction: str) -> Callable[[Problem, str], Step]:
    return lambda problem, opt: ours_optimizer(opt, problem.ours(retraction)).step


COMPILED_SETTLE_STEPS = 3  # compile (step 1) and recompile (step 2, when the state exists)


def _ours_compiled(problem: Problem, opt: str) -> Step:
    """The default step under ``torch.compile``, compiled and settled before it is timed."""
    step = torch.compile(ours_optimizer(opt, problem.ours("qr")).step)
    for _ in range(COMPILED_SETTLE_STEPS):
        step()
    return step


METHODS: dict[str, Callable[[Problem, str], Step]] = {
    **{ours_method(r): _ours(r) for r in RETRACTIONS},
    OURS_COMPILED: _ours_compiled,
    GEOOPT_QR: lambda problem, opt: geoopt_optimizer(opt, problem.geoopt(geoopt.EuclideanStiefel())).step,
    GEOOPT_CANONICAL: lambda problem, opt: geoopt_optimizer(opt, problem.geoopt(geoopt.Stiefel())).step,
    TORCH: lambda problem, opt: torch_optimizer(opt, problem.plain()).step,
}


def step_builders(problem: Problem, methods: Sequence[str]) -> dict[Hashable, Callable[[], Step]]:
    """For each (optimizer, method): a function that builds it on fresh copies of ``problem`` and returns its step."""
    return {
        (opt, method): (lambda method=method, opt=opt: METHODS[method](problem, opt))
        for opt in OPTIMIZERS
        for method in methods
    }


# ---------------------------------------------------------------------------- 1 + 2: workloads
def measure_workloads(settings: Settings) -> dict[str, dict[Hashable, Result]]:
    """Every method and every retraction on each workload, both optimizers, timed together with its Gram."""
    results = {}
    for name in progress(list(WORKLOADS), "workloads"):
        problem = Problem(WORKLOADS[name][1], settings.device)
        methods = [ours_method(r) for r in RETRACTIONS] + [GEOOPT_QR]
        if problem.max_n <= GEOOPT_CANONICAL_MAX_N:
            methods.append(GEOOPT_CANONICAL)
        methods.append(TORCH)
        builders = step_builders(problem, methods)
        results[name] = measure(settings, builders, problem.gram())
    return results


def workload_table(results: dict[str, dict[Hashable, Result]]) -> str:
    """Section 1: the headline, manifold_opt's default Stiefel against the anchors."""
    parts = [
        "## 1. Optimizer step on four workloads\n\n"
        "`opt.step()` with fixed gradients (lr = 1e-3), same starting points and gradients for every method. "
        "manifold_opt stacks equal shapes into one batched call; geoopt loops over parameters (it gets the tall "
        "matrices: conv kernels as 288×64); torch.optim is the unconstrained floor on the same shapes. "
        "Gram units: the step's time over the time of one batched XᵀX over the workload, measured in the same "
        "repeat. `× faster than geoopt` is the per-repeat median of geoopt EuclideanStiefel's time over the "
        "method's (> 1: faster than geoopt). geoopt's canonical Stiefel (an n×n solve) only where every n ≤ "
        f"{GEOOPT_CANONICAL_MAX_N}."
    ]
    for name, timings in results.items():
        description = WORKLOADS[name][0]
        rows = []
        for opt in OPTIMIZERS:
            reference, floor = timings[(opt, GEOOPT_QR)], timings[(opt, TORCH)]
            for method in (OURS, GEOOPT_QR, GEOOPT_CANONICAL, TORCH):
                if (opt, method) not in timings:
                    continue
                result = timings[(opt, method)]
                row = {"optimizer": OPTIMIZER_LABELS[opt], "method": method}
                if isinstance(result, str):
                    row["ms / step"] = result
                else:
                    row["ms / step"] = number(result.ms)
                    row["Gram units"] = number(result.units)
                row["× faster than geoopt EuclideanStiefel"] = ratio(result, reference, Timing.speedup_over)
                if name == "small":
                    row["time vs torch.optim foreach"] = ratio(result, floor, Timing.time_vs)
                rows.append(row)
        columns = ["optimizer", "method", "ms / step", "Gram units", "× faster than geoopt EuclideanStiefel"]
        if name == "small":
            columns.append("time vs torch.optim foreach")
        parts.append(
            f"### `{name}`: {description} (1 Gram unit = {gram_ms(timings)} ms)\n\n" + markdown_table(rows, columns)
        )
    return "\n\n".join(parts)


def retraction_table(results: dict[str, dict[Hashable, Result]]) -> str:
    """Section 2: every retraction of manifold_opt's Stiefel, from the same runs as section 1."""
    rows = []
    for name, timings in results.items():
        for opt in OPTIMIZERS:
            row = {"workload": name, "optimizer": OPTIMIZER_LABELS[opt], "1 Gram unit (ms)": gram_ms(timings)}
            for r in RETRACTIONS:
                row[f"{r}: Gram units (ms)"] = units_and_ms(timings[(opt, ours_method(r))])
            timed = {r: timings[(opt, ours_method(r))] for r in RETRACTIONS}
            timed = {r: t for r, t in timed.items() if isinstance(t, Timing)}
            row["fastest"] = min(timed, key=lambda r: timed[r].units) if timed else "–"
            rows.append(row)
    return (
        "## 2. Every retraction on the same workloads\n\n"
        "`Stiefel(retraction=r)` with RiemannianSGD/RiemannianAdam, timed in the same round-robin as section 1. "
        "Cells: Gram units (ms per step). qr is Cholesky-QR (one Gram product, a p×p Cholesky factorization, "
        "one triangular solve), polar an eigendecomposition of the Gram matrix, cayley an exact solve, "
        "newton a Newton–Schulz iteration (matrix products only).\n\n" + markdown_table(rows)
    )


# ---------------------------------------------------------------------------- 3: size sweep
SHAPE_KINDS: dict[str, Callable[[int], tuple[int, int]]] = {
    "square": lambda n: (n, n),
    "tall": lambda n: (8 * n, n),
    "wide": lambda n: (n, 8 * n),
}
SHAPE_LABELS = {"square": "n×n", "tall": "8n×n", "wide": "n×8n"}
MANY = 32
MANY_MAX_N = 256  # 128 in quick mode (32 matrices of 2048×256 take most of a quick run)
# the compiled step: one matrix, where launching the step's operations is most of its cost
# (compiling takes seconds per optimizer, so only the smallest size of each kind in quick mode)
COMPILED_MAX_N = {"square": 256, "tall": 64, "wide": 64}
SWEEP_STYLE = {
    OURS: "tab:blue",
    OURS_COMPILED: "tab:green",
    OURS_NEWTON: "tab:cyan",
    GEOOPT_QR: "tab:red",
    GEOOPT_CANONICAL: "tab:orange",
    TORCH: "tab:gray",
}
SweepKey = tuple[str, int, int]  # (kind, matrices, n)


def sweep_cases(settings: Settings) -> list[tuple[SweepKey, list[str]]]:
    """The (kind, count, n) points of the sweep and the methods timed at each."""
    square = [64, 128, 256] if settings.quick else [64, 128, 256, 512, 1024, 2048]
    thin = [16, 32, 64, 128, 256] if settings.quick else [16, 32, 64, 128, 256, 512]
    cases = []
    for kind, sizes in (("square", square), ("tall", thin), ("wide", thin)):
        for count in (1, MANY):
            for n in sizes:
                if count > 1 and n > (MANY_MAX_N // 2 if settings.quick else MANY_MAX_N):
                    continue
                methods = [OURS, GEOOPT_QR, TORCH] if settings.quick else [OURS, OURS_NEWTON, GEOOPT_QR, TORCH]
                rows = max(SHAPE_KINDS[kind](n))
                if not settings.quick and n <= 512 and rows <= GEOOPT_CANONICAL_MAX_N:
                    methods.insert(3, GEOOPT_CANONICAL)
                if count == 1 and n <= (sizes[0] if settings.quick else COMPILED_MAX_N[kind]):
                    methods.insert(1, OURS_COMPILED)
                cases.append(((kind, count, n), methods))
    if not settings.quick:
        cases.append((("square", 1, 4096), [OURS, GEOOPT_QR]))
    return cases


def measure_sweep(settings: Settings) -> dict[SweepKey, dict[Hashable, Result]]:
    results = {}
    for key, methods in progress(sweep_cases(settings), "size sweep"):
        kind, count, n = key
        problem = Problem([SHAPE_KINDS[kind](n)] * count, settings.device)
        builders = step_builders(problem, methods)
        if OURS_COMPILED in methods:
            # this case's optimizers only: their entries for the same code stay below dynamo's recompile limit
            torch._dynamo.reset()
        if n >= 4096:  # several seconds a call: one call per repeat, three repeats
            results[key] = measure(settings, builders, problem.gram(), repeats=3, min_seconds=0.0, warmup=1)
        else:
            results[key] = measure(settings, builders, problem.gram())
    return results


def sweep_table(results: dict[SweepKey, dict[Hashable, Result]]) -> str:
    """Section 3: Gram units against the size, per shape kind."""
    methods = list(dict.fromkeys(m for timings in results.values() for _, m in timings))
    many_max_n = max((n for _, count, n in results if count == MANY), default=0)
    parts = [
        "## 3. Size sweep\n\n"
        f"`opt.step()` on one matrix, or on {MANY} of them (n ≤ {many_max_n}): square n×n, tall 8n×n and wide n×8n "
        "(geoopt gets the transpose of the wide ones). Cells: Gram units (ms per step), per-repeat medians. "
        f"geoopt's canonical Stiefel only for n ≤ 512 with at most {GEOOPT_CANONICAL_MAX_N} rows (its n×n solve), "
        "the 4096×4096 point (full run only) for manifold_opt qr and geoopt EuclideanStiefel, one call per "
        f"repeat and three repeats. `{OURS_COMPILED}`: the same optimizer with its step compiled (inductor), "
        "timed after it settled (its compilation is not counted), for one matrix up to "
        + ", ".join(f"n = {n} ({kind})" for kind, n in COMPILED_MAX_N.items())
        + " (the smallest size of each kind in quick mode): where a step costs less than a millisecond, most of "
        "it is launching its operations one by one, which compilation removes."
    ]
    for kind in SHAPE_KINDS:
        rows = []
        for opt in OPTIMIZERS:
            for (k, count, n), timings in sorted(results.items(), key=lambda item: item[0][1:]):
                if k != kind:
                    continue
                shape = "×".join(map(str, SHAPE_KINDS[kind](n)))
                row = {"optimizer": OPTIMIZER_LABELS[opt], "shape": shape, "matrices": count}
                row["1 Gram unit (ms)"] = gram_ms(timings)
                row.update({m: units_and_ms(timings.get((opt, m))) for m in methods})
                rows.append(row)
        if rows:
            parts.append(f"### {kind}\n\n" + markdown_table(rows))
    return "\n\n".join(parts)


def sweep_plots(results: dict[SweepKey, dict[Hashable, Result]], suffix: str) -> list[str]:
    """One figure per shape kind: Gram units against n, panels Adam and SGD, dashed for 32 matrices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    names = []
    for kind in SHAPE_KINDS:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        plotted: list[str] = []
        for axis, opt in zip(axes, ("Adam", "SGD")):
            sizes = sorted({n for k, _, n in results if k == kind})
            for method, color in SWEEP_STYLE.items():
                for count, style in ((1, "-"), (MANY, "--")):
                    points = sorted(
                        (n, timings[(opt, method)].units)
                        for (k, c, n), timings in results.items()
                        if k == kind and c == count and isinstance(timings.get((opt, method)), Timing)
                    )
                    if points:
                        axis.plot(*zip(*points), style, color=color, marker="o", markersize=3)
                        plotted.append(method)
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks(sizes, [str(n) for n in sizes])
            axis.set_title(f"{OPTIMIZER_LABELS[opt]}: {kind} {SHAPE_LABELS[kind]}")
            axis.set_xlabel("n")
            axis.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("time per step (Gram units)")
        handles = [Line2D([], [], color=c, marker="o", markersize=3) for m, c in SWEEP_STYLE.items() if m in plotted]
        labels = [m for m in SWEEP_STYLE if m in plotted]
        handles += [Line2D([], [], color="black"), Line2D([], [], color="black", linestyle="--")]
        labels += ["one matrix", f"{MANY} matrices"]
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
        figure.tight_layout()
        name = f"core_speed_sweep_{kind}{suffix}"
        save_figure(figure, name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- 4: training step
class OrthogonalMLP(nn.Module):
    """64 -> width x depth -> 10 with square hidden layers, to be made orthogonal."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


TORCH_PARAMETRIZED = "torch parametrizations.orthogonal + Adam"
GEOOPT_TRAINED = "geoopt EuclideanStiefel + RiemannianAdam"


def training_step_table(settings: Settings, width: int, depth: int) -> str:
    """Section 4: forward + backward + step of an MLP whose square hidden layers are orthogonal."""
    device = settings.device
    Build = Callable[[], tuple[nn.Module, torch.optim.Optimizer]]

    def mlp() -> OrthogonalMLP:
        torch.manual_seed(0)
        return OrthogonalMLP(width, depth).to(device)

    def plain() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        return model, torch.optim.Adam(model.parameters(), lr=LR)

    def ours(retraction: str) -> Build:
        def build() -> tuple[nn.Module, torch.optim.Optimizer]:
            model = mlp()
            for layer in model.hidden:
                layer.weight = ManifoldParameter(layer.weight, Stiefel(retraction=retraction))
            return model, RiemannianAdam(model.parameters(), lr=LR)

        return build

    def geoopt_model() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        for layer in model.hidden:
            manifold = geoopt.EuclideanStiefel()
            layer.weight = geoopt.ManifoldParameter(manifold.projx(layer.weight.detach()), manifold=manifold)
        return model, geoopt.optim.RiemannianAdam(model.parameters(), lr=LR)

    def torch_parametrized() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        for layer in model.hidden:
            nn.utils.parametrizations.orthogonal(layer)
        return model, torch.optim.Adam(model.parameters(), lr=LR)

    def geotorch_model() -> tuple[nn.Module, torch.optim.Optimizer]:
        model = mlp()
        for layer in model.hidden:
            geotorch.orthogonal(layer, "weight")
        return model, torch.optim.Adam(model.parameters(), lr=LR)

    cases: dict[str, Build] = {
        "unconstrained, torch.optim.Adam": plain,
        TORCH_PARAMETRIZED: torch_parametrized,
        "geotorch.orthogonal + Adam": geotorch_model,
        GEOOPT_TRAINED: geoopt_model,
        "manifold_opt Stiefel() + RiemannianAdam": ours("qr"),
        "manifold_opt Stiefel(newton) + RiemannianAdam": ours("newton"),
    }
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen).to(device)
    y = torch.randint(0, 10, (64,), generator=gen).to(device)

    def training_step(build: Build) -> Callable[[], Step]:
        def make() -> Step:
            model, optimizer = build()

            def step() -> None:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

            return step

        return make

    timings = measure(settings, {name: training_step(build) for name, build in cases.items()})
    rows = []
    for name, result in timings.items():
        rows.append(
            {
                "method": name,
                "ms / training step": result if isinstance(result, str) else number(result.ms),
                "× faster than geoopt": ratio(result, timings[GEOOPT_TRAINED], Timing.speedup_over),
                "× faster than torch parametrizations": ratio(result, timings[TORCH_PARAMETRIZED], Timing.speedup_over),
            }
        )
    return (
        f"## 4. Training step of an MLP with {depth} orthogonal {width}×{width} hidden layers\n\n"
        f"64 → {width} → {depth} × ({width}×{width}, orthogonal) → 10, batch 64, cross-entropy; forward + backward + "
        "step, Adam with lr = 1e-3. Parametrizations (torch, geotorch) pay in the forward and backward passes, "
        "manifold optimizers in the step. Ratios: per-repeat medians of the reference's time over the method's "
        "(> 1: faster than the reference).\n\n" + markdown_table(rows)
    )


# ---------------------------------------------------------------------------- 5: primitives
PRIMITIVE_SHAPES = [(1, 512, 512), (4, 512, 512), (1, 2048, 1024), (20, 256, 128), (1, 30000, 50), (10, 288, 64)]


def primitives_table(settings: Settings) -> str:
    """Section 5: the building blocks of the ``qr`` retraction, in Gram units of the same matrices."""
    rows = []
    for k, n, p in progress(PRIMITIVE_SHAPES, "primitives"):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(k, n, p, generator=gen).to(settings.device)
        b = torch.randn(k, p, p, generator=gen).to(settings.device)
        spd = torch.eye(p, device=settings.device) + 0.25 * (b.mT @ b) / p  # condition number about 2
        r = torch.linalg.cholesky(spd, upper=True)
        functions: dict[Hashable, Step] = {
            "lapack": lambda r=r, w=w: torch.linalg.solve_triangular(r, w, upper=True, left=False),
            "inverse": lambda r=r, w=w: w @ invert_upper(r),
            "cholesky": lambda spd=spd: torch.linalg.cholesky_ex(spd, upper=True),
            "cholesky_upper": lambda spd=spd: cholesky_upper(spd),
            "householder": lambda w=w: torch.linalg.qr(w),
        }
        builders = {name: (lambda f=f: f) for name, f in functions.items()}
        timings = measure(settings, builders, lambda w=w: w.mT @ w)
        difference = (w @ invert_upper(r) - torch.linalg.solve_triangular(r, w, upper=True, left=False)).abs()
        rows.append(
            {
                "shape (k, n, p)": str((k, n, p)),
                "1 Gram unit (ms)": gram_ms(timings),
                "LAPACK solve_triangular": units_and_ms(timings["lapack"]),
                "W @ R⁻¹ (explicit inverse)": units_and_ms(timings["inverse"]),
                "× faster than the solve": ratio(timings["inverse"], timings["lapack"], Timing.speedup_over),
                "max abs difference": f"{float(difference.max()):.1e}",
                "cholesky_ex (p×p)": units_and_ms(timings["cholesky"]),
                "cholesky_upper (p×p)": units_and_ms(timings["cholesky_upper"]),
                "Householder QR": units_and_ms(timings["householder"]),
            }
        )
    return (
        "## 5. Primitives (supporting the library's choice of solver)\n\n"
        "The `qr` retraction is Cholesky-QR: a Gram product, a p×p Cholesky factorization and W R⁻¹. This "
        "section times those pieces on (k, n, p) stacks, in Gram units of the same stack (cells: Gram units "
        "(ms)): LAPACK's `torch.linalg.solve_triangular(R, W, upper=True, left=False)` against a product with "
        "the explicit inverse (`W @ invert_upper(R)`, what the library does for tall W, n ≥ 4p), with R the upper "
        "Cholesky factor of a well-conditioned SPD p×p matrix; `torch.linalg.cholesky_ex` of that matrix and "
        "the library's `cholesky_upper` (the same factor, computed as the adjoint of the lower one: torch's CPU "
        "kernel copies its input through a strided triangle loop, faster for the lower triangle; p a multiple of "
        "64 is factored inside diag(G, I) of size p + 16, which spares that loop a cache-thrashing power-of-two "
        "stride); and "
        "Householder QR (`torch.linalg.qr(W)`, what geoopt's EuclideanStiefel retraction costs). `× faster than "
        "the solve` > 1 means the explicit inverse is faster; `max abs difference` compares the two.\n\n"
        + markdown_table(rows)
    )


# ---------------------------------------------------------------------------- 6: accuracy
ACCURACY_SHAPES = [(64, 16), (256, 64), (512, 512)]
STEP_NORMS = [1.0, 10.0, 1e3, 1e6]
SEEDS = 5


def accuracy_table(settings: Settings) -> str:
    """Section 6: max |YᵀY − I| after one long rank-1 step, float32."""
    stiefel = Stiefel()
    euclidean_stiefel = geoopt.EuclideanStiefel()
    retractions: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        f"Stiefel(retraction={r!r})": Stiefel(retraction=r).retract for r in RETRACTIONS
    }
    retractions["geoopt EuclideanStiefel.retr"] = euclidean_stiefel.retr
    worst: dict[tuple[tuple[int, int], str, float], float] = {}
    jobs = [(shape, seed) for shape in ACCURACY_SHAPES for seed in range(SEEDS)]
    for shape, seed in progress(jobs, "accuracy"):
        gen = torch.Generator().manual_seed(seed)
        x = stiefel.random_point(shape, generator=gen).to(settings.device)
        a = torch.randn(shape[0], 1, generator=gen).to(settings.device)
        b = torch.randn(1, shape[1], generator=gen).to(settings.device)
        direction = stiefel.project_tangent(x, a @ b)
        size = torch.linalg.matrix_norm(direction.mT.double() @ direction.double()).sqrt()
        for norm in STEP_NORMS:
            u = (direction.double() * (norm / size)).float()
            for name, retract in retractions.items():
                error = float(stiefel.distance_to_manifold(retract(x, u)))
                key = (shape, name, norm)
                worst[key] = max(worst.get(key, 0.0), error) if math.isfinite(error) else math.nan
    rows = []
    for shape in ACCURACY_SHAPES:
        for name in retractions:
            row: dict[str, Any] = {"point": "×".join(map(str, shape)), "retraction": name}
            row.update({f"‖uᵀu‖^½ = {norm:g}": f"{worst[(shape, name, norm)]:.1e}" for norm in STEP_NORMS})
            rows.append(row)
    return (
        "## 6. Accuracy at large steps (float32)\n\n"
        f"max |YᵀY − I| over {SEEDS} seeds for Y = retract(X, u), X a random point, u = P_X(a bᵀ) a rank-1 "
        "tangent step scaled to ‖uᵀu‖_F^½ = 1, 10, 1e3, 1e6. manifold_opt shortens Gram-based steps beyond "
        "‖uᵀu‖_F = 9 (see `Stiefel`'s docstring), so the long steps stay on the manifold; geoopt's "
        "EuclideanStiefel (Householder QR of X + u) is the reference.\n\n" + markdown_table(rows)
    )


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = topic_parser("core_speed", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, a smaller sweep (about 3 minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to create every tensor")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    settings = Settings(
        quick=args.quick, device=device, repeats=3 if args.quick else 7, min_seconds=0.03 if args.quick else 0.2
    )
    width, depth = (128, 2) if args.quick else (256, 4)

    workloads = measure_workloads(settings)
    sweep = measure_sweep(settings)
    plots = sweep_plots(sweep, settings.suffix)
    if device.type == "cpu":
        where = f"CPU with {torch.get_num_threads()} thread(s)"
    else:
        where = f"{torch.cuda.get_device_name(device)} ({device})"
    sections = [
        f"Timed on {where}, float32. **Gram unit**: the time of one batched XᵀX over every "
        "matrix of the same workload (each parameter viewed as a matrix, first dimension against the rest, wide "
        "ones transposed to tall; equal shapes stacked into one contiguous (k, n, p) tensor; the unit is the "
        "total time of `s.mT @ s` over the stacks), timed in the same run. Every table is timed round-robin: "
        f"each of {settings.repeats} repeats times every function in turn, each for at least "
        f"{settings.min_seconds} s after {settings.warmup} warm-up calls. Gram units and ratios are computed per "
        "repeat (a method against the Gram time, or the reference, of the same repeat) and the median over "
        "repeats is reported, which is more robust than a ratio of medians on a noisy machine; ms are medians. "
        "Ratios > 1× mean manifold_opt is faster.",
        workload_table(workloads),
        retraction_table(workloads),
        sweep_table(sweep) + "\n\n" + "\n\n".join(f"![{name}]({name}.png)" for name in plots),
        training_step_table(settings, width, depth),
        primitives_table(settings),
        accuracy_table(settings),
    ]
    command = "python -m benchmarks.core_speed" + (" --quick" if args.quick else "")
    if device.type != "cpu":
        command += f" --device {device.type}"
    path = write_results("core_speed" + settings.suffix, "Core speed, in Gram units", sections, command)
    print(path.read_text())


if __name__ == "__main__":
    main()
