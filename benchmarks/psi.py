"""PSI-SGD on sklearn digits: SGD, PSI-SGD and sphere SGD, from the original and the rescaled start.

A miniature of the experiment of Yi, Meng, Chen, Ma (arXiv 2101.02916). A small CNN with
BatchNorm (3 conv-BN-ReLU layers, global average pooling, a linear head) is trained on the
8×8 digits by

* **SGD**: ``torch.optim.SGD`` with momentum 0.9;
* **PSI-SGD**: :class:`~manifold_opt.PSISGD` (momentum 0.9), which finds the BN-preceded
  weights from the gradient by itself;
* **sphere SGD**: Cho & Lee's Riemannian approach to BN (NeurIPS 2017) in its plain form:
  the BN-preceded weights declared ``ManifoldParameter(w, Sphere(batch_dims=1))`` (each
  filter on the unit sphere), :class:`~manifold_opt.RiemannianSGD` with momentum 0.9 (their
  separate learning rate and gradient clipping for the sphere parameters are left out);

each from the original initialization and from the BN-preceded weights multiplied by 10
(the same function). Every run decays its learning rate to 0 by a cosine over the
training steps (a ``LambdaLR`` scheduler, which also exercises PSI-SGD's scheduler support);
a last section repeats SGD and PSI-SGD at constant learning rates. The learning rate of
each method is picked from a small sweep on a validation split of the training set (from
the original start); the methods are also compared at equal learning rates. A CNN without
BatchNorm is the control: there is nothing scale invariant in it, so PSI-SGD must be plain
SGD there.

Also measured: per-layer row norms and angular steps (the "effective step size", the angle
between a filter before and after a step) and the optimizer step time.

Run: ``python -m benchmarks.psi [--quick]``. Writes ``benchmarks/results/psi.md`` (or
``psi_quick.md``) and ``benchmarks/results/psi_curves*.png``, ``psi_layers*.png``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from manifold_opt import PSI, PSISGD, ManifoldParameter, RiemannianSGD, Sphere
from manifold_opt.optim import find_psi_weights

from .common import digits, markdown_table, mean_std, progress, save_figure, time_call, topic_parser, write_results

METHODS = ("SGD", "PSI-SGD", "sphere SGD")
STARTS = {"original": 1.0, "rescaled ×10": 10.0}
MOMENTUM = 0.9
BATCH = 64


# ------------------------------------------------------------------ model and data
def make_model(seed: int, batchnorm: bool = True, eps: float = 1e-5) -> nn.Sequential:
    torch.manual_seed(seed)

    def norm(channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels, eps=eps) if batchnorm else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        norm(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        norm(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor


def load(split_seed: int, validation: bool) -> Data:
    """Digits as (N, 1, 8, 8); with ``validation`` the last 20% of a shuffled training set is held out."""
    x_train, y_train, x_test, y_test = digits(split_seed)
    x_train, x_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)
    if not validation:
        return Data(x_train, y_train, x_test, y_test)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(order))
    return Data(x_train[order[:cut]], y_train[order[:cut]], x_train[order[cut:]], y_train[order[cut:]])


# ------------------------------------------------------------------ one run
@dataclass
class Run:
    method: str
    start: str
    lr: float
    seed: int
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    # per invariant layer, per epoch: mean row norm at the end, mean angular step (radians) over the epoch
    norms: dict[str, list[float]] = field(default_factory=dict)
    angles: dict[str, list[float]] = field(default_factory=dict)


def build(
    method: str,
    scale: float,
    lr: float,
    seed: int,
    batchnorm: bool = True,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-5,
) -> tuple[nn.Module, torch.optim.Optimizer, list[str]]:
    model = make_model(seed, batchnorm, eps).to(dtype)
    invariant = list(find_psi_weights(model))
    with torch.no_grad():
        for name in invariant:
            model.get_parameter(name).mul_(scale)
    if method == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    elif method == "PSI-SGD":
        opt = PSISGD(model.named_parameters(), lr=lr, momentum=MOMENTUM)
    elif method == "sphere SGD":
        for name in invariant:
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            setattr(module, attribute, ManifoldParameter(getattr(module, attribute), Sphere(batch_dims=1)))
        opt = RiemannianSGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    else:
        raise ValueError(f"unknown method {method!r}")
    return model, opt, invariant


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    model.train()
    return float(functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train(
    method: str,
    start: str,
    lr: float,
    seed: int,
    data: Data,
    epochs: int,
    batchnorm: bool = True,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-5,
    cosine: bool = True,
) -> Run:
    """One training run, with a cosine learning-rate decay to 0 over all steps (stepped each
    step) or, with ``cosine=False``, a constant learning rate."""
    model, opt, invariant = build(method, STARTS[start], lr, seed, batchnorm, dtype, eps)
    steps_per_epoch = math.ceil(len(data.x_train) / BATCH)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0
    )
    data = Data(*(t.to(dtype) if t.is_floating_point() else t for t in vars(data).values()))
    run = Run(method, start, lr, seed, norms={n: [] for n in invariant}, angles={n: [] for n in invariant})
    psi = PSI()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train), generator=generator)
        losses, angles = [], {n: [] for n in invariant}
        for begin in range(0, len(order), BATCH):
            batch = order[begin : begin + BATCH]
            before = {n: model.get_parameter(n).detach().flatten(1).clone() for n in invariant}
            opt.zero_grad()
            loss = functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            for name in invariant:
                angles[name].append(float(psi.dist(before[name], model.get_parameter(name).detach().flatten(1)).mean()))
        test_loss, test_acc = evaluate(model, data.x_eval, data.y_eval)
        run.train_loss.append(statistics.fmean(losses))
        run.test_loss.append(test_loss)
        run.test_acc.append(test_acc)
        for name in invariant:
            run.norms[name].append(float(model.get_parameter(name).detach().flatten(1).norm(dim=1).mean()))
            run.angles[name].append(statistics.fmean(angles[name]))
    return run


# ------------------------------------------------------------------ summaries
def seeds_cell(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"diverged ({len(values) - len(finite)}/{len(values)})"
    return mean_std(values, 4)


def final(runs: list[Run], key: Callable[[Run], float]) -> str:
    return seeds_cell([key(r) for r in runs])


def select(runs: list[Run], **fields: object) -> list[Run]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in fields.items())]


def sweep(lrs: list[float], epochs: int, data: Data) -> tuple[dict[str, float], list[dict[str, object]]]:
    """Validation accuracy of every method × start × lr (seed 0); best lr per method from the original start."""
    rows, best = [], {}
    jobs = [(m, s, lr) for m in METHODS for s in STARTS for lr in lrs]
    results = {}
    for method, start, lr in progress(jobs, "psi sweep"):
        run = train(method, start, lr, 0, data, epochs)
        results[(method, start, lr)] = run.test_acc[-1]
    for method in METHODS:
        row: dict[str, object] = {"method": method}
        for start in STARTS:
            for lr in lrs:
                row[f"{start}, lr {lr:g}"] = results[(method, start, lr)]
        rows.append(row)
        best[method] = max(lrs, key=lambda lr, m=method: (results[(m, "original", lr)], -lr))
    return best, rows


def layer_rows(runs: list[Run]) -> list[dict[str, object]]:
    """Per-layer row norm and angular step, first and last epoch, seed 0."""
    rows = []
    for run in runs:
        for layer in run.norms:
            rows.append(
                {
                    "method": run.method,
                    "start": run.start,
                    "lr": run.lr,
                    "layer": layer,
                    "row norm, epoch 1": run.norms[layer][0],
                    "row norm, last": run.norms[layer][-1],
                    "angular step, epoch 1": run.angles[layer][0],
                    "angular step, last": run.angles[layer][-1],
                }
            )
    return rows


def curves_figure(runs: list[Run], title: str, name: str) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"SGD": "tab:blue", "PSI-SGD": "tab:red", "sphere SGD": "tab:green"}
    styles = {"original": "-", "rescaled ×10": "--"}
    for method in METHODS:
        for start in STARTS:
            chosen = select(runs, method=method, start=start)
            if not chosen:
                continue
            epochs = range(1, len(chosen[0].test_acc) + 1)
            for axis, attribute in zip(axes, ("test_acc", "test_loss")):
                mean = [statistics.fmean(values) for values in zip(*(getattr(r, attribute) for r in chosen))]
                axis.plot(
                    epochs, mean, styles[start], color=colors[method], label=f"{method}, {start} (lr {chosen[0].lr:g})"
                )
    axes[0].set(xlabel="epoch", ylabel="test accuracy", ylim=(0.5, 1.0))
    axes[1].set(xlabel="epoch", ylabel="test loss", yscale="log")
    axes[0].legend(fontsize=7)
    figure.suptitle(title)
    return save_figure(figure, name).name


def layers_figure(runs: list[Run], name: str) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"SGD": "tab:blue", "PSI-SGD": "tab:red", "sphere SGD": "tab:green"}
    styles = {"original": "-", "rescaled ×10": "--"}
    for run in runs:
        for index, layer in enumerate(run.norms):
            label = f"{run.method}, {run.start}" if index == 0 else None
            marker = ["o", "s", "^"][index % 3]
            epochs = range(1, len(run.norms[layer]) + 1)
            style = dict(color=colors[run.method], linestyle=styles[run.start], marker=marker, markersize=3)
            axes[0].plot(epochs, run.norms[layer], label=label, **style)
            axes[1].plot(epochs, run.angles[layer], **style)
    axes[0].set(xlabel="epoch", ylabel="mean row norm (o, s, ^ = conv 1, 2, 3)", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="mean angular step per step (rad)", yscale="log")
    axes[0].legend(fontsize=7)
    figure.suptitle("BN-preceded layers at equal lr: weight norms and effective step sizes")
    return save_figure(figure, name).name


def step_times() -> list[dict[str, object]]:
    """Median optimizer step time on the BN CNN (gradients of one batch, verdicts already final)."""
    data = load(0, validation=False)
    rows = []
    for method in METHODS:
        model, opt, _ = build(method, 1.0, 0.01, 0)
        x, y = data.x_train[:BATCH], data.y_train[:BATCH]
        for _ in range(6):  # past PSISGD's verify_steps
            opt.zero_grad()
            functional.cross_entropy(model(x), y).backward()
            opt.step()
        rows.append({"method": method, "step (µs)": 1e6 * time_call(opt.step)})
    return rows


class Block(nn.Module):
    """A residual block: x + BN(conv(ReLU(BN(conv(x)))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def zoo(seed: int) -> nn.Sequential:
    """Every kind of weight: BN-preceded convs (plain and in residual blocks), a conv with no
    normalization, a conv before a LayerNorm (whose own affine weight is 3-dim), a bias-free
    linear before a LayerNorm, a plain linear and the head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        Block(16),
        Block(16),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, bias=False),
        nn.LayerNorm([32, 2, 2]),
        nn.Flatten(),
        nn.Linear(128, 64, bias=False),
        nn.LayerNorm(64, bias=False),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def detection(seeds: list[int]) -> list[dict[str, object]]:
    """Radial cosines at initialization and PSISGD's verdicts after 6 steps, per weight of :func:`zoo`."""
    import warnings

    from manifold_opt.optim.psi_detection import radial_statistics

    data = load(0, validation=False)
    records: dict[str, dict[str, object]] = {}
    for seed in progress(seeds, "psi detection"):
        model = zoo(seed)
        graph = find_psi_weights(model)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(data.x_train), generator=generator)
        x, y = data.x_train[order[:BATCH]], data.y_train[order[:BATCH]]
        functional.cross_entropy(model(x), y).backward()
        opt = PSISGD(model.named_parameters())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            initial = {n: radial_statistics(p, p.grad).tolist() for n, p in model.named_parameters() if p.dim() >= 2}
            opt.step()
            for step in range(1, 6):
                batch = order[step * BATCH : (step + 1) * BATCH]
                opt.zero_grad()
                functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
                opt.step()
        verdicts = {row["name"]: row["verdict"] for row in opt.invariance_report()}
        demoted = {str(w.message).split("'")[1] for w in caught if "looked scale invariant" in str(w.message)}
        for name, (max_cos, _, _, tensor_cos) in initial.items():
            record = records.setdefault(
                name,
                {
                    "weight": name,
                    "shape": "×".join(map(str, model.get_parameter(name).shape)),
                    "graph": {1: "rows", 0: "whole tensor"}.get(graph[name].batch_dims, "") if name in graph else "—",
                    "row cos": [],
                    "tensor cos": [],
                    "psi": 0,
                    "demoted": 0,
                },
            )
            record["row cos"].append(max_cos)
            record["tensor cos"].append(tensor_cos)
            record["psi"] += verdicts[name] == "psi"
            record["demoted"] += name in demoted
    rows = []
    for record in records.values():
        rows.append(
            {
                "weight": record["weight"],
                "shape": record["shape"],
                "graph walk": record["graph"],
                "largest row cosine at init (min–max over seeds)": f"{min(record['row cos']):.2g} – "
                f"{max(record['row cos']):.2g}",
                "whole-tensor cosine (min–max)": f"{min(record['tensor cos']):.2g} – {max(record['tensor cos']):.2g}",
                "PSISGD verdict psi": f"{record['psi']}/{len(seeds)}",
                "demoted": f"{record['demoted']}/{len(seeds)}",
            }
        )
    return rows


def equivalence(best: dict[str, float], epochs: int, data: Data, runs: list[Run]) -> list[dict[str, object]]:
    """Loss gaps between the two equivalent starts, float32 (eps 1e-5: the seed-0 runs of ``runs``)
    and float64 (eps 1e-12: run here)."""
    rows = []
    jobs = [(dtype, eps, m) for dtype, eps in ((torch.float32, 1e-5), (torch.float64, 1e-12)) for m in METHODS]
    for dtype, eps, method in progress(jobs, "psi equivalence"):
        if dtype == torch.float32:
            a = select(runs, method=method, start="original", lr=best[method], seed=0)[0]
            b = select(runs, method=method, start="rescaled ×10", lr=best[method], seed=0)[0]
        else:
            a = train(method, "original", best[method], 0, data, epochs, dtype=dtype, eps=eps)
            b = train(method, "rescaled ×10", best[method], 0, data, epochs, dtype=dtype, eps=eps)
        train_gaps = [abs(x - y) for x, y in zip(a.train_loss, b.train_loss)]
        test_gaps = [abs(x - y) for x, y in zip(a.test_loss, b.test_loss)]
        above = [epoch + 1 for epoch, gap in enumerate(train_gaps) if gap > 1e-3]
        rows.append(
            {
                "method": method,
                "dtype": str(dtype).removeprefix("torch."),
                "BN eps": eps,
                "lr": best[method],
                "largest train-loss gap": max(train_gaps),
                "first epoch with train gap > 1e-3": above[0] if above else "none",
                "test-loss gap, epoch 1": test_gaps[0],
                "test-loss gap, last epoch": test_gaps[-1],
                "final accuracy (original / rescaled)": f"{a.test_acc[-1]:.4f} / {b.test_acc[-1]:.4f}",
            }
        )
    return rows


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = topic_parser("psi", __doc__)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs and learning rates (~2 min)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        seeds, epochs, lrs, equal_lrs = [0], 8, [0.01, 0.03, 0.1], [0.03, 0.1]
    else:
        seeds, epochs, lrs, equal_lrs = [0, 1, 2, 3, 4], 15, [0.003, 0.01, 0.03, 0.1, 0.3], [0.03, 0.1]
    suffix = "_quick" if args.quick else ""
    command = "python -m benchmarks.psi" + (" --quick" if args.quick else "")

    best, sweep_rows = sweep(lrs, epochs, load(0, validation=True))
    data = load(0, validation=False)
    jobs = [(m, s, best[m], seed) for m in METHODS for s in STARTS for seed in seeds]
    jobs += [(m, s, lr, seed) for lr in equal_lrs for m in METHODS for s in STARTS for seed in seeds if lr != best[m]]
    runs = [train(m, s, lr, seed, data, epochs) for m, s, lr, seed in progress(jobs, "psi runs")]
    control = [
        train(m, "original", best["SGD"], seed, data, epochs, batchnorm=False)
        for m, seed in progress([(m, s) for m in ("SGD", "PSI-SGD") for s in seeds], "psi control")
    ]

    def table(lr_of: Callable[[str], float], pool: list[Run] = runs, methods: tuple[str, ...] = METHODS) -> str:
        rows = []
        for method in methods:
            for start in STARTS:
                chosen = select(pool, method=method, start=start, lr=lr_of(method))
                rows.append(
                    {
                        "method": method,
                        "start": start,
                        "lr": lr_of(method),
                        "test accuracy": final(chosen, lambda r: r.test_acc[-1]),
                        "test loss": final(chosen, lambda r: r.test_loss[-1]),
                        "best-epoch accuracy": final(chosen, lambda r: max(r.test_acc)),
                    }
                )
        return markdown_table(rows)

    def per_epoch(lr_of: Callable[[str], float]) -> str:
        rows = []
        for method in METHODS:
            for start in STARTS:
                chosen = select(runs, method=method, start=start, lr=lr_of(method))
                row: dict[str, object] = {"method": method, "start": start}
                for epoch in range(epochs):
                    acc = statistics.fmean(r.test_acc[epoch] for r in chosen)
                    loss = statistics.fmean(r.test_loss[epoch] for r in chosen)
                    row[f"ep {epoch + 1}"] = f"{acc:.3f} / {loss:.3f}"
                rows.append(row)
        return markdown_table(rows)

    equivalence_rows = equivalence(best, epochs, data, runs)
    detection_rows = detection(seeds)
    constant_jobs = [
        (m, s, lr, seed) for m in ("SGD", "PSI-SGD") for lr in equal_lrs for s in STARTS for seed in seeds[:3]
    ]
    constant = [
        train(m, s, lr, seed, data, epochs, cosine=False) for m, s, lr, seed in progress(constant_jobs, "psi constant")
    ]
    control_rows = []
    for method in ("SGD", "PSI-SGD"):
        chosen = [r for r in control if r.method == method]
        control_rows.append(
            {
                "method": method,
                "lr": best["SGD"],
                "test accuracy": final(chosen, lambda r: r.test_acc[-1]),
                "test loss": final(chosen, lambda r: r.test_loss[-1]),
            }
        )
    control_identical = all(
        a.test_loss == b.test_loss
        for a, b in zip([r for r in control if r.method == "SGD"], [r for r in control if r.method == "PSI-SGD"])
    )

    equal_lr = equal_lrs[-1]
    figures = [
        curves_figure(
            [r for m in METHODS for r in select(runs, method=m, lr=best[m])],
            "each method at its own best lr (mean over seeds)",
            f"psi_curves{suffix}",
        ),
        curves_figure(
            [r for m in METHODS for r in select(runs, method=m, lr=equal_lr)],
            f"all methods at lr {equal_lr:g} (mean over seeds)",
            f"psi_curves_lr{equal_lr:g}{suffix}",
        ),
        layers_figure(
            [r for r in select(runs, lr=equal_lr, seed=0) if r.method != "sphere SGD"], f"psi_layers{suffix}"
        ),
    ]
    notes = (
        f"Digits 8×8 (1347 train / 450 test), CNN 1→16→32→64 channels with BatchNorm, batch {BATCH}, "
        f"{epochs} epochs ({epochs * math.ceil(1347 / BATCH)} steps), momentum {MOMENTUM} for every method, "
        "learning rate decayed to 0 by a cosine over the steps (except in the constant-lr section), "
        f"seeds {seeds}. 'rescaled ×10': the three BN-preceded conv weights multiplied by 10 (the same "
        f"function). Learning rates swept: {lrs}; best by validation accuracy (20% of the training set, seed 0, "
        f"original start): " + ", ".join(f"{m} {best[m]:g}" for m in METHODS) + "."
    )
    sections = [
        notes,
        "## Each method at its own best learning rate\n\nFinal-epoch test accuracy and loss, mean ± std over "
        "seeds.\n\n" + table(lambda m: best[m]),
        f"## All methods at lr {equal_lr:g}\n\n" + table(lambda m: equal_lr),
        *(
            [f"## All methods at lr {lr:g}\n\n" + table(lambda m, lr=lr: lr) for lr in equal_lrs[:-1]]
            if len(equal_lrs) > 1
            else []
        ),
        "## Constant learning rate (no schedule)\n\nThe same runs without the cosine decay (seeds "
        f"{seeds[:3]}): PSI-SGD's angular step stays at about η‖∇L(θ̂)‖/(1 − μ), while SGD's shrinks as the "
        "filter norms grow.\n\n"
        + "\n\n".join(table(lambda m, lr=lr: lr, constant, ("SGD", "PSI-SGD")) for lr in equal_lrs),
        "## Equivalent starts\n\nThe original and the rescaled start compute the same function. Train-loss gap "
        "= |mean training loss over an epoch, original − rescaled ×10| (training mode: BN uses batch statistics); "
        "test-loss gap = the same for the test loss after an epoch (evaluation mode: BN uses its running "
        "statistics, which start at mean 0 and variance 1 for both starts, so they are not rescaled with the "
        "weights and the two evaluation-mode networks differ until the start values decay, 0.9 per step). Seed 0, "
        "each method at its best lr, in float32 with BN's default eps 1e-5 and in float64 with eps 1e-12 (where the "
        "invariance is exact to rounding). Sphere SGD projects both starts onto the same unit rows (up to one "
        "rounding).\n\n" + markdown_table(equivalence_rows),
        "## Per-epoch test accuracy / loss at the best learning rates (mean over seeds)\n\n"
        + per_epoch(lambda m: best[m]),
        f"## Per-epoch test accuracy / loss at lr {equal_lr:g} (mean over seeds)\n\n" + per_epoch(lambda m: equal_lr),
        f"## Weight norms and effective step sizes (lr {equal_lr:g}, seed 0)\n\nMean row norm of each BN-preceded "
        "weight at the end of epoch 1 and of the last epoch, and the mean angle (radians) between a row before "
        "and after one step, over epoch 1 and over the last epoch.\n\n"
        + markdown_table(layer_rows(select(runs, lr=equal_lr, seed=0))),
        "## Control: CNN without BatchNorm (nothing scale invariant)\n\nPSI-SGD detects no invariant weight and "
        "steps every parameter as torch.optim.SGD: the per-epoch losses of the two are "
        + ("bit-identical" if control_identical else "NOT identical")
        + ".\n\n"
        + markdown_table(control_rows),
        "## Detection\n\nA network with every kind of weight (`zoo()`: BN-preceded convs, residual blocks, "
        "a conv with no normalization, a bias-free conv and linear before LayerNorms, the LayerNorm's 3-dim "
        "affine weight, plain linears, the head), float32, BN/LN eps 1e-5, digits batches of 64. Per weight: "
        "what the graph walk (`find_psi_weights`) says, the largest row radial cosine and the whole-tensor "
        "cosine of the first gradient (min – max over the seeds), and in how many seeds `PSISGD` (tolerance "
        "1e-3) held the weight as PSI after 6 steps, and demoted it on the way.\n\n" + markdown_table(detection_rows),
        "## Learning-rate sweep (validation accuracy, seed 0)\n\n" + markdown_table(sweep_rows),
        "## Optimizer step time (BN CNN, 1 thread)\n\n" + markdown_table(step_times()),
        "Plots: " + ", ".join(f"`{f}`" for f in figures) + ".",
    ]
    path = write_results(f"psi{suffix}", "PSI-SGD on sklearn digits", sections, command)
    print(path)


if __name__ == "__main__":
    main()
