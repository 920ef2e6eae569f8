"""OIALR on sklearn digits: full-rank training against OIALR at several τ, several seeds.

Two networks, each trained with AdamW (the paper's optimizer) on the 8×8 digits:

* **MLP** 64-256-256-256-10 (ReLU);
* **ViT**: 2×2 patches (16 tokens + a class token), width 64, 2 pre-norm blocks with 4 heads
  and an MLP of 128, written with plain ``nn.Linear`` so OIALR can factor the attention.

Per configuration and seed: final test accuracy, trainable-parameter fraction over training,
per-layer ranks, wall time per epoch (full-rank phase and low-rank phase), and the size of the
:meth:`~manifold_opt.lowrank.OIALR.compact` inference model. Also compared: the official code's
optimizer-state treatment (``state_transfer="slice"``) against ours (``"rotate"``), with AdamW and
with SGD + momentum (which the official code cannot run with a low-rank Σ).

Run: ``python -m benchmarks.oialr [--quick]``. Writes ``benchmarks/results/oialr.md`` (or
``oialr_quick.md``) and PNG plots ``benchmarks/results/oialr_*.png``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from manifold_opt.lowrank import OIALR

from .common import digits, markdown_table, mean_std, progress, save_figure, time_call, topic_parser, write_results


# ------------------------------------------------------------------ models
def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc2(functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer for 8×8 images (2×2 patches)."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, hidden: int = 128, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        tokens = (8 // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        images = x.reshape(-1, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, p * p)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(images)], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


MODELS = {"MLP 64-256-256-256-10": make_mlp, "ViT (2 blocks, width 64)": ViT}


# ------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Config:
    label: str
    tau: float | None  # None: full rank
    state_transfer: str = "rotate"
    optimizer: str = "adamw"


@dataclass
class Run:
    accuracy: float
    fraction: float
    compact_fraction: float
    history: list[dict[str, Any]]
    ranks: dict[str, int]
    full_ranks: dict[str, int]
    epoch_seconds_full: list[float] = field(default_factory=list)
    epoch_seconds_low: list[float] = field(default_factory=list)
    trained: tuple[nn.Module, torch.optim.Optimizer, OIALR | None] | None = None


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=10 * lr, momentum=0.9, weight_decay=1e-4)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        result = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100 * result


def train_one(
    model_name: str, config: Config, seed: int, data: tuple, *, epochs: int, delay: int, frequency: int, lr: float
) -> Run:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    dense_count = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(config.optimizer, model.parameters(), lr)
    oialr = None
    if config.tau is not None:
        oialr = OIALR(
            model, optimizer, delay=delay, frequency=frequency, tau=config.tau, state_transfer=config.state_transfer
        )
    full_ranks = oialr.ranks() if oialr else {}
    generator = torch.Generator().manual_seed(seed)
    batch_size = 64
    run = Run(0.0, 1.0, 1.0, [], {}, full_ranks)
    step = 0
    for _ in range(epochs):
        low_rank_phase = oialr is not None and step >= delay
        start = time.perf_counter()
        order = torch.randperm(x_train.shape[0], generator=generator)
        for i in range(0, x_train.shape[0], batch_size):
            index = order[i : i + batch_size]
            loss = functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            if oialr is not None:
                oialr.step()
            optimizer.zero_grad()
            step += 1
        elapsed = time.perf_counter() - start
        (run.epoch_seconds_low if low_rank_phase else run.epoch_seconds_full).append(elapsed)
    run.accuracy = accuracy(model, x_test, y_test)
    if seed == 0:
        run.trained = (model, optimizer, oialr)
    if oialr is not None:
        run.fraction = oialr.trainable_fraction()
        run.history = oialr.history
        run.ranks = oialr.ranks()
        compact = oialr.compact()
        run.compact_fraction = sum(p.numel() for p in compact.parameters()) / dense_count
        assert abs(accuracy(compact, x_test, y_test) - run.accuracy) < 0.5, "compact() changed the predictions"
    return run


# ------------------------------------------------------------------ reporting
def summary_rows(results: dict[Config, list[Run]]) -> list[dict[str, Any]]:
    baseline = {
        optimizer: statistics.mean(r.accuracy for r in runs)
        for config, runs in results.items()
        for optimizer in [config.optimizer]
        if config.tau is None
    }
    rows = []
    for config, runs in results.items():
        acc = [r.accuracy for r in runs]
        full_epoch = [t for r in runs for t in r.epoch_seconds_full]
        low_epoch = [t for r in runs for t in r.epoch_seconds_low]
        delta = statistics.mean(acc) - baseline[config.optimizer] if config.optimizer in baseline else float("nan")
        rows.append(
            {
                "configuration": config.label,
                "optimizer": "AdamW" if config.optimizer == "adamw" else "SGD (momentum 0.9)",
                "test accuracy (%)": mean_std(acc),
                "Δ vs full rank (points)": "—" if config.tau is None else f"{delta:+.2f}",
                "trainable fraction at end": "1" if config.tau is None else mean_std([r.fraction for r in runs]),
                "compact() size / dense": "1" if config.tau is None else mean_std([r.compact_fraction for r in runs]),
                "ms / epoch, full-rank phase": f"{1000 * statistics.median(full_epoch):.0f}" if full_epoch else "—",
                "ms / epoch, low-rank phase": f"{1000 * statistics.median(low_epoch):.0f}" if low_epoch else "—",
            }
        )
    return rows


def rank_rows(results: dict[Config, list[Run]]) -> list[dict[str, Any]]:
    rows = []
    for config, runs in results.items():
        if config.tau is None:
            continue
        names = list(runs[0].ranks)
        row: dict[str, Any] = {"configuration": config.label}
        for name in names:
            ranks = [r.ranks[name] for r in runs]
            row[f"{name} (of {runs[0].full_ranks[name]})"] = f"{min(ranks)}–{max(ranks)}"
        rows.append(row)
    return rows


def timing_rows(model_name: str, results: dict[Config, list[Run]], data: tuple) -> list[dict[str, Any]]:
    """Repeated timings (medians, back to back: less exposed to a shared machine) of a training step of the dense
    model and of the OIALR model at its final ranks, of one check, and of inference."""
    x_train, y_train, x_test, _ = data
    x, y = x_train[:64], y_train[:64]
    dense_model, dense_optimizer, _ = next(r.trained for c, r in _first_runs(results) if c.tau is None)
    config, run = next((c, r) for c, r in _first_runs(results) if c.tau == 0.2 and c.state_transfer == "rotate")
    model, optimizer, oialr = run.trained

    def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        def call() -> None:
            functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()

        return call

    def infer(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                model(x_test)

        return call

    compact = oialr.compact()
    rows = [
        ("training step (batch 64), dense", step(dense_model, dense_optimizer)),
        (f"training step (batch 64), {config.label} at its final ranks", step(model, optimizer)),
        ("one OIALR check (SVD of every Σ, rotation, state transfer; no cut)", lambda: oialr.rediagonalize(cut=False)),
        ("inference (batch 450), dense", infer(dense_model)),
        (f"inference (batch 450), compact() of {config.label}", infer(compact)),
    ]
    return [{"what": label, "ms": 1000 * time_call(call, repeats=7, min_seconds=0.1)} for label, call in rows]


def _first_runs(results: dict[Config, list[Run]]) -> list[tuple[Config, Run]]:
    return [(config, runs[0]) for config, runs in results.items() if runs[0].trained is not None]


def plot(model_name: str, results: dict[Config, list[Run]], slug: str, suffix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(6, 4))
    for color, (config, runs) in enumerate((c, r) for c, r in results.items() if c.tau is not None):
        for index, run in enumerate(runs):
            steps = [h["step"] for h in run.history]
            fractions = [h["trainable_fraction"] for h in run.history]
            label = config.label if index == 0 else None
            axis.step(steps, fractions, where="post", color=f"C{color}", alpha=0.7, label=label)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("trainable parameters / full-rank model")
    axis.set_title(f"{model_name}: trainable fraction (every seed)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=7)
    paths.append(save_figure(figure, f"oialr_{slug}_fraction{suffix}").name)

    config = next((c for c in results if c.tau == 0.2 and c.state_transfer == "rotate"), None)
    if config is not None:
        run = results[config][0]
        figure, axis = plt.subplots(figsize=(6, 4))
        steps = [h["step"] for h in run.history]
        for name in run.ranks:
            axis.step(steps, [h["ranks"][name] for h in run.history], where="post", label=name)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("rank")
        axis.set_title(f"{model_name}: per-layer ranks, {config.label}, first seed")
        axis.legend(fontsize=7)
        paths.append(save_figure(figure, f"oialr_{slug}_ranks{suffix}").name)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = topic_parser("oialr", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer seeds and epochs (about a minute)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (default 5 for the MLP and 4 for the ViT)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = digits(seed=0)
    steps_per_epoch = -(-data[0].shape[0] // 64)
    settings = {
        "MLP 64-256-256-256-10": {"epochs": 40, "lr": 1e-3, "seeds": 5},
        "ViT (2 blocks, width 64)": {"epochs": 50, "lr": 2e-3, "seeds": 4},
    }
    if args.quick:
        settings = {name: {**s, "epochs": s["epochs"] // 3, "seeds": 1} for name, s in settings.items()}
    if args.seeds:
        settings = {name: {**s, "seeds": args.seeds} for name, s in settings.items()}
    suffix = "_quick" if args.quick else ""
    configs = [
        Config("full rank", None),
        Config("OIALR τ=0.1", 0.1),
        Config("OIALR τ=0.2", 0.2),
        Config("OIALR τ=0.3", 0.3),
        Config("OIALR τ=0.2, sliced state (official)", 0.2, "slice"),
    ]
    sgd_configs = [
        Config("full rank (SGD)", None, optimizer="sgd"),
        Config("OIALR τ=0.2 (SGD)", 0.2, optimizer="sgd"),
        Config("OIALR τ=0.2, sliced state (SGD)", 0.2, "slice", optimizer="sgd"),
    ]
    sections = []
    command = "python -m benchmarks.oialr" + (" --quick" if args.quick else "")
    for model_name, setting in settings.items():
        epochs, seeds = setting["epochs"], setting["seeds"]
        total = epochs * steps_per_epoch
        delay, frequency = total // 8, total // 20
        chosen = configs + (sgd_configs if model_name.startswith("MLP") else [])
        results: dict[Config, list[Run]] = {}
        jobs = [(c, s) for c in chosen for s in range(seeds)]
        for config, seed in progress(jobs, model_name):
            run = train_one(
                model_name,
                config,
                seed,
                data,
                epochs=epochs,
                delay=delay,
                frequency=frequency,
                lr=setting["lr"],
            )
            results.setdefault(config, []).append(run)
        slug = "mlp" if model_name.startswith("MLP") else "vit"
        figures = plot(model_name, results, slug, suffix)
        sections.append(
            f"## {model_name}\n\n"
            f"{epochs} epochs of {steps_per_epoch} steps (batch 64), AdamW lr {setting['lr']:g} (weight decay 0.01; "
            f"SGD rows: lr {10 * setting['lr']:g}, momentum 0.9, weight decay 1e-4), {seeds} seeds (initialization "
            f"and batch order; one fixed train/test split of 1347/450 images). OIALR: delay {delay} steps, "
            f"frequency {frequency}, the last layer kept dense; state carried by rotation unless marked "
            f"*sliced*.\n\n"
            + markdown_table(summary_rows(results))
            + "\n\nFinal ranks (range over seeds):\n\n"
            + markdown_table(rank_rows(results))
            + "\n\nTimings (median of 7 repeats, first seed's trained models):\n\n"
            + markdown_table(timing_rows(model_name, results, data))
            + "\n\n"
            + "\n".join(f"![{name}]({name})" for name in figures)
        )
    notes = (
        "Accuracy is the final-epoch test accuracy (450 images: one image is 0.22 points). "
        "*Trainable fraction*: trainable parameters of the model at the end over those of the full-rank model "
        "(biases, norms, the dense head and embeddings included). *compact() size*: all parameters of the "
        "inference model from `OIALR.compact()` (bases included) over the dense model's. Epoch times are medians "
        "over all epochs and seeds of a phase, one thread; the low-rank phase includes the checks' SVDs. The "
        "machine is shared with other jobs, so these columns move with its load (identical full-rank phases differ "
        "between rows): for speed, read the *Timings* tables (medians of repeated measurements, back to back)."
    )
    path = write_results(f"oialr{suffix}", "OIALR on sklearn digits", [notes, *sections], command)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
