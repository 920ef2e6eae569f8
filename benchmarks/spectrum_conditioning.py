"""What ONI and weight conditioning do to the singular values of a weight (no training).

* ONI on Kaiming-initialized kernels: sigma_min and sigma_max of the orthogonalized matrix
  against the iteration count T, in row mode (64 x 576, a 64->64 3x3 conv, the reference
  table of tests/test_oni.py) and column mode (64 x 27, a 3->64 3x3 conv), centered and
  not, over seeds; and the official column mode (no division of S by its norm) on the same 64 x 27 kernel.
* Weight conditioning on matrices made ill-conditioned by row scales (log-normal) and on an
  intrinsically low-rank matrix (rank 8 plus noise), 128 x 256.

Run: ``python -m benchmarks.spectrum_conditioning [--quick]``. Writes
``benchmarks/results/spectrum_conditioning.md``.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from manifold_opt.nn import condition_weight, oni_orthogonalize, weight_as_matrix

from .common import markdown_table, mean_std, progress, topic_parser, write_results


def kaiming(out: int, inp: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    weight = torch.empty(out, inp, 3, 3, dtype=torch.float64)
    nn.init.kaiming_normal_(weight)
    return weight_as_matrix(weight)


def official_column(v: torch.Tensor, iterations: int) -> torch.Tensor:
    """huangleiBuaa/ONI ``ONINorm_colum``: S = Zc^T Zc + eps I is not divided by its norm."""
    zc = v - v.mean(dim=-1, keepdim=True)
    s = zc.mT @ zc + 1e-5 * torch.eye(v.shape[1], dtype=v.dtype)
    norm = torch.linalg.matrix_norm(s)
    b = torch.eye(v.shape[1], dtype=v.dtype)
    for _ in range(iterations):
        b = 1.5 * b - 0.5 * (b @ b @ b) @ s
    return zc @ b / norm.sqrt()


def oni_rows(seeds: int) -> list[dict]:
    rows = []
    cases = [
        ("row, 64 x 576", 64, True, "all"),
        ("column, 64 x 27, uncentered", 3, False, "all"),
        ("column, 64 x 27, centered", 3, True, "all but the zero one"),
    ]
    for label, inputs, center, which in progress(cases, "oni"):
        for iterations in (0, 1, 2, 3, 5, 7):
            lows, highs = [], []
            for seed in range(seeds):
                s = torch.linalg.svdvals(oni_orthogonalize(kaiming(64, inputs, seed), iterations, center=center))
                if which != "all":
                    s = s[:-1]
                lows.append(float(s.min()))
                highs.append(float(s.max()))
            rows.append(
                {
                    "mode": label,
                    "singular values": which,
                    "T": iterations,
                    "sigma_min": mean_std(lows, 4),
                    "sigma_max": mean_std(highs, 4),
                    "sigma_min / sigma_max": mean_std([lo / hi for lo, hi in zip(lows, highs)], 4),
                }
            )
    return rows


def official_rows() -> list[dict]:
    v = kaiming(64, 3, 0)
    rows = []
    for iterations in (0, 1, 2, 3, 4, 5):
        with torch.no_grad():
            official = official_column(v, iterations)
        finite = bool(torch.isfinite(official).all())
        top = float(torch.linalg.svdvals(official).max()) if finite else float("inf")
        ours = float(torch.linalg.svdvals(oni_orthogonalize(v, iterations)).max())
        rows.append({"T": iterations, "official column mode, sigma_max": top, "ours (normalized), sigma_max": ours})
    return rows


def conditioning_rows(seeds: int) -> list[dict]:
    rows = []
    for label in ("log-normal row scales (sd 1.5)", "rank 8 + 0.01 noise"):
        before, after = {m: [] for m in ("row", "column", "both")}, {m: [] for m in ("row", "column", "both")}
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            if label.startswith("log"):
                w = torch.randn(128, 256, generator=gen, dtype=torch.float64)
                w = w * torch.exp(1.5 * torch.randn(128, 1, generator=gen, dtype=torch.float64))
            else:
                w = torch.randn(128, 8, generator=gen, dtype=torch.float64) @ torch.randn(
                    8, 256, generator=gen, dtype=torch.float64
                )
                w = w + 0.01 * torch.randn(128, 256, generator=gen, dtype=torch.float64)
            s = torch.linalg.svdvals(w)
            for mode in before:
                c = torch.linalg.svdvals(condition_weight(w, mode))
                before[mode].append(float(s[0] / s[-1]))
                after[mode].append(float(c[0] / c[-1]))
        for mode in before:
            rows.append(
                {
                    "128 x 256 matrix": label,
                    "mode": mode,
                    "kappa before": statistics.median(before[mode]),
                    "kappa after": statistics.median(after[mode]),
                }
            )
    return rows


def main() -> None:
    parser = topic_parser("spectrum_conditioning", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 3 if args.quick else 20
    command = "python -m benchmarks.spectrum_conditioning" + (" --quick" if args.quick else "")
    sections = [
        f"## ONI on Kaiming-normal 3x3 conv kernels (float64, mean ± sd over {seeds} seeds)\n\n"
        "Centering makes every row orthogonal to the all-ones vector, so a centered 64 x 27 matrix has one zero "
        "singular value; its row lists the other 26.\n\n" + markdown_table(oni_rows(seeds)),
        "## The official column mode diverges (64 x 27, seed 0)\n\n" + markdown_table(official_rows()),
        f"## Weight conditioning (float64, median over {seeds} seeds)\n\n" + markdown_table(conditioning_rows(seeds)),
    ]
    path = write_results(
        "spectrum_conditioning" + ("_quick" if args.quick else ""),
        "What ONI and weight conditioning do to singular values",
        sections,
        command,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
