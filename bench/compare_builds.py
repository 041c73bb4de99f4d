"""Times two builds of foveal against each other in one run: the installed one and a baseline
installed elsewhere (e.g. the previous commit), on the attention cases of compare_torch.py's
dense, window, decode and sparsek_attn suites. Each build runs in its own worker process; the
workers take turns case by case, round by round, so both see the same machine state. Prints
baseline_time / new_time per case (above 1: the new build is faster) and the geometric mean.

    python3 -m pip install --no-build-isolation --target /tmp/base-site <old checkout>
    python3 bench/compare_builds.py --baseline /tmp/base-site [--threads 1 2] [--seconds 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time, statistics
import numpy as np
import foveal

inputs = {}

def arrays(case):
    key = json.dumps(case, sort_keys=True)
    if key in inputs:
        return inputs[key]
    rng = np.random.default_rng(0)
    kind = case["kind"]
    if kind == "decode":
        lk = case["Lk"]
        k = rng.standard_normal((1, 8, lk, 128), dtype=np.float32)
        v = rng.standard_normal((1, 8, lk, 128), dtype=np.float32)
        q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
        made = dict(q=q, cache=foveal.KVCache.wrap(k, v, lengths=[lk]),
                    out=np.empty((1, 32, 1, 128), np.float32))
    else:
        shape = (1, 16, case["L"], case["D"])
        q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        made = dict(q=q, k=k, v=v, out=np.empty(shape, np.float32))
        if kind == "sparsek":
            made["u"] = rng.standard_normal((1, 16, case["L"]), dtype=np.float32)
    inputs[key] = made
    return made

def call(case):
    a = arrays(case)
    kind = case["kind"]
    if kind == "dense":
        return lambda: foveal.attention(a["q"], a["k"], a["v"], causal=case["causal"], out=a["out"])
    if kind == "window":
        return lambda: foveal.sliding_window_attention(
            a["q"], a["k"], a["v"], window_left=case["W"], causal=True, out=a["out"])
    if kind == "decode":
        return lambda: foveal.decode_attention(a["q"], a["cache"], out=a["out"])
    return lambda: foveal.sparsek_attention(
        a["q"], a["k"], a["v"], a["u"], case["topk"], window=case["W"], out=a["out"])

for line in sys.stdin:
    request = json.loads(line)
    foveal.set_num_threads(request["threads"])
    run = call(request["case"])
    run()
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < request["seconds"]:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    print(json.dumps(statistics.median(times)), flush=True)
"""


def cases():
    for dim in (64, 128):
        for length in (1024, 2048):
            for causal in (False, True):
                yield dict(kind="dense", L=length, D=dim, causal=causal)
    for length in (4096, 8192):
        yield dict(kind="window", L=length, D=64, W=256)
    for len_k in (4096, 32768):
        yield dict(kind="decode", Lk=len_k)
    for window in (0, 256):
        yield dict(kind="sparsek", L=4096, D=64, topk=256, W=window)


def label(case: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in case.items())


class Worker:
    def __init__(self, site: str | None):
        env = dict(os.environ)
        if site is not None:
            env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def time(self, case: dict, threads: int, seconds: float) -> float:
        request = dict(case=case, threads=threads, seconds=seconds)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="site dir holding the baseline foveal")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=0.5, help="per case, build and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    new, base = Worker(None), Worker(args.baseline)
    ratios = []
    print(f"{'case':<46}{'threads':>8}{'base ms':>10}{'new ms':>10}{'base/new':>10}")
    for threads in args.threads:
        for case in cases():
            new_times, base_times = [], []
            for _ in range(args.rounds):
                base_times.append(base.time(case, threads, args.seconds / args.rounds))
                new_times.append(new.time(case, threads, args.seconds / args.rounds))
            base_s, new_s = statistics.median(base_times), statistics.median(new_times)
            ratios.append(base_s / new_s)
            print(
                f"{label(case):<46}{threads:>8}{base_s * 1e3:>10.2f}{new_s * 1e3:>10.2f}"
                f"{base_s / new_s:>9.3f}x"
            )
    new.close()
    base.close()
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"\nbaseline_time / new_time: geometric mean {geomean:.3f}x, min {min(ratios):.3f}x, "
        f"max {max(ratios):.3f}x over {len(ratios)} cases"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
