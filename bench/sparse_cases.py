"""The sparse suite of bench/compare_torch.py: training-free sparse attention against foveal's
own dense kernels (the baseline a sparse method has to beat), in one run.

1. Prefill, causal, B 1, H 16, D 64, budget 1/16: ``block_sparse_attention``,
   ``token_topk_attention`` and ``vertical_slash_attention`` (their selection included) against
   ``attention(causal=True)``; L 8192 (quick) or 32768 (--full).
2. Decode, Hq 32, Hkv 8, D 128, one query, budget 1/16: ``quest_decode_attention`` against
   ``decode_attention`` over the same cache; Lk 32768 (quick) or 131072 (--full); pages of 16
   and 32 rows. Page-bound upkeep is included: every timed step first drops the newest token
   and appends it again (two page recomputations, more than a decode step's one).

Recall (the dense attention mass the method keeps, exp(lse - lse_dense)) is printed too; on
random data it says little (docs/frontier.md has planted data with known answers).
"""

from __future__ import annotations

import foveal
import torch

PREFILL_METHODS = {
    "block_sparse": (foveal.block_sparse_attention, foveal.block_sparse_select),
    "token_topk": (foveal.token_topk_attention, foveal.token_topk_select),
    "vertical_slash": (foveal.vertical_slash_attention, foveal.vertical_slash_select),
}


def _prefill_case(method: str, length: int, threads: int, seconds: float, interleaved) -> dict:
    attend, select = PREFILL_METHODS[method]
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn((1, 16, length, 64), generator=generator) for _ in "qkv")
    budget = 1 / 16
    dense_s, sparse_s = interleaved(
        lambda: foveal.attention(q, k, v, causal=True),
        lambda: attend(q, k, v, budget=budget),
        seconds,
        rounds=1,
    )
    select_s, _ = interleaved(
        lambda: select(q, k, budget=budget),
        lambda: None,
        seconds / 4,
        rounds=1,
    )
    _, dense_lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    _, lse = attend(q, k, v, budget=budget, return_lse=True)
    recall = torch.exp(lse - dense_lse).mean().item()
    return dict(
        case="prefill",
        method=method,
        L=length,
        threads=threads,
        budget=budget,
        dense_ms=dense_s * 1e3,
        sparse_ms=sparse_s * 1e3,
        select_ms=select_s * 1e3,
        speedup=dense_s / sparse_s,
        recall=recall,
    )


def _decode_case(len_k: int, page: int, threads: int, seconds: float, interleaved) -> dict:
    generator = torch.Generator().manual_seed(len_k + page)
    k = torch.randn((1, 8, len_k, 128), generator=generator)
    v = torch.randn((1, 8, len_k, 128), generator=generator)
    q = torch.randn((1, 32, 1, 128), generator=generator)
    cache = foveal.KVCache(1, 8, len_k, 128, page_bounds=page)
    cache.append(k, v)
    last_k, last_v = k[:, :, -1:].clone(), v[:, :, -1:].clone()
    out = torch.empty((1, 32, 1, 128))
    budget = 1 / 16

    def step(attend):
        cache.truncate(len_k - 1)
        cache.append(last_k, last_v)
        attend()

    dense_s, quest_s = interleaved(
        lambda: step(lambda: foveal.decode_attention(q, cache, out=out)),
        lambda: step(lambda: foveal.quest_decode_attention(q, cache, budget=budget, out=out)),
        seconds,
    )
    _, dense_lse = foveal.decode_attention(q, cache, return_lse=True)
    _, lse = foveal.quest_decode_attention(q, cache, budget=budget, return_lse=True)
    return dict(
        case="decode",
        method="quest",
        Lk=len_k,
        page=page,
        threads=threads,
        budget=budget,
        dense_ms=dense_s * 1e3,
        sparse_ms=quest_s * 1e3,
        speedup=dense_s / quest_s,
        recall=torch.exp(lse - dense_lse).mean().item(),
    )


def run(threads_list, seconds, interleaved, full) -> list[dict]:
    rows = []
    print(
        f"{'case':<40}{'threads':>8}{'dense ms':>10}{'sparse ms':>11}{'speed-up':>10}{'recall':>8}"
    )
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        for method, length in (
            (method, length)
            for method in PREFILL_METHODS
            for length in ((32768,) if full else (8192,))
        ):
            row = _prefill_case(method, length, threads, seconds, interleaved)
            rows.append(row)
            label = f"{method} prefill L{length} (select {row['select_ms']:.0f} ms)"
            print(
                f"{label:<40}{threads:>8}{row['dense_ms']:>10.1f}{row['sparse_ms']:>11.1f}"
                f"{row['speedup']:>9.2f}x{row['recall']:>8.3f}"
            )
        for len_k in (131072,) if full else (32768,):
            for page in (16, 32):
                row = _decode_case(len_k, page, threads, seconds, interleaved)
                rows.append(row)
                label = f"quest decode Lk{len_k} page {page}"
                print(
                    f"{label:<40}{threads:>8}{row['dense_ms']:>10.2f}{row['sparse_ms']:>11.2f}"
                    f"{row['speedup']:>9.2f}x{row['recall']:>8.3f}"
                )
    return rows


def markdown_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| method | case | threads | dense ms | sparse ms | speed-up | recall (random data) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["case"] == "prefill":
            case = f"prefill L {row['L']} (selection {row['select_ms']:.0f} ms)"
        else:
            case = f"decode Lk {row['Lk']}, pages of {row['page']}"
        lines.append(
            f"| {row['method']} | {case} | {row['threads']} | {row['dense_ms']:.2f} "
            f"| {row['sparse_ms']:.2f} | **{row['speedup']:.2f}x** | {row['recall']:.3f} |"
        )
    return lines
