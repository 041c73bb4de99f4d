"""SPARSEK projection: foveal against PyTorch, for compare_torch.py --suite sparsek.

The case of issue 5: fp32, 65536 rows of length 4096, k = 256. PyTorch projects by sorting:
every row's 2n breakpoints z and z - 1 sorted descending, f = sum clip(z - tau, 0, 1) built by
cumulative sums of the slopes over the segments, tau solved on the segment where f reaches k.
foveal.sparsek.sparsek selects the k-th largest score and solves tau among the few breakpoints
within 1 of it (expected O(n)). A size sweep (row length 1024 ... 16384 at the same element
count) shows foveal's time per element staying flat.
"""

from __future__ import annotations

from typing import Callable

import foveal
import torch
from foveal import sparsek as sk

ROWS, LENGTH, BUDGET = 65536, 4096, 256
SWEEP_LENGTHS = (1024, 2048, 4096, 8192, 16384)
SWEEP_ELEMENTS = 1 << 26  # rows = SWEEP_ELEMENTS / length


def torch_sort_sparsek(z: torch.Tensor, k: int, block_rows: int = 4096) -> torch.Tensor:
    """SPARSEK per row of z [N, n] by sorting, in blocks of rows (the whole [65536, 8192]
    breakpoint matrix with its int64 sort order would need over 16 GiB)."""
    return torch.cat([sort_block(block, k) for block in z.split(block_rows)])


def sort_block(z: torch.Tensor, k: int) -> torch.Tensor:
    """SPARSEK per row of z [N, n] by sorting the 2n breakpoints."""
    points = torch.cat([z, z - 1], dim=-1)
    slopes = torch.cat([torch.ones_like(z), -torch.ones_like(z)], dim=-1)
    points, order = points.sort(dim=-1, descending=True)
    slope_below = slopes.gather(-1, order).cumsum(-1)
    widths = points[..., :-1] - points[..., 1:]
    f_at = torch.cat([z.new_zeros(z.shape[0], 1), (slope_below[..., :-1] * widths).cumsum(-1)], -1)
    above = (f_at >= k).to(torch.int8).argmax(-1, keepdim=True) - 1
    tau = points.gather(-1, above) - (k - f_at.gather(-1, above)) / slope_below.gather(-1, above)
    return (z - tau).clamp_(0, 1)


def run(
    threads_list: list, seconds: float, interleaved: Callable, median_time, full: bool = True
) -> list:
    """Prints the tables of compare_torch.py --suite sparsek and returns their rows. Without
    `full` (the quick demo) the main case has 4096 rows and the sweep 2^22 elements per call."""
    num_rows = ROWS if full else 4096
    sweep_elements = SWEEP_ELEMENTS if full else 1 << 22
    print(f"\nSPARSEK fp32 rows={num_rows} n={LENGTH} k={BUDGET}: foveal.sparsek vs torch sort")
    print(
        f"{'threads':>8}{'foveal ms':>11}{'torch ms':>10}{'ratio':>8}{'ns/elem':>9}{'max|dp|':>10}"
    )
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(num_rows, LENGTH, generator=generator)
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        foveal.set_num_threads(threads)

        def run_foveal(z=z):
            return sk.sparsek(z, BUDGET)

        def run_torch(z=z):
            return torch_sort_sparsek(z, BUDGET)

        head = z[:4096]
        difference = (
            (sk.sparsek(head, BUDGET) - torch_sort_sparsek(head, BUDGET)).abs().max().item()
        )
        # One round (a warm-up and two timed calls each): a torch call takes most of a minute.
        foveal_s, torch_s = interleaved(run_foveal, run_torch, seconds, rounds=1)
        row = dict(
            op="sparsek",
            case="main",
            rows=num_rows,
            n=LENGTH,
            k=BUDGET,
            threads=threads,
            foveal_ms=foveal_s * 1e3,
            torch_ms=torch_s * 1e3,
            ratio=torch_s / foveal_s,
            foveal_ns_per_element=foveal_s * 1e9 / (num_rows * LENGTH),
            max_abs_difference=difference,
        )
        rows.append(row)
        print(
            f"{threads:>8}{row['foveal_ms']:>11.1f}{row['torch_ms']:>10.1f}{row['ratio']:>7.2f}x"
            f"{row['foveal_ns_per_element']:>9.2f}{difference:>10.1e}"
        )
    print(f"\nsize sweep (foveal, {sweep_elements} elements per call, k = n / 16, 1 thread)")
    print(f"{'n':>8}{'rows':>8}{'foveal ms':>11}{'ns/elem':>9}")
    foveal.set_num_threads(1)
    for length in SWEEP_LENGTHS:
        count = sweep_elements // length
        z = torch.randn(count, length, generator=generator)
        budget = length // 16
        foveal_s = median_time(lambda z=z, budget=budget: sk.sparsek(z, budget), seconds, 3)
        row = dict(
            op="sparsek",
            case="sweep",
            rows=count,
            n=length,
            k=budget,
            threads=1,
            foveal_ms=foveal_s * 1e3,
            foveal_ns_per_element=foveal_s * 1e9 / sweep_elements,
        )
        rows.append(row)
        print(f"{length:>8}{count:>8}{row['foveal_ms']:>11.1f}{row['foveal_ns_per_element']:>9.2f}")
    return rows
