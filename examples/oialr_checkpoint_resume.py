"""How to: checkpoint and resume low-rank training with OIALR, bit for bit.

OIALR (``manifold_opt.lowrank.OIALR``) trains a network at full rank for ``delay`` steps,
then replaces each eligible layer by ``W = U Σ Vᵀ`` and cuts the ranks every
``frequency`` steps, changing the model's layers and the optimizer's parameters as it
goes. A checkpoint therefore holds three state dicts, and a resumed run must restore
them in this order into a freshly built model, optimizer and OIALR (``docs/oialr.md``):

1. ``oialr.load_state_dict(...)``: factors the fresh layers at the saved ranks and puts
   the cores ``Σ`` in the optimizer's param groups;
2. ``model.load_state_dict(...)``;
3. ``optimizer.load_state_dict(...)``.

The example trains an MLP (64-256-256-10, AdamW) on sklearn's digits. It runs the
training once without interruption, and once stopped at ``--checkpoint-step`` (after
some rank cuts), saved with ``torch.save`` (to ``--checkpoint``, or a temporary
directory), rebuilt from scratch, loaded with ``torch.load(..., weights_only=True)`` and
continued. It prints the ranks and the largest difference between the parameters of the
two runs (0: the resumed run is the uninterrupted one). The batch order is a function of
the step, so it needs no state of its own in the checkpoint.

Run:  python examples/oialr_checkpoint_resume.py [--quick] [--steps 880] [--checkpoint-step 440] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from manifold_opt.lowrank import OIALR


def load_digit_vectors(seed: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's digits as standardized 64-vectors, split 75/25 (stratified)."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return tuple(t.to(device) for t in ((x_train - mean) / std, y_train, (x_test - mean) / std, y_test))


def build(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, OIALR]:
    """Model, optimizer and OIALR: a resumed run builds them again with the same options."""
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    oialr = OIALR(model, optimizer, delay=args.delay, frequency=args.frequency, tau=args.tau)
    return model, optimizer, oialr


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> Tensor:
    """The batch of a step: epoch ``e`` visits the examples in a random order seeded by ``(seed, e)``."""
    batches_per_epoch = -(-num_examples // batch_size)
    epoch, position = divmod(step, batches_per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    oialr: OIALR,
    data: tuple[Tensor, ...],
    steps: range,
    args: argparse.Namespace,
) -> None:
    """Optimizer steps ``steps`` (global step numbers), with OIALR's schedule after each."""
    x_train, y_train = data[0], data[1]
    for step in steps:
        batch = batch_indices(step, len(x_train), args.batch_size, args.seed).to(x_train.device)
        nn.functional.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
        optimizer.step()
        oialr.step()  # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()


def test_accuracy(model: nn.Module, data: tuple[Tensor, ...]) -> float:
    x_test, y_test = data[2], data[3]
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


def max_parameter_difference(model: nn.Module, other: nn.Module) -> float:
    """Largest absolute difference over every entry of the two state dicts (which must have the same keys)."""
    state, other_state = model.state_dict(), other.state_dict()
    if list(state) != list(other_state):
        raise ValueError(f"the models differ in structure: {list(state)} vs {list(other_state)}")
    return max(float((state[key] - other_state[key]).abs().max()) for key in state)


def save_and_resume(
    data: tuple[Tensor, ...], args: argparse.Namespace, path: Path
) -> tuple[nn.Module, OIALR, dict[str, int]]:
    """Train to the checkpoint, save, forget everything, rebuild, load and continue to the end."""
    model, optimizer, oialr = build(args)
    train(model, optimizer, oialr, data, range(args.checkpoint_step), args)
    ranks_at_checkpoint = oialr.ranks()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "oialr": oialr.state_dict()}, path)
    del model, optimizer, oialr

    model, optimizer, oialr = build(args)
    checkpoint = torch.load(path, weights_only=True, map_location=args.device)
    oialr.load_state_dict(checkpoint["oialr"])  # first: reshapes the model and the optimizer's groups
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    train(model, optimizer, oialr, data, range(oialr.step_count, args.steps), args)
    return model, oialr, ranks_at_checkpoint


def format_ranks(ranks: dict[str, int], full_ranks: dict[str, int]) -> str:
    """``"layer 0: 64/64, layer 2: 132/256"`` (rank / full rank)."""
    return ", ".join(f"layer {name}: {rank}/{full_ranks[name]}" for name, rank in ranks.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (120 steps): a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps in all (default 880, 40 epochs)")
    parser.add_argument("--delay", type=int, default=None, help="full-rank steps before the conversion (default 110)")
    parser.add_argument("--frequency", type=int, default=None, help="steps between rank checks (default 44)")
    parser.add_argument("--checkpoint-step", type=int, default=None, help="where to stop and save (default steps/2)")
    parser.add_argument("--tau", type=float, default=0.2, help="OIALR's cut-off fraction of the largest σ")
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint file (default: a temporary one)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    quick_or_full = {"steps": (120, 880), "delay": (30, 110), "frequency": (15, 44)}
    for name, (quick, full) in quick_or_full.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.checkpoint_step is None:
        args.checkpoint_step = args.steps // 2
    if not 0 < args.checkpoint_step < args.steps:
        parser.error(f"--checkpoint-step must lie in (0, {args.steps})")
    torch.set_num_threads(1)  # a small model: one thread is fastest, and fair to other jobs

    data = load_digit_vectors(args.seed, torch.device(args.device))
    model, optimizer, oialr = build(args)
    train(model, optimizer, oialr, data, range(args.steps), args)
    if args.checkpoint is None:
        with tempfile.TemporaryDirectory() as directory:
            resumed_model, resumed_oialr, ranks_at_checkpoint = save_and_resume(data, args, Path(directory) / "ckpt.pt")
    else:
        resumed_model, resumed_oialr, ranks_at_checkpoint = save_and_resume(data, args, args.checkpoint)

    print(
        f"sklearn digits, MLP 64-256-256-10, AdamW, {args.steps} steps of batch {args.batch_size}; OIALR delay "
        f"{args.delay}, frequency {args.frequency}, tau {args.tau:g}; checkpoint at step {args.checkpoint_step}\n"
    )
    full_ranks = oialr.history[0]["ranks"]  # the record made at construction, before any cut
    print("layer eligibility:", ", ".join(f"layer {name}: {why}" for name, why in oialr.eligibility.items()))
    print(f"ranks at the checkpoint (step {args.checkpoint_step}): {format_ranks(ranks_at_checkpoint, full_ranks)}")
    print("rank checks of the uninterrupted run:")
    for record in oialr.history:
        print(
            f"  step {record['step']:4d}: {format_ranks(record['ranks'], full_ranks)}, "
            f"trainable fraction {record['trainable_fraction']:.3f}"
        )
    print("\n| run | final ranks | trainable fraction | test accuracy |")
    print("|---|---|---|---|")
    for name, run_model, run_oialr in (("uninterrupted", model, oialr), ("resumed", resumed_model, resumed_oialr)):
        print(
            f"| {name} | {format_ranks(run_oialr.ranks(), full_ranks)} | {run_oialr.trainable_fraction():.3f} "
            f"| {test_accuracy(run_model, data):.4f} |"
        )
    print(f"\nranks equal: {resumed_oialr.ranks() == oialr.ranks()}")
    print(f"histories equal: {resumed_oialr.history == oialr.history}")
    difference = max_parameter_difference(model, resumed_model)
    print(f"max abs difference of parameters and buffers, resumed vs uninterrupted: {difference:.3g}")


if __name__ == "__main__":
    main()
