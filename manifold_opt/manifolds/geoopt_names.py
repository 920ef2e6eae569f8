"""geoopt's method names on the native manifolds.

A geoopt script whose classes are replaced as the migration page says
(``geoopt.EuclideanStiefel()`` by :class:`~manifold_opt.Stiefel`, ``geoopt.Sphere()`` by
:class:`~manifold_opt.Sphere`, ``geoopt.ManifoldParameter`` by
:class:`~manifold_opt.ManifoldParameter`) keeps calling geoopt's names on its manifolds;
:class:`GeooptNames`, a base class of every :class:`~manifold_opt.manifolds.Manifold`,
answers to them with geoopt's meaning. They are aliases: each calls one of the native
methods, and that method's docstring is the reference.

Layout: a geoopt manifold treats the last ``manifold.ndim`` dimensions of a tensor as one
point and the leading ones as a batch, which is this package's points layout
``(..., *point_shape)`` (the last two dimensions for a Stiefel matrix, the last one for a
sphere, none for Euclidean), so the aliases take exactly the tensors geoopt's methods take.
A parameter's own layout (``batch_dims``, a conv kernel flattened to one matrix) is that of
:meth:`~manifold_opt.ManifoldParameter.proj_`, of the constructor and of the optimizers;
with the ``batch_dims`` the migration table gives, the two layouts are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def size_to_shape(*size: Any) -> tuple[int, ...]:
    """``random(5, 3)`` and ``random((5, 3))`` alike (geoopt's ``size2shape``)."""
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        return tuple(size[0])
    return tuple(size)


class GeooptNames:
    """geoopt's names on a :class:`~manifold_opt.manifolds.Manifold` (all in the points layout).

    ===================================================  ==============================================
    geoopt                                               native method
    ===================================================  ==============================================
    ``random(*size, dtype=None, device=None)``           :meth:`~Manifold.random_point` ``(size)``
    ``projx(x)``                                         :meth:`~Manifold.project`
    ``proju(x, u)``                                      :meth:`~Manifold.project_tangent`
    ``egrad2rgrad(x, u)``                                :meth:`~Manifold.riemannian_grad`
    ``retr(x, u)``                                       :meth:`~Manifold.retract` ``(x, u)``
    ``expmap(x, u)``                                     ``exp(x, u)`` where the manifold has one
    ``transp(x, y, v)``                                  :meth:`~Manifold.transport`
    ``retr_transp(x, u, v)``                             ``(y, transport(x, y, v))``, ``y = retract(x, u)``
    ``inner(x, u, v=None, *, keepdim=False)``            :meth:`~Manifold.inner` (keeps dims by default)
    ``check_point_on_manifold(x, *, atol, rtol)``        :meth:`~Manifold.distance_to_manifold` ``<= atol``
    ``assert_check_point_on_manifold(x, *, atol, rtol)`` the same, raising a ValueError
    ===================================================  ==============================================

    ``inner`` is the native method itself, which accepts geoopt's arguments; its default
    keeps the point dimensions as singletons (the package's convention, which broadcasts
    against ``x``), so pass ``keepdim=False`` for geoopt's shape (the values are the same).
    ``random`` returns a plain tensor that carries ``.manifold`` (as geoopt's
    ``ManifoldTensor`` does), so ``ManifoldParameter(manifold.random(5, 3))`` lies on the
    manifold. All of them are differentiable, as the native methods are.
    """

    def random(
        self,
        *size: Any,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """geoopt's ``random``: a random point of shape ``size`` (points layout, e.g.
        ``Stiefel().random(5, 3)`` is one ``5 x 3`` matrix, ``random(2, 5, 3)`` two). The same
        draw as geoopt's for the same seed: :meth:`random_point` (the normalized or plain
        Gaussian of ``Sphere`` and ``Euclidean``, as geoopt's), except on ``Stiefel``, where it
        is geoopt's ``EuclideanStiefel.random``, the ``Q`` factor of ``torch.linalg.qr`` of a
        Gaussian matrix (without :meth:`random_point`'s sign fix, which makes the draw Haar).
        The tensor carries ``.manifold = self``."""
        shape = size_to_shape(*size)
        point = self.geoopt_random_point(shape, generator=generator, dtype=dtype, device=device)
        point.manifold = self
        return point

    def geoopt_random_point(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """The point :meth:`random` draws: geoopt's draw for this manifold, which is
        :meth:`random_point` unless a manifold overrides it (``Stiefel``)."""
        return self.random_point(shape, generator=generator, dtype=dtype, device=device)

    def projx(self, x: Tensor) -> Tensor:
        """geoopt's ``projx``: :meth:`project`."""
        return self.project(x)

    def proju(self, x: Tensor, u: Tensor) -> Tensor:
        """geoopt's ``proju``: :meth:`project_tangent`."""
        return self.project_tangent(x, u)

    def egrad2rgrad(self, x: Tensor, u: Tensor) -> Tensor:
        """geoopt's ``egrad2rgrad``: :meth:`riemannian_grad` of the Euclidean gradient ``u``."""
        return self.riemannian_grad(x, u)

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """geoopt's ``retr``: :meth:`retract` ``(x, u)`` (with this manifold's retraction)."""
        return self.retract(x, u)

    def expmap(self, x: Tensor, u: Tensor) -> Tensor:
        """geoopt's ``expmap``: the manifold's ``exp`` (Stiefel, Sphere, PSI, Euclidean).

        Raises:
            NotImplementedError: on a manifold without an exponential map (ConditionedSpectrum).
        """
        exp = getattr(self, "exp", None)
        if exp is None:
            raise NotImplementedError(f"{type(self).__name__} has no exponential map; use retr(x, u)")
        return exp(x, u)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """geoopt's ``transp``: :meth:`transport` of ``v`` from ``x`` to ``y``."""
        return self.transport(x, y, v)

    def retr_transp(self, x: Tensor, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """geoopt's ``retr_transp``: ``y = retr(x, u)`` and ``v`` transported to ``y``."""
        return self.retract_transport(x, u, v)

    def check_point_on_manifold(
        self, x: Tensor, *, explain: bool = False, atol: float = 1e-5, rtol: float = 1e-5
    ) -> bool | tuple[bool, str | None]:
        """geoopt's ``check_point_on_manifold``: whether every point of ``x`` lies within ``atol``
        of the manifold as :meth:`distance_to_manifold` measures it (``rtol`` is accepted for
        geoopt's signature; the distances are measured against 0). ``explain=True`` also
        returns the reason of a failure."""
        del rtol
        if x.dim() < self.point_ndim:
            ok, reason = False, f"`x` needs at least {self.point_ndim} dimensions, got shape {tuple(x.shape)}"
        elif x.numel() == 0:
            ok, reason = True, None
        else:
            with torch.no_grad():
                distance = float(self.distance_to_manifold(x).amax())
            ok = distance <= atol
            reason = None if ok else f"`x` lies {distance:.3g} off {self!r} (atol={atol})"
        return (ok, reason) if explain else ok

    def assert_check_point_on_manifold(self, x: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
        """geoopt's ``assert_check_point_on_manifold``: :meth:`check_point_on_manifold` or a ValueError."""
        ok, reason = self.check_point_on_manifold(x, explain=True, atol=atol, rtol=rtol)
        if not ok:
            raise ValueError(f"`x` seems to be a tensor not lying on {self!r}: {reason}")
