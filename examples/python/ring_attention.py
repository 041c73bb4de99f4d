"""Ring attention over 1, 2 and 4 processes against one foveal call (docs/distributed.md).

    python3 examples/python/ring_attention.py [--length 4096] [--heads 8] [--kv-heads 2]
        [--dim 64] [--worlds 1 2 4] [--threads 1] [--repeats 3] [--no-causal]
        [--layout zigzag|contiguous]

For each world size N, N processes (torch.multiprocessing, gloo over 127.0.0.1) hold their
shards (zig-zag by default) of the same random sequence and run
foveal.distributed.ring_attention forward and backward; rank 0 reports the best of --repeats
wall times of each pass (between barriers, after one untimed warm-up run). The shards of the
output and gradients are put back together and compared with one foveal.torch.attention call
over the whole sequence in this process, timed the same way. Every process runs foveal with
--threads threads, so N processes use N * threads cores: on a machine with fewer cores they
oversubscribe it. Under a causal mask it also prints how many query-key pairs each rank
computes in each layout (exact counts).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import foveal
import foveal.distributed as fdist
import foveal.torch as ftorch
import torch
import torch.distributed as dist


def make_inputs(args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "q": (1, args.heads, args.length, args.dim),
        "k": (1, args.kv_heads, args.length, args.dim),
        "v": (1, args.kv_heads, args.length, args.dim),
        "grad": (1, args.heads, args.length, args.dim),
    }
    return {name: torch.randn(*shape, generator=generator) for name, shape in shapes.items()}


def best_times(run, repeats: int, barrier=lambda: None) -> tuple[float, float, dict]:
    """The best forward and backward wall times of `run` (returning (out, inputs, grad)) over
    `repeats` runs after one untimed warm-up run."""
    forward, backward = [], []
    for _ in range(repeats + 1):
        barrier()
        start = time.perf_counter()
        out, inputs, grad = run()
        barrier()
        middle = time.perf_counter()
        out.backward(grad)
        barrier()
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    result = {"out": out.detach(), **{f"grad_{n}": x.grad for n, x in inputs.items()}}
    return min(forward[1:]), min(backward[1:]), result


def worker(rank: int, world_size: int, port: int, args: argparse.Namespace, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    foveal.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    full = make_inputs(args)
    local = {name: fdist.shard(x, rank, world_size, layout=args.layout) for name, x in full.items()}

    def run():
        inputs = {n: local[n].clone().requires_grad_() for n in ("q", "k", "v")}
        out = fdist.ring_attention(*inputs.values(), causal=args.causal, layout=args.layout)
        return out, inputs, local["grad"]

    forward, backward, result = best_times(run, args.repeats, dist.barrier)
    torch.save(result, Path(folder) / f"rank{rank}.pt")
    if rank == 0:
        torch.save((forward, backward), Path(folder) / "times.pt")
    dist.destroy_process_group()


def print_causal_balance(length: int, worlds: list) -> None:
    """Under a causal mask, the query-key pairs each rank computes (query at position p sees p + 1
    keys): zig-zag shards share them evenly, contiguous ones do not. Exact counts, not timings."""
    for world_size in worlds:
        for layout in fdist.LAYOUTS:
            work = [
                int((fdist.shard_positions(length, r, world_size, layout) + 1).sum())
                for r in range(world_size)
            ]
            print(
                f"causal pairs per rank, {world_size} ranks, {layout:>10}: "
                f"{', '.join(f'{w / sum(work):.1%}' for w in work)} (largest / mean "
                f"{max(work) * world_size / sum(work):.2f})"
            )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="foveal threads per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--layout", choices=fdist.LAYOUTS, default="zigzag")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    foveal.set_num_threads(args.threads)
    full = make_inputs(args)

    def one_call():
        inputs = {n: full[n].clone().requires_grad_() for n in ("q", "k", "v")}
        return ftorch.attention(*inputs.values(), causal=args.causal), inputs, full["grad"]

    forward, backward, expected = best_times(one_call, args.repeats)
    print(
        f"L={args.length} Hq={args.heads} Hkv={args.kv_heads} D={args.dim} causal={args.causal} "
        f"layout={args.layout}, "
        f"{args.threads} foveal thread(s) per process, {os.cpu_count()} CPUs, best of "
        f"{args.repeats}; load average {os.getloadavg()[0]:.1f}"
    )
    if args.causal:
        print_causal_balance(args.length, [w for w in args.worlds if w > 1])
    largest = max(x.abs().max().item() for name, x in expected.items() if name != "out")
    print(f"(the largest gradient entry is {largest:.1f}; outputs are of size ~1)")
    print("| run | forward s | backward s | max abs diff (out) | max abs diff (grads) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| one foveal.torch.attention call | {forward:.3f} | {backward:.3f} | 0 | 0 |")
    for world_size in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            torch.multiprocessing.spawn(
                worker, args=(world_size, free_port(), args, folder), nprocs=world_size
            )
            forward, backward = torch.load(Path(folder) / "times.pt")
            shards = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(world_size)]
        diffs = {
            name: (fdist.unshard([s[name] for s in shards], layout=args.layout) - want)
            .abs()
            .max()
            .item()
            for name, want in expected.items()
        }
        grads = max(value for name, value in diffs.items() if name != "out")
        print(
            f"| ring, {world_size} process{'es' if world_size > 1 else ''} | {forward:.3f} | "
            f"{backward:.3f} | {diffs['out']:.1e} | {grads:.1e} |"
        )


if __name__ == "__main__":
    main()
