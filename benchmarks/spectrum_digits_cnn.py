"""Digits classification with a deep plain CNN without BatchNorm: plain init vs ONI vs weight conditioning.

sklearn's 8x8 digits, a stack of 3x3 convolutions with ReLU and no normalization layer,
global average pooling and a linear classifier. The conv layers are, in turn, plain
(Kaiming-normal init), ONI with T in {0, 1, 3, 5} (gain sqrt(2), learnable) and weight
conditioning (row); the same Adam run trains each, over several seeds, and the test
accuracy is recorded after every epoch. A diagnostic variant multiplies the
weight-conditioned kernels by sqrt(2) (the ReLU gain ONI uses), to separate the effect of
the equilibration from that of the scale.

Run: ``python -m benchmarks.spectrum_digits_cnn [--quick]``. Writes
``benchmarks/results/spectrum_digits_cnn.md`` and ``spectrum_digits_cnn.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional
from torch.nn.utils import parametrize

from manifold_opt.nn import layer_spectra, oni, weight_conditioning

from .common import digits, markdown_table, mean_std, plot_mean_band, progress, save_figure, topic_parser, write_results


class Scale(nn.Module):
    """A fixed scalar gain, stacked after another parametrization (diagnostic only)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.gain * weight


def conditioned_with_gain(conv: nn.Conv2d) -> nn.Conv2d:
    weight_conditioning(conv, mode="row")
    parametrize.register_parametrization(conv, "weight", Scale(math.sqrt(2.0)))
    return conv


VARIANTS: dict[str, Callable[[nn.Conv2d], nn.Module]] = {
    "plain (Kaiming)": lambda conv: conv,
    "ONI T=0": lambda conv: oni(conv, iterations=0),
    "ONI T=1": lambda conv: oni(conv, iterations=1),
    "ONI T=3": lambda conv: oni(conv, iterations=3),
    "ONI T=5": lambda conv: oni(conv, iterations=5),
    "weight conditioning (row)": lambda conv: weight_conditioning(conv, mode="row"),
    "weight conditioning (row) x sqrt2 [diagnostic]": conditioned_with_gain,
}


def make_cnn(variant: str, depth: int, width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 1
    for _ in range(depth):
        conv = nn.Conv2d(channels, width, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [VARIANTS[variant](conv), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train(variant: str, seed: int, data: tuple, config: argparse.Namespace) -> dict:
    x_train, y_train, x_test, y_test = data
    model = make_cnn(variant, config.depth, config.width, seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    accuracies, losses, start = [], [], time.perf_counter()
    for _ in range(config.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for begin in range(0, len(x_train), config.batch):
            index = order[begin : begin + config.batch]
            optimizer.zero_grad()
            loss = functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(x_train))
        accuracies.append(accuracy(model, x_test, y_test))
    seconds = (time.perf_counter() - start) / config.epochs
    kappas = [s.kappa for s in layer_spectra(model).values()][1:-1]  # the convs after the first
    return {"accuracy": accuracies, "loss": losses, "seconds_per_epoch": seconds, "kappa": statistics.median(kappas)}


def summarize(results: dict[str, list[dict]], epochs: list[int]) -> list[dict]:
    rows = []
    for variant, runs in results.items():
        row: dict = {"variant": variant}
        for epoch in epochs:
            values = [100 * run["accuracy"][epoch - 1] for run in runs]
            row[f"test acc. @ epoch {epoch} [%]"] = mean_std(values, 1)
        row["train loss (last epoch)"] = statistics.mean(run["loss"][-1] for run in runs)
        row["s / epoch"] = statistics.mean(run["seconds_per_epoch"] for run in runs)
        row["median kappa, conv 2..L (end)"] = statistics.mean(run["kappa"] for run in runs)
        rows.append(row)
    return rows


def plot(results: dict[str, list[dict]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant, runs in results.items():
        values = 100 * torch.tensor([run["accuracy"] for run in runs])
        epochs = range(1, values.shape[1] + 1)
        plot_mean_band(axis, epochs, values, variant, marker="o", markersize=3)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy [%]")
    axis.set_title("Digits, plain CNN without BatchNorm (mean, min-max over seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    save_figure(figure, name)


def main() -> None:
    parser = topic_parser("spectrum_digits_cnn", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = argparse.Namespace(
        depth=8, width=32, lr=1e-3, batch=64, epochs=4 if args.quick else 10, seeds=1 if args.quick else 3
    )
    x_train, y_train, x_test, y_test = digits()
    data = (x_train.view(-1, 1, 8, 8), y_train, x_test.view(-1, 1, 8, 8), y_test)
    runs = [(variant, seed) for variant in VARIANTS for seed in range(config.seeds)]
    results: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for variant, seed in progress(runs, "digits cnn"):
        results[variant].append(train(variant, seed, data, config))
    checkpoints = sorted({1, max(1, config.epochs // 3), max(1, config.epochs // 2), config.epochs})
    name = "spectrum_digits_cnn" + ("_quick" if args.quick else "")
    plot(results, name)
    command = "python -m benchmarks.spectrum_digits_cnn" + (" --quick" if args.quick else "")
    setup = (
        f"sklearn digits (1347 train / 450 test, standardized), {config.depth} conv layers 3x3 of width "
        f"{config.width} with ReLU and no normalization layer, global average pooling, linear classifier. "
        f"Adam lr {config.lr}, batch {config.batch}, {config.epochs} epochs, seeds 0..{config.seeds - 1} "
        "(mean ± standard deviation). Conv biases start at 0 and raw kernels are Kaiming-normal in every "
        "variant; ONI: centered, gain sqrt(2) learnable, applied to every conv (the first one, 32 x 9, in "
        "column mode). The median condition number is over the convs after the first, at the end."
    )
    sections = ["## Setup\n\n" + setup, "## Test accuracy\n\n" + markdown_table(summarize(results, checkpoints))]
    sections.append(f"![test accuracy per epoch]({name}.png)")
    path = write_results(name, "Digits with a deep plain CNN", sections, command)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
