"""Scratch buffers that the geometry borrows from one step to the next."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class Workspace:
    """Scratch tensors reused from one step to the next (the optimizers keep one per bucket).

    ``like(name, tensor)`` (or ``empty(name, shape, dtype, device)``) returns a contiguous
    buffer of that shape, dtype and device. One flat buffer is kept per name, dtype and
    device, as large as the largest request so far, and every request is a view of its
    start: buckets of different shapes share it without reallocating, so after the first
    step nothing is allocated (on CPUs a fresh large tensor also costs page faults). A
    buffer belongs to its caller until the same name is asked for again; geometry methods
    take an optional workspace and allocate when given none. Under ``torch.compile`` the
    optimizers pass a disabled one (``enabled=False``): inductor plans memory itself, and
    ``out=`` arguments into reused buffers only get in its way.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        self._views: dict[tuple[Any, ...], Tensor] = {}  # the last views handed out, per shape
        self.enabled = enabled

    def like(self, name: str, tensor: Tensor) -> Tensor | None:
        """A buffer like ``tensor`` (None for a disabled workspace: the caller allocates), in
        its layout when ``tensor`` is the transpose of a contiguous tensor (the tall view of a
        wide point): an elementwise operation between the two layouts runs several times
        slower than within one (10 x 288 x 64 on one CPU thread: 0.14 against 0.02 ms)."""
        if tensor.dim() >= 2 and not tensor.is_contiguous() and tensor.mT.is_contiguous():
            buffer = self.empty(name, tensor.mT.shape, tensor.dtype, tensor.device)
            return None if buffer is None else buffer.mT
        return self.empty(name, tensor.shape, tensor.dtype, tensor.device)

    def empty(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        *,
        on_create: Callable[[Tensor], object] | None = None,
    ) -> Tensor | None:
        """A buffer of this shape, dtype and device (None for a disabled workspace).

        ``on_create`` is called on the buffer when it is handed out for the first time (a new
        view, or a reallocation): a caller that writes only part of a buffer under its own
        name can fill the rest once, there."""
        if not self.enabled:
            return None
        view_key = (name, dtype, device, *shape)
        view = self._views.get(view_key)
        if view is not None:
            return view
        size = math.prod(shape)
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[:3] != key}  # views of the old one
        view = self._views[view_key] = buffer[:size].view(shape)
        if on_create is not None:
            on_create(view)
        return view

    def clear(self) -> None:
        """Drop every buffer (memory is returned; the next step allocates again)."""
        self._buffers.clear()
        self._views.clear()
