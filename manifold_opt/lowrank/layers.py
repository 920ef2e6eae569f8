r"""Low-rank layers :math:`W = U \Sigma V^\top` with orthonormal bases and a dense trainable core.

A dense weight of shape ``(out, *rest)`` is read as the matrix :math:`W \in \mathbb{R}^{m\times d}`,
``m = out``, ``d = prod(rest)`` (a conv kernel flattens its ``(in/groups, *kernel)`` into one row,
as everywhere in the package). The layers store

* ``u``: :math:`U \in \mathrm{St}(m, r)`, the left basis (orthonormal columns),
* ``sigma``: :math:`\Sigma \in \mathbb{R}^{r\times r}`, a dense trainable matrix,
* ``v``: :math:`V \in \mathrm{St}(d, r)`, the right basis (orthonormal columns),

and compute :math:`W = U\Sigma V^\top`. The bases are frozen buffers, or
:class:`~manifold_opt.ManifoldParameter` on :class:`~manifold_opt.Stiefel` with
``train_bases=True``. The rank ``r`` is ``sigma.shape[0]``; :meth:`LowRankLayer.set_factors`
changes it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional

from ..manifolds import Stiefel
from ..parameter import ManifoldParameter, _rebuild_manifold_parameter

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS = {1: functional.conv1d, 2: functional.conv2d, 3: functional.conv3d}
_CONV_CLASSES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision weights are factored in float32 (SVD has no half-precision kernels)."""
    return torch.promote_types(dtype, torch.float32)


def weight_matrix(weight: Tensor) -> Tensor:
    """The ``(out, prod(rest))`` matrix view of a dense weight."""
    return weight.reshape(weight.shape[0], -1)


def thin_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Thin SVD :math:`A = U\,\mathrm{diag}(s)\,V^\top` in the geometry dtype.

    Returns:
        ``(u, s, v)`` with ``u (m, k)``, ``s (k,)`` descending, ``v (d, k)``, ``k = min(m, d)``.
    """
    u, s, vh = torch.linalg.svd(matrix.to(geometry_dtype(matrix.dtype)), full_matrices=False)
    return u, s, vh.mT


class LowRankLayer(nn.Module):
    """Storage and bookkeeping shared by :class:`LowRankLinear` and :class:`LowRankConv`.

    Not used directly: the subclasses build the factors from a dense layer and define
    ``forward`` and :meth:`compact`.
    """

    u: Tensor
    sigma: nn.Parameter
    v: Tensor
    bias: nn.Parameter | None
    train_bases: bool

    def _init_factors(
        self,
        weight: Tensor,
        bias: nn.Parameter | None,
        rank: int | None,
        train_bases: bool,
        factors: tuple[Tensor, Tensor, Tensor] | None,
    ) -> None:
        m, d = weight.shape[0], math.prod(weight.shape[1:])
        self.weight_shape = tuple(weight.shape)
        self.train_bases = bool(train_bases)
        full = min(m, d)
        if rank is None:
            rank = full
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise ValueError(
                f"rank must be an int in [1, {full}] for a weight of shape {tuple(weight.shape)}, got {rank!r}"
            )
        with torch.no_grad():
            u, s, v = thin_svd(weight_matrix(weight.detach())) if factors is None else factors
            u, s, v = u[:, :rank], s[:rank], v[:, :rank]
            dtype, device = weight.dtype, weight.device
            u, sigma, v = (t.to(dtype=dtype, device=device) for t in (u, torch.diag(s), v))
        self.sigma = nn.Parameter(sigma.contiguous(), requires_grad=weight.requires_grad)
        if self.train_bases:
            self.u = ManifoldParameter(u.contiguous(), Stiefel())
            self.v = ManifoldParameter(v.contiguous(), Stiefel())
        else:
            self.register_buffer("u", u.contiguous())
            self.register_buffer("v", v.contiguous())
        self.bias = bias
        self._check_shapes(self.u, self.sigma, self.v)

    # ----------------------------------------------------------------- queries
    @property
    def rank(self) -> int:
        """The current rank ``r`` (the size of ``sigma``)."""
        return self.sigma.shape[0]

    @property
    def full_rank(self) -> int:
        """``min(m, d)``: the largest rank a weight of this shape can have."""
        return min(self.u.shape[0], self.v.shape[0])

    def dense_weight(self) -> Tensor:
        r"""The dense weight :math:`U\Sigma V^\top` in the layer's weight shape (a new tensor).

        Shapes: ``weight_shape``, e.g. ``(out, in)`` or ``(out, in/groups, *kernel)``.
        """
        return (self.u @ self.sigma @ self.v.mT).reshape(self.weight_shape)

    def _check_shapes(self, u: Tensor, sigma: Tensor, v: Tensor) -> None:
        m, d = self.weight_shape[0], math.prod(self.weight_shape[1:])
        r = sigma.shape[0] if sigma.dim() == 2 else -1
        if (
            sigma.dim() != 2
            or sigma.shape[1] != r
            or tuple(u.shape) != (m, r)
            or tuple(v.shape) != (d, r)
            or not 1 <= r <= min(m, d)
        ):
            raise ValueError(
                f"factors of shapes u {tuple(u.shape)}, sigma {tuple(sigma.shape)}, v {tuple(v.shape)} do not fit a "
                f"weight of shape {self.weight_shape}: need u (m, r), sigma (r, r), v (d, r) with m = {m}, d = {d}, "
                f"1 <= r <= {min(m, d)}"
            )

    # ----------------------------------------------------------------- updates
    @torch.no_grad()
    def set_factors(self, u: Tensor, sigma: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Replace the factors, possibly with a new rank.

        A parameter whose shape stays the same keeps its identity (its data is swapped);
        one whose shape changes is replaced by a new ``nn.Parameter`` (or
        :class:`~manifold_opt.ManifoldParameter`), because autograd caches a leaf's shape.
        Every touched parameter's ``.grad`` is cleared (it belongs to the old coordinates).

        Args:
            u: ``(m, r)`` orthonormal columns.
            sigma: ``(r, r)``.
            v: ``(d, r)`` orthonormal columns.

        Returns:
            ``(old, new)`` pairs of the parameters replaced by new objects, to swap in an
            optimizer (:class:`~manifold_opt.lowrank.OIALR` does this).

        Raises:
            ValueError: if the shapes do not fit the layer.
        """
        self._check_shapes(u, sigma, v)
        dtype, device = self.sigma.dtype, self.sigma.device
        u, sigma, v = (t.to(dtype=dtype, device=device).contiguous() for t in (u, sigma, v))
        replaced = []
        names = ("u", "sigma", "v") if self.train_bases else ("sigma",)
        for name, value in (("u", u), ("sigma", sigma), ("v", v)):
            old = getattr(self, name)
            if name not in names:
                setattr(self, name, value)  # a frozen basis: a buffer
            elif old.shape == value.shape:
                old.data = value
                old.grad = None
            else:
                if isinstance(old, ManifoldParameter):
                    new = _rebuild_manifold_parameter(value, old.manifold, old.requires_grad)
                else:
                    new = nn.Parameter(value, requires_grad=old.requires_grad)
                setattr(self, name, new)
                replaced.append((old, new))
        return replaced

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}, train_bases={self.train_bases}"


def _factored_is_cheaper(rows: int, m: int, d: int, r: int) -> bool:
    """Multiply-adds of ``x V Σᵀ Uᵀ`` against forming ``W = UΣVᵀ`` then ``x Wᵀ``."""
    return rows * r * (m + d + r) < m * r * (r + d) + rows * m * d


class LowRankLinear(LowRankLayer):
    r"""A ``nn.Linear`` whose weight is :math:`W = U\Sigma V^\top`, :math:`U \in \mathrm{St}(\text{out}, r)`,
    :math:`V \in \mathrm{St}(\text{in}, r)`, :math:`\Sigma \in \mathbb{R}^{r\times r}` dense.

    Built from a dense ``nn.Linear`` by a thin SVD truncated to ``rank`` (``sigma`` starts
    diagonal). The layer takes over the dense layer's ``bias`` parameter object, so an
    optimizer's state for it carries on. The forward pass picks the cheaper of
    ``((x V) Σᵀ) Uᵀ`` and ``x (UΣVᵀ)ᵀ`` for the batch at hand.

    Args:
        linear: the dense layer to factor.
        rank: number of singular triplets kept (default ``min(out, in)``).
        train_bases: make ``u`` and ``v`` trainable :class:`~manifold_opt.ManifoldParameter`
            on the Stiefel manifold (step them with a Riemannian optimizer); default frozen buffers.
        factors: ``(u, s, v)`` of a precomputed thin SVD (``u (out, k)``, ``s (k,)``, ``v (in, k)``)
            to use instead of computing it (e.g. one broadcast from rank 0).

    Shapes: input ``(*, in)``, output ``(*, out)``; ``u (out, r)``, ``sigma (r, r)``, ``v (in, r)``.

    Example:
        >>> import torch
        >>> from manifold_opt.lowrank import LowRankLinear
        >>> dense = torch.nn.Linear(8, 6)
        >>> layer = LowRankLinear(dense)
        >>> x = torch.randn(4, 8)
        >>> torch.allclose(layer(x), dense(x), atol=1e-5)
        True
        >>> LowRankLinear(dense, rank=2).sigma.shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int | None = None,
        *,
        train_bases: bool = False,
        factors: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._init_factors(linear.weight, linear.bias, rank, train_bases, factors)

    def forward(self, input: Tensor) -> Tensor:
        rows = input.numel() // max(self.in_features, 1)
        m, d, r = self.out_features, self.in_features, self.rank
        if _factored_is_cheaper(rows, m, d, r):
            hidden = functional.linear(functional.linear(input, self.v.mT), self.sigma)
            return functional.linear(hidden, self.u, self.bias)
        return functional.linear(input, self.dense_weight(), self.bias)

    @torch.no_grad()
    def compact(self) -> nn.Module:
        """A plain inference module computing the same function.

        ``nn.Sequential(nn.Linear(in, r, bias=False), nn.Linear(r, out))`` with weights
        :math:`V^\\top` and :math:`U\\Sigma` when that has fewer entries than the dense
        weight, else one ``nn.Linear`` holding :math:`U\\Sigma V^\\top`. Tensors are copies.
        """
        m, d, r = self.out_features, self.in_features, self.rank
        factory = {"dtype": self.sigma.dtype, "device": self.sigma.device}
        bias = self.bias is not None
        if r * (m + d) >= m * d:
            dense = nn.Linear(d, m, bias=bias, **factory)
            dense.weight.copy_(self.dense_weight())
            if bias:
                dense.bias.copy_(self.bias)
            return dense
        first = nn.Linear(d, r, bias=False, **factory)
        second = nn.Linear(r, m, bias=bias, **factory)
        first.weight.copy_(self.v.mT)
        second.weight.copy_(self.u @ self.sigma)
        if bias:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class LowRankConv(LowRankLayer):
    r"""A ``nn.Conv1d``/``Conv2d``/``Conv3d`` whose kernel, read as the ``(out, in/groups·prod(kernel))``
    matrix, is :math:`W = U\Sigma V^\top`.

    Built from the dense conv by a thin SVD truncated to ``rank``; it keeps the conv's
    stride, padding (and ``padding_mode``), dilation and groups, and takes over its ``bias``
    parameter object. Without groups, the forward pass runs the cheaper of a rank-``r``
    conv followed by a ``1×1`` conv, or one conv with the dense kernel.

    Args:
        conv: the dense ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d`` to factor.
        rank: number of singular triplets kept (default ``min(out, in/groups·prod(kernel))``).
        train_bases: make ``u`` and ``v`` trainable Stiefel parameters.
        factors: ``(u, s, v)`` of a precomputed thin SVD of the kernel matrix.

    Shapes: as the dense conv; ``u (out, r)``, ``sigma (r, r)``, ``v (in/groups·prod(kernel), r)``.

    Example:
        >>> import torch
        >>> from manifold_opt.lowrank import LowRankConv
        >>> dense = torch.nn.Conv2d(3, 8, 3, padding=1)
        >>> layer = LowRankConv(dense)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> torch.allclose(layer(x), dense(x), atol=1e-5)
        True
    """

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        rank: int | None = None,
        *,
        train_bases: bool = False,
        factors: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        if not isinstance(conv, CONV_TYPES):
            raise TypeError(f"conv must be a torch.nn.Conv1d, Conv2d or Conv3d, got {type(conv).__name__}")
        super().__init__()
        self.conv_dims = len(conv.kernel_size)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
        self._init_factors(conv.weight, conv.bias, rank, train_bases, factors)

    def _pad(self, input: Tensor) -> tuple[Tensor, str | tuple[int, ...]]:
        if self.padding_mode == "zeros":
            return input, self.padding
        padded = functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return padded, (0,) * self.conv_dims

    def forward(self, input: Tensor) -> Tensor:
        conv = _CONV_FUNCTIONS[self.conv_dims]
        x, padding = self._pad(input)
        m, d, r = self.out_channels, self.v.shape[0], self.rank
        if self.groups == 1 and r * (m + d) < m * d:
            first = self.v.mT.reshape(r, *self.weight_shape[1:])
            hidden = conv(x, first, None, self.stride, padding, self.dilation, 1)
            second = (self.u @ self.sigma).reshape(m, r, *([1] * self.conv_dims))
            return conv(hidden, second, self.bias)
        return conv(x, self.dense_weight(), self.bias, self.stride, padding, self.dilation, self.groups)

    def _dense_conv(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], **kwargs) -> nn.Module:
        cls = _CONV_CLASSES[self.conv_dims]
        return cls(in_channels, out_channels, kernel_size, dtype=self.sigma.dtype, device=self.sigma.device, **kwargs)

    @torch.no_grad()
    def compact(self) -> nn.Module:
        """A plain inference module computing the same function.

        Without groups and when it has fewer entries: ``nn.Sequential`` of a conv with ``r``
        output channels and kernel :math:`V^\\top` (the original stride, padding, dilation)
        and a ``1×1`` conv with kernel :math:`U\\Sigma`; otherwise one dense conv. Tensors are copies.
        """
        m, d, r = self.out_channels, self.v.shape[0], self.rank
        bias = self.bias is not None
        geometry = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}
        if self.groups != 1 or r * (m + d) >= m * d:
            dense = self._dense_conv(
                self.in_channels,
                m,
                self.kernel_size,
                groups=self.groups,
                bias=bias,
                padding_mode=self.padding_mode,
                **geometry,
            )
            dense.weight.copy_(self.dense_weight())
            if bias:
                dense.bias.copy_(self.bias)
            return dense
        first = self._dense_conv(
            self.in_channels, r, self.kernel_size, bias=False, padding_mode=self.padding_mode, **geometry
        )
        second = self._dense_conv(r, m, (1,) * self.conv_dims, bias=bias)
        first.weight.copy_(self.v.mT.reshape(first.weight.shape))
        second.weight.copy_((self.u @ self.sigma).reshape(second.weight.shape))
        if bias:
            second.bias.copy_(self.bias)
        return nn.Sequential(first, second)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            + super().extra_repr()
        )
