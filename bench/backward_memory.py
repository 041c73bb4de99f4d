"""Peak memory of foveal's dense causal attention backward: the resident-set growth of the
backward call beyond its inputs (q, k, v, out, lse, grad_out), against the gradients it returns.

    python3 bench/backward_memory.py [--length 32768] [--dim 64] [--heads 1] [--threads 2]

The backward recomputes the probabilities tile by tile, so it should add its three gradients
and O(threads x tile) scratch, never an [L, L] matrix.
"""

from __future__ import annotations

import argparse
import resource
import time

import foveal
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    shape = (1, args.heads, args.length, args.dim)
    rng = np.random.default_rng(0)
    q, k, v, grad_out = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    out, lse = foveal.attention(q, k, v, causal=True, return_lse=True, num_threads=args.threads)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    grads = foveal.attention_backward(
        q, k, v, out, lse, grad_out, causal=True, num_threads=args.threads
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = 2.0**20
    gradients = sum(g.nbytes for g in grads) / mib
    square = args.heads * args.length**2 * 4 / mib
    print(
        f"L={args.length} D={args.dim} H={args.heads} threads={args.threads}: the backward "
        f"added {(after - before) / 1024:.1f} MiB to the peak resident set; its gradients are "
        f"{gradients:.1f} MiB (one [L, L] float32 matrix per head: {square:.0f} MiB); "
        f"{seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
