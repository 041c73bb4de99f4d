"""Times two builds of foveal against each other in one run: the installed one and a baseline
installed elsewhere (e.g. the previous commit). Suites (--suites, default: attention):
  attention  compare_torch.py's dense, window, decode and sparsek_attn cases, and the SparseK
             backward (fp32, B = 1, 16 heads, D = 64, L = 4096, topk = 256);
  pde        PdeSsm.forward (multiplier cached), fp32, B = 2, C = 256, 64x64 and 128x128, periodic
             and zero boundary;
  vq         vq.assign, fp32, N = 65536, D = 64, K in {512, 4096}, l2 and cosine;
  sparsek    the SPARSEK projection sparsek.sparsek, fp32, 1024 rows of n = 4096, k = 256, and
             its backward; the linear scorer, B = 4, L = 4096, Dm = 256, 16 heads;
  spade      SpadeEmbedding of compare_torch.py's spade suite (B = 32, n = 1024, 3 binned
             features of width 64, one continuous, d_model = 256), random weights.
Each build runs in its own worker process; the workers take turns case by case, round by
round, so both see the same machine state. Prints baseline_time / new_time per case (above 1:
the new build is faster) and the geometric mean.

    python3 -m pip install --no-build-isolation --target /tmp/base-site <old checkout>
    python3 bench/compare_builds.py --baseline /tmp/base-site [--threads 1 2] [--seconds 1] \
        [--suites attention pde vq sparsek spade]
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
import foveal.sparsek
import foveal.vq

inputs = {}

def arrays(case):
    key = json.dumps(case, sort_keys=True)
    if key in inputs:
        return inputs[key]
    rng = np.random.default_rng(0)
    kind = case["kind"]
    if kind in EXTRA:
        made = EXTRA[kind](rng, case)
    elif kind == "decode":
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
        if kind in ("sparsek", "sparsek_backward"):
            made["u"] = rng.standard_normal((1, 16, case["L"]), dtype=np.float32)
        if kind == "sparsek_backward":
            made["out"], made["lse"] = foveal.sparsek_attention(
                made["q"], made["k"], made["v"], made["u"], case["topk"], window=case["W"],
                return_lse=True)
            made["grad_out"] = rng.standard_normal(shape, dtype=np.float32)
    inputs[key] = made
    return made

def pde_inputs(rng, case):
    from foveal import pde_ssm
    c, side = 256, case["side"]
    params = (0.5 + 0.2 * rng.random((c, 3)), rng.standard_normal((c, 2)),
              -0.1 * rng.random(c), 0.5 + rng.random(c), rng.standard_normal(c))
    block = pde_ssm.PdeSsm(side, side, c, *(p.astype(np.float32) for p in params),
                           boundary=case["boundary"])
    x = rng.standard_normal((case["B"], side, side, c), dtype=np.float32)
    return dict(block=block, x=x, out=np.empty_like(x))

def vq_inputs(rng, case):
    return dict(x=rng.standard_normal((65536, 64), dtype=np.float32),
                codebook=rng.standard_normal((case["K"], 64), dtype=np.float32))

def projection_inputs(rng, case):
    z = rng.standard_normal((1024, 4096), dtype=np.float32)
    made = dict(z=z, x=rng.standard_normal((4, 4096, 256), dtype=np.float32),
                w=rng.standard_normal((16, 256), dtype=np.float32))
    made["p"] = foveal.sparsek.sparsek(z, 256)
    made["grad_p"] = rng.standard_normal(z.shape, dtype=np.float32)
    return made

def spade_inputs(rng, case):
    from foveal import spade
    names = ("z", "x", "y")
    schema = spade.Schema([spade.Feature.binned(name, 30) for name in names]
                          + [spade.Feature.continuous("energy")])
    weight = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
    features = {name: {"table": weight(32, 64)} for name in names}
    features["energy"] = dict(hidden_weight=weight(16, 1), hidden_bias=weight(16),
                              output_weight=weight(16, 16), output_bias=weight(16))
    embedding = spade.SpadeEmbedding(schema, features, projection_weight=weight(256, 208),
                                     projection_bias=weight(256))
    ids = rng.integers(1, 31, (32, 1024, 3))
    values = (10 * rng.random((32, 1024, 1))).astype(np.float32)
    delayed_ids, delayed_values, _ = spade.delay(schema, ids, values)
    return dict(embedding=embedding, ids=delayed_ids, values=delayed_values)

EXTRA = dict(pde=pde_inputs, vq=vq_inputs, projection=projection_inputs,
             projection_backward=projection_inputs, linear_scores=projection_inputs,
             spade=spade_inputs)

def call(case):
    a = arrays(case)
    kind = case["kind"]
    if kind == "pde":
        return lambda: a["block"](a["x"], out=a["out"])
    if kind == "vq":
        return lambda: foveal.vq.assign(a["x"], a["codebook"], metric=case["metric"])
    if kind == "projection":
        return lambda: foveal.sparsek.sparsek(a["z"], 256)
    if kind == "projection_backward":
        return lambda: foveal.sparsek.sparsek_backward(a["p"], a["grad_p"])
    if kind == "linear_scores":
        return lambda: foveal.sparsek.linear_scores(a["x"], a["w"])
    if kind == "spade":
        return lambda: a["embedding"](a["ids"], a["values"])
    if kind == "sparsek_backward":
        return lambda: foveal.sparsek.sparsek_attention_backward(
            a["q"], a["k"], a["v"], a["u"], a["out"], a["lse"], a["grad_out"], case["topk"],
            window=case["W"])
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


def cases(suites: list) -> list:
    return [case for suite in suites for case in SUITES[suite]()]


def attention_cases():
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
    yield dict(kind="sparsek_backward", L=4096, D=64, topk=256, W=256)


def pde_cases():
    for side in (64, 128):
        for boundary in ("periodic", "zero"):
            yield dict(kind="pde", B=2, side=side, boundary=boundary)


def vq_cases():
    for codes in (512, 4096):
        for metric in ("l2", "cosine"):
            yield dict(kind="vq", K=codes, metric=metric)


def sparsek_cases():
    yield dict(kind="projection")
    yield dict(kind="projection_backward")
    yield dict(kind="linear_scores")


def spade_cases():
    yield dict(kind="spade")


SUITES = dict(
    attention=attention_cases, pde=pde_cases, vq=vq_cases, sparsek=sparsek_cases, spade=spade_cases
)


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
    parser.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=["attention"])
    args = parser.parse_args()

    new, base = Worker(None), Worker(args.baseline)
    ratios = []
    print(f"{'case':<46}{'threads':>8}{'base ms':>10}{'new ms':>10}{'base/new':>10}")
    for threads in args.threads:
        for case in cases(args.suites):
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
