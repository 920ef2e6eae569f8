"""Griffe extension: render the reStructuredText markup of the docstrings in Markdown.

The library's docstrings are Google style ("Args:", "Returns:", ...) with a few Sphinx
constructs, which mkdocstrings would otherwise print verbatim. Before rendering, each
docstring is rewritten (only in the documentation build; the source is untouched):

* ``:math:`x``` becomes inline math ``\\(x\\)`` and a ``.. math::`` directive a ``$$``
  block, both rendered by ``pymdownx.arithmatex``;
* ``.. code-block:: lang`` becomes a fenced code block, and so do doctest lines
  (``>>>``, without their ``# doctest:`` flags);
* ``:func:``, ``:class:``, ``:meth:``, ``:attr:``, ``:mod:``, ``:data:``, ``:exc:`` and
  ``:obj:`` roles become cross-references, resolved in the scope of the documented
  object like Sphinx does (``~`` shows the last component only). A reference to an object
  that is not rendered anywhere (a private helper, torch) is shown as code, without a
  link and without a warning.

Two more adjustments keep the strict build free of false warnings:

* a class that defines ``__new__`` and no ``__init__`` (``ManifoldParameter``) gets its
  constructor signature from ``__new__``, so its "Args:" are checked against it;
* an "Args:" entry that documents several parameters at once (``foreach, fused: ...``) is
  rendered as written, without Griffe's "does not appear in the function signature" and
  "no type" warnings for the grouped name (every name of the group must be a parameter).

Loaded by ``mkdocs.yml`` (``plugins: mkdocstrings: handlers: python: options:
extensions``).
"""

from __future__ import annotations

import logging
import re
import textwrap
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|mod|data|exc|obj):`([^`]+)`")
_DOCTEST_FLAG = re.compile(r"\s*#\s*doctest:.*$")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. (?P<name>math|code-block|code)::[ \t]*(?P<argument>\S*)[ \t]*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _convert_directives(text: str) -> str:
    """``.. math::`` -> ``$$`` block, ``.. code-block:: lang`` -> fenced block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(">>>"):
            i = _fence_doctest(lines, i, out)
            continue
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        i += 1
        body: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            i -= 1  # keep the blank lines after the block
            body.pop()
        content = textwrap.dedent("\n".join(body)).strip("\n").split("\n")
        if match["name"] == "math":
            opening, closing = "$$", "$$"
        else:
            opening, closing = f"```{match['argument']}", "```"
        _separate(out, len(indent))
        out.append(indent + opening)
        out.extend(indent + line if line.strip() else "" for line in content)
        out.append(indent + closing)
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


def _separate(out: list[str], indent: int) -> None:
    """A blank line before a block that follows text of its paragraph.

    None after a less indented line: that is a section title ("Example:") or an "Args:"
    entry, whose content must follow it directly.
    """
    if out and out[-1].strip() and _indent_of(out[-1]) >= indent:
        out.append("")


def _fence_doctest(lines: list[str], i: int, out: list[str]) -> int:
    """Fence the doctest lines from ``lines[i]`` to the next blank line as ``pycon``.

    An "Example:" section is an admonition for Griffe (only "Examples:" is parsed as
    code), whose ``>>>`` lines Markdown would show as nested quotes.
    """
    indent = lines[i][: _indent_of(lines[i])]
    _separate(out, len(indent))
    out.append(indent + "```pycon")
    while i < len(lines) and lines[i].strip():
        line = _DOCTEST_FLAG.sub("", lines[i]).rstrip()
        out.append(indent + line[len(indent) :] if line.startswith(indent) else line)
        i += 1
    out.append(indent + "```")
    return i


def _lookup(collection: Any, path: str) -> griffe.Object | griffe.Alias | None:
    try:
        return collection[path]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _final_path(collection: Any, obj: griffe.Object | griffe.Alias) -> str | None:
    """The path of the object an alias finally points to (aliases are not resolved yet)."""
    seen: set[str] = set()
    while isinstance(obj, griffe.Alias):
        target = obj.target_path
        if target in seen:
            return None
        seen.add(target)
        found = _lookup(collection, target)
        if found is None:
            return None
        obj = found
    return obj.path


def _resolve(collection: Any, scope: griffe.Object, name: str, role: str) -> str | None:
    """Resolve ``name`` as Sphinx would: in the object's scope, its parents', then absolute."""
    candidates: list[str] = []
    current: griffe.Object | None = scope
    while current is not None:
        candidates.append(f"{current.path}.{name}")
        current = current.parent
    candidates.append(name)
    for candidate in candidates:
        found = _lookup(collection, candidate)
        if found is None:
            continue
        path = _final_path(collection, found)
        if path is None:
            return None
        if role != "mod" and isinstance(found, griffe.Module):
            # ``from .oni import oni`` in a package: Griffe keeps the submodule under the
            # name; the function or class of that name inside it is the one meant
            inner = _lookup(collection, f"{path}.{name.rsplit('.', 1)[-1]}")
            return None if inner is None else _final_path(collection, inner)
        return path
    return None


def _convert_roles(text: str, collection: Any, scope: griffe.Object) -> str:
    text = _MATH_ROLE.sub(lambda m: f"\\({m[1]}\\)", text)

    def xref(match: re.Match[str]) -> str:
        role, target = match[1], match[2].strip()
        short = target.startswith("~")
        target = target.lstrip("~").lstrip(".")
        display = target.rsplit(".", 1)[-1] if short else target
        if role in {"func", "meth"}:
            display += "()"
        path = _resolve(collection, scope, target, role)
        if path is None:
            return f"`{display}`"
        return f'<autoref identifier="{path}" optional>`{display}`</autoref>'

    return _XREF_ROLE.sub(xref, text)


def _constructor_from_new(cls: griffe.Class) -> None:
    """Give a class with ``__new__`` and no ``__init__`` the signature of its ``__new__``."""
    new = cls.members.get("__new__")
    if "__init__" in cls.members or not isinstance(new, griffe.Function):
        return
    parameters = list(new.parameters)
    if not parameters:
        return
    init = griffe.Function(
        "__init__",
        lineno=new.lineno,
        endlineno=new.endlineno,
        parameters=griffe.Parameters(griffe.Parameter("self", kind=parameters[0].kind), *parameters[1:]),
        returns="None",
    )
    cls.set_member("__init__", init)


_GROUPED_PARAMETER = re.compile(r"(?P<file>[^\s:]+):\d+: .*parameter '(?P<names>[^']*,[^']*)'", re.IGNORECASE)


class _GroupedParameters(logging.Filter):
    """Drop Griffe's warnings about an "Args:" entry ``a, b: ...`` whose names all exist.

    The names must all be parameters of one function of the file the warning is about.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signatures: dict[str, list[set[str]]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        match = _GROUPED_PARAMETER.search(record.getMessage())
        if match is None:
            return True
        names = {name.strip() for name in match["names"].split(",")}
        return not any(names <= known for known in self.signatures.get(match["file"], []))


_FILTER = _GroupedParameters()
for _name in ("griffe", "mkdocs.plugins.griffe"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _GroupedParameters) for f in _logger.filters):
        _logger.addFilter(_FILTER)


class RstRoles(griffe.Extension):
    """Rewrite the Sphinx roles and directives of every docstring of a package."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        collection = loader.modules_collection
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if isinstance(obj, griffe.Class):
                _constructor_from_new(obj)
            if isinstance(obj, griffe.Function):
                known = _FILTER.signatures.setdefault(str(obj.relative_filepath), [])
                known.append({parameter.name for parameter in obj.parameters})
            if obj.docstring is not None:
                obj.docstring.value = _convert_roles(_convert_directives(obj.docstring.value), collection, obj)
            stack.extend(member for member in obj.members.values() if not member.is_alias)
