"""The how-to scripts of ``examples/`` run in quick mode and print what they claim.

Each script runs in a subprocess (``sys.executable``, from the repository root) with
``--quick``; the test checks its exit code, that it printed no warning, and the numbers
that show the point of the example. ``examples/digits_stiefel.py`` has no quick mode and
is left out.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 180  # about 10 s each on an idle core; generous for a shared machine


def run_example(script: str, *arguments: str) -> str:
    """Run ``examples/<script> --quick <arguments>`` and return its standard output."""
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / script), "--quick", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, f"{script} exited with {result.returncode}:\n{result.stderr}"
    assert "Warning" not in result.stderr, f"{script} warned:\n{result.stderr}"
    return result.stdout


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``text``, as lists of ``{header: cell}`` rows."""
    tables, lines = [], text.splitlines()
    for index, line in enumerate(lines[:-1]):
        if line.startswith("| ") and lines[index + 1].startswith("|---"):
            headers = [cell.strip() for cell in line.strip("|").split("|")]
            rows = []
            for row_line in lines[index + 2 :]:
                if not row_line.startswith("|"):
                    break
                cells = [cell.strip() for cell in row_line.strip("|").split("|")]
                assert len(cells) == len(headers), f"malformed row {row_line!r} under {headers}"
                rows.append(dict(zip(headers, cells)))
            tables.append(rows)
    return tables


def spectra_tables(text: str) -> dict[str, dict[str, dict[str, str]]]:
    """The ``spectra_table`` blocks of ``text``: title line -> layer -> column -> cell."""
    blocks, lines = {}, text.splitlines()
    for index, line in enumerate(lines[1:], start=1):
        if line.split()[:1] == ["layer"]:
            headers = line.split()[1:]
            layers = {}
            for row_line in lines[index + 1 :]:
                if not row_line.strip():
                    break
                name, *cells = row_line.split()
                layers[name] = dict(zip(headers, cells))
            blocks[lines[index - 1]] = layers
    return blocks


def test_orthogonal_rnn_stays_orthogonal_under_riemannian_adam() -> None:
    (rows,) = markdown_tables(run_example("orthogonal_rnn.py"))
    by_method = {row["method"]: row for row in rows}
    constrained = by_method["RiemannianAdam, W_hh on Stiefel"]
    unconstrained = by_method["Adam, unconstrained"]
    assert float(constrained["max abs(WᵀW − I)"]) < 1e-4
    # the same start (orthogonal) drifts away without the constraint
    assert float(unconstrained["max abs(WᵀW − I)"]) > 1e-3
    for row in rows:
        assert math.isfinite(float(row["test loss"])) and math.isfinite(float(row["final train loss"]))
        assert 0.0 <= float(row["recall accuracy"]) <= 1.0


def test_bn_cnn_psisgd_detects_the_batchnorm_fed_convs() -> None:
    accuracies, report = markdown_tables(run_example("bn_cnn_psisgd.py"))
    verdicts = {row["parameter"]: row["verdict"] for row in report}
    assert sum(verdict == "psi" for verdict in verdicts.values()) >= 1
    assert [verdicts[name] for name in ("0.weight", "3.weight", "6.weight")] == ["psi"] * 3  # the convs before BN
    assert verdicts["11.weight"] == "euclidean"  # the head feeds no normalization
    assert all(verdicts[row["parameter"]] == "euclidean" for row in report if "×" not in row["shape"])  # 1-dim
    accuracy = {(row["optimizer"], row["conv weights at start"]): float(row["test accuracy"]) for row in accuracies}
    assert len(accuracy) == 4 and all(value > 0.2 for value in accuracy.values())  # above chance (0.1)
    # PSISGD's training does not depend on the scale of the invariant weights
    assert abs(accuracy["PSISGD", "×1"] - accuracy["PSISGD", "×10"]) <= 0.05


def test_oni_and_weight_conditioning_shape_the_spectra() -> None:
    output = run_example("oni_and_weight_conditioning.py")
    blocks = spectra_tables(output)
    plain, oni, conditioned = (blocks[title] for title in sorted(blocks, key=output.index))
    for layer in ("2.weight", "4.weight"):  # the reparametrized inner convs
        # ONI: nearly a multiple of an orthonormal matrix (the gain is learned per output)
        assert float(oni[layer]["kappa"]) < 1.3 and float(oni[layer]["scaled.err"]) < 0.2
        assert float(plain[layer]["kappa"]) > 2.0
        # unit-norm rows of a wide matrix: the mean of σ² is 1, so σ_min <= 1 <= σ_max
        assert float(conditioned[layer]["sigma_min"]) <= 1.0 <= float(conditioned[layer]["sigma_max"])
    (rows,) = markdown_tables(output)
    assert [row["model"] for row in rows] == ["plain", "ONI (T=5)", "weight conditioning (row)"]
    assert all(0.0 <= float(row["test accuracy"]) <= 1.0 for row in rows)


def test_oialr_resumed_run_matches_the_uninterrupted_one(tmp_path: Path) -> None:
    checkpoint = tmp_path / "oialr.pt"
    output = run_example("oialr_checkpoint_resume.py", "--checkpoint", str(checkpoint))
    assert checkpoint.is_file()
    difference = re.search(r"max abs difference of parameters and buffers, resumed vs uninterrupted: (\S+)", output)
    assert difference is not None and float(difference.group(1)) <= 1e-6
    assert "ranks equal: True" in output and "histories equal: True" in output
    (rows,) = markdown_tables(output)
    assert rows[0]["final ranks"] == rows[1]["final ranks"]
    ranks = [tuple(map(int, pair)) for pair in re.findall(r"(\d+)/(\d+)", rows[0]["final ranks"])]
    assert ranks and any(rank < full for rank, full in ranks)  # OIALR did cut a rank before the end


def test_monitor_spectra_reports_a_stiefel_layer_at_unit_singular_values() -> None:
    (rows,) = markdown_tables(run_example("monitor_spectra.py"))
    stiefel = [row for row in rows if row["layer"] == "stiefel.weight"]
    plain = [row for row in rows if row["layer"] == "plain.weight"]
    assert len(stiefel) == len(plain) >= 2 and stiefel[0]["step"] == "0"
    for row in stiefel:
        assert float(row["orthogonality error"]) < 1e-4
        assert abs(float(row["σ_min"]) - 1) < 1e-4 and abs(float(row["σ_max"]) - 1) < 1e-4
    assert float(plain[-1]["orthogonality error"]) > 1e-2
