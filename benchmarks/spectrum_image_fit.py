"""Coordinate-MLP image fitting: a NeRF-like miniature of the weight-conditioning paper's experiment.

A ReLU MLP with a positional encoding maps pixel coordinates to RGB on a 64x64 image from
``sklearn.datasets.load_sample_image``. The hidden layers are reparametrized in turn by
nothing, torch's weight normalization, (scaled) weight standardization, weight
conditioning (row, both) and ONI; the same Adam run (full batch) trains each, over several
seeds, and the PSNR is recorded against the step.

Run: ``python -m benchmarks.spectrum_image_fit [--quick]``. Writes
``benchmarks/results/spectrum_image_fit.md`` and ``spectrum_image_fit.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from manifold_opt.nn import layer_spectra, oni, weight_conditioning

from .common import markdown_table, mean_std, plot_mean_band, progress, save_figure, topic_parser, write_results


class ScaledWeightStandardization(nn.Module):
    """Weight standardization (Qiao et al. 2019) with the 1/sqrt(fan_in) of Brock et al. (2021).

    ``(W - mean_row) / (std_row * sqrt(d))``: zero-mean, unit-norm rows. Plain WS (unit
    variance entries) multiplies the signal by ~sqrt(d) per layer and is meant to be followed
    by a normalization layer, which this network has none of.
    """

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        centered = weight - weight.mean(dim=1, keepdim=True)
        std = centered.pow(2).mean(dim=1, keepdim=True).add(1e-10).sqrt()
        return centered / (std * math.sqrt(weight.shape[1]))


def weight_standardization(layer: nn.Linear) -> nn.Linear:
    parametrize.register_parametrization(layer, "weight", ScaledWeightStandardization())
    return layer


VARIANTS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "none": lambda layer: layer,
    "weight norm": lambda layer: weight_norm(layer),
    "weight standardization": weight_standardization,
    "weight conditioning (row)": lambda layer: weight_conditioning(layer, mode="row"),
    "weight conditioning (both)": lambda layer: weight_conditioning(layer, mode="both"),
    "ONI (T=5)": lambda layer: oni(layer, iterations=5),
}


def load_image(size: int) -> torch.Tensor:
    """``china.jpg`` center-cropped to a square and area-averaged to ``size x size``, RGB in [0, 1]."""
    from sklearn.datasets import load_sample_image

    image = torch.tensor(load_sample_image("china.jpg"), dtype=torch.float32) / 255.0  # (427, 640, 3)
    height, width, _ = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side].permute(2, 0, 1).unsqueeze(0)
    return torch.nn.functional.interpolate(square, size=(size, size), mode="area")[0].permute(1, 2, 0)


def encode(coordinates: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``[x, sin(2^k pi x), cos(2^k pi x)]`` for ``k < frequencies`` (Mildenhall et al.'s encoding)."""
    scales = (2.0 ** torch.arange(frequencies)) * math.pi
    angles = (coordinates.unsqueeze(-1) * scales).flatten(1)
    return torch.cat([coordinates, angles.sin(), angles.cos()], dim=1)


def make_mlp(variant: str, inputs: int, width: int, depth: int, seed: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers (reparametrized by ``variant``), then a plain linear RGB head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    features = inputs
    for _ in range(depth):
        layers += [VARIANTS[variant](nn.Linear(features, width)), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 3))
    return nn.Sequential(*layers)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float(-10 * torch.log10(((prediction.clamp(0, 1) - target) ** 2).mean()))


def train(variant: str, seed: int, data: tuple, config: argparse.Namespace) -> dict:
    features, target = data
    model = make_mlp(variant, features.shape[1], config.width, config.depth, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    curve, start = [], time.perf_counter()
    for step in range(1, config.steps + 1):
        optimizer.zero_grad()
        loss = ((model(features) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        if step % config.every == 0 or step == 1:
            with torch.no_grad():
                curve.append((step, psnr(model(features), target)))
    seconds = time.perf_counter() - start
    kappas = [s.kappa for s in layer_spectra(model).values()][:-1]  # hidden layers
    return {
        "curve": curve,
        "seconds_per_step": seconds / config.steps,
        "kappa_first": kappas[0],
        "kappa": statistics.median(kappas[1:]),
    }


def summarize(results: dict[str, list[dict]], checkpoints: list[int]) -> list[dict]:
    rows = []
    for variant, runs in results.items():
        row: dict = {"variant": variant}
        for checkpoint in checkpoints:
            values = [dict(run["curve"])[checkpoint] for run in runs]
            row[f"PSNR @ {checkpoint} [dB]"] = mean_std(values, 2)
        row["ms / step"] = 1e3 * statistics.mean(run["seconds_per_step"] for run in runs)
        row["kappa, hidden layer 1 (end)"] = statistics.mean(run["kappa_first"] for run in runs)
        row["median kappa, hidden layers 2.. (end)"] = statistics.mean(run["kappa"] for run in runs)
        rows.append(row)
    return rows


def plot(results: dict[str, list[dict]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant, runs in results.items():
        steps = [s for s, _ in runs[0]["curve"]]
        values = torch.tensor([[v for _, v in run["curve"]] for run in runs])
        plot_mean_band(axis, steps, values, variant)
    axis.set_xlabel("Adam step (full batch)")
    axis.set_ylabel("PSNR [dB]")
    axis.set_title("64x64 image fit, ReLU MLP with positional encoding (mean, min-max over seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    save_figure(figure, name)


def main() -> None:
    parser = topic_parser("spectrum_image_fit", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps, one seed, narrower network")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = argparse.Namespace(
        size=64,
        frequencies=8,
        width=64 if args.quick else 128,
        depth=4,
        lr=1e-3,
        steps=150 if args.quick else 500,
        every=10 if args.quick else 20,
        seeds=1 if args.quick else 3,
    )
    image = load_image(config.size)
    axis = (torch.arange(config.size, dtype=torch.float32) + 0.5) / config.size
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    data = (encode(grid, config.frequencies), image.reshape(-1, 3))
    runs = [(variant, seed) for variant in VARIANTS for seed in range(config.seeds)]
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for variant, seed in progress(runs, "image fit"):
        results[variant].append(train(variant, seed, data, config))
    checkpoints = sorted({config.steps // 5, config.steps // 2, config.steps})
    checkpoints = [c - c % config.every for c in checkpoints]
    name = "spectrum_image_fit" + ("_quick" if args.quick else "")
    plot(results, name)
    command = "python -m benchmarks.spectrum_image_fit" + (" --quick" if args.quick else "")
    setup = (
        f"Image `china.jpg` (sklearn), center crop, area-resized to {config.size}x{config.size}, RGB in [0, 1]; "
        f"input: positional encoding with {config.frequencies} frequencies ({data[0].shape[1]} features); MLP: "
        f"{config.depth} hidden ReLU layers of width {config.width} (reparametrized) and a plain linear RGB head; "
        f"Adam lr {config.lr}, full batch ({data[0].shape[0]} pixels), {config.steps} steps, seeds "
        f"0..{config.seeds - 1} (mean ± standard deviation). PSNR of the clamped prediction. Weight "
        "standardization is the scaled form (zero-mean rows of unit norm) since the network has no "
        "normalization layer. ONI: T = 5, learnable gain initialized to 1, centered. Condition numbers of the "
        "weights the layers use, at the end (a centered square or tall matrix has one zero singular value, "
        "so centered ONI and standardization give kappa of order 1e7 there)."
    )
    sections = ["## Setup\n\n" + setup, "## PSNR\n\n" + markdown_table(summarize(results, checkpoints))]
    sections.append(f"![PSNR against steps]({name}.png)")
    path = write_results(name, "Coordinate-MLP image fitting", sections, command)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
