"""The Python code blocks of the documentation run, so that they cannot rot.

Every fenced code block tagged ``python`` (or ``py``, ``python3``, ``pycon``) of
``README.md`` and of every ``docs/**/*.md`` page is collected; one test per block, named
``<file>:<line>`` after the block's first line of code. The blocks of one file run in
order in one shared namespace (a fresh module per file, ``torch.manual_seed(0)`` first),
so a block may use the names defined by the blocks above it. Running one block alone
(``-k``) first runs the blocks above it in its file. The line numbers of tracebacks are
those of the Markdown file.

Conventions for writing the blocks:

* A block whose first line is the comment ``# doc: no-run`` is only compiled, not run:
  for code that cannot run here (it needs a GPU, several processes, or a file or data set
  that is not shipped). Every other block must run on a CPU in a second or two: use small
  sizes, make the data in the block (``torch.randn``), and keep loops short.
* A block whose first line of code starts with ``>>>`` is a doctest: it runs with
  :mod:`doctest` (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``) and its printed output is
  checked.
* Blocks of other languages (``bash``, ``text``, ...) are not collected, nor are the
  pages of ``docs/api/`` that hold only mkdocstrings directives (``::: name``); their
  docstrings' examples run as the package's doctests.

Every block runs alone, or says which block it continues. A reader copies one block, so
each block that runs is also run alone, in a fresh namespace (:func:`test_code_block_alone`):
it has its own imports and data. A block that needs the names of another block of its page
says so in its first line (after ``>>>`` in a doctest), with one of these markers:

* ``# continues the block above``: the block right above it (which may itself continue
  another) runs first;
* ``# continues the first block of this page``: the page's first block (typically its
  imports) runs first;
* ``# continues the blocks above``: every block above it on the page runs first.

The marker may go on with ``:`` and a note (``# continues the block above: w and b``). The
alone test runs just the blocks the marker names, then the block, so a marker has to be
enough. A block marked ``# doc: no-run`` is only compiled and needs no marker.

``README.md``'s ``make test`` paragraph states no number of tests or duration
(:func:`test_readme_states_no_test_count`): pytest prints both, and a number in the text
goes stale as tests are added.

A block that is known to fail and cannot be fixed here is listed in
:data:`KNOWN_FAILURES` with the reason; it is a strict xfail, so the entry has to go once
the block runs.
"""

from __future__ import annotations

import doctest
import io
import re
import sys
import textwrap
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = "# doc: no-run"
# the markers of a block that continues another (see the module's docstring), and what runs first
CONTINUES = {
    "# continues the block above": "above",
    "# continues the first block of this page": "first",
    "# continues the blocks above": "all",
}
_CONTINUES = re.compile(r"^# continues the (?:block above|first block of this page|blocks above)(?=$|:)")
LANGUAGES = {"python", "py", "python3", "pycon"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its file (relative to the repository), first code line, source."""

    path: str
    line: int  # 1-based line of the block's first line of code
    source: str
    language: str

    @property
    def first_line(self) -> str:
        return self.source.split("\n", 1)[0].strip()

    @property
    def no_run(self) -> bool:
        return self.first_line.removeprefix(">>>").strip() == NO_RUN

    @property
    def continues(self) -> str | None:
        """What the block continues (``above``, ``first``, ``all``), from its first line's marker."""
        line = self.first_line.removeprefix(">>>").strip()
        marker = _CONTINUES.match(line)
        return CONTINUES[marker[0]] if marker else None

    @property
    def is_doctest(self) -> bool:
        code = [line.strip() for line in self.source.splitlines() if line.strip() and line.strip() != NO_RUN]
        return self.language == "pycon" or bool(code and code[0].startswith(">>>"))

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def markdown_files() -> list[Path]:
    """``README.md`` and the pages under ``docs/``, without the mkdocstrings-only API pages."""
    pages = [ROOT / "README.md"]
    for page in sorted((ROOT / "docs").rglob("*.md")):
        if page.is_relative_to(ROOT / "docs" / "api") and only_directives(page.read_text(encoding="utf-8")):
            continue
        pages.append(page)
    return pages


def only_directives(text: str) -> bool:
    """Whether a page has no fenced Python block (an API page of ``::: name`` directives)."""
    return not extract_blocks(text, "page")


def extract_blocks(text: str, path: str) -> list[Block]:
    """The fenced blocks of a Markdown text in one of :data:`LANGUAGES`, in order.

    Fences may be indented (inside a list item): the block is dedented by the fence's
    indentation. A fence closes with the same character, at least as long, and no info.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        language = opening["info"].split()[0].lower().strip("{}.") if opening["info"] else ""
        start = i + 1
        i = start
        while i < len(lines):
            closing = _FENCE.match(lines[i])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"]
            ):
                break
            i += 1
        body = [line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[start:i]]
        i += 1  # past the closing fence (or the end of the text: an unclosed fence runs to it)
        if language not in LANGUAGES:
            continue
        leading = next((k for k, line in enumerate(body) if line.strip()), len(body))
        source = textwrap.dedent("\n".join(body[leading:])) + "\n"
        blocks.append(Block(path=path, line=start + leading + 1, source=source, language=language))
    return blocks


def collect_blocks() -> list[Block]:
    blocks = []
    for page in markdown_files():
        relative = page.relative_to(ROOT).as_posix()
        blocks.extend(extract_blocks(page.read_text(encoding="utf-8"), relative))
    return blocks


BLOCKS = collect_blocks()

# Blocks known to fail, in pages this test's author does not edit (README.md and
# docs/design.md are the lead's): (file, a line of the block) -> why. They are xfail
# (strict): once such a block runs, its entry here must go.
KNOWN_FAILURES: dict[tuple[str, str], str] = {
    # e.g. ("README.md", "for x, y in loader:"): "iterates over `loader`, which no block defines",
}


def has_line(block: Block, path: str, line: str) -> bool:
    return block.path == path and line in {code.strip() for code in block.source.splitlines()}


def known_failure(block: Block) -> str | None:
    return next((why for (path, line), why in KNOWN_FAILURES.items() if has_line(block, path, line)), None)


def block_params() -> list:
    params = []
    for block in BLOCKS:
        why = known_failure(block)
        marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


@dataclass
class FileRun:
    """The shared namespace of one Markdown file and how far its blocks have run."""

    module: types.ModuleType
    done: int = 0
    failed: list[str] = field(default_factory=list)


_RUNS: dict[str, FileRun] = {}


def file_run(path: str) -> FileRun:
    if path not in _RUNS:
        _RUNS[path] = FileRun(fresh_module(path, "page"))  # classes defined in a block pickle
    return _RUNS[path]


def compile_block(block: Block) -> types.CodeType:
    """Compile with the Markdown file's name and line numbers (for tracebacks)."""
    return compile("\n" * (block.line - 1) + block.source, str(ROOT / block.path), "exec")


def run_doctest(block: Block, namespace: dict) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.source, namespace, block.id, str(ROOT / block.path), block.line - 1)
    if block.no_run:
        for example in test.examples:
            compile(example.source, f"{block.path}:{block.line + example.lineno}", "single")
        return
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=out.write, clear_globs=False)
    if result.failed:
        raise AssertionError(f"doctest failed:\n{out.getvalue()}")


def run_block(block: Block, namespace: dict) -> None:
    if block.is_doctest:
        run_doctest(block, namespace)
        return
    code = compile_block(block)
    if not block.no_run:
        exec(code, namespace)


def describe_failure(block: Block, error: BaseException, earlier_failures: list[str]) -> str:
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(ROOT / block.path)]
    where = "".join(traceback.format_list(frames)) if frames else ""
    what = "".join(traceback.format_exception_only(type(error), error))
    message = f"the code block of {block.path} starting at line {block.line} failed:\n{where}{what}"
    if earlier_failures:
        message += f"(earlier blocks of this file failed too, at {', '.join(earlier_failures)})\n"
    return message


def test_blocks_are_collected() -> None:
    paths = {block.path for block in BLOCKS}
    assert "README.md" in paths
    assert any(path.startswith("docs/") for path in paths)
    for path, line in KNOWN_FAILURES:  # an entry whose block was edited away must go too
        assert any(has_line(block, path, line) for block in BLOCKS), (path, line)


def fresh_module(path: str, label: str) -> types.ModuleType:
    """A new module for blocks of ``path`` (registered, so that their classes pickle), seed 0."""
    name = f"docs_block_{label}_" + re.sub(r"\W", "_", path)
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / path)
    sys.modules[name] = module
    import torch

    torch.manual_seed(0)
    return module


def prerequisites(block: Block) -> list[Block]:
    """The blocks that run before ``block`` when it runs alone, in order: what its marker names."""
    page = [other for other in BLOCKS if other.path == block.path]
    index = page.index(block)
    if block.continues is None:
        return []
    assert index > 0, f"{block.id}: the first block of a page continues nothing ({block.first_line!r})"
    if block.continues == "all":
        return page[:index]
    target = page[index - 1] if block.continues == "above" else page[0]
    return [*prerequisites(target), target]


def test_continuation_markers_are_known() -> None:
    """A first line that starts like a marker is one of the markers (a typo runs nothing)."""
    for block in BLOCKS:
        line = block.first_line.removeprefix(">>>").strip()
        if line.lower().startswith("# continue"):
            assert block.continues is not None, (
                f"{block.id}: {line!r} is not one of the markers {sorted(CONTINUES)} (then ':' and a note)"
            )
            assert block.source.split("\n", 1)[0].strip().removeprefix(">>>").strip() == line


def alone_params() -> list:
    return [param for param in block_params() if not param.values[0].no_run]


@pytest.mark.parametrize("block", alone_params())
def test_code_block_alone(block: Block) -> None:
    """The block runs in a fresh namespace, after only the blocks its marker names (if any)."""
    namespace = fresh_module(block.path, f"alone_{block.line}").__dict__
    for earlier in prerequisites(block):
        try:
            run_block(earlier, namespace)
        except Exception as error:
            pytest.fail(f"the block {earlier.id}, which {block.id} continues, failed:\n{error!r}", pytrace=False)
    try:
        run_block(block, namespace)
    except Exception as error:
        message = describe_failure(block, error, [])
        if block.continues is None:
            message += (
                "Run alone, in a fresh namespace, the block fails: give it its own imports and data, or "
                "start it with a marker that says which block it continues, e.g. '# continues the block "
                "above' (see the docstring of tests/test_docs_code_blocks.py).\n"
            )
        else:
            message += f"Its marker {block.first_line!r} does not name every block it needs.\n"
        pytest.fail(message, pytrace=False)


def test_readme_states_no_test_count() -> None:
    """The README's ``make test`` paragraph gives no number of tests or duration (they go stale)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraphs = [part for part in re.split(r"\n\s*\n", text) if "`make test` runs" in part]
    assert paragraphs, "README.md has no paragraph on what `make test` runs"
    for paragraph in paragraphs:
        stale = re.findall(
            r"\b\d[\d,]*\s+tests\b|\b(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten)\s+minutes\b", paragraph
        )
        assert not stale, f"README.md's `make test` paragraph states {stale}: pytest prints the count and the time"


@pytest.mark.parametrize("block", block_params())
def test_code_block(block: Block) -> None:
    run = file_run(block.path)
    blocks = [other for other in BLOCKS if other.path == block.path]
    index = blocks.index(block)
    failure = None
    while run.done <= index:
        current = blocks[run.done]
        run.done += 1
        try:
            run_block(current, run.module.__dict__)
        except Exception as error:
            if current is block:
                failure = describe_failure(block, error, list(run.failed))
            # else an earlier block, run because this one was selected alone: its own test reports it
            run.failed.append(str(current.line))
    if failure is not None:
        pytest.fail(failure, pytrace=False)
    if str(block.line) in run.failed:
        pytest.fail(f"the code block of {block.path} starting at line {block.line} failed (see above)", pytrace=False)
