"""The built documentation site stands on its own: it renders without the network.

The site is built once (``mkdocs build --strict`` into a temporary folder, a few seconds)
and inspected:

* no page loads a script, a style sheet (or a font, an icon, ...) from another host, and
  no style sheet of the site imports one: wherever the reader's browser cannot reach a CDN
  the pages still render, math included;
* MathJax is part of the site (``javascripts/mathjax/``, published by the hook
  ``docs/_ext/mathjax_assets.py`` from the ``docs`` extra's ``django-static-mathjax``):
  every page with math loads the configuration and then the site's own copy, and the
  files MathJax loads on demand (its fonts, the TeX extensions) are there;
* every script and style sheet a page loads exists in the site;
* the site's style sheet ``stylesheets/extra.css`` wraps the long lines of code blocks
  (the rest of a wrapped line indented under the line, by the hook
  ``docs/_ext/code_lines.py``) and keeps identifiers in table cells whole (the theme breaks
  them mid-word), and comes after the theme's;
* where a Chromium is installed, a page with math is opened headless from the files (no
  server, no network) and its math has been typeset by MathJax.

The tests need the ``docs`` extra (mkdocs and the theme): without it they are skipped.
With the environment variable ``MANIFOLD_OPT_DOCS_SITE`` set to a built site (CI sets it to
``site`` after ``make docs``), that site is inspected instead of building one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE_VARIABLE = "MANIFOLD_OPT_DOCS_SITE"
MATHJAX_CONFIG = "javascripts/mathjax.js"
MATHJAX = "javascripts/mathjax/tex-mml-chtml.js"
EXTRA_CSS = "stylesheets/extra.css"
# <link rel=...> that make the browser fetch something (not canonical, alternate, ...)
LOADING_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "preconnect", "dns-prefetch", "icon", "manifest"}
MATH_PAGE = "concepts/index.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site: ``$MANIFOLD_OPT_DOCS_SITE``, or a fresh strict build."""
    given = os.environ.get(SITE_VARIABLE)
    if given:
        folder = Path(given)
        if not folder.is_absolute():
            folder = ROOT / folder
        assert (folder / "index.html").is_file(), f"{SITE_VARIABLE}={given}: no built site there"
        return folder
    pytest.importorskip("mkdocs", reason="building the site needs the docs extra (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="building the site needs the docs extra (mkdocs-material)")
    folder = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return folder


class _Loads(HTMLParser):
    """What a page loads: ``(tag, rel, url)`` of every ``<script src>`` and loading ``<link>``."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str, str]] = []
        self.math = 0  # elements of class arithmatex (math left for MathJax)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if "arithmatex" in attributes.get("class", "").split():
            self.math += 1
        if tag == "script" and attributes.get("src"):
            self.loads.append(("script", "", attributes["src"]))
        elif tag == "link" and attributes.get("href"):
            rels = set(attributes.get("rel", "").lower().split())
            for rel in sorted(rels & LOADING_RELS):
                self.loads.append(("link", rel, attributes["href"]))


def parse(page: Path) -> _Loads:
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def pages(site: Path) -> list[Path]:
    found = sorted(site.rglob("*.html"))
    assert len(found) > 10, f"too few pages in {site}"
    return found


def is_external(url: str) -> bool:
    """A URL on another host (``https://...``, ``//host/...``); ``data:`` is inline."""
    parts = urlsplit(url.strip())
    return bool(parts.netloc) or parts.scheme.lower() not in {"", "data"}


def local_file(site: Path, page: Path, url: str) -> Path:
    """The file of the site that a page's local URL names."""
    path = urlsplit(url).path
    base = site if path.startswith("/") else page.parent
    return (base / path.lstrip("/")).resolve()


def test_no_page_loads_from_another_host(site: Path) -> None:
    external = [
        f"{page.relative_to(site)}: <{tag}{' rel=' + rel if rel else ''}> {url}"
        for page in pages(site)
        for tag, rel, url in parse(page).loads
        if is_external(url)
    ]
    assert not external, "pages load from another host:\n" + "\n".join(external)


def test_no_style_sheet_imports_from_another_host(site: Path) -> None:
    reference = re.compile(r"""@import\s+(?:url\()?\s*["']?([^"')\s;]+)|url\(\s*["']?([^"')\s]+)""")
    external = [
        f"{sheet.relative_to(site)}: {url}"
        for sheet in sorted(site.rglob("*.css"))
        for match in reference.finditer(sheet.read_text(encoding="utf-8", errors="replace"))
        for url in match.groups()
        if url and is_external(url)
    ]
    assert not external, "style sheets load from another host:\n" + "\n".join(external)


def test_every_script_and_style_sheet_is_in_the_site(site: Path) -> None:
    missing = [
        f"{page.relative_to(site)}: {url}"
        for page in pages(site)
        for tag, rel, url in parse(page).loads
        if not is_external(url) and not urlsplit(url).scheme and not local_file(site, page, url).is_file()
    ]
    assert not missing, "pages load files the site does not have:\n" + "\n".join(missing)


def test_mathjax_is_in_the_site(site: Path) -> None:
    mathjax = site / "javascripts" / "mathjax"
    assert (site / MATHJAX).is_file()
    assert (site / MATHJAX_CONFIG).is_file()
    assert re.search(r'VERSION="3\.\d+\.\d+"', (site / MATHJAX).read_text(encoding="utf-8")), "not MathJax 3"
    fonts = list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert len(fonts) > 10, "the CommonHTML output's fonts are missing"
    for component in ("input/tex/extensions/ams.js", "input/tex/extensions/boldsymbol.js", "ui/menu.js"):
        assert (mathjax / component).is_file(), component


def test_pages_with_math_load_the_local_mathjax(site: Path) -> None:
    with_math = 0
    for page in pages(site):
        parsed = parse(page)
        if not parsed.math:
            continue
        with_math += 1
        scripts = [local_file(site, page, url) for tag, _, url in parsed.loads if tag == "script"]
        config, mathjax = (site / MATHJAX_CONFIG).resolve(), (site / MATHJAX).resolve()
        where = page.relative_to(site)
        assert mathjax in scripts, f"{where} has math but does not load {MATHJAX}"
        assert config in scripts, f"{where} has math but does not load {MATHJAX_CONFIG}"
        assert scripts.index(config) < scripts.index(mathjax), f"{where}: the configuration must come first"
    assert with_math >= 3, "expected several pages with math"
    assert parse(site / MATH_PAGE).math > 0, f"{MATH_PAGE} has no math any more: pick another page here"


def _rules(css: str) -> dict[str, str]:
    """``{selector: declarations}`` of a flat style sheet (no nesting), comments removed."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        for selector in selectors.split(","):
            key = re.sub(r"\s+", " ", re.sub(r"\s*>\s*", " > ", selector)).strip()
            rules[key] = rules.get(key, "") + body
    return rules


def _declares(body: str, prop: str, value: str) -> bool:
    return re.search(rf"(^|;|\s){re.escape(prop)}\s*:\s*{re.escape(value)}\s*(;|$)", body.strip()) is not None


def test_code_blocks_wrap_and_table_identifiers_stay_whole(site: Path) -> None:
    rules = _rules((site / EXTRA_CSS).read_text(encoding="utf-8"))
    code_block = rules.get(".md-typeset pre > code", "")
    assert _declares(code_block, "white-space", "pre-wrap"), "code blocks must wrap long lines"
    for cell in (".md-typeset td code", ".md-typeset th code"):
        assert _declares(rules.get(cell, ""), "word-break", "normal"), f"{cell}: identifiers break mid-word"
        assert _declares(rules.get(cell, ""), "overflow-wrap", "normal"), f"{cell}: identifiers break mid-word"
    lines = _rules((site / EXTRA_CSS).read_text(encoding="utf-8")).get('.md-typeset pre > code > span[id^="__span-"]')
    assert lines and "var(--indent" in lines, "a wrapped code line must continue under its own indentation"
    # the hook docs/_ext/code_lines.py marks the indentation of each code line
    assert re.search(r'<span id="__span-[0-9-]+" style="--indent:4ch">', (site / MATH_PAGE).read_text(encoding="utf-8"))
    for page in pages(site):
        sheets = [local_file(site, page, url) for _, rel, url in parse(page).loads if rel == "stylesheet"]
        if not any(sheet.name.startswith("main.") for sheet in sheets):
            continue  # not a page of the theme
        names = [sheet.name for sheet in sheets]
        assert (site / EXTRA_CSS).resolve() in sheets, f"{page.relative_to(site)} does not load {EXTRA_CSS}"
        assert names.index("extra.css") > max(i for i, n in enumerate(names) if n.startswith("main.")), (
            f"{page.relative_to(site)}: {EXTRA_CSS} must come after the theme's style sheet"
        )


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def test_math_renders_offline_in_chromium(site: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium) to open a page headless")
    page = site / MATH_PAGE
    expected = parse(page).math
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert "</html>" in dom, f"Chromium gave no page:\n{result.stderr[-2000:]}"
    typeset = dom.count("<mjx-container")
    assert typeset >= expected, f"MathJax typeset {typeset} of the {expected} formulas of {MATH_PAGE}"
    assert "<mjx-merror" not in dom, "MathJax reported a TeX error"
