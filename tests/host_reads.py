"""Count host reads during an optimizer step: the GPU-readiness proxy of the test suite.

A read is an operator that brings a tensor's value to the host (``aten._local_scalar_dense``
behind ``.item()``/``float()``/``bool()``, ``nonzero`` and the other data-dependent-shape
operators) applied to a value derived from a parameter, a gradient or an optimizer state
tensor. Derivation is tracked through every operator run while the mode is active. Step
counters are left out (torch.optim keeps them on the host and reads them), so that
``torch.optim.Adam`` counts 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

READ_OPERATORS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "nonzero_static",
        "argwhere",
        "masked_select",
        "masked_scatter",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "_linalg_check_errors",
    }
)


class HostReads(TorchDispatchMode):
    """Records the read operators applied to values derived from ``sources``."""

    def __init__(self, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self._alive = list(sources)  # keeps ids unique while the mode is active
        self._derived = {id(t) for t in sources}
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        derived = any(id(t) in self._derived for t in inputs)
        if derived and func.overloadpacket.__name__ in READ_OPERATORS:
            self.reads.append(func.overloadpacket.__name__)
        out = func(*args, **kwargs)
        if derived:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._derived.add(id(tensor))
                    self._alive.append(tensor)
        return out


def optimizer_sources(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, gradients and state tensors of an optimizer (step counters excepted)."""
    sources = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            sources.append(param)
            if param.grad is not None:
                sources.append(param.grad)
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and key != "step":
                    sources.append(value)
    return sources


def reads_during_step(optimizer: torch.optim.Optimizer) -> list[str]:
    """Run ``optimizer.step()`` and return the host reads it made."""
    mode = HostReads(optimizer_sources(optimizer))
    with mode:
        optimizer.step()
    return mode.reads
