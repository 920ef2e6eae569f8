"""MkDocs hook: publish MathJax with the site, so the math renders without the network.

The math of the pages is left by ``pymdownx.arithmatex`` (generic mode) as ``\\( \\)`` and
``\\[ \\]`` in ``<span class="arithmatex">``; MathJax typesets it in the browser. Instead of
loading MathJax from a CDN (raw TeX wherever the reader's browser cannot reach it), the
site carries its own copy: this hook adds the files of MathJax 3 from the Python package
``django-static-mathjax`` (the ``docs`` extra; it ships MathJax's ``es5`` build as package
data and needs no Django) to the site's files as ``javascripts/mathjax/...`` at build time
(also under ``mkdocs serve``). ``mkdocs.yml`` loads ``javascripts/mathjax/tex-mml-chtml.js``
after the configuration ``javascripts/mathjax.js``.

Only what that entry point uses is published: the combined component itself, the
components it loads on demand (TeX extensions by ``autoload``, the accessibility and menu
components and the speech rule engine's locale maps) and the CommonHTML output's web
fonts; MathJax finds them relative to the entry point's own URL. The other combined
components, the SVG output and the server-side (node) files are left out.

Loaded by ``mkdocs.yml`` (``hooks:``). ``tests/test_docs_site.py`` checks the built site.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DISTRIBUTION = "django-static-mathjax"
PACKAGE_FOLDER = "mathjax/static/mathjax/es5"  # inside the distribution: MathJax's es5 build
SITE_FOLDER = "javascripts/mathjax"
ENTRY = "tex-mml-chtml.js"  # the component mkdocs.yml loads (TeX and MathML in, CommonHTML out)
# folders of the es5 build that the entry point loads from on demand
ON_DEMAND = ("a11y", "input", "output/chtml", "sre", "ui")


def mathjax_folder() -> Path:
    """The ``es5`` folder of the installed MathJax package; a build error when it is missing."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise PluginError(
            f"MathJax is not installed: the documentation needs the Python package {DISTRIBUTION} "
            "(in the 'docs' extra: pip install -e '.[docs]', or make docs)"
        ) from None
    folder = Path(str(distribution.locate_file(PACKAGE_FOLDER)))
    if not (folder / ENTRY).is_file():
        raise PluginError(f"{DISTRIBUTION} {distribution.version} has no {PACKAGE_FOLDER}/{ENTRY}")
    return folder


def mathjax_files() -> list[tuple[str, Path]]:
    """``(path under the es5 folder, file)`` for every file the site publishes, sorted."""
    folder = mathjax_folder()
    paths = [folder / ENTRY]
    for name in ON_DEMAND:
        paths.extend(path for path in (folder / name).rglob("*") if path.is_file())
    license_file = folder.parent / "LICENSE"
    published = [(path.relative_to(folder).as_posix(), path) for path in paths]
    if license_file.is_file():
        published.append(("LICENSE", license_file))
    return sorted(published)


def on_files(files: Files, *, config: MkDocsConfig) -> Files:
    """Add MathJax's files to the site as ``javascripts/mathjax/...``."""
    for relative, path in mathjax_files():
        files.append(File.generated(config, f"{SITE_FOLDER}/{relative}", abs_src_path=str(path)))
    return files
