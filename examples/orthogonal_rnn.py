"""How to: an RNN with an orthogonal hidden-to-hidden matrix (Stiefel), on the copy task.

The copy task tests long memory: the network reads ``symbols`` random symbols (of 8),
then ``delay`` blank steps ending with a recall marker, and must output the symbols
in order after the marker (blanks everywhere else). A network without memory cannot
beat the baseline cross-entropy ``symbols·log(8) / (delay + 2·symbols)``.

The same ``nn.RNN`` (tanh) is trained twice from the same orthogonal initialization:
unconstrained with ``torch.optim.Adam``, and with its recurrent matrix ``weight_hh_l0``
replaced by ``ManifoldParameter(..., Stiefel())`` and stepped by ``RiemannianAdam``
(which keeps it orthogonal at every step). Training batches come from a seeded
``torch.Generator``, so every run is reproducible.

Run:  python examples/orthogonal_rnn.py [--quick] [--delay 20] [--steps 1500] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import Tensor, nn

from manifold_opt import ManifoldParameter, RiemannianAdam, Stiefel

NUM_CATEGORIES = 8  # symbols are 1..8; 0 is the blank and 9 the recall marker


def copy_task_batch(
    batch_size: int, delay: int, symbols: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """One batch of the copy task (Arjovsky et al., 2016).

    Returns:
        ``inputs (batch, length, NUM_CATEGORIES + 2)`` one-hot and ``targets (batch, length)``
        class indices, ``length = delay + 2 * symbols``.
    """
    length = delay + 2 * symbols
    sequence = torch.randint(1, NUM_CATEGORIES + 1, (batch_size, symbols), generator=generator)
    inputs = torch.zeros(batch_size, length, dtype=torch.long)
    targets = torch.zeros(batch_size, length, dtype=torch.long)
    inputs[:, :symbols] = sequence
    inputs[:, symbols + delay - 1] = NUM_CATEGORIES + 1  # the recall marker
    targets[:, -symbols:] = sequence
    one_hot = nn.functional.one_hot(inputs, NUM_CATEGORIES + 2).float()
    return one_hot.to(device), targets.to(device)


class CopyRNN(nn.Module):
    """A one-layer tanh RNN and a linear read-out at every time step."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.rnn = nn.RNN(NUM_CATEGORIES + 2, hidden_size, batch_first=True, nonlinearity="tanh")
        self.readout = nn.Linear(hidden_size, NUM_CATEGORIES + 1)

    def forward(self, inputs: Tensor) -> Tensor:
        """``inputs (batch, length, features)`` -> logits ``(batch, length, NUM_CATEGORIES + 1)``."""
        hidden_states, _ = self.rnn(inputs)
        return self.readout(hidden_states)


def orthogonality_error(matrix: Tensor) -> float:
    """``max |WᵀW − I|`` (entrywise) of a square matrix."""
    with torch.no_grad():
        gram = matrix.T @ matrix
        return float((gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device)).abs().max())


def build(
    constrained: bool, hidden_size: int, lr: float, stiefel_lr: float, seed: int, device: torch.device
) -> tuple[CopyRNN, torch.optim.Optimizer]:
    """The model (recurrent matrix started at the same orthogonal matrix either way) and its optimizer."""
    torch.manual_seed(seed)
    model = CopyRNN(hidden_size).to(device)
    orthogonal_start = Stiefel().project(model.rnn.weight_hh_l0.detach())
    if not constrained:
        with torch.no_grad():
            model.rnn.weight_hh_l0.copy_(orthogonal_start)
        return model, torch.optim.Adam(model.parameters(), lr=lr)
    # nn.RNN accepts a new tensor for one of its weights (it updates its flat weight list).
    model.rnn.weight_hh_l0 = ManifoldParameter(orthogonal_start, Stiefel())
    recurrent = model.rnn.weight_hh_l0
    others = [p for p in model.parameters() if p is not recurrent]
    # RiemannianAdam keeps one second moment per matrix on Stiefel, so a step moves the whole
    # matrix by about `lr` in Frobenius norm (not every entry): it gets a larger lr of its own.
    groups = [{"params": others}, {"params": [recurrent], "lr": stiefel_lr}]
    return model, RiemannianAdam(groups, lr=lr)


def train_and_evaluate(
    name: str, constrained: bool, args: argparse.Namespace, test_batch: tuple[Tensor, Tensor]
) -> dict[str, str]:
    """Train one model on fresh batches, then report its test loss, accuracy and orthogonality."""
    device = torch.device(args.device)
    model, optimizer = build(constrained, args.hidden, args.lr, args.stiefel_lr, args.seed, device)
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same batches for both models
    start = time.perf_counter()
    for _ in range(args.steps):
        inputs, targets = copy_task_batch(args.batch_size, args.delay, args.symbols, generator, device)
        loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    inputs, targets = test_batch
    with torch.no_grad():
        logits = model(inputs)
        test_loss = float(nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
        recalled = logits[:, -args.symbols :].argmax(-1) == targets[:, -args.symbols :]
    return {
        "method": name,
        "final train loss": f"{float(loss.detach()):.4f}",
        "test loss": f"{test_loss:.4f}",
        "recall accuracy": f"{float(recalled.float().mean()):.3f}",
        "max abs(WᵀW − I)": f"{orthogonality_error(model.rnn.weight_hh_l0):.1e}",
        "seconds": f"{seconds:.1f}",
    }


def print_table(rows: list[dict[str, str]]) -> None:
    """Print rows of equal keys as a Markdown table."""
    headers = list(rows[0])
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row[h] for h in headers) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (delay 10, 150 steps): a smoke test")
    parser.add_argument("--delay", type=int, default=None, help="blank steps before the recall (default 20)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 1500)")
    parser.add_argument("--symbols", type=int, default=10, help="symbols to remember")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam's lr (and RiemannianAdam's, except W_hh)")
    parser.add_argument("--stiefel-lr", type=float, default=3e-2, help="RiemannianAdam's lr for W_hh")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.delay is None:
        args.delay = 10 if args.quick else 20
    if args.steps is None:
        args.steps = 150 if args.quick else 1500
    if args.delay < 1 or args.steps < 1:
        parser.error("--delay and --steps must be at least 1 (the recall marker is the delay's last step)")
    torch.set_num_threads(1)  # small matrices: one thread is fastest, and fair to other jobs

    test_batch = copy_task_batch(500, args.delay, args.symbols, torch.Generator().manual_seed(12345), args.device)
    rows = [
        train_and_evaluate("Adam, unconstrained", False, args, test_batch),
        train_and_evaluate("RiemannianAdam, W_hh on Stiefel", True, args, test_batch),
    ]
    length = args.delay + 2 * args.symbols
    baseline = args.symbols * math.log(NUM_CATEGORIES) / length
    print(
        f"copy task: {args.symbols} symbols of {NUM_CATEGORIES}, delay {args.delay} (sequence length {length}), "
        f"tanh RNN with {args.hidden} hidden units, {args.steps} steps of batch {args.batch_size}, seed {args.seed}"
    )
    print(f"memoryless baseline: test loss {baseline:.4f}, recall accuracy {1 / NUM_CATEGORIES:.3f} (chance)\n")
    print_table(rows)


if __name__ == "__main__":
    main()
