"""How plain (Euclidean) tensors are stepped: by ``torch.optim``'s own kernels.

The optimizers take torch's ``foreach`` and ``fused`` options and pass them to the
functional forms of ``torch.optim.SGD``/``Adam`` (``torch.optim.sgd.sgd``,
``torch.optim.adam.adam``), so plain tensors get torch's numbers bit for bit for the same
options. The default (both ``None``) is torch's fused kernel where it exists for the
device and dtype, else its multi-tensor (``foreach``) kernel: the fused kernels are the
fastest and skip a step on the device when a gradient is non-finite, with no host read.
Under ``torch.compile`` the default is ``foreach`` (dynamo does not trace fused kernels;
inductor fuses the ``foreach`` ones itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_fused_kernels_supported_devices

IMPLEMENTATIONS = ("fused", "foreach", "single")


def check_implementation_options(foreach: bool | None, fused: bool | None, **unsupported: Any) -> None:
    """Validate torch.optim's implementation keywords (``capturable``/``differentiable`` must be False)."""
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be None, True or False (as in torch.optim), got {value!r}")
    if foreach and fused:
        raise ValueError("fused=True and foreach=True cannot both be set (as in torch.optim); choose one")
    for name, value in unsupported.items():
        if value:
            raise ValueError(
                f"{name}=True is not supported: the optimizers never read the device during a step (what "
                f"capturable buys), and differentiating through a step is not implemented; leave {name}=False"
            )


def fused_supported(params: list[Tensor], kernel: str) -> bool:
    """Whether torch has the fused kernel ``kernel`` (e.g. ``"_fused_adam_"``) for these tensors."""
    if not hasattr(torch, kernel):
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def adam_kernel_options(
    group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]], kernel: str
) -> tuple[str, bool]:
    """The implementation (:func:`plain_implementation`) and ``capturable`` flag for torch's
    Adam-family kernels on these plain tensors, with each ``state["step"]`` moved where that
    kernel keeps it (a checkpoint from another implementation keeps it elsewhere): on the
    device for the fused kernel and, under ``torch.compile``, for torch's capturable
    ``foreach`` form (bias corrections as device tensors); on the host otherwise."""
    implementation = plain_implementation(group, params, kernel)
    capturable = torch.compiler.is_compiling() and implementation == "foreach"
    device = torch.device(params[0].device if implementation == "fused" or capturable else "cpu")
    for state in states:
        if state["step"].device != device:
            state["step"] = state["step"].to(device)
    return implementation, capturable


def plain_implementation(group: dict[str, Any], params: list[Tensor], kernel: str) -> str:
    """``"fused"``, ``"foreach"`` or ``"single"`` for a bucket of plain tensors of ``group``."""
    fused, foreach = group.get("fused"), group.get("foreach")
    if fused:
        return "fused"
    if torch.compiler.is_compiling():
        return "single" if foreach is False else "foreach"  # dynamo does not trace the fused kernels
    if foreach:
        return "foreach"
    if foreach is False:
        return "single"
    if fused is None and fused_supported(params, kernel):
        return "fused"
    return "foreach"
