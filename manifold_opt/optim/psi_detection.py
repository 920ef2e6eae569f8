r"""Finding the scale-invariant weights of a network, for :class:`~manifold_opt.PSISGD`.

Two independent ways, documented in ``docs/psi.md``:

* **From the gradient** (:func:`radial_statistics`, used by ``PSISGD`` on undeclared
  parameters): for a group with :math:`L(c\theta) = L(\theta)`, Euler's identity gives
  :math:`\langle \nabla L(\theta), \theta\rangle = 0`, so the radial cosine
  :math:`|\langle g_i, \theta_i\rangle| / (\|g_i\|\|\theta_i\|)` of every row is at the
  level of rounding and of the normalization's ``eps``; for other weights it is of order
  :math:`1/\sqrt{d}`.
* **From the module graph** (:func:`find_psi_weights`, :func:`declare_psi`): a
  ``torch.fx`` trace shows which weights feed a normalization, through which operations,
  and whether a weight is read anywhere else.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from ..manifolds.linalg import unit_and_norm
from ..manifolds.psi import PSI
from ..parameter import ManifoldParameter

# ------------------------------------------------------------------ gradient test


def radial_statistics(weight: Tensor, grad: Tensor, batch_dims: int = 1) -> Tensor:
    r"""Radial cosines of the groups of one parameter, reduced to four numbers.

    For each group (output row when ``batch_dims=1``, the whole tensor when ``0``),
    :math:`\cos_i = |\langle \hat g_i, \hat\theta_i\rangle|`, computed in at least float32
    (float64 parameters stay float64; no float64 is needed, so it runs on devices without it)
    with scale-safe norms. Rows whose gradient is zero carry no evidence and are left out.

    Args:
        weight: the parameter, parameter layout ``(out, *rest)``.
        grad: its gradient, same shape.
        batch_dims: 1 (rows) or 0 (whole tensor).

    Returns:
        A tensor ``[max_cos, determined, zero_groups, tensor_cos]``: the largest
        cosine over the groups with a nonzero gradient, how many such groups there are,
        how many groups are zero (no PSI point), and the cosine of the whole tensor. NaN
        entries mean a non-finite gradient (no evidence).

    Shapes: ``weight, grad (out, *rest)`` -> ``(4,)``.
    """
    groups = weight.shape[0] if batch_dims == 1 else 1
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().reshape(groups, -1).to(dtype)
    g = grad.detach().reshape(groups, -1).to(dtype)
    w_unit, w_norm = unit_and_norm(w)
    g_unit, g_norm = unit_and_norm(g)
    cosines = (w_unit * g_unit).sum(-1).abs()
    determined = (g_norm.squeeze(-1) > 0) & (w_norm.squeeze(-1) > 0)
    max_cos = torch.where(determined, cosines, torch.zeros_like(cosines)).amax()
    tw, _ = unit_and_norm(w.reshape(-1))
    tg, _ = unit_and_norm(g.reshape(-1))
    tensor_cos = (tw * tg).sum().abs()
    finite = torch.isfinite(g_norm).all()
    stats = torch.stack([max_cos, determined.sum().to(dtype), (w_norm == 0).sum().to(dtype), tensor_cos])
    return torch.where(finite, stats, torch.full_like(stats, float("nan")))


def gather_statistics(pairs: Sequence[tuple[Tensor, Tensor, int]]) -> list[list[float]]:
    """:func:`radial_statistics` of many parameters with one host synchronization per device."""
    by_device: dict[torch.device, list[int]] = {}
    for index, (weight, _, _) in enumerate(pairs):
        by_device.setdefault(weight.device, []).append(index)
    results: list[list[float]] = [[] for _ in pairs]
    for indices in by_device.values():
        stacked = torch.stack([radial_statistics(*pairs[i]) for i in indices]).cpu().tolist()
        for i, row in zip(indices, stacked):
            results[i] = row
    return results


# ------------------------------------------------------------------ graph walk

_ROW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # output channels on dim 0 of the weight
_TRANSPOSED_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # on dim 1
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_TENSOR_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)

# Operations f with f(c z) = c f(z) for c > 0 that keep each channel separate. "linear"
# ones also pass a per-channel constant through as a per-channel constant (so a bias
# before them is still cancelled by BatchNorm's mean); the others need a bias-free layer.
_LINEAR_MODULES = (
    nn.Identity,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_LINEAR_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_HOMOGENEOUS_FUNCTIONS = {torch.relu, F.relu, F.leaky_relu, F.dropout, torch.relu_}
_HOMOGENEOUS_METHODS = {"relu", "relu_"}
_RESHAPES = {torch.flatten, torch.reshape, operator.getitem}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous"}


def _follow(node: Any, layer: nn.Module, modules: dict[str, nn.Module]) -> PSI | None:
    """The invariance of ``layer``'s weight from the uses of one of its call nodes, or None."""
    transposed = isinstance(layer, _TRANSPOSED_LAYERS)  # its output channels are dim 1 of the weight
    flattened = False  # an nn.Flatten() keeps every feature inside one channel (fine for BatchNorm)
    reshaped = False  # any other reshape may mix channels inside a normalization group
    needs_no_bias = False  # a nonlinearity or dropout would not pass a bias on as a per-channel constant
    has_bias = getattr(layer, "bias", None) is not None
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    while True:
        if len(node.users) != 1:
            return None  # read by two paths (or unused): one of them may not be normalized
        (node,) = node.users
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, _CHANNEL_NORMS):
            per_feature = flattened and isinstance(module, nn.modules.batchnorm._BatchNorm)
            aligned = not reshaped and (per_feature or (not flattened and module.num_features == out_channels))
            if has_bias and (needs_no_bias or not aligned):
                return None  # the bias is not cancelled by the normalization's mean
            return PSI(batch_dims=1) if aligned and not transposed else PSI(batch_dims=0)
        if isinstance(module, _TENSOR_NORMS):
            return None if has_bias else PSI(batch_dims=0)  # a bias is not scaled: invariance lost
        if isinstance(module, _LINEAR_MODULES) or (node.op == "call_function" and node.target in _LINEAR_FUNCTIONS):
            continue
        if (
            isinstance(module, _HOMOGENEOUS_MODULES)
            or (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCTIONS)
            or (node.op == "call_method" and node.target in _HOMOGENEOUS_METHODS)
        ):
            needs_no_bias = True
            continue
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1 and not flattened:
            flattened = True
            continue
        if isinstance(module, (nn.Flatten, nn.Unflatten)) or (
            (node.op == "call_function" and node.target in _RESHAPES)
            or (node.op == "call_method" and node.target in _RESHAPE_METHODS)
        ):
            reshaped = True
            continue
        return None


def find_psi_weights(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> dict[str, PSI]:
    r"""The weights of ``model`` that are positively scale invariant, by their graph.

    The model is traced with ``torch.fx``. A ``Linear``/``Conv{1,2,3}d`` weight is one
    PSI group per output row when its output flows, through operations that keep channels
    apart and are positively homogeneous (ReLU, LeakyReLU, PReLU, pooling, dropout,
    ``nn.Flatten()``), into a ``BatchNorm``/``InstanceNorm`` over its channels and
    nowhere else; a bias before BatchNorm is cancelled by its mean, except behind a
    nonlinearity or dropout. A bias-free layer feeding a ``LayerNorm``/``GroupNorm``/
    ``RMSNorm`` (also through reshapes), or a ``ConvTranspose`` feeding a BatchNorm, is
    one group for the whole tensor (``PSI(batch_dims=0)``). A weight read by two nodes
    (a shared module, a functional use of ``.weight``, a parameter registered twice) is
    invariant only if every use is.

    Invariance holds in training mode (batch statistics); it is the training dynamics
    that PSI-SGD changes.

    Args:
        model: the network.
        example_inputs: optional inputs for a numerical check: in training mode (buffers
            restored afterwards), each found weight's groups are multiplied by random
            factors in [0.5, 2] and the outputs must not change (relative 1e-3); weights
            that fail are left out with a ``RuntimeWarning``.

    Returns:
        ``{parameter name: PSI manifold}`` (names as in ``model.named_parameters()``).

    Shapes: weights ``(out, *rest)``; ``PSI(batch_dims=1)`` means ``out`` groups of
    ``prod(rest)`` entries, ``PSI(batch_dims=0)`` one group of ``out * prod(rest)``.

    Raises:
        TypeError: if ``torch.fx`` cannot trace the model (data-dependent control flow):
            declare weights by hand with ``ManifoldParameter(w, PSI())`` or let
            :class:`~manifold_opt.PSISGD` detect them from gradients.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from manifold_opt.optim.psi_detection import find_psi_weights
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
        >>> find_psi_weights(net)
        {'0.weight': PSI(batch_dims=1)}
    """
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        raise TypeError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); declare its "
            f"scale-invariant weights by hand with ManifoldParameter(w, PSI()), or let PSISGD detect them "
            f"from the gradient"
        ) from error
    modules = dict(traced.named_modules())
    uses: dict[int, list[PSI | None]] = {}
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            module = modules[node.target]
            verdict = None
            if isinstance(module, _ROW_LAYERS + _TRANSPOSED_LAYERS):
                verdict = _follow(node, module, modules)
            for param in module.parameters(recurse=True):
                uses.setdefault(id(param), []).append(verdict if param is getattr(module, "weight", None) else None)
        elif node.op == "get_attr":
            attribute = traced.get_parameter(node.target) if _is_parameter(traced, node.target) else None
            if attribute is not None:
                uses.setdefault(id(attribute), []).append(None)
    registrations: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        registrations[id(param)] = registrations.get(id(param), 0) + 1
    found: dict[str, PSI] = {}
    params = {id(p): p for p in model.parameters()}
    for key, verdicts in uses.items():
        if not verdicts or any(v is None or v != verdicts[0] for v in verdicts):
            continue
        if registrations.get(key, 0) != 1:
            continue  # registered under two names (tied weights): read by two modules
        manifold = verdicts[0]
        if not _valid_point(params[key], manifold):
            continue
        found[names[key]] = manifold
    if example_inputs is not None and found:
        found = _numerically_invariant(model, found, example_inputs)
    return found


def _is_parameter(module: nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
    except AttributeError:
        return False
    return True


def _valid_point(param: Tensor, manifold: PSI) -> bool:
    """A weight with groups of >= 2 coordinates, none of them zero, in a floating dtype."""
    if not param.is_floating_point():
        return False
    try:
        manifold.point_shape(param.shape)
    except ValueError:
        return False
    return bool((manifold.distance_to_manifold(manifold.to_points(param.detach())) == 0).all())


@torch.no_grad()
def _numerically_invariant(
    model: nn.Module, found: dict[str, PSI], example_inputs: tuple[Any, ...], tolerance: float = 1e-3
) -> dict[str, PSI]:
    """Keep the weights whose random positive rescaling leaves the outputs unchanged."""
    was_training = model.training
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)

    def outputs() -> list[Tensor]:
        result = model(*example_inputs)
        return [leaf.detach().clone() for leaf in _tensors(result)]

    def differs(names: list[str]) -> bool:
        saved = {name: params[name].detach().clone() for name in names}
        for name in names:
            weight = params[name]
            groups = weight.shape[0] if found[name].batch_dims == 1 else 1
            factors = 0.5 * 4 ** torch.rand(groups, generator=generator, dtype=torch.float64)
            shape = (groups,) + (1,) * (weight.dim() - 1) if groups > 1 else ()
            weight.mul_(factors.reshape(shape).to(weight.dtype).to(weight.device))
        try:
            changed = outputs()
        finally:
            for name in names:
                params[name].copy_(saved[name])
        return any(
            float((a - b).abs().max()) > tolerance * max(1.0, float(b.abs().max())) for a, b in zip(changed, reference)
        )

    try:
        model.train()
        reference = outputs()
        if differs(list(found)):
            failed = [name for name in found if differs([name])]
            if failed:
                warnings.warn(
                    f"find_psi_weights: {failed} feed a normalization in the graph but rescaling them changes the "
                    f"outputs on the example inputs; they are left out",
                    RuntimeWarning,
                    stacklevel=3,
                )
            found = {name: m for name, m in found.items() if name not in failed}
    finally:
        model.train(was_training)
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return found


def _tensors(value: Any) -> list[Tensor]:
    """The tensors inside a (nested) output: a tensor, or lists, tuples and dicts of them."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def declare_psi(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> dict[str, PSI]:
    """Replace the scale-invariant weights of ``model`` by ``ManifoldParameter(w, PSI(...))``.

    Finds them with :func:`find_psi_weights` (same arguments). The new parameters hold
    the same values (PSI never normalizes); weights that already are
    ``ManifoldParameter`` on a non-Euclidean manifold are left as they are. Call it
    before building the optimizer: an optimizer built earlier still holds the old tensors.

    Returns:
        ``{name: PSI manifold}`` of the parameters it declared.

    Shapes: as for :func:`find_psi_weights`; the parameters keep their shapes and values.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from manifold_opt import PSISGD, declare_psi
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        >>> declare_psi(net)
        {'0.weight': PSI(batch_dims=1)}
        >>> opt = PSISGD(net.parameters())  # 0.weight gets the PSI update, the rest plain SGD
    """
    found = find_psi_weights(model, example_inputs)
    declared = {}
    for name, manifold in found.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attribute)
        existing = getattr(current, "manifold", None)
        if existing is not None and not _is_euclidean(existing):
            continue
        setattr(owner, attribute, ManifoldParameter(current.detach(), manifold, requires_grad=current.requires_grad))
        declared[name] = manifold
    return declared


def _is_euclidean(manifold: Any) -> bool:
    from ..manifolds import Euclidean

    return isinstance(manifold, Euclidean)
