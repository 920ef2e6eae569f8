"""The wheel as a user gets it (``make wheel-check``, run by CI).

Builds the wheel with ``pip wheel . --no-deps``, checks what it holds (the package with
``py.typed``, the LICENSE in its metadata, the version of ``manifold_opt.__version__``, no
tests, benchmarks, examples or docs, no geoopt requirement), installs it with ``--no-deps``
into a fresh virtual environment that has only torch and numpy, and runs a smoke script
there: import (warnings are errors), ``py.typed`` installed, a few steps of each optimizer.

    python .ci/wheel_check.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import email.parser
import re
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the Makefile's pin (the CPU build on disk)

SMOKE = textwrap.dedent(
    """
    import importlib.metadata
    import importlib.util
    import sys
    import warnings
    from pathlib import Path

    import torch

    warnings.simplefilter("error")  # import manifold_opt warns about nothing
    import manifold_opt
    from manifold_opt import PSISGD, ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel

    package = Path(manifold_opt.__file__).parent
    assert "site-packages" in package.parts, f"imported from {package}, not from the installed wheel"
    assert (package / "py.typed").is_file(), "py.typed is not installed"
    assert importlib.metadata.version("manifold_opt") == manifold_opt.__version__
    assert importlib.util.find_spec("geoopt") is None, "geoopt should not be installed here"
    heavy = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor", "sklearn", "geoopt"))]
    assert not heavy, f"import manifold_opt imported {heavy[:5]}"

    torch.manual_seed(0)
    for make in (
        lambda ps: RiemannianSGD(ps, lr=0.1, momentum=0.9),
        lambda ps: RiemannianAdam(ps, lr=0.05),
        lambda ps: PSISGD(ps, lr=0.1),
    ):
        w = ManifoldParameter(torch.randn(8, 4), Stiefel())
        s = ManifoldParameter(torch.randn(3, 5), Sphere(batch_dims=1))
        b = torch.nn.Parameter(torch.zeros(4))
        opt = make([w, s, b])
        target = torch.randn(8, 4)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = ((w + b - target) ** 2).sum() + (s.sum(1) - 1).pow(2).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        gram = w.detach().mT @ w.detach()
        assert torch.allclose(gram, torch.eye(4), atol=1e-5), gram
        assert torch.allclose(s.detach().norm(dim=1), torch.ones(3), atol=1e-5)
        assert losses[-1] < losses[0], (type(opt).__name__, losses)
    print(f"manifold_opt {manifold_opt.__version__} from the wheel: import, py.typed, 3 optimizers: ok")
    """
)


def run(*args: str | Path, cwd: Path | None = None) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True, cwd=cwd)


def version_in_source() -> str:
    text = (ROOT / "manifold_opt" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE).group(1)


def check_contents(wheel: Path) -> None:
    """What the wheel holds: the package with py.typed, LICENSE in its metadata, nothing else."""
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    problems = []
    if "manifold_opt/__init__.py" not in names or "manifold_opt/py.typed" not in names:
        problems.append("manifold_opt/__init__.py or manifold_opt/py.typed missing")
    if f"{info}/licenses/LICENSE" not in names:
        problems.append(f"{info}/licenses/LICENSE missing")
    strays = [n for n in names if n.split("/")[0] not in ("manifold_opt", info)]
    if strays:  # tests, benchmarks, examples, docs, ...
        problems.append(f"files outside the package: {strays[:5]}")
    metadata = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode())
    if metadata["Version"] != version_in_source():
        problems.append(f"version {metadata['Version']} != __version__ {version_in_source()}")
    if metadata["License-Expression"] != "MIT" or metadata.get_all("License-File") != ["LICENSE"]:
        problems.append(f"license metadata: {metadata['License-Expression']!r}, {metadata.get_all('License-File')}")
    required = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
    if any(r.startswith("geoopt") for r in required):
        problems.append(f"geoopt is required: {required}")
    if problems:
        sys.exit(f"{wheel.name}: " + "; ".join(problems))
    print(f"{wheel.name}: {len(names)} files, py.typed, licenses/LICENSE, requires {required}: ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work in this directory (kept) instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="wheel-check-") as temporary:
        work = args.keep or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        run(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--quiet", "--wheel-dir", work / "dist")
        (wheel,) = (work / "dist").glob("manifold_opt-*.whl")
        check_contents(wheel)
        venv = work / "venv"
        run(sys.executable, "-m", "venv", "--clear", venv)
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "--quiet", TORCH, "numpy")
        run(python, "-m", "pip", "install", "--quiet", "--no-deps", wheel)
        (work / "smoke.py").write_text(SMOKE)
        run(python, "-I", work / "smoke.py", cwd=work)  # -I: nothing from the repository on sys.path


if __name__ == "__main__":
    main()
