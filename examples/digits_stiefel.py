"""Demo: a small network with orthonormal (Stiefel) hidden layers on sklearn's digits.

Trains the same MLP (64-256-256-10) three ways and prints a Markdown table:
unconstrained with torch.optim.Adam, and with both hidden weights on the Stiefel
manifold stepped by RiemannianAdam and by RiemannianSGD with momentum.

Run:  python examples/digits_stiefel.py [--epochs 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from manifold_opt import ManifoldParameter, RiemannianAdam, RiemannianSGD, Stiefel
from manifold_opt.checks import manifold_residuals


def load(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def make_model(constrained: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    if constrained:
        for index in (0, 2):
            model[index].weight = ManifoldParameter(model[index].weight, Stiefel(retraction="qr"))
    return model


def train(
    name: str,
    constrained: bool,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    data: tuple[torch.Tensor, ...],
    epochs: int,
    seed: int,
) -> dict[str, str]:
    x_train, y_train, x_test, y_test = data
    model = make_model(constrained, seed)
    optimizer = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order.split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = model(x_test)
        accuracy = float((logits.argmax(1) == y_test).float().mean())
        loss = float(nn.functional.cross_entropy(logits, y_test))
    residuals = manifold_residuals(model)
    return {
        "method": name,
        "test accuracy": f"{accuracy:.4f}",
        "test loss": f"{loss:.4f}",
        "max abs(WᵀW − I)": f"{max(residuals.values()):.1e}" if residuals else "—",
        "ms / epoch": f"{1000 * seconds / epochs:.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load(args.seed)
    runs = [
        ("Adam, unconstrained", False, lambda ps: torch.optim.Adam(ps, lr=1e-3)),
        ("RiemannianAdam, Stiefel hidden layers", True, lambda ps: RiemannianAdam(ps, lr=1e-2)),
        ("RiemannianSGD (momentum 0.9), Stiefel", True, lambda ps: RiemannianSGD(ps, lr=0.05, momentum=0.9)),
    ]
    rows = [train(name, constrained, make, data, args.epochs, args.seed) for name, constrained, make in runs]
    print(f"sklearn digits, MLP 64-256-256-10, {args.epochs} epochs, batch 64, seed {args.seed}\n")
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")


if __name__ == "__main__":
    main()
