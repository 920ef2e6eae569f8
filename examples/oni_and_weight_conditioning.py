"""How to: control the singular values of layers with ONI and weight conditioning, and check them.

The same small CNN (three 3×3 convs 1→16→32→64 with ReLU and no normalization layer,
global average pooling, a linear head) is trained on sklearn's 8×8 digits three ways
with ``torch.optim.Adam``: plain; with ``manifold_opt.nn.oni`` on the two inner convs
(orthogonalization by Newton's iteration: the layer uses a kernel with approximately
orthonormal rows, times a learnable per-output gain, √2 at the start); and with
``manifold_opt.nn.weight_conditioning`` on the same convs (every output channel's
filter normalized to unit norm). Both are forward-pass reparametrizations
(``torch.nn.utils.parametrize``): the raw weight stays the trainable parameter, and any
optimizer trains it. The first conv and the head stay plain in all three models. The
script prints, for each model, the ``manifold_opt.nn.layer_spectra`` report of the
weights the layers use (each kernel viewed as the matrix ``out × in·3·3``: σ_min, σ_max,
κ = σ_max/σ_min, the orthogonality error max|σ²−1|, and its scale-free form, which is 0
for any multiple of an orthonormal matrix), then the test accuracies.

Run:  python examples/oni_and_weight_conditioning.py [--quick] [--epochs 20] [--iterations 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from manifold_opt.nn import layer_spectra, oni, spectra_table, weight_conditioning

INNER_CONVS = (2, 4)  # indices in the Sequential of the convs that get reparametrized


def load_digit_images(seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as ``(n, 1, 8, 8)`` images, standardized, split 75/25 (stratified)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return tuple(t.to(device) for t in ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test))


def make_cnn(seed: int, reparametrize: Callable[[nn.Conv2d], nn.Module] | None) -> nn.Sequential:
    """The CNN with ``reparametrize`` applied to its inner convs (the same raw weights for every variant)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for in_channels, out_channels in ((1, 16), (16, 32), (32, 64)):
        layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    if reparametrize is not None:
        for index in INNER_CONVS:
            reparametrize(model[index])
    return model


def train(model: nn.Module, data: tuple[Tensor, ...], args: argparse.Namespace) -> tuple[float, float]:
    """Train with Adam; returns the test accuracy and the training time in seconds."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every variant
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in torch.randperm(len(x_train), generator=generator).split(args.batch_size):
            batch = batch.to(x_train.device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (3 epochs): a smoke test")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 20)")
    parser.add_argument("--iterations", type=int, default=5, help="ONI's Newton iterations T")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 3 if args.quick else 20
    torch.set_num_threads(1)  # a small model: one thread is fastest, and fair to other jobs

    variants: list[tuple[str, Callable[[nn.Conv2d], nn.Module] | None]] = [
        ("plain", None),
        (f"ONI (T={args.iterations})", lambda conv: oni(conv, iterations=args.iterations)),
        ("weight conditioning (row)", lambda conv: weight_conditioning(conv, mode="row")),
    ]
    data = load_digit_images(args.seed, torch.device(args.device))
    print(
        f"sklearn digits (8×8), CNN 1-16-32-64 (convs 2 and 3 reparametrized), Adam lr {args.lr:g}, "
        f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}\n"
    )
    results = []
    for name, reparametrize in variants:
        model = make_cnn(args.seed, reparametrize).to(args.device)
        accuracy, seconds = train(model, data, args)
        results.append((name, accuracy, seconds))
        print(f"{name}: spectra of the weights the layers use, after training")
        print(spectra_table(layer_spectra(model)) + "\n")

    print("| model | test accuracy | seconds |")
    print("|---|---|---|")
    for name, accuracy, seconds in results:
        print(f"| {name} | {accuracy:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
