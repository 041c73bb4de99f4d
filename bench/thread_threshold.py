#!/usr/bin/env python3
"""The work below which a second thread does not pay: decode_attention at 1 and 2 threads.

    python3 bench/thread_threshold.py                 # the sweep, threshold off (~1 minute)
    python3 bench/thread_threshold.py --threshold     # the same with foveal's threshold on
    python3 bench/thread_threshold.py --torch         # a torch matmul before every call
    OMP_WAIT_POLICY=PASSIVE python3 bench/thread_threshold.py --torch --threshold

One decode step (B = 1, Hq = 8, Hkv = 2, D = Dv = 64, one query) over caches of growing length
L; its work is Hq * L * (D + Dv) multiply-adds, the unit of foveal's kMinWorkPerThread. The 1-
and 2-thread calls alternate, `--calls` calls per round, `--rounds` rounds; each time is the
median over the rounds of a round's mean, in microseconds per call. Without --threshold foveal's
threshold is off (every call starts its threads), which is what finds the crossover: the
smallest work from which on 2 threads are faster at every size measured. --torch runs a small
torch.matmul on torch's threads before each call, as a model's layers alternate with
attention: the two libraries then share one OpenMP runtime and its wait policy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import foveal
import numpy as np
from foveal import _core

HEADS_Q, HEADS_KV, DIM = 8, 2, 64
LENGTHS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def work_of(length: int) -> int:
    return HEADS_Q * length * (DIM + DIM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", action="store_true", help="keep foveal's threshold on")
    parser.add_argument("--torch", action="store_true", help="a torch.matmul before each call")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()

    matmul = None
    if args.torch:
        import torch

        torch.set_num_threads(2)
        a = torch.randn(64, 256)
        b = torch.randn(256, 256)

        def matmul() -> None:
            torch.matmul(a, b)

    if not args.threshold:
        _core._set_min_work_per_thread(0)
    rng = np.random.default_rng(0)
    print(
        f"foveal {foveal.__version__}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
        f"threshold {'on' if args.threshold else 'off'}, torch {'on' if args.torch else 'off'}"
    )
    print(f"{'L':>6} {'work':>10} {'1 thread us':>12} {'2 threads us':>13} {'2 / 1':>7}")
    faster = []
    for length in LENGTHS:
        cache = foveal.KVCache(1, HEADS_KV, length, DIM, DIM, dtype=np.float32)
        k = rng.standard_normal((1, HEADS_KV, length, DIM), dtype=np.float32)
        cache.append(k, k.copy())
        q = rng.standard_normal((1, HEADS_Q, 1, DIM), dtype=np.float32)
        out = np.empty((1, HEADS_Q, 1, DIM), dtype=np.float32)
        times = {1: [], 2: []}
        for _ in range(args.rounds):
            for threads in (1, 2):
                start = time.perf_counter()
                for _ in range(args.calls):
                    if matmul is not None:
                        matmul()
                    foveal.decode_attention(q, cache, out=out, num_threads=threads)
                times[threads].append((time.perf_counter() - start) / args.calls * 1e6)
        one, two = statistics.median(times[1]), statistics.median(times[2])
        faster.append((work_of(length), two < one))
        print(f"{length:>6} {work_of(length):>10} {one:>12.1f} {two:>13.1f} {two / one:>7.2f}")
    crossover = None
    for i, (work, _) in enumerate(faster):
        if all(win for _, win in faster[i:]):
            crossover = work
            break
    if crossover is None:
        print("2 threads never won at every larger size")
    else:
        print(f"2 threads faster from work {crossover} on: kMinWorkPerThread ~ {crossover // 2}")


if __name__ == "__main__":
    main()
