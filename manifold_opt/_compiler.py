"""``torch.compiler.disable`` on methods, applied when their class is first instantiated.

``torch.compiler.disable`` imports ``torch._dynamo`` (about a second) when it is called, so
a method decorated with it at class definition makes ``import manifold_opt`` that much
slower. :func:`compiler_disable` only marks the method; :func:`apply_compiler_disable`,
called by the constructor, replaces the marked methods of the class and its bases with
``torch.compiler.disable(method)`` once. The replacement is then the same as the decorator
at class definition: under ``torch.compile`` a call is one graph break, and the first
compiled step (never the constructor) already sees the disabled method, so it traces the
same graph as the later ones. (A first eager step imports ``torch._dynamo`` anyway: torch's
optimizers call ``torch._dynamo.graph_break`` around every step.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_MARK = "_manifold_opt_compiler_disable"
_applied: set[type] = set()


def compiler_disable(method: F) -> F:
    """Mark ``method`` for ``torch.compiler.disable`` (applied by :func:`apply_compiler_disable`)."""
    setattr(method, _MARK, True)
    return method


def apply_compiler_disable(cls: type) -> None:
    """Wrap the marked methods of ``cls`` and its bases in ``torch.compiler.disable``, once."""
    if cls in _applied:
        return
    for owner in cls.__mro__:
        for name, value in list(vars(owner).items()):
            # the disabled wrapper copies the mark (functools.wraps) and has _torchdynamo_disable
            if getattr(value, _MARK, False) and not getattr(value, "_torchdynamo_disable", False):
                setattr(owner, name, torch.compiler.disable(value))
    _applied.add(cls)
