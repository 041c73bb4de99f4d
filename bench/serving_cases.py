"""The serving suite of bench/compare_torch.py: a paged KV cache under a server's load.

1. Batch decode of S sequences with lengths drawn from 512-16384 (Hq 32, Hkv 8, D 128, one
   query each): one batch_decode_attention call over a PagedKVCache against S separate
   decode_attention calls on contiguous caches holding the same keys, and the GB/s of K/V read
   against the machine's copy bandwidth; then the same batch over an int8 pool (36 bytes per 32
   values) against the float32 pool, with the relative error of its outputs.
2. Shared prefix: 32 sequences forked from one 8192-token prompt, 256 own tokens each; the
   batch call with prefix sharing against the same call without, and the bytes the pool holds
   against what 32 private caches would.
3. A server loop of random add / append / fork / truncate / remove steps (small heads), checked
   against a float64 numpy reference every 100th step, with the resident set sampled.
"""

from __future__ import annotations

import math
import time

import foveal
import numpy as np

HEADS_Q, HEADS_KV, DIM = 32, 8, 128


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _kv_bytes(tokens: int) -> int:
    return tokens * HEADS_KV * 2 * DIM * 4


def batch_decode_case(
    threads: int,
    seconds: float,
    interleaved,
    copy_gbps: float,
    sequences: int,
    page: int,
    int8: bool = False,
) -> dict:
    rng = np.random.default_rng(0)
    lengths = rng.integers(512, 16385, sequences).tolist()
    tokens = sum(lengths)
    pages = sum(math.ceil(length / page) for length in lengths)
    cache = foveal.PagedKVCache(pages, page, HEADS_KV, DIM)
    cache8 = foveal.PagedKVCache(pages, page, HEADS_KV, DIM, dtype="int8") if int8 else None
    contiguous = []
    ids = []
    for length in lengths:
        k = rng.standard_normal((1, HEADS_KV, length, DIM), dtype=np.float32)
        v = rng.standard_normal((1, HEADS_KV, length, DIM), dtype=np.float32)
        ids.append(cache.add_sequence())
        cache.append(ids[-1], k[0], v[0])
        if cache8 is not None:
            assert cache8.add_sequence() == ids[-1]
            cache8.append(ids[-1], k[0], v[0])
        contiguous.append(foveal.KVCache.wrap(k, v, lengths=[length]))
    q = rng.standard_normal((sequences, HEADS_Q, 1, DIM), dtype=np.float32)
    out = np.empty((sequences, HEADS_Q, 1, DIM), np.float32)
    outs = [np.empty((1, HEADS_Q, 1, DIM), np.float32) for _ in range(sequences)]

    def batched():
        foveal.batch_decode_attention(q, cache, ids, out=out, num_threads=threads)

    def separate():
        for s in range(sequences):
            foveal.decode_attention(q[s : s + 1], contiguous[s], out=outs[s], num_threads=threads)

    batched()
    separate()
    difference = float(np.abs(out - np.concatenate(outs)).max())
    batched_s, separate_s = interleaved(batched, separate, seconds)
    gbps = _kv_bytes(tokens) / batched_s * 1e-9
    extra = {}
    if cache8 is not None:
        out8 = np.empty_like(out)

        def batched8():
            foveal.batch_decode_attention(q, cache8, ids, out=out8, num_threads=threads)

        batched8()
        float_s, int8_s = interleaved(batched, batched8, seconds)
        extra = dict(
            int8_ms=int8_s * 1e3,
            float_ms=float_s * 1e3,
            int8_ratio=float_s / int8_s,
            int8_error=float(np.linalg.norm(out8 - out) / np.linalg.norm(out)),
            int8_mib=cache8.bytes_in_use / 2**20,
            float_mib=cache.bytes_in_use / 2**20,
        )
    return dict(
        case="batch decode",
        sequences=sequences,
        page=page,
        tokens=tokens,
        threads=threads,
        foveal_ms=batched_s * 1e3,
        separate_ms=separate_s * 1e3,
        ratio=separate_s / batched_s,
        foveal_gbps=gbps,
        separate_gbps=_kv_bytes(tokens) / separate_s * 1e-9,
        of_copy=gbps / copy_gbps,
        copy_gbps=copy_gbps,
        max_abs_diff=difference,
        **extra,
    )


def shared_prefix_case(threads: int, seconds: float, interleaved, page: int) -> dict:
    rng = np.random.default_rng(1)
    members, prefix, own = 32, 8192, 256
    pages = prefix // page + members * (math.ceil(own / page) + 1)
    cache = foveal.PagedKVCache(pages, page, HEADS_KV, DIM)
    prompt = cache.add_sequence()
    k = rng.standard_normal((HEADS_KV, prefix, DIM), dtype=np.float32)
    cache.append(prompt, k, rng.standard_normal(k.shape, dtype=np.float32))
    ids = [prompt] + [cache.fork(prompt) for _ in range(members - 1)]
    k = rng.standard_normal((members, HEADS_KV, own, DIM), dtype=np.float32)
    cache.append(ids, k, rng.standard_normal(k.shape, dtype=np.float32))
    q = rng.standard_normal((members, HEADS_Q, 1, DIM), dtype=np.float32)
    shared_out = np.empty((members, HEADS_Q, 1, DIM), np.float32)
    alone_out = np.empty_like(shared_out)

    def shared():
        foveal.batch_decode_attention(q, cache, ids, out=shared_out, num_threads=threads)

    def alone():
        foveal.batch_decode_attention(
            q, cache, ids, out=alone_out, share_prefixes=False, num_threads=threads
        )

    _, info = foveal.batch_decode_attention(q, cache, ids, return_info=True)
    shared()
    alone()
    shared_s, alone_s = interleaved(shared, alone, seconds)
    return dict(
        case="shared prefix",
        sequences=members,
        page=page,
        prefix=prefix,
        own=own,
        threads=threads,
        foveal_ms=shared_s * 1e3,
        unshared_ms=alone_s * 1e3,
        ratio=alone_s / shared_s,
        shared_tokens=info["shared_tokens"],
        pool_mib=cache.bytes_in_use / 2**20,
        private_mib=_kv_bytes(members * (prefix + own)) / 2**20,
        max_abs_diff=float(np.abs(shared_out - alone_out).max()),
    )


def _reference(q, keys, values):
    """float64 decode of one sequence: q [Hq, D], keys/values [Hkv, L, D]."""
    group = q.shape[0] // keys.shape[0]
    k = np.repeat(keys, group, axis=0)
    v = np.repeat(values, group, axis=0)
    logits = np.einsum("hd,hld->hl", q, k) / math.sqrt(q.shape[1])
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.einsum("hl,hld->hd", weights / weights.sum(axis=1, keepdims=True), v)


def _tokens(segments: list, heads_kv: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values [Hkv, L, D] a sequence holds, regenerated from its segments: each
    append is (seed, count, kept): count tokens drawn from that seed, the first kept of them
    still held."""
    empty = np.zeros((heads_kv, 0, dim), np.float32)
    keys, values = [empty], [empty]
    for seed, count, kept in segments:
        k, v = _segment(seed, count, heads_kv, dim)
        keys.append(k[:, :kept])
        values.append(v[:, :kept])
    return np.concatenate(keys, axis=1), np.concatenate(values, axis=1)


def _segment(seed: int, count: int, heads_kv: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(seed)
    k = generator.standard_normal((heads_kv, count, dim), dtype=np.float32)
    return k, generator.standard_normal((heads_kv, count, dim), dtype=np.float32)


def server_loop(steps: int, check_every: int = 100) -> dict:
    """Random server steps on a pool that fills up; returns the worst error against the float64
    reference and the resident set at the first and last checks. The loop keeps no copy of the
    keys: each sequence is a list of (seed, count, kept) appends, regenerated for the checks, so the
    resident set shows the cache's memory, not the test's."""
    rng = np.random.default_rng(2)
    heads_q, heads_kv, dim, page = 8, 2, 64, 32
    cache = foveal.PagedKVCache(256, page, heads_kv, dim)
    segments: dict[int, list] = {}
    worst, exhausted, checks, resident = 0.0, 0, 0, []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        action = rng.choice(["add", "append", "append", "append", "fork", "truncate", "remove"])
        live = list(segments)
        try:
            if action == "add" or not live:
                if len(live) < 24:
                    segments[cache.add_sequence()] = []
            else:
                sequence = int(rng.choice(live))
                if action == "append":
                    seed, count = int(rng.integers(2**31)), int(rng.integers(1, 200))
                    cache.append(sequence, *_segment(seed, count, heads_kv, dim))
                    segments[sequence] = [*segments[sequence], (seed, count, count)]
                elif action == "fork" and len(live) < 24:
                    segments[cache.fork(sequence)] = list(segments[sequence])
                elif action == "truncate":
                    length = int(rng.integers(0, cache.length(sequence) + 1))
                    cache.truncate(sequence, length)
                    kept, total = [], 0
                    for seed, count, held in segments[sequence]:
                        if total < length:
                            kept.append((seed, count, min(held, length - total)))
                        total += held
                    segments[sequence] = kept
                elif action == "remove" and len(live) > 4:
                    cache.remove(sequence)
                    del segments[sequence]
        except MemoryError:
            exhausted += 1
        if step % check_every == 0:
            ready = [s for s in segments if cache.length(s) > 0]
            if ready:
                q = rng.standard_normal((len(ready), heads_q, 1, dim), dtype=np.float32)
                out = foveal.batch_decode_attention(q, cache, ready)
                for s, sequence in enumerate(ready):
                    keys, values = _tokens(segments[sequence], heads_kv, dim)
                    want = _reference(
                        q[s, :, 0].astype(np.float64), keys.astype(np.float64), values
                    )
                    worst = max(worst, float(np.abs(out[s, :, 0] - want).max()))
                checks += 1
            resident.append(_resident_mib())
    return dict(
        case="server loop",
        steps=steps,
        checks=checks,
        exhausted=exhausted,
        max_abs_diff=worst,
        resident_first_mib=resident[0],
        resident_tenth_mib=resident[len(resident) // 10],
        resident_last_mib=resident[-1],
        resident_max_mib=max(resident),
        pool_mib=cache.num_pages * cache.page_bytes / 2**20,
        seconds=time.perf_counter() - start,
    )


def run(threads_list, seconds, interleaved, median_time, full, copy_bandwidth) -> list[dict]:
    import torch  # the copy yardstick runs on torch's threads, as many as the case's

    copies = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        copies[threads] = copy_bandwidth(seconds)
        print(
            f"copy bandwidth (1 GiB, read + write), {threads} threads: {copies[threads]:.1f} GB/s"
        )
    sequences = 64 if full else 16
    rows = []
    print(
        f"{'case':<40}{'threads':>8}{'batch ms':>10}{'separate':>10}{'ratio':>8}{'GB/s':>7}"
        f"{'of copy':>9}{'max|diff|':>11}"
    )
    for page in (128,) if not full else (16, 128):
        for threads in threads_list:
            row = batch_decode_case(
                threads, seconds, interleaved, copies[threads], sequences, page, page == 128
            )
            rows.append(row)
            label = f"{sequences} seqs, {row['tokens']} tokens, page {page}"
            print(
                f"{label:<40}{threads:>8}"
                f"{row['foveal_ms']:>10.1f}{row['separate_ms']:>10.1f}{row['ratio']:>7.2f}x"
                f"{row['foveal_gbps']:>7.1f}{row['of_copy']:>9.0%}{row['max_abs_diff']:>11.1e}"
            )
    print(
        f"\n{'int8 pool vs float32 pool':<40}{'threads':>8}{'int8 ms':>10}{'float32':>10}"
        f"{'ratio':>8}{'MiB':>7}{'float32':>9}{'rel err':>9}"
    )
    for row in rows:
        if "int8_ms" in row:
            label = f"{sequences} seqs, {row['tokens']} tokens, page {row['page']}"
            print(
                f"{label:<40}{row['threads']:>8}{row['int8_ms']:>10.1f}{row['float_ms']:>10.1f}"
                f"{row['int8_ratio']:>7.2f}x{row['int8_mib']:>7.0f}{row['float_mib']:>9.0f}"
                f"{row['int8_error']:>9.1e}"
            )
    print(
        f"\n{'case':<40}{'threads':>8}{'shared ms':>10}{'unshared':>10}{'ratio':>8}"
        f"{'pool MiB':>10}{'private':>9}"
    )
    for threads in threads_list:
        row = shared_prefix_case(threads, seconds, interleaved, 128)
        rows.append(row)
        print(
            f"{'32 seqs, 8192 shared + 256 own, page 128':<40}{threads:>8}"
            f"{row['foveal_ms']:>10.1f}{row['unshared_ms']:>10.1f}{row['ratio']:>7.2f}x"
            f"{row['pool_mib']:>10.0f}{row['private_mib']:>9.0f}"
        )
    loop = server_loop(10000 if full else 2000)
    rows.append(loop)
    print(
        f"\nserver loop: {loop['steps']} steps ({loop['exhausted']} refused for a full pool), "
        f"{loop['checks']} checks vs float64: max |diff| {loop['max_abs_diff']:.1e}; pool "
        f"{loop['pool_mib']:.0f} MiB; resident set {loop['resident_first_mib']:.1f} MiB at the "
        f"first check, {loop['resident_tenth_mib']:.1f} MiB a tenth of the way in, "
        f"{loop['resident_last_mib']:.1f} MiB at the last (max {loop['resident_max_mib']:.1f}); "
        f"{loop['seconds']:.1f} s"
    )
    return rows


def markdown_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| case | threads | foveal ms | baseline ms | ratio | GB/s (of copy) | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["case"] == "batch decode":
            lines.append(
                f"| {row['sequences']} seqs, {row['tokens']} tokens, page {row['page']}, vs "
                f"separate decode_attention | {row['threads']} | {row['foveal_ms']:.1f} | "
                f"{row['separate_ms']:.1f} | **{row['ratio']:.2f}x** | {row['foveal_gbps']:.1f} "
                f"({row['of_copy']:.0%}) | {row['max_abs_diff']:.1e} |"
            )
            if "int8_ms" in row:
                lines.append(
                    f"| the same over an int8 pool ({row['int8_mib']:.0f} MiB) vs the float32 pool "
                    f"({row['float_mib']:.0f} MiB) | {row['threads']} | {row['int8_ms']:.1f} | "
                    f"{row['float_ms']:.1f} | **{row['int8_ratio']:.2f}x** | - | relative "
                    f"{row['int8_error']:.1e} |"
                )
        elif row["case"] == "shared prefix":
            lines.append(
                f"| {row['sequences']} seqs, {row['prefix']} shared + {row['own']} own, vs "
                f"no sharing; pool {row['pool_mib']:.0f} MiB vs {row['private_mib']:.0f} "
                f"private | {row['threads']} | {row['foveal_ms']:.1f} | "
                f"{row['unshared_ms']:.1f} | **{row['ratio']:.2f}x** | - | "
                f"{row['max_abs_diff']:.1e} |"
            )
    return lines
