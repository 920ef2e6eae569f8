"""Step time and bytes communicated per step of FSDP2-sharded manifold parameters, by world size.

A model of 8 Stiefel 512×128 weights (declared in a param group) and 8 plain 512×128 ones,
each Linear wrapped by ``fully_shard`` (CPU, gloo, processes on 127.0.0.1). For world sizes
1 (no sharding), 2 and 4: the time of ``opt.step()`` (median over steps, rank 0) and the bytes
each rank sends per step in the optimizer's own collectives (``all_to_all_single`` and
``all_reduce``, counted by wrapping them), for RiemannianAdam against ``torch.optim.Adam``
on the same model unconstrained. The machine has 2 cores: 4 ranks share them, so times at
world size 4 measure oversubscription as much as the algorithm.

Run: ``python -m benchmarks.distributed [--quick]``. Writes ``benchmarks/results/distributed.md``.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .common import markdown_table, progress, topic_parser, write_results

LAYERS = 8
SHAPE = (512, 128)  # (out, in) of each constrained Linear: 512×128, tall


def build(mesh: object | None) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(SHAPE[1], SHAPE[0], bias=False), nn.Linear(SHAPE[0], SHAPE[1], bias=False)]
    model = nn.Sequential(*layers)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def optimizer(name: str, model: nn.Sequential) -> torch.optim.Optimizer:
    from manifold_opt import RiemannianAdam, Stiefel

    if name == "torch.optim.Adam (unconstrained)":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    constrained = [model[i].weight for i in range(0, len(model), 2)]
    plain = [model[i].weight for i in range(1, len(model), 2)]
    return RiemannianAdam([{"params": constrained, "manifold": Stiefel()}, {"params": plain}], lr=1e-3)


METHODS = ("manifold_opt RiemannianAdam, Stiefel group", "torch.optim.Adam (unconstrained)")


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = {"bytes": 0}
    originals = {"all_to_all_single": dist.all_to_all_single, "all_reduce": dist.all_reduce}

    def counting(name: str):
        def wrapped(*args, **kwargs):
            tensor = args[1] if name == "all_to_all_single" else args[0]
            sent["bytes"] += tensor.numel() * tensor.element_size()
            return originals[name](*args, **kwargs)

        return wrapped

    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
        results = {}
        for method in METHODS:
            model = build(mesh)
            opt = optimizer(method, model)
            x = torch.randn(32, SHAPE[1], generator=torch.Generator().manual_seed(1))
            times = []
            for step in range(steps + 2):
                opt.zero_grad()
                model(x).square().mean().backward()
                dist.barrier()
                sent["bytes"] = 0
                for name in originals:
                    setattr(dist, name, counting(name))
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                for name, original in originals.items():
                    setattr(dist, name, original)
                if step >= 2:  # warm-up
                    times.append(elapsed)
            results[method] = {"ms": 1e3 * statistics.median(times), "bytes": sent["bytes"]}
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = topic_parser("distributed", __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    steps = 3 if args.quick else 15
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for world in progress([1, 2, 4], "world sizes"):
            out = str(Path(directory) / f"{world}.pt")
            mp.spawn(_worker, args=(world, free_port(), steps, out), nprocs=world, join=True)
            results = torch.load(out, weights_only=True)
            for method in METHODS:
                rows.append(
                    {
                        "world size": world,
                        "method": method,
                        "ms / step (rank 0)": f"{results[method]['ms']:.1f}",
                        "bytes sent / step / rank": f"{results[method]['bytes']:,}",
                    }
                )
    matrix_bytes = SHAPE[0] * SHAPE[1] * 4
    text = (
        "## Optimizer step under FSDP2, by world size\n\n"
        f"{LAYERS} Stiefel {SHAPE[0]}×{SHAPE[1]} weights (one param group) and {LAYERS} plain "
        f"{SHAPE[1]}×{SHAPE[0]} ones, each Linear `fully_shard`-ed; float32, one torch thread per rank, "
        f"median of {steps} steps. World size 1: no sharding. Bytes: what the optimizer's own collectives "
        "send per rank and step (the all_to_alls that gather whole Stiefel matrices to their owner rank and "
        "return the rows, and the all_reduces of per-point states and skip decisions); torch.optim sends "
        f"nothing. One whole matrix is {matrix_bytes:,} bytes. The all_to_all buffers count the rank's own "
        "pieces too: per step a rank sends its shards of parameter, gradient and momentum of every Stiefel "
        "matrix (3 × 1/W of all of them) and the new rows of parameter and momentum of the matrices it owns "
        "(2 × 1/W of them, whole): about 5/W of the constrained weights' bytes, so the per-rank traffic falls "
        "as ranks are added and no rank ever holds every matrix.\n\n" + markdown_table(rows)
    )
    path = write_results(
        "distributed" + ("_quick" if args.quick else ""),
        "Distributed (FSDP2) step",
        [text],
        "python -m benchmarks.distributed" + (" --quick" if args.quick else ""),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
