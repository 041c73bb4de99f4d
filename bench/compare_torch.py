#!/usr/bin/env python3
"""foveal vs PyTorch on the same inputs, in one process: prints torch_time / foveal_time.

    python3 bench/compare_torch.py                  # quick demo of every suite (~2 minutes)
    python3 bench/compare_torch.py --full           # the issues' grids (many minutes)
    python3 bench/compare_torch.py --suite vq       # one suite (any of SUITES)
    python3 bench/compare_torch.py --markdown bench/results/dense_full.json   # table for docs

Suites: dense attention (vs SDPA), sliding-window attention (vs SDPA with the equivalent
boolean mask), decode over a KV cache (vs SDPA with enable_gqa, and against the machine's copy
bandwidth), a 10,000-step ring-buffer decode checked against a dense masked reference, and
the SPADE embedding (vs the same module in PyTorch, bench/spade_cases.py) and VQ assign (vs
torch.cdist and matmul + argmin, bench/vq_cases.py), the SPARSEK projection (vs a torch
implementation by sort, bench/sparsek_cases.py), SparseK attention (vs foveal's dense causal
attention and SDPA, bench/sparsek_attention_cases.py) and the PDE-SSM block (vs torch rfft2 ·
multiplier · irfft2, bench/pde_cases.py), training steps of attention, forward + backward
(vs SDPA forward + backward, bench/backward_cases.py), serving: batch decode over a paged
KV cache (vs separate decode calls), shared-prefix decode (vs no sharing) and a server loop
(bench/serving_cases.py), training steps of the foveal.nn modules (vs
vector-quantize-pytorch and other references when installed, bench/modules_cases.py), and
16-bit storage: bfloat16 / float16 KV caches against float32 ones in decode, and bfloat16
prefill against SDPA in bfloat16 with both errors against float64 (bench/precision_cases.py),
and training-free sparse attention (block-sparse prefill, Quest decode) against foveal's own
dense kernels (bench/sparse_cases.py).
Both libraries run interleaved on identical float32 tensors at each thread count, so machine
noise hits both alike; each time is the median of the repetitions. Writes
bench/results/<suite>_<quick|full>.json and, when matplotlib is installed, a .png beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import foveal
import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(function, min_seconds: float, min_reps: int) -> float:
    function()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        function()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(foveal_fn, torch_fn, min_seconds: float, rounds: int = 3) -> tuple[float, float]:
    """Median times of both, measured in alternating rounds."""
    foveal_times, torch_times = [], []
    for _ in range(rounds):
        foveal_times.append(median_time(foveal_fn, min_seconds / rounds, 2))
        torch_times.append(median_time(torch_fn, min_seconds / rounds, 2))
    return statistics.median(foveal_times), statistics.median(torch_times)


def attention_flops(
    batch: int, heads: int, len_q: int, len_k: int, dim: int, causal: bool
) -> float:
    pairs = len_q * (len_q + 1) / 2 if causal else len_q * len_k
    return 4.0 * batch * heads * pairs * dim


def matmul_gflops(min_seconds: float) -> float:
    a = torch.randn(2048, 2048)
    b = torch.randn(2048, 2048)
    seconds = median_time(lambda: torch.matmul(a, b), min_seconds, 3)
    return 2 * 2048**3 / seconds * 1e-9


def dense_cases(full: bool):
    lengths = [1024, 2048, 4096, 8192] if full else [1024, 2048]
    for dim in (64, 128):
        for length in lengths:
            for causal in (False, True):
                yield dict(op="dense", B=1, H=16, L=length, D=dim, causal=causal)


def run_dense(case: dict, min_seconds: float) -> tuple[float, float, float]:
    generator = torch.Generator().manual_seed(0)
    shape = (case["B"], case["H"], case["L"], case["D"])
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    out = torch.empty(shape)
    foveal_out = foveal.attention(q, k, v, causal=case["causal"], out=out)
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case["causal"])
    error = (foveal_out - torch_out).abs().max().item()
    foveal_s, torch_s = interleaved(
        lambda: foveal.attention(q, k, v, causal=case["causal"], out=out),
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=case["causal"]),
        min_seconds,
    )
    return foveal_s, torch_s, error


MEMORY_PROBE = """
import sys, numpy as np, foveal
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
L, D = int(sys.argv[1]), 64
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, L, D), dtype=np.float32) for _ in range(3))
out = np.zeros_like(q)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set (VmHWM) to the current one
before = status("VmRSS:")
foveal.attention(q, k, v, causal=True, out=out)
print(status("VmHWM:") - before)
"""


# --------------------------------------------------------------------------------------------
# Sliding-window attention.

WINDOW = 256


def window_lengths(full: bool) -> list[int]:
    return [4096, 8192, 16384, 32768] if full else [4096, 8192]


def window_mask(length: int, window: int) -> torch.Tensor:
    """[L, L] bool, True where query i sees key j: i - window <= j <= i."""
    i = torch.arange(length)
    return (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - window)


def run_window(length: int, min_seconds: float, with_torch: bool) -> dict:
    """B=1 H=16 D=64, causal window of WINDOW keys; torch only when asked (its cost is L^2)."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, 16, length, 64)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    out = torch.empty(shape)

    def run_foveal():
        foveal.sliding_window_attention(q, k, v, window_left=WINDOW, causal=True, out=out)

    row = dict(L=length, W=WINDOW)
    if not with_torch:
        row["foveal_ms"] = median_time(run_foveal, min_seconds, 3) * 1e3
        return row
    mask = window_mask(length, WINDOW)

    def run_torch():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    run_foveal()
    row["max_abs_diff"] = (out - run_torch()).abs().max().item()
    foveal_s, torch_s = interleaved(run_foveal, run_torch, min_seconds)
    row.update(foveal_ms=foveal_s * 1e3, torch_ms=torch_s * 1e3, ratio=torch_s / foveal_s)
    return row


def window_suite(threads: int, full: bool, seconds: float) -> list[dict]:
    rows = []
    print(f"{'case':<34}{'foveal ms':>11}{'torch ms':>11}{'ratio':>8}{'t/t(4096)':>11}")
    for length in window_lengths(full):
        row = dict(run_window(length, seconds, with_torch=length == 4096), threads=threads)
        row["growth"] = row["foveal_ms"] / rows[0]["foveal_ms"] if rows else 1.0
        rows.append(row)
        torch_ms = f"{row['torch_ms']:>11.1f}{row['ratio']:>7.1f}x" if "ratio" in row else ""
        print(
            f"{f'B1 H16 D64 W{WINDOW} causal L{length}':<34}{row['foveal_ms']:>11.2f}"
            f"{torch_ms or ' ' * 19:>19}{row['growth']:>11.2f}"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Decode over a KV cache.


def copy_bandwidth(min_seconds: float, mib: int = 1024) -> float:
    """GB/s of copying a buffer much larger than the caches (bytes read + bytes written, the
    STREAM convention) with torch's threads: the yardstick of a memory-bound kernel."""
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    seconds = median_time(lambda: target.copy_(source), min_seconds, 3)
    return 2 * source.numel() * 4 / seconds * 1e-9


def decode_lengths(full: bool) -> list[int]:
    return [4096, 32768, 131072] if full else [4096, 32768]


def run_decode(len_k: int, min_seconds: float) -> dict:
    """B=1 Hq=32 Hkv=8 D=128, one query over len_k cached keys: the cache adopts the very
    tensors torch reads (KVCache.wrap), so both read the same memory."""
    generator = torch.Generator().manual_seed(0)
    k = torch.randn((1, 8, len_k, 128), generator=generator)
    v = torch.randn((1, 8, len_k, 128), generator=generator)
    q = torch.randn((1, 32, 1, 128), generator=generator)
    cache = foveal.KVCache.wrap(k, v, lengths=[len_k])
    out = torch.empty((1, 32, 1, 128))

    def run_foveal():
        foveal.decode_attention(q, cache, out=out)

    def run_torch():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    run_foveal()
    error = (out - run_torch()).abs().max().item()
    foveal_s, torch_s = interleaved(run_foveal, run_torch, min_seconds)
    step_bytes = 2 * k.numel() * 4
    return dict(
        Lk=len_k,
        foveal_ms=foveal_s * 1e3,
        torch_ms=torch_s * 1e3,
        ratio=torch_s / foveal_s,
        foveal_gbps=step_bytes / foveal_s * 1e-9,
        torch_gbps=step_bytes / torch_s * 1e-9,
        max_abs_diff=error,
    )


def decode_suite(threads: int, full: bool, seconds: float) -> list[dict]:
    copy = copy_bandwidth(seconds)
    print(f"copy bandwidth (1 GiB, read + write): {copy:.1f} GB/s")
    print(
        f"{'case':<34}{'foveal ms':>11}{'torch ms':>11}{'ratio':>8}{'GB/s':>8}{'of copy':>9}"
        f"{'max|diff|':>11}"
    )
    rows = []
    for len_k in decode_lengths(full):
        row = dict(run_decode(len_k, seconds), threads=threads, copy_gbps=copy)
        rows.append(row)
        print(
            f"{f'B1 Hq32 Hkv8 D128 Lq1 Lk{len_k}':<34}{row['foveal_ms']:>11.2f}"
            f"{row['torch_ms']:>11.2f}{row['ratio']:>7.2f}x{row['foveal_gbps']:>8.1f}"
            f"{row['foveal_gbps'] / copy:>9.0%}{row['max_abs_diff']:>11.1e}"
        )
    return rows


# --------------------------------------------------------------------------------------------
# Ring-buffer decode.


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def ring_suite(threads: int, steps: int, check_every: int = 1000) -> list[dict]:
    """`steps` single-token decode steps through a ring buffer (window 1024, 4 sinks,
    B=1 Hq=32 Hkv=8 D=128); every check_every-th step is compared with SDPA over the whole
    history under the explicit window-and-sinks mask, and the resident set is sampled."""
    window, sinks = 1024, 4
    generator = torch.Generator().manual_seed(0)
    history_k = torch.randn((1, 8, steps, 128), generator=generator)
    history_v = torch.randn((1, 8, steps, 128), generator=generator)
    queries = torch.randn((steps, 1, 32, 1, 128), generator=generator)
    cache = foveal.KVCache(1, 8, window + 1 + sinks, 128, ring=True, sink_tokens=sinks)
    out = torch.empty((1, 32, 1, 128))
    rows = []
    start = time.perf_counter()
    decode_seconds = 0.0
    for step in range(steps):
        cache.append(history_k[:, :, step : step + 1], history_v[:, :, step : step + 1])
        t0 = time.perf_counter()
        foveal.decode_attention(
            queries[step], cache, causal=True, window_left=window, sink_tokens=sinks, out=out
        )
        decode_seconds += time.perf_counter() - t0
        if (step + 1) % check_every == 0:
            length = step + 1
            position = torch.arange(length)
            visible = (position >= length - 1 - window) | (position < sinks)
            reference = torch.nn.functional.scaled_dot_product_attention(
                queries[step],
                history_k[:, :, :length],
                history_v[:, :, :length],
                attn_mask=visible[None, :],
                enable_gqa=True,
            )
            rows.append(
                dict(
                    threads=threads,
                    step=length,
                    max_abs_diff=(out - reference).abs().max().item(),
                    resident_mib=resident_bytes() / 2**20,
                )
            )
    total = time.perf_counter() - start
    growth = rows[-1]["resident_mib"] - rows[0]["resident_mib"]
    worst = max(row["max_abs_diff"] for row in rows)
    print(
        f"{steps} steps, window {window}, {sinks} sinks, capacity {cache.capacity}: "
        f"{decode_seconds / steps * 1e6:.0f} us per decode step ({total:.1f} s in all); "
        f"max |diff| vs masked SDPA at every {check_every}th step {worst:.1e}; resident set "
        f"{rows[0]['resident_mib']:.1f} MiB at step {rows[0]['step']}, "
        f"{rows[-1]['resident_mib']:.1f} MiB at step {rows[-1]['step']} (growth {growth:+.2f} MiB)"
    )
    for row in rows:
        row["us_per_step"] = decode_seconds / steps * 1e6
    return rows


def peak_extra_memory(length: int, threads: int) -> int:
    """Growth of the peak resident set of a fresh process during its first forward pass, in
    bytes: inputs and output are allocated and touched before the peak is reset, so what
    remains is foveal's workspace, the code pages of the first call and the OpenMP threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(length)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return int(result.stdout.strip())


def plot(suite: str, rows: list[dict], path: Path) -> bool:
    # A table says it all for these suites.
    if suite in (
        "spade",
        "vq",
        "sparsek",
        "pde",
        "backward",
        "serving",
        "modules",
        "precision",
        "sparse",
    ):
        return False
    if suite == "sparsek_attn":
        import sparsek_attention_cases

        return sparsek_attention_cases.plot(rows, path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    threads = sorted({row["threads"] for row in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
    for axis, thread_count in zip(axes[0], threads):
        subset = [row for row in rows if row["threads"] == thread_count]
        if suite == "dense":
            labels = [f"D{r['D']} L{r['L']}{' c' if r['causal'] else ''}" for r in subset]
            x = np.arange(len(subset))
            axis.bar(x - 0.2, [r["foveal_gflops"] for r in subset], 0.4, label="foveal")
            axis.bar(x + 0.2, [r["torch_gflops"] for r in subset], 0.4, label="torch SDPA")
            axis.axhline(
                subset[0]["matmul_gflops"],
                color="gray",
                linestyle="--",
                linewidth=1,
                label="torch.matmul 2048³",
            )
            axis.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
            axis.set_ylabel("GFLOP/s (fp32)")
            axis.set_title(f"dense attention, B=1 H=16, {thread_count} thread(s)")
        elif suite == "window":
            lengths = [r["L"] for r in subset]
            axis.loglog(lengths, [r["foveal_ms"] for r in subset], "o-", label="foveal", base=2)
            axis.loglog(
                lengths,
                [subset[0]["foveal_ms"] * length / lengths[0] for length in lengths],
                "--",
                color="gray",
                label="linear in L",
                base=2,
            )
            timed = [r for r in subset if "torch_ms" in r]
            axis.loglog(
                [r["L"] for r in timed],
                [r["torch_ms"] for r in timed],
                "s",
                label="torch SDPA, bool mask",
                base=2,
            )
            axis.set_xlabel("L")
            axis.set_ylabel("ms")
            axis.set_title(f"sliding window W={WINDOW}, B=1 H=16 D=64, {thread_count} thread(s)")
        elif suite == "decode":
            labels = [f"Lk {r['Lk']}" for r in subset]
            x = np.arange(len(subset))
            axis.bar(x - 0.2, [r["foveal_gbps"] for r in subset], 0.4, label="foveal")
            axis.bar(x + 0.2, [r["torch_gbps"] for r in subset], 0.4, label="torch SDPA")
            axis.axhline(
                subset[0]["copy_gbps"], color="gray", linestyle="--", label="copy bandwidth"
            )
            axis.set_xticks(x, labels)
            axis.set_ylabel("GB/s of K and V read per step")
            axis.set_title(f"decode B=1 Hq=32 Hkv=8 D=128, {thread_count} thread(s)")
        else:
            steps = [r["step"] for r in subset]
            axis.plot(steps, [r["resident_mib"] for r in subset], "o-", label="resident set")
            axis.set_ylim(bottom=0)
            axis.set_xlabel("decode step")
            axis.set_ylabel("MiB")
            axis.set_title(f"ring-buffer decode, W=1024, 4 sinks, {thread_count} thread(s)")
        axis.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(path: Path) -> str:
    """The results file at `path` as the markdown table the docs show."""
    report = json.loads(path.read_text())
    machine = report["machine"]
    suite = report.get("suite", "dense")
    lines = [
        f"`{report['command']}` — foveal {report['foveal']}, torch {report['torch']}, "
        f"{machine['cpus']} cpus ({machine['processor'] or machine['machine']})",
        "",
    ]
    rows = report["rows"]
    if suite == "dense":
        lines += [
            "| threads | D | L | mask | foveal ms | torch ms | torch / foveal | foveal GFLOP/s "
            "| of torch.matmul |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            mask = "causal" if row["causal"] else "none"
            of_matmul = row["foveal_gflops"] / row["matmul_gflops"]
            lines.append(
                f"| {row['threads']} | {row['D']} | {row['L']} | {mask} "
                f"| {row['foveal_ms']:.1f} | {row['torch_ms']:.1f} | {row['ratio']:.2f}x "
                f"| {row['foveal_gflops']:.1f} | {of_matmul:.0%} |"
            )
        lines.append("")
        lines.append(
            f"Geometric mean of torch / foveal: **{report['geomean_ratio']:.2f}x** over "
            f"{len(rows)} cells (min {min(r['ratio'] for r in rows):.2f}x)."
        )
        for threads, extra in report.get("peak_extra_memory_bytes", {}).items():
            lines.append(
                f"Peak extra memory of one causal forward at L = 32768, D = 64, {threads} "
                f"thread(s): {extra / 2**10:.0f} KiB."
            )
    elif suite == "window":
        lines += [
            "| threads | L | foveal ms | torch ms (bool mask) | torch / foveal | t(L) / t(4096) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            torch_ms = f"{row['torch_ms']:.1f}" if "torch_ms" in row else "—"
            ratio = f"**{row['ratio']:.1f}x**" if "ratio" in row else "—"
            lines.append(
                f"| {row['threads']} | {row['L']} | {row['foveal_ms']:.2f} | {torch_ms} "
                f"| {ratio} | {row['growth']:.2f} |"
            )
    elif suite == "decode":
        lines += [
            "| threads | Lk | foveal ms | torch ms | torch / foveal | foveal GB/s | copy GB/s "
            "| of copy |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['threads']} | {row['Lk']} | {row['foveal_ms']:.2f} "
                f"| {row['torch_ms']:.2f} | **{row['ratio']:.2f}x** | {row['foveal_gbps']:.1f} "
                f"| {row['copy_gbps']:.1f} | {row['foveal_gbps'] / row['copy_gbps']:.0%} |"
            )
    elif suite == "spade":
        lines += [
            "| case | threads | foveal ms | torch ms | torch / foveal | (delay + undelay) / "
            "embedding |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            case = "concat + LayerNorm" if row["layer_norm"] else "concat"
            lines.append(
                f"| {case} | {row['threads']} | {row['foveal_ms']:.2f} | {row['torch_ms']:.2f} "
                f"| **{row['ratio']:.2f}x** | {row['delay_undelay_fraction']:.1%} |"
            )
    elif suite == "sparsek":
        lines += [
            "| case | rows | n | k | threads | foveal ms | torch sort ms | vs torch "
            "| ns / element |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            torch_ms = f"{row['torch_ms']:.1f}" if "torch_ms" in row else "-"
            ratio = f"**{row['ratio']:.2f}x**" if "ratio" in row else "-"
            lines.append(
                f"| {row['case']} | {row['rows']} | {row['n']} | {row['k']} | {row['threads']} "
                f"| {row['foveal_ms']:.1f} | {torch_ms} | {ratio} "
                f"| {row['foveal_ns_per_element']:.2f} |"
            )
    elif suite == "pde":
        lines += pde_markdown(rows)
    elif suite == "precision":
        import precision_cases

        lines += precision_cases.markdown_lines(rows)
    elif suite == "serving":
        import serving_cases

        lines += serving_cases.markdown_lines(rows)
    elif suite == "sparse":
        import sparse_cases

        lines += sparse_cases.markdown_lines(rows)
    elif suite == "sparsek_attn":
        import sparsek_attention_cases

        lines += sparsek_attention_cases.markdown_lines(rows)
    elif suite == "modules":
        import modules_cases
        import modules_cases_sparsek

        twinned = [row for row in rows if "twin_ms" in row]  # modules_cases_sparsek's rows
        others = [row for row in rows if "twin_ms" not in row]
        lines += modules_cases.markdown_lines(others) if others else []
        lines += ["", *modules_cases_sparsek.markdown_lines(twinned)] if twinned else []
    elif suite == "backward":
        import backward_cases

        lines += backward_cases.markdown_lines(rows)
    elif suite == "vq":
        lines += [
            "| K | threads | foveal ms | cdist ms | vs cdist | matmul ms | vs matmul | GFLOP/s "
            "| peak extra MiB (foveal / matmul) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['K']} | {row['threads']} | {row['foveal_ms']:.1f} | {row['cdist_ms']:.1f} "
                f"| **{row['ratio_cdist']:.2f}x** | {row['matmul_ms']:.1f} "
                f"| **{row['ratio_matmul']:.2f}x** | {row['foveal_gflops']:.0f} "
                f"| {row['foveal_peak_extra_mib']:.1f} / {row['matmul_peak_extra_mib']:.0f} |"
            )
    else:
        lines += [
            "| threads | step | max abs diff vs masked SDPA | resident MiB | µs per step (mean) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['threads']} | {row['step']} | {row['max_abs_diff']:.1e} "
                f"| {row['resident_mib']:.1f} | {row['us_per_step']:.0f} |"
            )
    return "\n".join(lines)


def pde_markdown(rows: list[dict]) -> list[str]:
    """The three tables of the pde suite: vs torch, the size sweep, the crossover."""
    lines = [
        "| grid | boundary | threads | pass | foveal ms | torch ms | torch / foveal | ns / token |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in (r for r in rows if r["case"] == "main"):
        lines.append(
            f"| {row['side']}² | {row['boundary']} | {row['threads']} | {row['passes']} "
            f"| {row['foveal_ms']:.1f} | {row['torch_ms']:.1f} | **{row['ratio']:.2f}x** "
            f"| {row['foveal_ns_per_token']:.1f} |"
        )
    lines += [
        "",
        "| grid | batch | foveal ms | ns / token | vs 32² |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in (r for r in rows if r["case"] == "sweep"):
        lines.append(
            f"| {row['side']}² | {row['batch']} | {row['foveal_ms']:.1f} "
            f"| {row['foveal_ns_per_token']:.1f} | {row['growth']:.2f}x |"
        )
    lines += ["", "| grid | L | PdeSsm ms | attention ms | attention / PdeSsm |"]
    lines.append("|---:|---:|---:|---:|---:|")
    for row in (r for r in rows if r["case"] == "crossover"):
        lines.append(
            f"| {row['side']}² | {row['L']} | {row['foveal_ms']:.3f} | {row['attention_ms']:.3f} "
            f"| {row['ratio']:.2f}x |"
        )
    return lines


def dense_suite(threads: int, full: bool, seconds: float) -> list[dict]:
    matmul = matmul_gflops(seconds)
    print(f"torch.matmul fp32 2048^3 = {matmul:.1f} GFLOP/s")
    print(
        f"{'case':<34}{'foveal ms':>11}{'torch ms':>11}{'ratio':>8}{'GFLOP/s':>9}"
        f"{'of mm':>7}{'max|diff|':>11}"
    )
    rows = []
    for case in dense_cases(full):
        foveal_s, torch_s, error = run_dense(case, seconds)
        flops = attention_flops(
            case["B"], case["H"], case["L"], case["L"], case["D"], case["causal"]
        )
        row = dict(
            case,
            threads=threads,
            foveal_ms=foveal_s * 1e3,
            torch_ms=torch_s * 1e3,
            ratio=torch_s / foveal_s,
            foveal_gflops=flops / foveal_s * 1e-9,
            torch_gflops=flops / torch_s * 1e-9,
            matmul_gflops=matmul,
            max_abs_diff=error,
        )
        rows.append(row)
        label = f"B1 H16 L{case['L']} D{case['D']} {'causal' if case['causal'] else 'full'}"
        print(
            f"{label:<34}{row['foveal_ms']:>11.2f}{row['torch_ms']:>11.2f}{row['ratio']:>7.2f}x"
            f"{row['foveal_gflops']:>9.1f}{row['foveal_gflops'] / matmul:>7.0%}{error:>11.1e}"
        )
    return rows


SUITES = (
    "dense",
    "window",
    "decode",
    "ring",
    "spade",
    "vq",
    "sparsek",
    "sparsek_attn",
    "pde",
    "backward",
    "serving",
    "precision",
    "modules",
    "sparse",
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the issues' full grids")
    parser.add_argument(
        "--suite", nargs="+", choices=SUITES, default=list(SUITES), help="which suites to run"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--seconds", type=float, default=None, help="measuring time per case and library"
    )
    parser.add_argument("--name", default=None, help="results file suffix (default: quick / full)")
    parser.add_argument("--memory-length", type=int, default=32768)
    parser.add_argument(
        "--modules",
        nargs="+",
        default=None,
        help="modules suite: only these modules (VectorQuantize, SparseKAttention, PdeSsm2d, "
        "SpadeEmbedding; default all)",
    )
    parser.add_argument(
        "--ring-steps", type=int, default=None, help="ring suite steps (default 10000 full, 3000)"
    )
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="print the results file as a markdown table and exit",
    )
    args = parser.parse_args()
    if args.markdown is not None:
        print(markdown(args.markdown))
        return
    seconds = args.seconds if args.seconds is not None else (2.0 if args.full else 0.6)
    suffix = args.name or ("full" if args.full else "quick")
    ring_steps = args.ring_steps or (10000 if args.full else 3000)

    processor = platform.processor() or platform.machine()
    versions = f"foveal {foveal.__version__}, torch {torch.__version__}"
    print(f"{versions}, {processor}, {os.cpu_count()} cpus")
    for suite in args.suite:
        rows = []
        if suite == "spade":  # bench/spade_cases.py runs its own thread counts
            import spade_cases

            print("\n[spade]")
            rows = spade_cases.run(args.threads, seconds, interleaved, median_time)
        if suite == "vq":  # bench/vq_cases.py, likewise
            import vq_cases

            print("\n[vq]")
            rows = vq_cases.run(args.threads, seconds, interleaved, median_time)
        if suite == "sparsek":  # bench/sparsek_cases.py, likewise
            import sparsek_cases

            print("\n[sparsek]")
            rows = sparsek_cases.run(args.threads, seconds, interleaved, median_time, args.full)
        if suite == "sparsek_attn":  # bench/sparsek_attention_cases.py, likewise
            import sparsek_attention_cases

            print("\n[sparsek_attn]")
            rows = sparsek_attention_cases.run(
                args.threads, seconds, interleaved, median_time, args.full
            )
        if suite == "pde":  # bench/pde_cases.py, likewise
            import pde_cases

            print("\n[pde]")
            rows = pde_cases.run(args.threads, seconds, interleaved, median_time, args.full)
        if suite == "backward":  # bench/backward_cases.py, likewise
            import backward_cases

            print("\n[backward]")
            rows = backward_cases.run(args.threads, seconds, interleaved, median_time, args.full)
        if suite == "serving":  # bench/serving_cases.py, likewise
            import serving_cases

            print("\n[serving]")
            rows = serving_cases.run(
                args.threads, seconds, interleaved, median_time, args.full, copy_bandwidth
            )
        if suite == "precision":  # bench/precision_cases.py, likewise
            import precision_cases

            print("\n[precision]")
            rows = precision_cases.run(
                args.threads, seconds, interleaved, args.full, copy_bandwidth
            )
        if suite == "sparse":  # bench/sparse_cases.py, likewise
            import sparse_cases

            print("\n[sparse]")
            rows = sparse_cases.run(args.threads, seconds, interleaved, args.full)
        if suite == "modules":  # bench/modules_cases.py, likewise
            import modules_cases

            print("\n[modules]")
            rows = []
            if args.modules is None or "VectorQuantize" in args.modules:
                rows = modules_cases.run(args.threads, seconds, interleaved, median_time, args.full)
            import modules_cases_sparsek  # SparseKAttention, PdeSsm2d, SpadeEmbedding vs twins

            rows += modules_cases_sparsek.run(
                args.threads, seconds, interleaved, median_time, args.full, only=args.modules
            )
        own_threads = (
            "spade",
            "vq",
            "sparsek",
            "sparsek_attn",
            "pde",
            "backward",
            "serving",
            "modules",
            "precision",
            "sparse",
        )
        for threads in args.threads if suite not in own_threads else []:
            torch.set_num_threads(threads)
            foveal.set_num_threads(threads)
            print(f"\n[{suite}] threads={threads}")
            if suite == "dense":
                rows += dense_suite(threads, args.full, seconds)
            elif suite == "window":
                rows += window_suite(threads, args.full, seconds)
            elif suite == "decode":
                rows += decode_suite(threads, args.full, seconds)
            else:
                rows += ring_suite(threads, ring_steps)
        report = dict(
            suite=suite,
            machine=dict(
                processor=platform.processor(),
                machine=platform.machine(),
                cpus=os.cpu_count(),
                python=platform.python_version(),
            ),
            foveal=foveal.__version__,
            torch=torch.__version__,
            command=" ".join(sys.argv),
            rows=rows,
        )
        if suite == "dense":
            ratios = [row["ratio"] for row in rows]
            report["geomean_ratio"] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            print(
                f"\ntorch_time / foveal_time: geometric mean {report['geomean_ratio']:.2f}x, "
                f"min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(rows)} cells"
            )
            memory = {}
            if args.memory_length > 0:
                for threads in args.threads:
                    extra = peak_extra_memory(args.memory_length, threads)
                    memory[str(threads)] = extra
                    scores = args.memory_length**2 * 4
                    print(
                        f"peak extra memory, causal L={args.memory_length} D=64, {threads} "
                        f"thread(s): {extra / 2**10:.0f} KiB (an [L, L] fp32 score matrix would "
                        f"be {scores / 2**30:.0f} GiB)"
                    )
            report["peak_extra_memory_bytes"] = memory
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{suite}_{suffix}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
        if plot(suite, rows, path.with_suffix(".png")):
            print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
