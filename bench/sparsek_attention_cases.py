"""SparseK attention: foveal against dense attention, for compare_torch.py --suite sparsek_attn.

The case of issue 5: fp32, B = 1, H = 16, D = 64, causal, topk = 256, window W in {0, 256},
L in {4096, 16384, 65536} (the quick demo runs 4096 only). For each size: foveal's SparseK
attention, foveal's own dense causal attention and torch SDPA causal on the same q, k, v (up to
L = 16384; dense at 65536 would take minutes), and the selection on its own — every head's
pass over its scores (prefix thresholds and top-k, foveal.sparsek.prefix_thresholds on u),
reported as a fraction of the SparseK call. A correctness check at L = 1024 compares the hard
top-k attention (gate "none") with SDPA given the boolean mask of the same selection.
"""

from __future__ import annotations

from typing import Callable

import foveal
import numpy as np
import torch
from foveal import sparsek as sk

HEADS, DIM, TOPK = 16, 64, 256
WINDOWS = (0, 256)
FULL_LENGTHS = (4096, 16384, 65536)
QUICK_LENGTHS = (4096,)
DENSE_MAX_LENGTH = 16384


def selection_mask(u: torch.Tensor, length: int, window: int) -> torch.Tensor:
    """[H, L, L] boolean mask of what each query sees: its selection, window and nothing else."""
    indices, _ = sk.sparsek_select(u, TOPK, length, window=window)
    mask = torch.zeros(HEADS, length, length + 1, dtype=torch.bool)
    mask.scatter_(2, torch.where(indices[0] < 0, length, indices[0]), True)
    mask = mask[..., :length]
    if window > 0:
        positions = torch.arange(length)
        distance = positions[:, None] - positions[None, :]
        mask |= (distance >= 0) & (distance < window)
    return mask


def check_against_sdpa(generator: torch.Generator) -> float:
    """max |foveal - SDPA| of hard top-k attention with a window at L = 1024."""
    length, window = 1024, 64
    q, k, v = (torch.randn(1, HEADS, length, DIM, generator=generator) for _ in range(3))
    u = torch.randn(1, HEADS, length, generator=generator)
    ours = foveal.sparsek_attention(q, k, v, u, TOPK, window=window, gate="none")
    mask = selection_mask(u, length, window)
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    return (ours - theirs).abs().max().item()


def run(
    threads_list: list, seconds: float, interleaved: Callable, median_time, full: bool = True
) -> list:
    """Prints the table of compare_torch.py --suite sparsek_attn and returns its rows."""
    generator = torch.Generator().manual_seed(0)
    difference = check_against_sdpa(generator)
    print(f"\nhard top-k + window vs SDPA with the same mask (L=1024): max|diff| {difference:.1e}")
    lengths = FULL_LENGTHS if full else QUICK_LENGTHS
    print(
        f"\nSparseK attention fp32 B=1 H={HEADS} D={DIM} causal topk={TOPK} "
        "(selection = every head's threshold and top-k pass)"
    )
    print(
        f"{'threads':>8}{'L':>7}{'W':>5}{'sparsek ms':>12}{'select ms':>11}{'select':>8}"
        f"{'dense ms':>10}{'sdpa ms':>10}{'vs dense':>10}{'vs sdpa':>9}"
    )
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        for length in lengths:
            q, k, v = (torch.randn(1, HEADS, length, DIM, generator=generator) for _ in range(3))
            u = torch.randn(1, HEADS, length, generator=generator)
            for row in measure(q, k, v, u, seconds, interleaved, median_time):
                row.update(threads=threads, max_abs_difference_vs_sdpa_masked=difference)
                rows.append(row)
                dense = (
                    f"{row['dense_ms']:>10.0f}{row['sdpa_ms']:>10.0f}{row['vs_dense']:>9.1f}x"
                    f"{row['vs_sdpa']:>8.1f}x"
                    if "dense_ms" in row
                    else f"{'-':>10}{'-':>10}{'-':>10}{'-':>9}"
                )
                print(
                    f"{threads:>8}{length:>7}{row['W']:>5}{row['foveal_ms']:>12.1f}"
                    f"{row['selection_ms']:>11.1f}{row['selection_fraction']:>8.1%}{dense}"
                )
    add_growth(rows)
    for row in rows:
        if "growth_vs_16384" in row:
            print(
                f"t({row['L']}) / t(16384), threads={row['threads']} W={row['W']}: "
                f"{row['growth_vs_16384']:.2f} (linear: {row['L'] / 16384:.0f})"
            )
    return rows


def measure(q, k, v, u, seconds: float, interleaved: Callable, median_time) -> list:
    """One row per window for inputs of one length, at the current thread count."""
    length = q.shape[2]
    reps = 3 if length <= DENSE_MAX_LENGTH else 2
    dense = {}
    if length <= DENSE_MAX_LENGTH:
        # Dense runs take seconds at L = 16384: one round, two timed calls each.
        dense_s, sdpa_s = interleaved(
            lambda: foveal.attention(q, k, v, causal=True),
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            seconds,
            rounds=1,
        )
        dense = dict(dense_ms=dense_s * 1e3, sdpa_ms=sdpa_s * 1e3)
    select_s = median_time(lambda: sk.prefix_thresholds(u[0], TOPK), seconds, reps)
    rows = []
    for window in WINDOWS:
        sparse_s = median_time(
            lambda window=window: foveal.sparsek_attention(q, k, v, u, TOPK, window=window),
            seconds,
            reps,
        )
        row = dict(
            op="sparsek_attention",
            L=length,
            W=window,
            topk=TOPK,
            foveal_ms=sparse_s * 1e3,
            selection_ms=select_s * 1e3,
            selection_fraction=select_s / sparse_s,
            **dense,
        )
        if dense:
            row.update(
                vs_dense=dense["dense_ms"] / row["foveal_ms"],
                vs_sdpa=dense["sdpa_ms"] / row["foveal_ms"],
            )
        rows.append(row)
    return rows


def add_growth(rows: list) -> None:
    """growth_vs_16384 = t(L) / t(16384) for the rows past 16384 (same threads and W)."""
    base = {(r["threads"], r["W"]): r["foveal_ms"] for r in rows if r["L"] == 16384}
    for row in rows:
        key = (row["threads"], row["W"])
        if row["L"] > 16384 and key in base:
            row["growth_vs_16384"] = row["foveal_ms"] / base[key]


def markdown_lines(rows: list) -> list:
    lines = [
        "| threads | L | W | SparseK ms | selection ms | selection share | foveal dense ms "
        "| SDPA ms | vs foveal dense | vs SDPA | t(L) / t(16384) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        dense = (
            f"{row['dense_ms']:.0f} | {row['sdpa_ms']:.0f} | **{row['vs_dense']:.1f}x** "
            f"| **{row['vs_sdpa']:.1f}x**"
            if "dense_ms" in row
            else "- | - | - | -"
        )
        growth = f"{row['growth_vs_16384']:.2f}" if "growth_vs_16384" in row else "-"
        lines.append(
            f"| {row['threads']} | {row['L']} | {row['W']} | {row['foveal_ms']:.1f} "
            f"| {row['selection_ms']:.1f} | {row['selection_fraction']:.1%} | {dense} | {growth} |"
        )
    return lines


def plot(rows: list, path) -> bool:
    """Time per query row against L, per window and thread count (flat = linear cost)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axis = plt.subplots(figsize=(7, 4.5))
    for threads in sorted({r["threads"] for r in rows}):
        for window in WINDOWS:
            subset = [r for r in rows if r["threads"] == threads and r["W"] == window]
            lengths = np.array([r["L"] for r in subset])
            per_row = np.array([r["foveal_ms"] * 1e6 / r["L"] for r in subset])
            axis.plot(lengths, per_row, "o-", label=f"SparseK W={window}, {threads} thr")
            dense = [r for r in subset if "dense_ms" in r]
            if window == 0 and dense:
                axis.plot(
                    [r["L"] for r in dense],
                    [r["dense_ms"] * 1e6 / r["L"] for r in dense],
                    "s--",
                    label=f"foveal dense causal, {threads} thr",
                )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length L")
    axis.set_ylabel("ns per query row (all 16 heads)")
    axis.set_title(f"SparseK attention, topk={TOPK}, D={DIM}: cost per row stays flat")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
