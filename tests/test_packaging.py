"""The package as it is installed: its files and metadata, what ``import manifold_opt`` costs,
and the package without geoopt (an optional dependency, the extra ``manifold_opt[geoopt]``).

The import checks run in fresh interpreters (``sys.executable``), where nothing else of the
test session is imported yet."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import manifold_opt

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
# each of the first two, and DTensor's sympy, adds most of a second to the import
HEAVY = ("torch._dynamo", "torch._inductor", "torch.distributed.tensor", "sympy", "sklearn", "geoopt")
INSTALL_HINT = "pip install manifold_opt[geoopt]"


def python(*code: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the blocks of ``code`` in a fresh interpreter from the repository root; fail with its output."""
    result = subprocess.run(
        [sys.executable, *flags, "-c", "".join(textwrap.dedent(block) for block in code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ----------------------------------------------------------------------- import


def test_import_loads_no_compiler_sklearn_or_geoopt() -> None:
    """``import manifold_opt`` leaves torch's compiler stack (about a second to import:
    ``torch.compiler.disable`` imports it), DTensor (sympy), scikit-learn and geoopt
    unimported, and warns about nothing."""
    result = python(
        f"""
        import sys
        import manifold_opt
        print("\\n".join(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))
        """,
        flags=("-W", "error"),
    )
    assert result.stdout.split() == [], result.stdout
    assert result.stderr == ""


def test_psisgd_applies_compiler_disable_when_constructed() -> None:
    """The graph break of PSI-SGD's host-side preparation under ``torch.compile`` (counted by
    test_accelerator_readiness) is applied lazily: by the constructor, before any step."""
    python(
        """
        import sys
        import torch
        from manifold_opt import PSISGD

        assert not getattr(PSISGD._prepare_step, "_torchdynamo_disable", False)
        assert "torch._dynamo" not in sys.modules
        PSISGD([torch.nn.Parameter(torch.ones(3))])
        assert PSISGD._prepare_step._torchdynamo_disable
        first = PSISGD._prepare_step
        PSISGD([torch.nn.Parameter(torch.ones(3))])
        assert PSISGD._prepare_step is first  # wrapped once
        """
    )


# ------------------------------------------------------------------- no geoopt

# geoopt hidden from the interpreter: importing it fails as if it were not installed
HIDE_GEOOPT = """
    import sys

    class HideGeoopt:
        def find_spec(self, name, path=None, target=None):
            if name == "geoopt" or name.startswith("geoopt."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, HideGeoopt())
    """


def test_everything_but_the_geoopt_interop_works_without_geoopt() -> None:
    result = python(
        HIDE_GEOOPT,
        """
        import importlib
        import pkgutil

        import torch

        import manifold_opt
        from manifold_opt import PSISGD, ManifoldParameter, RiemannianAdam, RiemannianSGD, Sphere, Stiefel
        from manifold_opt.manifolds import from_geoopt, is_geoopt_manifold

        try:
            import geoopt
        except ImportError:
            pass
        else:
            raise AssertionError("geoopt is not hidden")

        # every module of the package imports
        for module in pkgutil.walk_packages(manifold_opt.__path__, "manifold_opt."):
            importlib.import_module(module.name)
        assert not [m for m in sys.modules if m.startswith("geoopt")]

        # a model with a Stiefel layer and a head of unit rows trains with each optimizer
        torch.manual_seed(0)
        x = torch.randn(64, 12)
        y = (x[:, :4].sum(1) > 0).long()
        for make in (
            lambda ps: RiemannianSGD(ps, lr=0.1, momentum=0.9),
            lambda ps: RiemannianAdam(ps, lr=0.02),
            lambda ps: PSISGD(ps, lr=0.1),
        ):
            torch.manual_seed(1)
            hidden, head = torch.nn.Linear(12, 8), torch.nn.Linear(8, 2, bias=False)
            hidden.weight = ManifoldParameter(hidden.weight, Stiefel())
            head.weight = ManifoldParameter(head.weight, Sphere(batch_dims=1))
            model = torch.nn.Sequential(hidden, torch.nn.Tanh(), head)
            opt = make(model.parameters())
            losses = []
            for _ in range(30):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(4 * model(x), y)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            assert losses[-1] < 0.9 * losses[0], (type(opt).__name__, losses[0], losses[-1])
            w = hidden.weight.detach()
            assert torch.allclose(w @ w.mT, torch.eye(8), atol=1e-5)  # wide: orthonormal rows
            assert torch.allclose(head.weight.detach().norm(dim=1), torch.ones(2), atol=1e-5)

        # the one geoopt-only entry point says how to get geoopt
        assert not is_geoopt_manifold(Stiefel())
        try:
            from_geoopt(object(), 2)
        except ImportError as error:
            print(error)
        else:
            raise AssertionError("from_geoopt without geoopt did not raise")
        """,
        flags=("-W", "error"),
    )
    assert INSTALL_HINT in result.stdout, result.stdout
    assert result.stderr == ""


def test_geoopt_is_an_extra_not_a_dependency() -> None:
    project = pyproject()["project"]
    assert not [d for d in project["dependencies"] if d.startswith("geoopt")]
    extras = project["optional-dependencies"]
    for extra in ("geoopt", "test", "bench"):  # the tests and benchmarks compare against geoopt
        assert [d for d in extras[extra] if d.startswith("geoopt")], extra


@pytest.mark.skipif(importlib.util.find_spec("geoopt") is None, reason="geoopt is not installed")
def test_with_geoopt_the_interop_maps_geoopts_manifolds() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import geoopt

    from manifold_opt.manifolds import from_geoopt

    assert from_geoopt(geoopt.EuclideanStiefel(), 2) == manifold_opt.Stiefel(retraction="qr")


# -------------------------------------------------------------- files, metadata


def test_version_has_one_source() -> None:
    """pyproject.toml takes the version from ``manifold_opt.__version__`` (hatch), and the
    installed metadata agrees with it."""
    config = pyproject()
    assert "version" not in config["project"]
    assert "version" in config["project"]["dynamic"]
    assert config["tool"]["hatch"]["version"]["path"] == "manifold_opt/__init__.py"
    assert importlib.metadata.version("manifold_opt") == manifold_opt.__version__


def test_license_py_typed_and_changelog() -> None:
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    assert "Copyright (c) 2026 the manifold_opt authors" in license_text
    assert (ROOT / "manifold_opt" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog
    assert f"## {manifold_opt.__version__}" in changelog


def test_wheel_holds_the_package_py_typed_and_license_only(tmp_path: Path) -> None:
    """``pip wheel . --no-deps`` (as ``make wheel-check``, which also installs and runs it in
    a fresh environment), checked by that script's own checks."""
    spec = importlib.util.spec_from_file_location("wheel_check", ROOT / ".ci" / "wheel_check.py")
    wheel_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheel_check)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "--wheel-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("manifold_opt-*.whl")
    wheel_check.check_contents(wheel)  # exits with the problems, if any
