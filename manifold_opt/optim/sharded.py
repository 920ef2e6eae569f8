"""Manifold steps of parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 turns every parameter into a DTensor sharded on its first dimension over a 1-D
device mesh. Elementwise (Euclidean) work runs on the local shards, as in torch.optim. A
retraction needs whole matrices, so a bucket of ``K`` sharded manifold parameters is
stepped the way distributed Muon-style optimizers step theirs: parameter ``i`` is owned by
rank ``i mod W``; one ``all_to_all`` sends every rank's shards of the parameter, its
gradient and its tangent-layout states (momentum) to the owner, which assembles the whole
matrices of the parameters it owns and steps them with the ordinary batched path; a
second ``all_to_all`` returns the new rows to their shards. No rank gathers every matrix.
Per-point states (Adam's second moments, step counts: one number per matrix) are kept
replicated on every rank as plain tensors and made equal again with one ``all_reduce``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (e.g. a parameter of a ``fully_shard`` module).

    Not imported here: ``torch.distributed.tensor`` takes most of a second to import (sympy),
    and there is no DTensor before it is imported (torch built without distributed support
    has none).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def check_row_sharded(param: Tensor) -> None:
    """A DTensor manifold parameter must be sharded on dimension 0 of a 1-D mesh (FSDP2's layout)."""
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    if mesh.ndim != 1 or len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise NotImplementedError(
            f"a manifold parameter of shape {tuple(param.shape)} is a DTensor with placements "
            f"{param.placements} on a {mesh.ndim}-D mesh; only FSDP2's layout (Shard(0) on a 1-D mesh) is "
            "supported"
        )


def row_ranges(rows: int, world: int) -> list[tuple[int, int]]:
    """The rows ``[start, end)`` of each rank under ``Shard(0)`` (``torch.chunk`` sizes)."""
    chunk = math.ceil(rows / world) if rows else 0
    return [(min(rank * chunk, rows), min((rank + 1) * chunk, rows)) for rank in range(world)]


@dataclass
class Exchange:
    """Which rank steps which parameter of a bucket, and the layout of the two all_to_alls."""

    shapes: list[torch.Size]  # global shapes of the bucket's parameters
    world: int
    rank: int
    kinds: int  # tensors exchanged per parameter (parameter, gradient, tangent states)

    def owner(self, index: int) -> int:
        return index % self.world

    @property
    def owned(self) -> list[int]:
        return [i for i in range(len(self.shapes)) if self.owner(i) == self.rank]

    def piece_numel(self, index: int, rank: int) -> int:
        start, end = row_ranges(self.shapes[index][0], self.world)[rank]
        return (end - start) * math.prod(self.shapes[index][1:])

    def splits_to_owners(self) -> list[int]:
        """Elements this rank sends to each rank (its pieces of the parameters that rank owns)."""
        sizes = [0] * self.world
        for i in range(len(self.shapes)):
            sizes[self.owner(i)] += self.kinds * self.piece_numel(i, self.rank)
        return sizes

    def splits_from_ranks(self) -> list[int]:
        """Elements this rank receives from each rank (their pieces of the parameters it owns)."""
        return [sum(self.kinds * self.piece_numel(i, source) for i in self.owned) for source in range(self.world)]


def gather_to_owners(exchange: Exchange, local: Sequence[Sequence[Tensor]], group: object) -> list[list[Tensor]]:
    """Whole tensors of the parameters this rank owns.

    ``local[i][k]``: this rank's shard of kind ``k`` of parameter ``i`` (all of one dtype).
    Returns ``full[j][k]`` for the ``j``-th owned parameter.
    """
    reference = local[0][0]
    order = sorted(range(len(local)), key=exchange.owner)  # grouped by destination, in index order
    pieces = [t.reshape(-1) for i in order for t in local[i]]
    send = torch.cat(pieces) if pieces else reference.new_empty(0)
    receive = reference.new_empty(sum(exchange.splits_from_ranks()))
    torch.distributed.all_to_all_single(
        receive, send, exchange.splits_from_ranks(), exchange.splits_to_owners(), group=group
    )
    chunks = list(receive.split(exchange.splits_from_ranks()))
    full: list[list[list[Tensor]]] = [[[] for _ in range(exchange.kinds)] for _ in exchange.owned]
    for source, chunk in enumerate(chunks):
        offset = 0
        for j, i in enumerate(exchange.owned):
            numel = exchange.piece_numel(i, source)
            for k in range(exchange.kinds):
                full[j][k].append(chunk[offset : offset + numel])
                offset += numel
    return [[torch.cat(parts).reshape(exchange.shapes[i]) for parts in full[j]] for j, i in enumerate(exchange.owned)]


def scatter_from_owners(
    exchange: Exchange, full: Sequence[Sequence[Tensor]], local: Sequence[Sequence[Tensor]], group: object
) -> None:
    """The reverse of :func:`gather_to_owners`: the rows of each owned whole tensor go back to
    the shards, copied into ``local[i][k]`` (this rank's shards) in place."""
    reference = local[0][0]
    pieces = []
    for destination in range(exchange.world):
        for j, i in enumerate(exchange.owned):
            start, end = row_ranges(exchange.shapes[i][0], exchange.world)[destination]
            pieces.extend(t[start:end].reshape(-1) for t in full[j])
    send = torch.cat(pieces) if pieces else reference.new_empty(0)
    receive = reference.new_empty(sum(exchange.splits_to_owners()))
    torch.distributed.all_to_all_single(
        receive, send, exchange.splits_to_owners(), exchange.splits_from_ranks(), group=group
    )
    offset = 0
    order = sorted(range(len(local)), key=exchange.owner)
    for i in order:
        for shard in local[i]:
            numel = shard.numel()
            shard.copy_(receive[offset : offset + numel].view_as(shard))
            offset += numel


def agree_on_all_ranks(flag: Tensor, group: object) -> Tensor:
    """A 0-dim bool flag true on every rank iff it is true on every rank (one all_reduce)."""
    value = flag.to(torch.float32).reshape(1).clone()
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return value[0] > 0


def all_reduce_owned(exchange: Exchange, values: Sequence[Tensor], group: object) -> None:
    """Make replicated per-parameter tensors equal on every rank: each keeps the owner's value.

    ``values[i]``: this rank's copy for parameter ``i`` (all of one dtype and device), written
    in place.
    """
    if not values:
        return
    pieces = [
        v.reshape(-1) if exchange.owner(i) == exchange.rank else torch.zeros_like(v.reshape(-1))
        for i, v in enumerate(values)
    ]
    flat = torch.cat(pieces)  # other ranks' entries are zeros (never their NaN): the sum is the owner's value
    torch.distributed.all_reduce(flat, group=group)
    offset = 0
    for value in values:
        value.copy_(flat[offset : offset + value.numel()].view_as(value))
        offset += value.numel()


class LocalShards:
    """The local shards of a bucket of sharded plain parameters, their gradients and states,
    for torch.optim's elementwise kernels; :meth:`store_states` keeps what the kernels
    created or replaced (wrapping new tensors of the parameters' shape as DTensors)."""

    def __init__(self, params: Sequence[Tensor], states: Sequence[dict]) -> None:
        self.sharded_params = list(params)
        self.real_states = list(states)
        self.params = [p.to_local() for p in params]
        self.grads = [p.grad.to_local() for p in params]
        self.states = [{k: v.to_local() if is_sharded(v) else v for k, v in s.items()} for s in states]
        self.group = params[0].device_mesh.get_group()

    def all_ranks(self, flag: Tensor) -> Tensor:
        return agree_on_all_ranks(flag, self.group)

    def store_states(self) -> None:
        from torch.distributed.tensor import DTensor

        for param, real, local in zip(self.sharded_params, self.real_states, self.states):
            for key, value in local.items():
                old = real.get(key)
                if old is value or (is_sharded(old) and _same_storage(old.to_local(), value)):
                    continue
                if isinstance(value, Tensor) and value.shape == param.to_local().shape and value.dim() > 0:
                    real[key] = DTensor.from_local(
                        value, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
                    )
                else:
                    real[key] = value


def _same_storage(a: Tensor, b: object) -> bool:
    return isinstance(b, Tensor) and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def full_tensor_rows(param: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The whole value of a row-sharded DTensor (an all-gather) and this rank's rows of it."""
    check_row_sharded(param)
    mesh = param.device_mesh
    return param.full_tensor(), row_ranges(param.shape[0], mesh.size())[mesh.get_local_rank()]
