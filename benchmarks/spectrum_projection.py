"""Accuracy and speed of the matmul-only spectral clipping against the SVD projection.

ConditionedSpectrum's ``"newton"`` retraction replaces the SVD of ``project(x + t u)`` by
Newton–Schulz iterations (``clip_singular_values``). In one run, on the same matrices:

* **accuracy against the iteration count**, for the two inputs that matter: a step from a
  point of the band (what an optimizer does) and a Gaussian matrix (an arbitrary input,
  singular values down to ~0), measured as the relative Frobenius distance to the exact
  projection and the band violation left;
* **time** of the exact projection (LAPACK SVD) and of the clipping, per matrix size.

Run: ``python -m benchmarks.spectrum_projection [--quick]``. Writes
``benchmarks/results/spectrum_projection.md`` and ``spectrum_projection.png``.
"""

from __future__ import annotations

import math

import torch

from manifold_opt import ConditionedSpectrum
from manifold_opt.manifolds.spectrum import DEFAULT_NEWTON_ITERATIONS, clip_singular_values

from .common import markdown_table, progress, save_figure, time_call, topic_parser, write_results

BAND = ConditionedSpectrum(sigma_min=0.5, sigma_max=2.0)
KAPPA = ConditionedSpectrum(kappa=10.0)


def inputs(kind: str, n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, ConditionedSpectrum]:
    """``step``: a point of the band plus a random step of 5% of its norm; ``gaussian``: N(0, 1/n) entries."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, n, generator=gen, dtype=dtype) / math.sqrt(n) * 2, BAND
    manifold = BAND if kind == "step" else KAPPA
    x = manifold.random_point((n, n), generator=gen, dtype=dtype)
    u = torch.randn(n, n, generator=gen, dtype=dtype)
    return x + 0.05 * x.norm() / u.norm() * u, manifold


def accuracy_rows(sizes: list[int], iteration_counts: list[int], seeds: int) -> list[dict]:
    rows = []
    cases = [(kind, n) for kind in ("step", "step-kappa", "gaussian") for n in sizes]
    for kind, n in progress(cases, "accuracy"):
        for dtype in (torch.float32, torch.float64):
            for iterations in iteration_counts:
                errors, violations = [], []
                for seed in range(seeds):
                    y, manifold = inputs(kind, n, seed, dtype)
                    exact = manifold.project(y)
                    approx = ConditionedSpectrum(
                        **_form(manifold), retraction="newton", iterations=iterations
                    ).project_approximate(y)
                    errors.append(float((approx - exact).norm() / exact.norm()))
                    violations.append(float(manifold.distance_to_manifold(approx)))
                rows.append(
                    {
                        "input": kind,
                        "n": n,
                        "dtype": str(dtype).replace("torch.", ""),
                        "iterations": iterations,
                        "rel. error vs SVD (max)": max(errors),
                        "band violation (max)": max(violations),
                    }
                )
    return rows


def _form(manifold: ConditionedSpectrum) -> dict:
    if manifold.kappa is not None:
        return {"kappa": manifold.kappa}
    return {"sigma_min": manifold.sigma_min, "sigma_max": manifold.sigma_max}


def timing_rows(sizes: list[int], iterations: int) -> list[dict]:
    rows = []
    for n in progress(sizes, "timing"):
        y, _ = inputs("step", n, 0, torch.float32)
        svd = time_call(lambda y=y: BAND.project(y), repeats=5)
        newton = time_call(lambda y=y: clip_singular_values(y, 0.5, 2.0, iterations), repeats=5)
        kappa_svd = time_call(lambda y=y: KAPPA.project(y), repeats=5)
        rows.append(
            {
                "n x n": f"{n} x {n}",
                "SVD projection [ms]": 1e3 * svd,
                "SVD projection, kappa form [ms]": 1e3 * kappa_svd,
                f"Newton-Schulz clipping, T={iterations} [ms]": 1e3 * newton,
                "Newton / SVD": newton / svd,
            }
        )
    return rows


def plot(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for axis, kind in zip(axes, ("step", "step-kappa", "gaussian")):
        for n in sorted({r["n"] for r in rows}):
            for dtype, style in (("float32", "--"), ("float64", "-")):
                chosen = [r for r in rows if r["input"] == kind and r["n"] == n and r["dtype"] == dtype]
                axis.semilogy(
                    [r["iterations"] for r in chosen],
                    [max(r["rel. error vs SVD (max)"], 1e-17) for r in chosen],
                    style,
                    marker="o",
                    label=f"n={n} {dtype}",
                )
        axis.set_title({"step": "band step", "step-kappa": "kappa step", "gaussian": "Gaussian matrix"}[kind])
        axis.set_xlabel("Newton-Schulz iterations")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||clip - project|| / ||project||")
    axes[0].legend(fontsize=7)
    save_figure(figure, name)


def main() -> None:
    parser = topic_parser("spectrum_projection", __doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [64, 128] if args.quick else [64, 256]
    counts = [6, 8, 10, 12, 16, 20, 24]
    seeds = 1 if args.quick else 3
    accuracy = accuracy_rows(sizes, counts, seeds)
    timing_sizes = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024]
    timing = timing_rows(timing_sizes, iterations=DEFAULT_NEWTON_ITERATIONS)
    name = "spectrum_projection" + ("_quick" if args.quick else "")
    plot(accuracy, name)
    command = "python -m benchmarks.spectrum_projection" + (" --quick" if args.quick else "")
    sections = [
        "## Accuracy of the matmul-only clipping\n\n"
        "`step`: a random point of the band [0.5, 2] plus a random step of 5% of its norm (what an optimizer "
        "step feeds the retraction); `step-kappa`: the same for `kappa=10` (band anchored at a power-iteration "
        "estimate of sigma_max, so the error includes the anchor's distance to the nearest band); `gaussian`: "
        f"N(0, 4/n) entries, singular values from ~0 to ~4, band [0.5, 2]. Max over {seeds} seed(s).\n\n"
        + markdown_table(accuracy),
        "## Time per matrix (float32, 1 thread, CPU)\n\n" + markdown_table(timing),
        f"![accuracy]({name}.png)",
    ]
    path = write_results(name, "Matmul-only spectral clipping vs SVD projection", sections, command)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
