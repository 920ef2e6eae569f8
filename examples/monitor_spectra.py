"""How to: watch the singular values of a network's layers during training.

``manifold_opt.nn.layer_spectra(model)`` returns, for every layer weight (viewed as the
matrix ``out × in``), its σ_min, σ_max, κ = σ_max/σ_min and orthogonality error
max|σ²−1| (= ‖WᵀW − I‖₂ on the short side). It costs one ``svdvals`` per layer, so it
can be called every few steps. The example trains an MLP on sklearn's digits whose first
layer (128 × 64) is constrained to orthonormal columns, ``ManifoldParameter(...,
Stiefel())``, next to a plain hidden layer (128 × 128) and a plain head, all stepped by
one ``RiemannianAdam``, and prints the three spectra every ``--every`` steps: the Stiefel
layer stays at σ = 1 (error at rounding level), the plain layers drift.

Run:  python examples/monitor_spectra.py [--quick] [--steps 440] [--every 55] [--device cpu]
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from collections.abc import Iterator

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from manifold_opt import ManifoldParameter, RiemannianAdam, Stiefel
from manifold_opt.nn import layer_spectra


def load_digit_vectors(seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as standardized 64-vectors, split 75/25 (stratified)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return tuple(t.to(device) for t in ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test))


def make_model(seed: int, device: torch.device) -> nn.Sequential:
    """MLP 64-128-128-10 whose first weight lies on the Stiefel manifold (orthonormal columns)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            stiefel=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            plain=nn.Linear(128, 128),
            relu2=nn.ReLU(),
            head=nn.Linear(128, 10),
        )
    ).to(device)
    model.stiefel.weight = ManifoldParameter(model.stiefel.weight, Stiefel())
    return model


def shuffled_batches(num_examples: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches, epoch after epoch, each epoch in a new random order."""
    while True:
        yield from torch.randperm(num_examples, generator=generator).split(batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (66 steps, a report every 22): a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 440, 20 epochs)")
    parser.add_argument("--every", type=int, default=None, help="steps between two reports (default 55)")
    parser.add_argument("--lr", type=float, default=1e-3, help="lr of the plain parameters (Adam's rule)")
    parser.add_argument("--stiefel-lr", type=float, default=1e-2, help="lr of the Stiefel weight")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 66 if args.quick else 440
    if args.every is None:
        args.every = 22 if args.quick else 55
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be at least 1")
    torch.set_num_threads(1)  # a small model: one thread is fastest, and fair to other jobs

    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = load_digit_vectors(args.seed, device)
    model = make_model(args.seed, device)
    stiefel_weight = model.stiefel.weight
    plain_parameters = [p for p in model.parameters() if p is not stiefel_weight]
    # One optimizer for both: RiemannianAdam steps plain tensors exactly like torch.optim.Adam. On
    # Stiefel it keeps one second moment per matrix (a step of about lr in Frobenius norm), hence its own lr.
    optimizer = RiemannianAdam(
        [{"params": plain_parameters}, {"params": [stiefel_weight], "lr": args.stiefel_lr}], lr=args.lr
    )
    constraint = {"stiefel.weight": "Stiefel", "plain.weight": "none", "head.weight": "none (head)"}

    print(
        f"sklearn digits, MLP 64-128-128-10, RiemannianAdam (lr {args.lr:g}, Stiefel lr {args.stiefel_lr:g}), "
        f"batch {args.batch_size}, seed {args.seed}; layer_spectra(model) every {args.every} steps\n"
    )
    print("| step | train loss | layer | constraint | σ_min | σ_max | κ | orthogonality error |")
    print("|---|---|---|---|---|---|---|---|")

    def report(step: int, loss: str) -> None:
        for name, spectrum in layer_spectra(model).items():
            print(
                f"| {step} | {loss} | {name} | {constraint[name]} | {spectrum.sigma_min:.4f} "
                f"| {spectrum.sigma_max:.4f} | {spectrum.kappa:.4g} | {spectrum.orthogonality_error:.1e} |"
            )

    report(0, "—")
    batches = shuffled_batches(len(x_train), args.batch_size, torch.Generator().manual_seed(args.seed))
    for step in range(1, args.steps + 1):
        batch = next(batches).to(device)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0 or step == args.steps:
            report(step, f"{float(loss.detach()):.4f}")

    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    print(f"\ntest accuracy after {args.steps} steps: {accuracy:.4f}")


if __name__ == "__main__":
    main()
