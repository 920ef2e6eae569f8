"""MkDocs hook: a wrapped line of a code block continues under its own indentation.

The site's style sheet (``docs/stylesheets/extra.css``) wraps the long lines of code
blocks instead of hiding them behind a scrollbar. So that the rest of a wrapped line does
not read as a line of its own, it continues with a hanging indent: four columns deeper than
the line's own indentation. ``pymdownx.highlight`` (``line_spans: __span`` in
``mkdocs.yml``) puts each line of a block in a ``<span id="__span-B-L">``; this hook gives
each line that starts with spaces its indentation as a CSS variable
(``style="--indent:8ch"``), which the style sheet adds to the hanging indent. The text of the
lines is not changed (the copy button copies the same code).

Loaded by ``mkdocs.yml`` (``hooks:``).
"""

from __future__ import annotations

import re

# a line's span, then its leading spaces: bare, or in a whitespace token of the lexer
_LINE = re.compile(r'<span id="(__span-[0-9-]+)">((?:<span class="w">)?)( +)')


def indent_lines(html: str) -> str:
    """Add ``style="--indent:Nch"`` to the line spans of code blocks that start with N spaces."""
    return _LINE.sub(
        lambda line: f'<span id="{line[1]}" style="--indent:{len(line[3])}ch">{line[2]}{line[3]}',
        html,
    )


def on_page_content(html: str, **kwargs: object) -> str:
    """Mark the indentation of every code line of the page (see :func:`indent_lines`)."""
    return indent_lines(html)
