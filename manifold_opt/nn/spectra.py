"""Per-layer singular-value reports, and the matrix view of a layer's weight.

A weight of shape ``(out, *rest)`` is the matrix ``(out, prod(rest))`` (a conv kernel's
``(in, kh, kw)`` flatten into one row); a transposed convolution's weight
``(in, out, *kernel)`` has its output axis at dimension 1 and is viewed as
``(out, in * prod(kernel))``. The reparametrizations of this package (:func:`oni`,
:func:`weight_conditioning`) and :func:`layer_spectra` all use this view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def output_axis(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that indexes output units: 1 for transposed convolutions, else 0.

    Raises:
        ValueError: for a grouped transposed convolution, whose output units are not one axis.
    """
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if module.groups != 1:
            raise ValueError(
                f"{type(module).__name__} with groups={module.groups} is not supported: its weight's dimension 1 "
                "indexes output channels within a group, not output units; use groups=1"
            )
        return 1
    return 0


def weight_as_matrix(weight: Tensor, axis: int = 0) -> Tensor:
    """View a weight ``(..., out at axis, ...)`` as the matrix ``(out, rest)`` (copies only when ``axis != 0``).

    Shapes: ``weight (d0, d1, ...)`` -> ``(d_axis, numel / d_axis)``.
    """
    if weight.dim() < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    if axis:
        weight = weight.movedim(axis, 0)
    return weight.reshape(weight.shape[0], -1)


def matrix_as_weight(matrix: Tensor, shape: Sequence[int], axis: int = 0) -> Tensor:
    """Inverse of :func:`weight_as_matrix`: back to the weight ``shape``."""
    shape = tuple(shape)
    if axis:
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
        return matrix.reshape(moved).movedim(0, axis)
    return matrix.reshape(shape)


def checked_weight(module: nn.Module, name: str, function: str) -> Tensor:
    """The tensor ``module.<name>``, checked to be a weight matrix (shared by the reparametrizations)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{function}() needs an nn.Module, got {type(module).__name__}")
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"{type(module).__name__} has no tensor attribute {name!r}; pass name=<the weight's attribute name>"
        )
    if weight.dim() < 2:
        raise ValueError(
            f"{function}() needs a weight of at least 2 dimensions (out, in, ...), got {name} of shape "
            f"{tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"{function}() needs a floating-point weight, got {name} of dtype {weight.dtype}")
    return weight


@dataclass(frozen=True)
class LayerSpectrum:
    r"""Singular-value summary of one weight matrix.

    Attributes:
        shape: the matrix view ``(out, in)`` of the weight.
        sigma_min: smallest of the ``min(out, in)`` singular values.
        sigma_max: largest singular value (the spectral norm).
        kappa: condition number :math:`\sigma_{\max}/\sigma_{\min}` (``inf`` when singular).
        orthogonality_error: :math:`\|W^\top W - I\|_2` on the short side, i.e.
            :math:`\max_i |\sigma_i^2 - 1|`: 0 for orthonormal rows (or columns).
        scaled_orthogonality_error: the same after the best global rescaling,
            :math:`\min_c \max_i |\sigma_i^2/c^2 - 1|
            = (\sigma_{\max}^2 - \sigma_{\min}^2)/(\sigma_{\max}^2 + \sigma_{\min}^2)`:
            0 for a multiple of an orthonormal matrix (e.g. ONI with a uniform gain).
    """

    shape: tuple[int, int]
    sigma_min: float
    sigma_max: float
    kappa: float
    orthogonality_error: float
    scaled_orthogonality_error: float

    @classmethod
    def of(cls, matrix: Tensor) -> LayerSpectrum:
        """The summary of one matrix (computed in at least float32, without gradients)."""
        with torch.no_grad():
            dtype = torch.promote_types(matrix.dtype, torch.float32)
            s = torch.linalg.svdvals(matrix.detach().to(dtype))
            top, bottom = float(s[0]), float(s[-1])
            squares = s * s
            orthogonality = float((squares - 1).abs().max())
        total = top * top + bottom * bottom
        return cls(
            shape=(matrix.shape[0], matrix.shape[1]),
            sigma_min=bottom,
            sigma_max=top,
            kappa=top / bottom if bottom > 0 else math.inf,
            orthogonality_error=orthogonality,
            scaled_orthogonality_error=(top * top - bottom * bottom) / total if total > 0 else 0.0,
        )


def layer_spectra(model: nn.Module) -> dict[str, LayerSpectrum]:
    """Singular-value summary of every layer weight of ``model``, for monitoring during training.

    Every submodule with a tensor ``weight`` of at least 2 dimensions is reported (Linear,
    Conv, ConvTranspose, ...), keyed by its qualified name plus ``".weight"``; the weight
    is the one the layer uses in its forward pass (after any parametrization such as
    :func:`~manifold_opt.nn.oni`), viewed as a matrix by :func:`weight_as_matrix`.
    One ``svdvals`` per layer.

    Args:
        model: any module.

    Returns:
        ``{name: LayerSpectrum}`` in the order of ``model.named_modules()``.

    Example:
        >>> import torch
        >>> from manifold_opt.nn import layer_spectra, oni
        >>> model = torch.nn.Sequential(oni(torch.nn.Linear(32, 16), iterations=7), torch.nn.Linear(16, 4))
        >>> report = layer_spectra(model)
        >>> list(report)
        ['0.weight', '1.weight']
        >>> report["0.weight"].kappa < 1.01  # ONI with T = 7: nearly orthogonal
        True
    """
    report = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() < 2:
            continue
        key = f"{name}.weight" if name else "weight"
        report[key] = LayerSpectrum.of(weight_as_matrix(weight, output_axis(module)))
    return report


def spectra_table(report: dict[str, LayerSpectrum]) -> str:
    """A plain-text table of a :func:`layer_spectra` report, one line per layer.

    Example:
        >>> import torch
        >>> from manifold_opt.nn import layer_spectra, spectra_table
        >>> print(spectra_table(layer_spectra(torch.nn.Linear(3, 2))).splitlines()[0])
        layer       shape  sigma_min  sigma_max      kappa   orth.err scaled.err
    """
    width = max([5, *(len(name) for name in report)])
    columns = ("shape", "sigma_min", "sigma_max", "kappa", "orth.err", "scaled.err")
    lines = [f"{'layer':<{width}}" + "".join(f" {column:>10}" for column in columns)]
    for name, spectrum in report.items():
        cells = (
            f"{spectrum.shape[0]}x{spectrum.shape[1]}",
            f"{spectrum.sigma_min:.4g}",
            f"{spectrum.sigma_max:.4g}",
            f"{spectrum.kappa:.4g}",
            f"{spectrum.orthogonality_error:.3g}",
            f"{spectrum.scaled_orthogonality_error:.3g}",
        )
        lines.append(f"{name:<{width}}" + "".join(f" {cell:>10}" for cell in cells))
    return "\n".join(lines)
