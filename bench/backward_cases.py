"""The backward suite of compare_torch.py: training steps of attention, forward + backward.

foveal.torch.attention(q, k, v).backward(g) against torch's
scaled_dot_product_attention(q, k, v).backward(g) on the same tensors (fp32, B = 1, H = 16,
requires_grad=True), causal or not; and the sliding window (W = 256) against SDPA with the
equivalent boolean mask. Reports the times, the ratio, the largest gradient difference, and
foveal's backward GFLOP/s (2.5 times the forward's FLOPs: the recomputed scores, dP, and the
three gradient products) next to its forward GFLOP/s.
"""

from __future__ import annotations

import math

import foveal
import foveal.torch as foveal_torch
import torch

WINDOW = 256


def _flops(length: int, dim: int, causal: bool) -> float:
    pairs = length * (length + 1) / 2 if causal else length * length
    return 4.0 * 16 * pairs * dim  # the forward's: QK^T and PV


def _dense_row(length, dim, causal, threads, seconds, interleaved, median_time) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (1, 16, length, dim)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator)

    def foveal_step():
        foveal_torch.attention(q, k, v, causal=causal).backward(grad)

    def torch_step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)

    foveal_step()
    foveal_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch_step()
    error = max((a - t.grad).abs().max().item() for a, t in zip(foveal_grads, (q, k, v)))
    foveal_s, torch_s = interleaved(foveal_step, torch_step, seconds)

    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = foveal.attention(qd, kd, vd, causal=causal, return_lse=True)
    forward_s = median_time(lambda: foveal.attention(qd, kd, vd, causal=causal), seconds / 3, 2)
    backward_s = median_time(
        lambda: foveal.attention_backward(qd, kd, vd, out, lse, grad, causal=causal),
        seconds / 3,
        2,
    )
    flops = _flops(length, dim, causal)
    return dict(
        op="dense",
        L=length,
        D=dim,
        causal=causal,
        threads=threads,
        foveal_ms=foveal_s * 1e3,
        torch_ms=torch_s * 1e3,
        ratio=torch_s / foveal_s,
        forward_gflops=flops / forward_s * 1e-9,
        backward_gflops=2.5 * flops / backward_s * 1e-9,
        max_abs_diff=error,
    )


def _window_row(length, threads, seconds, interleaved, median_time, with_torch) -> dict:
    generator = torch.Generator().manual_seed(0)
    shape = (1, 16, length, 64)
    q, k, v = (torch.randn(shape, generator=generator).requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=generator)

    def foveal_step():
        foveal_torch.sliding_window_attention(q, k, v, window_left=WINDOW, causal=True).backward(
            grad
        )

    row = dict(op="window", L=length, D=64, W=WINDOW, threads=threads)
    if not with_torch:
        row["foveal_ms"] = median_time(foveal_step, seconds, 2) * 1e3
        return row
    i = torch.arange(length)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - WINDOW)

    def torch_step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(grad)

    foveal_s, torch_s = interleaved(foveal_step, torch_step, seconds)
    row.update(foveal_ms=foveal_s * 1e3, torch_ms=torch_s * 1e3, ratio=torch_s / foveal_s)
    return row


def run(threads_list, seconds, interleaved, median_time, full: bool) -> list[dict]:
    lengths = [1024, 2048, 4096, 8192] if full else [1024, 2048]
    window_lengths = [4096, 8192, 16384, 32768] if full else [4096, 8192]
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        print(f"threads={threads}")
        print(
            f"{'case':<34}{'foveal ms':>11}{'torch ms':>11}{'ratio':>8}{'fwd GF/s':>10}"
            f"{'bwd GF/s':>10}{'max|diff|':>11}"
        )
        for dim in (64, 128):
            for length in lengths:
                for causal in (False, True):
                    row = _dense_row(
                        length, dim, causal, threads, seconds, interleaved, median_time
                    )
                    rows.append(row)
                    label = f"B1 H16 L{length} D{dim} {'causal' if causal else 'full'}"
                    print(
                        f"{label:<34}{row['foveal_ms']:>11.1f}{row['torch_ms']:>11.1f}"
                        f"{row['ratio']:>7.2f}x{row['forward_gflops']:>10.1f}"
                        f"{row['backward_gflops']:>10.1f}{row['max_abs_diff']:>11.1e}"
                    )
        for length in window_lengths:
            row = _window_row(length, threads, seconds, interleaved, median_time, length <= 8192)
            rows.append(row)
            label = f"window W{WINDOW} L{length} D64"
            ratio = f"{row['ratio']:>7.2f}x" if "ratio" in row else f"{'':>8}"
            torch_ms = f"{row['torch_ms']:>11.1f}" if "torch_ms" in row else f"{'':>11}"
            print(f"{label:<34}{row['foveal_ms']:>11.1f}{torch_ms}{ratio}")
    return rows


def markdown_lines(rows: list[dict]) -> list[str]:
    """The dense grid (with its geometric mean per thread count), then the window rows."""
    dense = [row for row in rows if "forward_gflops" in row]
    lines = [
        "| threads | D | L | mask | foveal ms | torch ms | torch / foveal | fwd GFLOP/s "
        "| bwd GFLOP/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in dense:
        lines.append(
            f"| {row['threads']} | {row['D']} | {row['L']} | "
            f"{'causal' if row['causal'] else 'none'} | {row['foveal_ms']:.1f} "
            f"| {row['torch_ms']:.1f} | {row['ratio']:.2f}x | {row['forward_gflops']:.0f} "
            f"| {row['backward_gflops']:.0f} |"
        )
    for threads in sorted({row["threads"] for row in dense}):
        ratios = [row["ratio"] for row in dense if row["threads"] == threads]
        mean = math.exp(sum(math.log(ratio) for ratio in ratios) / len(ratios))
        lines.append(
            f"\n{threads} thread(s): geometric mean {mean:.2f}x, "
            f"{min(ratios):.2f}x-{max(ratios):.2f}x over {len(ratios)} cells."
        )
    window = [row for row in rows if row.get("op") == "window"]
    if window:
        lines += [
            "",
            f"| threads | window W{WINDOW}, D 64: L | foveal ms | masked SDPA ms | ratio |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in window:
            torch_ms = f"{row['torch_ms']:.1f}" if "torch_ms" in row else "-"
            ratio = f"**{row['ratio']:.2f}x**" if "ratio" in row else "-"
            lines.append(
                f"| {row['threads']} | {row['L']} | {row['foveal_ms']:.1f} | {torch_ms} | {ratio} |"
            )
    return lines
