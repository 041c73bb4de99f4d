"""The precision suite of bench/compare_torch.py: 16-bit storage.

1. Decode over a KV cache (B 1, Hq 32, Hkv 8, D 128, one query): foveal's bfloat16, float16 and
   8-bit (int8 blocks of 32 with a float32 scale) caches against its float32 cache, the GB/s of
   cache bytes read against the machine's copy bandwidth, and each cache's output error
   against float64 attention over the unquantized keys and values.
2. bfloat16 prefill (B 1, H 16, D 64 / 128, causal and not): foveal against torch SDPA in
   bfloat16, and both errors against float64 (FlashAttention's rule: foveal's at most 2x that
   of a plain bfloat16 torch implementation, softmax(q k^T) v in bfloat16).
3. SparseK prefill (B 1, Hq 16, Hkv 4, D 64 / 128, topk 256, window 256): foveal's bfloat16 call
   against its float32 call on the same values, both errors against its float64 call.
"""

from __future__ import annotations

import foveal
import torch


def _decode_case(len_k: int, threads: int, seconds: float, interleaved, copy_gbps: float):
    generator = torch.Generator().manual_seed(0)
    k = torch.randn((1, 8, len_k, 128), generator=generator)
    v = torch.randn((1, 8, len_k, 128), generator=generator)
    q = torch.randn((1, 32, 1, 128), generator=generator)
    calls = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cache = foveal.KVCache.wrap(k.to(dtype), v.to(dtype), lengths=[len_k])
        query = q.to(dtype)
        out = torch.empty((1, 32, 1, 128), dtype=dtype)
        calls[dtype] = (lambda c=cache, x=query, o=out: foveal.decode_attention(x, c, out=o), out)
    int8 = foveal.KVCache(1, 8, len_k, 128, dtype="int8")
    int8.append(k, v)
    int8_out = torch.empty((1, 32, 1, 128))
    calls["int8"] = (lambda: foveal.decode_attention(q, int8, out=int8_out), int8_out)
    single_s, bf16_s = interleaved(calls[torch.float32][0], calls[torch.bfloat16][0], seconds)
    _, fp16_s = interleaved(calls[torch.float32][0], calls[torch.float16][0], seconds)
    single_s_int8, int8_s = interleaved(calls[torch.float32][0], calls["int8"][0], seconds)
    for call, _ in calls.values():
        call()
    difference = (calls[torch.bfloat16][1].float() - calls[torch.float32][1]).abs().max().item()
    exact = _exact_decode(q, k, v)
    errors = {
        name: ((out.double() - exact).norm() / exact.norm()).item()
        for name, (_, out) in zip(("float32", "bfloat16", "float16", "int8"), calls.values())
    }
    cache_bytes = 2 * k.numel()
    return dict(
        case="decode",
        Lk=len_k,
        threads=threads,
        float32_ms=single_s * 1e3,
        bfloat16_ms=bf16_s * 1e3,
        float16_ms=fp16_s * 1e3,
        int8_ms=int8_s * 1e3,
        bfloat16_speedup=single_s / bf16_s,
        float16_speedup=single_s / fp16_s,
        int8_speedup=single_s_int8 / int8_s,
        bfloat16_gbps=cache_bytes * 2 / bf16_s * 1e-9,
        float32_gbps=cache_bytes * 4 / single_s * 1e-9,
        int8_gbps=cache_bytes * 36 / 32 / int8_s * 1e-9,
        copy_gbps=copy_gbps,
        max_abs_diff=difference,
        **{f"{name}_error": error for name, error in errors.items()},
    )


def _exact_decode(q, k, v):
    """float64 decode of q [1, 32, 1, D] over k, v [1, 8, Lk, D] (GQA groups of 4: the 4 query
    heads of a group as 4 rows)."""
    rows = q.double().reshape(1, 8, 4, q.shape[-1])
    scores = (rows @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (torch.softmax(scores, -1) @ v.double()).reshape(q.shape)


def _plain(q, k, v, causal):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _prefill_case(length: int, dim: int, causal: bool, threads: int, seconds: float, interleaved):
    generator = torch.Generator().manual_seed(length + dim)
    q, k, v = (torch.randn((1, 16, length, dim), generator=generator).bfloat16() for _ in "qkv")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    foveal_s, torch_s = interleaved(
        lambda: foveal.attention(q, k, v, causal=causal),
        lambda: sdpa(q, k, v, is_causal=causal),
        seconds,
    )
    # Errors against float64 on the first 4 heads (the plain implementation forms [L, L]).
    head = slice(0, 4)
    exact = _plain(q[:, head].double(), k[:, head].double(), v[:, head].double(), causal)
    ours = foveal.attention(q[:, head], k[:, head], v[:, head], causal=causal).double()
    plain = _plain(q[:, head], k[:, head], v[:, head], causal).double()
    sdpa_error = sdpa(q[:, head], k[:, head], v[:, head], is_causal=causal).double() - exact
    return dict(
        case="prefill",
        L=length,
        D=dim,
        causal=causal,
        threads=threads,
        foveal_ms=foveal_s * 1e3,
        torch_ms=torch_s * 1e3,
        ratio=torch_s / foveal_s,
        foveal_error=(ours - exact).abs().max().item(),
        plain_error=(plain - exact).abs().max().item(),
        sdpa_error=sdpa_error.abs().max().item(),
    )


def _sparsek_case(length: int, dim: int, threads: int, seconds: float, interleaved):
    """SparseK prefill (B 1, Hq 16, Hkv 4, topk 256, window 256, gate value) in bfloat16 against
    foveal's float32 call on the same values; both errors against foveal's float64 call."""
    generator = torch.Generator().manual_seed(length + dim + 5)
    q = torch.randn((1, 16, length, dim), generator=generator).bfloat16()
    k, v = (torch.randn((1, 4, length, dim), generator=generator).bfloat16() for _ in "kv")
    u = (2 * torch.randn((1, 4, length), generator=generator)).bfloat16()
    wide = [x.float() for x in (q, k, v, u)]
    options = dict(window=256)
    half_s, single_s = interleaved(
        lambda: foveal.sparsek_attention(q, k, v, u, 256, **options),
        lambda: foveal.sparsek_attention(*wide, 256, **options),
        seconds,
    )
    exact = foveal.sparsek_attention(*(x.double() for x in wide), 256, **options)
    half = foveal.sparsek_attention(q, k, v, u, 256, **options).double()
    single = foveal.sparsek_attention(*wide, 256, **options).double()
    return dict(
        case="sparsek",
        L=length,
        D=dim,
        threads=threads,
        float32_ms=single_s * 1e3,
        bfloat16_ms=half_s * 1e3,
        speedup=single_s / half_s,
        bfloat16_error=(half - exact).abs().max().item(),
        float32_error=(single - exact).abs().max().item(),
    )


def run(threads_list, seconds, interleaved, full, copy_bandwidth) -> list[dict]:
    rows = []
    print(
        f"{'decode case':<30}{'threads':>8}{'f32 ms':>9}{'bf16 ms':>9}{'x':>7}{'f16 ms':>9}"
        f"{'x':>7}{'int8 ms':>9}{'x':>7}{'bf16 GB/s':>11}{'of copy':>9}{'int8 GB/s':>11}"
        f"{'err f32':>9}{'err bf16':>10}{'err int8':>10}"
    )
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        copy = copy_bandwidth(seconds)
        for len_k in (4096, 32768, 131072):
            row = _decode_case(len_k, threads, seconds, interleaved, copy)
            rows.append(row)
            print(
                f"{f'Hq32 Hkv8 D128 Lk{len_k}':<30}{threads:>8}{row['float32_ms']:>9.2f}"
                f"{row['bfloat16_ms']:>9.2f}{row['bfloat16_speedup']:>6.2f}x"
                f"{row['float16_ms']:>9.2f}{row['float16_speedup']:>6.2f}x"
                f"{row['int8_ms']:>9.2f}{row['int8_speedup']:>6.2f}x"
                f"{row['bfloat16_gbps']:>11.1f}{row['bfloat16_gbps'] / copy:>9.0%}"
                f"{row['int8_gbps']:>11.1f}{row['float32_error']:>9.1e}"
                f"{row['bfloat16_error']:>10.1e}{row['int8_error']:>10.1e}"
            )
    print(
        f"\n{'bf16 prefill case':<30}{'threads':>8}{'foveal ms':>11}{'sdpa ms':>9}{'ratio':>8}"
        f"{'err foveal':>12}{'err plain':>11}{'err sdpa':>10}"
    )
    lengths = (1024, 2048, 4096, 8192) if full else (1024, 2048)
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        for dim in (64, 128):
            for length in lengths:
                for causal in (False, True):
                    row = _prefill_case(length, dim, causal, threads, seconds, interleaved)
                    rows.append(row)
                    label = f"B1 H16 L{length} D{dim}{' causal' if causal else ''}"
                    print(
                        f"{label:<30}{threads:>8}{row['foveal_ms']:>11.1f}{row['torch_ms']:>9.1f}"
                        f"{row['ratio']:>7.2f}x{row['foveal_error']:>12.1e}"
                        f"{row['plain_error']:>11.1e}{row['sdpa_error']:>10.1e}"
                    )
    print(
        f"\n{'SparseK prefill (window 256)':<30}{'threads':>8}{'f32 ms':>9}{'bf16 ms':>9}"
        f"{'x':>7}{'err f32':>9}{'err bf16':>10}"
    )
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        for dim in (64, 128):
            for length in (4096, 16384) if full else (4096,):
                row = _sparsek_case(length, dim, threads, seconds, interleaved)
                rows.append(row)
                print(
                    f"{f'Hq16 Hkv4 topk256 L{length} D{dim}':<30}{threads:>8}"
                    f"{row['float32_ms']:>9.1f}{row['bfloat16_ms']:>9.1f}{row['speedup']:>6.2f}x"
                    f"{row['float32_error']:>9.1e}{row['bfloat16_error']:>10.1e}"
                )
    return rows


def markdown_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| decode (Hq 32, Hkv 8, D 128) | threads | float32 ms | bfloat16 ms (speed-up) "
        "| float16 ms (speed-up) | int8 ms (speed-up) | bfloat16 GB/s (of copy) | int8 GB/s "
        "| error float32 / bfloat16 / int8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if row["case"] == "decode":
            lines.append(
                f"| Lk {row['Lk']} | {row['threads']} | {row['float32_ms']:.2f} "
                f"| {row['bfloat16_ms']:.2f} (**{row['bfloat16_speedup']:.2f}x**) "
                f"| {row['float16_ms']:.2f} ({row['float16_speedup']:.2f}x) "
                f"| {row['int8_ms']:.2f} (**{row['int8_speedup']:.2f}x**) "
                f"| {row['bfloat16_gbps']:.1f} ({row['bfloat16_gbps'] / row['copy_gbps']:.0%}) "
                f"| {row['int8_gbps']:.1f} | {row['float32_error']:.1e} / "
                f"{row['bfloat16_error']:.1e} / {row['int8_error']:.1e} |"
            )
    lines += [
        "",
        "| bfloat16 prefill (B 1, H 16) | threads | foveal ms | SDPA ms | SDPA / foveal "
        "| error foveal | error plain bf16 | error SDPA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["case"] == "prefill":
            lines.append(
                f"| L {row['L']}, D {row['D']}{', causal' if row['causal'] else ''} "
                f"| {row['threads']} | {row['foveal_ms']:.1f} | {row['torch_ms']:.1f} "
                f"| **{row['ratio']:.2f}x** | {row['foveal_error']:.1e} "
                f"| {row['plain_error']:.1e} | {row['sdpa_error']:.1e} |"
            )
    lines += [
        "",
        "| SparseK prefill (Hq 16, Hkv 4, topk 256, window 256) | threads | float32 ms "
        "| bfloat16 ms | speed-up | error float32 | error bfloat16 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["case"] == "sparsek":
            lines.append(
                f"| L {row['L']}, D {row['D']} | {row['threads']} | {row['float32_ms']:.1f} "
                f"| {row['bfloat16_ms']:.1f} | **{row['speedup']:.2f}x** "
                f"| {row['float32_error']:.1e} | {row['bfloat16_error']:.1e} |"
            )
    return lines
