"""Shared helpers for the benchmark scripts: data, timing, tables, plots, output files."""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def topic_parser(topic: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks.<topic>``: its name and first docstring line."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{topic}", description=(doc or topic).splitlines()[0])


def digits(seed: int = 0, test_size: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits (1797 images, offline), standardized with training statistics.

    Returns ``x_train, y_train, x_test, y_test`` with images of shape ``(N, 64)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def time_call(function: Callable[[], Any], *, repeats: int = 7, min_seconds: float = 0.05, warmup: int = 2) -> float:
    """Median seconds per call of ``function`` (each repeat loops until ``min_seconds``)."""
    return time_interleaved({"only": function}, repeats=repeats, min_seconds=min_seconds, warmup=warmup)["only"]


def time_interleaved(
    functions: dict[Hashable, Callable[[], Any]], *, repeats: int = 7, min_seconds: float = 0.05, warmup: int = 2
) -> dict[Hashable, float]:
    """Median seconds per call of each function, timed round-robin (one repeat of every
    function, then the next repeat), so that a change of machine speed during the run
    affects all of them alike and their ratios stay meaningful."""
    samples = time_interleaved_samples(functions, repeats=repeats, min_seconds=min_seconds, warmup=warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def time_interleaved_samples(
    functions: dict[Hashable, Callable[[], Any]],
    *,
    repeats: int = 7,
    min_seconds: float = 0.05,
    warmup: int = 2,
    synchronize: Callable[[], Any] | None = None,
) -> dict[Hashable, list[float]]:
    """Seconds per call of each function in every repeat, timed round-robin as in :func:`time_interleaved`.

    ``samples[name][i]`` is repeat ``i`` of ``name``: the mean over as many calls as fill
    ``min_seconds`` (one call when a call takes longer), after ``warmup`` untimed calls. Entry
    ``i`` of every function was measured in the same pass, so per-repeat ratios
    (:func:`median_ratio`) cancel a change of machine speed between passes. ``synchronize``
    (e.g. ``torch.cuda.synchronize``) is called before the clock starts and after the loop,
    before the clock is read.
    """
    sync = synchronize or (lambda: None)
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples: dict[Hashable, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            sync()
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_seconds or count == 0:
                function()
                count += 1
            sync()
            samples[name].append((time.perf_counter() - start) / count)
    return samples


def median_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median over repeats of ``numerators[i] / denominators[i]`` (samples of the same pass)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators against {len(denominators)} denominators")
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def number(x: float) -> str:
    """Three significant digits, without an exponent below a million."""
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """A parameter as the Stiefel manifold and Muon see it: first dimension against the rest."""
    return t.reshape(t.shape[0], -1)


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"mean ± std"`` over seeds (just the value for a single seed)."""
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), columns in the order of ``columns`` or the first row."""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def machine_note() -> str:
    """One line naming the machine and versions, for the top of a results file."""
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}"
    )


def write_results(name: str, title: str, sections: Sequence[str], command: str) -> Path:
    """Write ``benchmarks/results/<name>.md`` with a title, how it was made, and the sections."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    header = f"# {title}\n\nMade by `{command}` on {time.strftime('%Y-%m-%d')} ({machine_note()}).\n"
    path.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    return path


def plot_mean_band(axis: Any, x: Sequence[float], values: torch.Tensor, label: str, **style: Any) -> None:
    """Plot the mean over seeds (rows of ``values``) and shade the min–max band."""
    axis.plot(list(x), values.mean(0), label=label, **style)
    axis.fill_between(list(x), values.min(0).values, values.max(0).values, alpha=0.15)


def save_figure(figure: Any, name: str) -> Path:
    """Save a matplotlib figure as ``benchmarks/results/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def progress(iterable: Iterable[Any], description: str, total: int | None = None) -> Iterable[Any]:
    """A tqdm progress bar on stderr (plain iteration when tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False)
