"""How to: train a BatchNorm CNN with PSISGD, which finds the scale-invariant weights by itself.

A weight that feeds a BatchNorm channel can be multiplied by any ``c > 0`` without
changing the network's function. ``PSISGD(model.named_parameters())`` detects such
weights from their first gradient (no declaration needed) and steps them on the PSI
manifold, so their training does not depend on their scale; every other parameter gets
``torch.optim.SGD``'s update. The example trains a small CNN (1→16→32→64 channels, each
conv followed by BatchNorm, global average pooling, a linear head) on sklearn's 8×8
digits with PSISGD and with ``torch.optim.SGD`` (same lr, momentum and cosine decay),
from the default start and from a start whose conv weights are multiplied by
``--rescale`` (the same function). It prints the test accuracies and
``opt.invariance_report()``: which parameters PSISGD treated as PSI, and why.

Run:  python examples/bn_cnn_psisgd.py [--quick] [--epochs 15] [--lr 0.1] [--rescale 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from manifold_opt import PSISGD

MakeOptimizer = Callable[[nn.Module, float], torch.optim.Optimizer]


def load_digit_images(seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as ``(n, 1, 8, 8)`` images, standardized, split 75/25 (stratified)."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()
    return tuple(t.to(device) for t in ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test))


def make_cnn(seed: int) -> nn.Sequential:
    """Three 3×3 convs, each followed by BatchNorm and ReLU, global average pooling, a linear head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for in_channels, out_channels in ((1, 16), (16, 32), (32, 64)):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def rescale_convs(model: nn.Module, factor: float) -> None:
    """Multiply every conv weight by ``factor``: BatchNorm makes this the same function (in training mode)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.mul_(factor)


def train(
    make_optimizer: MakeOptimizer,
    data: tuple[Tensor, ...],
    args: argparse.Namespace,
    rescale: float,
) -> tuple[float, torch.optim.Optimizer, float]:
    """Train one CNN; returns its test accuracy, its optimizer and the training time in seconds."""
    x_train, y_train, x_test, y_test = data
    model = make_cnn(args.seed).to(args.device)
    rescale_convs(model, rescale)
    optimizer = make_optimizer(model, args.lr)
    batches_per_epoch = -(-len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * batches_per_epoch)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every run
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x_train), generator=generator).split(args.batch_size):
            batch = batch.to(x_train.device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return accuracy, optimizer, seconds


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Print a Markdown table."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (3 epochs): a smoke test")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 15)")
    parser.add_argument("--lr", type=float, default=0.1, help="initial lr of both optimizers (cosine decay to 0)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--rescale", type=float, default=10.0, help="factor of the conv weights of the second start")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 3 if args.quick else 15
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    torch.set_num_threads(1)  # a small model: one thread is fastest, and fair to other jobs

    def make_sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum)

    def make_psisgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        # named_parameters(): the names appear in the invariance report
        return PSISGD(model.named_parameters(), lr=lr, momentum=args.momentum)

    data = load_digit_images(args.seed, torch.device(args.device))
    results = []
    reported_optimizer = None
    for name, make_optimizer in (("torch.optim.SGD", make_sgd), ("PSISGD", make_psisgd)):
        for rescale in (1.0, args.rescale):
            accuracy, optimizer, seconds = train(make_optimizer, data, args, rescale)
            results.append([name, f"×{rescale:g}", f"{accuracy:.4f}", f"{seconds:.1f}"])
            if isinstance(optimizer, PSISGD) and rescale == 1.0:
                reported_optimizer = optimizer

    print(
        f"sklearn digits (8×8), CNN 1-16-32-64 with BatchNorm, {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.lr:g} (cosine decay), momentum {args.momentum:g}, seed {args.seed}\n"
    )
    print_table(["optimizer", "conv weights at start", "test accuracy", "seconds"], results)
    print("\nPSISGD.invariance_report() (default start):\n")
    rows = []
    for row in reported_optimizer.invariance_report():
        cosine = row["radial_cosine"]
        rows.append(
            [
                row["name"],
                "×".join(map(str, row["shape"])),
                row["verdict"],
                "—" if cosine is None else f"{cosine:.1e}",
                row["reason"],
            ]
        )
    print_table(["parameter", "shape", "verdict", "radial cosine", "reason"], rows)


if __name__ == "__main__":
    main()
