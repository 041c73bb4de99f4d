"""Hashes of the outputs of a fixed grid of attention calls, for refactors that must not change
arithmetic: run it before and after a change and compare the two files.

    python3 scripts/bitwise_snapshot.py before.json      # on the old build
    python3 scripts/bitwise_snapshot.py after.json       # on the new build
    python3 scripts/bitwise_snapshot.py --compare before.json after.json

Covers dense attention (masks, sinks, softcap, bias, GQA, q_offset), sliding window, decode over
plain and ring-buffer KV caches (split-KV and multi-tile), SparseK attention (every gate,
windows, sinks, non-causal) and SparseKCache decode, in float32 and float64, each at 1 and 2
threads. Each case records whether a causal query before the last sink can see a later sink
(`early_sinks`): those are the cases that a change of the causality rule may change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import foveal
import foveal.sparsek
import numpy as np


def _digest(*arrays) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()[:16]


def _tensors(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def _cases():
    """(name, early_sinks, thunk returning arrays) for every case of the grid."""
    cases = []
    shapes = [  # B, Hq, Hkv, Lq, Lk, D, Dv
        (1, 1, 1, 1, 1, 8, 8),
        (2, 4, 2, 37, 37, 19, 23),
        (1, 8, 2, 130, 300, 64, 64),
        (1, 2, 1, 67, 67, 128, 32),
    ]
    masks = [
        dict(),
        dict(causal=True),
        dict(causal=True, window_left=5),
        dict(causal=True, window_left=2, sink_tokens=4),
        dict(window_left=7, window_right=3, sink_tokens=2),
        dict(causal=True, sink_tokens=3, softcap=20.0),
        dict(window_left=0, window_right=0),
    ]
    for dtype in (np.float32, np.float64):
        for shape_index, (b, hq, hkv, lq, lk, d, dv) in enumerate(shapes):
            for mask_index, mask in enumerate(masks):
                for threads in (1, 2):

                    def dense(
                        b=b,
                        hq=hq,
                        hkv=hkv,
                        lq=lq,
                        lk=lk,
                        d=d,
                        dv=dv,
                        mask=mask,
                        dtype=dtype,
                        threads=threads,
                        seed=shape_index,
                    ):
                        rng = np.random.default_rng(seed)
                        q = _tensors(rng, (b, hq, lq, d), dtype)
                        k = _tensors(rng, (b, hkv, lk, d), dtype)
                        v = _tensors(rng, (b, hkv, lk, dv), dtype)
                        out, lse = foveal.attention(
                            q, k, v, return_lse=True, num_threads=threads, **mask
                        )
                        return out, lse

                    early = mask.get("causal", False) and mask.get("sink_tokens", 0) > 1
                    name = f"dense/{np.dtype(dtype).name}/s{shape_index}/m{mask_index}/t{threads}"
                    cases.append((name, early, dense))
            for threads in (1, 2):

                def window(
                    dtype=dtype, threads=threads, seed=shape_index, shape=shapes[shape_index]
                ):
                    b, hq, hkv, _lq, lk, d, dv = shape
                    rng = np.random.default_rng(seed + 100)
                    q = _tensors(rng, (b, hq, lk, d), dtype)
                    k = _tensors(rng, (b, hkv, lk, d), dtype)
                    v = _tensors(rng, (b, hkv, lk, dv), dtype)
                    return foveal.sliding_window_attention(
                        q,
                        k,
                        v,
                        window_left=9,
                        causal=True,
                        sink_tokens=2,
                        return_lse=True,
                        num_threads=threads,
                    )

                name = f"window/{np.dtype(dtype).name}/s{shape_index}/t{threads}"
                cases.append((name, True, window))
    decodes = [  # B, Hq, Hkv, Lq, D, ring, capacity, lengths, options
        (1, 4, 1, 1, 64, False, 5000, [4100], dict()),
        (2, 8, 2, 3, 19, False, 700, [650, 301], dict(causal=True)),
        (2, 8, 2, 1, 32, True, 300, [900, 257], dict(window_left=200, sink_tokens=4)),
        (1, 2, 2, 5, 16, True, 64, [70], dict(causal=True, window_left=50, sink_tokens=3)),
        (1, 64, 1, 3, 16, False, 200, [150], dict(causal=True, sink_tokens=5)),
    ]
    for dtype in (np.float32, np.float64):
        for index, (b, hq, hkv, lq, d, ring, capacity, lengths, options) in enumerate(decodes):
            for threads in (1, 2):

                def decode(
                    b=b,
                    hq=hq,
                    hkv=hkv,
                    lq=lq,
                    d=d,
                    ring=ring,
                    capacity=capacity,
                    lengths=lengths,
                    options=options,
                    dtype=dtype,
                    threads=threads,
                    seed=index,
                ):
                    rng = np.random.default_rng(seed + 200)
                    sinks = options.get("sink_tokens", 0) if ring else 0
                    cache = foveal.KVCache(
                        b,
                        hkv,
                        capacity,
                        d,
                        dtype=np.dtype(dtype).name,
                        ring=ring,
                        sink_tokens=sinks,
                    )
                    longest = max(lengths)
                    for start in range(0, longest, 64):
                        step = min(64, longest - start)
                        counts = [max(0, min(step, n - start)) for n in lengths]
                        k = _tensors(rng, (b, hkv, step, d), dtype)
                        v = _tensors(rng, (b, hkv, step, d), dtype)
                        cache.append(k, v, counts=counts)
                    q = _tensors(rng, (b, hq, lq, d), dtype)
                    return foveal.decode_attention(
                        q, cache, return_lse=True, num_threads=threads, **options
                    )

                early = options.get("causal", False) and options.get("sink_tokens", 0) > 0
                name = f"decode/{np.dtype(dtype).name}/c{index}/t{threads}"
                cases.append((name, early, decode))
    sparse = [  # B, Hq, Hkv, Lq, Lk, D, options
        (1, 2, 1, 200, 200, 32, dict(topk=16)),
        (2, 4, 2, 97, 301, 19, dict(topk=40, window=8, sink_tokens=3, gate="kv")),
        (1, 2, 2, 130, 130, 64, dict(topk=7, window=20, gate="none")),
        (1, 2, 1, 50, 90, 16, dict(topk=12, causal=False, sink_tokens=2)),
        (1, 1, 1, 70, 70, 8, dict(topk=300, gate="none")),
    ]
    for dtype in (np.float32, np.float64):
        for index, (b, hq, hkv, lq, lk, d, options) in enumerate(sparse):
            for threads in (1, 2):

                def sparsek(
                    b=b,
                    hq=hq,
                    hkv=hkv,
                    lq=lq,
                    lk=lk,
                    d=d,
                    options=options,
                    dtype=dtype,
                    threads=threads,
                    seed=index,
                ):
                    rng = np.random.default_rng(seed + 300)
                    q = _tensors(rng, (b, hq, lq, d), dtype)
                    k = _tensors(rng, (b, hkv, lk, d), dtype)
                    v = _tensors(rng, (b, hkv, lk, d), dtype)
                    u = _tensors(rng, (b, hkv, lk), dtype) * 3
                    opts = dict(options)
                    topk = opts.pop("topk")
                    return foveal.sparsek_attention(
                        q, k, v, u, topk, return_lse=True, num_threads=threads, **opts
                    )

                name = f"sparsek/{np.dtype(dtype).name}/c{index}/t{threads}"
                cases.append((name, False, sparsek))

            def sparsek_cache(dtype=dtype, seed=index, threads=1):
                rng = np.random.default_rng(seed + 400)
                cache = foveal.sparsek.SparseKCache(
                    2,
                    2,
                    16,
                    topk=9,
                    window=5,
                    sink_tokens=2,
                    gate="kv",
                    dtype=np.dtype(dtype).name,
                    num_threads=threads,
                )
                outputs = []
                for _step in range(60):
                    k = _tensors(rng, (2, 2, 1, 16), dtype)
                    v = _tensors(rng, (2, 2, 1, 16), dtype)
                    u = _tensors(rng, (2, 2, 1), dtype)
                    cache.append(k, v, u)
                    q = _tensors(rng, (2, 6, 1, 16), dtype)
                    outputs.extend(cache.attend(q, return_lse=True))
                return outputs

            cases.append((f"sparsek_cache/{np.dtype(dtype).name}/c{index}", False, sparsek_cache))
    return cases


def snapshot(path: str) -> None:
    result = {}
    for name, early, thunk in _cases():
        outputs = thunk()
        result[name] = {"digest": _digest(*outputs), "early_sinks": early}
    with open(path, "w") as file:
        json.dump(result, file, indent=1, sort_keys=True)
    print(f"{len(result)} cases written to {path}")


def compare(before_path: str, after_path: str) -> int:
    with open(before_path) as file:
        before = json.load(file)
    with open(after_path) as file:
        after = json.load(file)
    same = [name for name in before if name in after and before[name] == after[name]]
    changed = [name for name in before if name in after and before[name] != after[name]]
    unexpected = [name for name in changed if not before[name]["early_sinks"]]
    print(
        f"{len(same)} bitwise equal, {len(changed)} changed "
        f"({len(changed) - len(unexpected)} of them cases with causal queries before sinks)"
    )
    for name in changed:
        tag = "" if before[name]["early_sinks"] else "  <-- not a causal-sink case"
        print(f"  changed: {name}{tag}")
    return 1 if unexpected else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.paths)
    snapshot(args.paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
