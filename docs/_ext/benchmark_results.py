"""MkDocs hook: publish the benchmark plots of ``benchmarks/results/`` with the site.

The plots are written by ``python -m benchmarks`` into ``benchmarks/results/``, outside
``docs_dir``. Instead of committing copies under ``docs/``, this hook adds every PNG of
that folder to the site's files as ``benchmark-results/<name>.png`` at build time (also
under ``mkdocs serve``), so ``docs/benchmarks.md`` links them as
``benchmark-results/<name>.png`` and the strict build checks those links like any other:
a plot that is gone is a warning, hence a failed build. The plots of quick runs
(``*_quick*``, not committed) are left out.

Loaded by ``mkdocs.yml`` (``hooks:``).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SITE_FOLDER = "benchmark-results"


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    """Add ``benchmarks/results/*.png`` (not the quick runs') as ``benchmark-results/*.png``."""
    for plot in sorted(RESULTS.glob("*.png")):
        if "_quick" in plot.stem:
            continue
        files.append(File.generated(config, f"{SITE_FOLDER}/{plot.name}", abs_src_path=str(plot)))
    return files
