#!/usr/bin/env python3
"""foveal vs PyTorch on the same inputs, in one process: prints torch_time / foveal_time.

    python3 bench/compare_torch.py            # quick demo grid (under a minute)
    python3 bench/compare_torch.py --full     # the foundation issue's grid (several minutes)
    python3 bench/compare_torch.py --markdown bench/results/dense_full.json   # table for docs

Both libraries run interleaved on identical float32 tensors at each thread count, so machine
noise hits both alike; each time is the median of the repetitions. Writes
bench/results/<name>.json and, when matplotlib is installed, bench/results/<name>.png.
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


def plot(rows: list[dict], path: Path) -> bool:
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
        axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(path: Path) -> str:
    """The results file at `path` as the markdown table docs/benchmarks.md shows."""
    report = json.loads(path.read_text())
    machine = report["machine"]
    columns = ["threads", "D", "L", "mask", "foveal ms", "torch ms", "torch / foveal"]
    columns += ["foveal GFLOP/s", "of torch.matmul"]
    lines = [
        f"`{report['command']}` — foveal {report['foveal']}, torch {report['torch']}, "
        f"{machine['cpus']} cpus ({machine['processor'] or machine['machine']})",
        "",
        "| " + " | ".join(columns) + " |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
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
        f"{len(report['rows'])} cells (min {min(r['ratio'] for r in report['rows']):.2f}x)."
    )
    for threads, extra in report.get("peak_extra_memory_bytes", {}).items():
        lines.append(
            f"Peak extra memory of one causal forward at L = 32768, D = 64, {threads} thread(s): "
            f"{extra / 2**10:.0f} KiB."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full", action="store_true", help="the foundation issue's full grid")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--seconds", type=float, default=None, help="measuring time per case and library"
    )
    parser.add_argument(
        "--name", default=None, help="results file name (default: dense_quick / dense_full)"
    )
    parser.add_argument("--memory-length", type=int, default=32768)
    parser.add_argument("--only", choices=["spade"], help="only this case (bench/spade_cases.py)")
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
    name = args.name or ("dense_full" if args.full else "dense_quick")
    if args.only == "spade":
        import spade_cases

        spade_cases.run(args.threads, seconds, interleaved, median_time)
        return

    processor = platform.processor() or platform.machine()
    versions = f"foveal {foveal.__version__}, torch {torch.__version__}"
    print(f"{versions}, {processor}, {os.cpu_count()} cpus")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)
        matmul = matmul_gflops(seconds)
        print(f"\nthreads={threads}: torch.matmul fp32 2048^3 = {matmul:.1f} GFLOP/s")
        print(
            f"{'case':<34}{'foveal ms':>11}{'torch ms':>11}{'ratio':>8}{'GFLOP/s':>9}"
            f"{'of mm':>7}{'max|diff|':>11}"
        )
        for case in dense_cases(args.full):
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
    ratios = [row["ratio"] for row in rows]
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(
        f"\ntorch_time / foveal_time: geometric mean {geomean:.2f}x, min {min(ratios):.2f}x, "
        f"max {max(ratios):.2f}x over {len(rows)} cells"
    )

    memory = {}
    if args.memory_length > 0:
        for threads in args.threads:
            extra = peak_extra_memory(args.memory_length, threads)
            memory[str(threads)] = extra
            scores = args.memory_length**2 * 4
            print(
                f"peak extra memory, causal L={args.memory_length} D=64, {threads} thread(s): "
                f"{extra / 2**10:.0f} KiB (an [L, L] fp32 score matrix would be "
                f"{scores / 2**30:.0f} GiB)"
            )

    RESULTS.mkdir(parents=True, exist_ok=True)
    report = dict(
        machine=dict(
            processor=platform.processor(),
            machine=platform.machine(),
            cpus=os.cpu_count(),
            python=platform.python_version(),
        ),
        foveal=foveal.__version__,
        torch=torch.__version__,
        command=" ".join(sys.argv),
        geomean_ratio=geomean,
        rows=rows,
        peak_extra_memory_bytes=memory,
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / (name + '.json')}")
    if plot(rows, RESULTS / f"{name}.png"):
        print(f"wrote {RESULTS / (name + '.png')}")


if __name__ == "__main__":
    main()
