"""VQ assign: foveal against PyTorch, for compare_torch.py --suite vq.

The case of issue 8: fp32, N = 65536 rows, D = 64, K in {512, 1024, 4096} codes. PyTorch runs
``torch.cdist(x, c).argmin(1)`` and the matmul formulation ``(|c|^2 - 2 x c^T).argmin(1)`` (both
form the [N, K] matrix); foveal.vq.assign keeps a running argmin over register tiles. Each
pair runs interleaved; the peak extra resident memory of one call is read from the kernel's
high-water mark (VmHWM after resetting it through /proc/self/clear_refs, Linux only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import foveal
import torch
from foveal import vq

ROWS, DIM, CODE_COUNTS = 65536, 64, (512, 1024, 4096)


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_mib(function: Callable) -> Optional[float]:
    """Resident memory a call adds at its peak, in MiB (None where Linux's counters are absent)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    function()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else max(0, peak - before) / 1024


def run(threads_list: list, seconds: float, interleaved: Callable, median_time) -> list:
    """Prints the table of compare_torch.py --suite vq and returns its rows."""
    del median_time  # every time here comes from interleaved pairs
    print(f"\nVQ assign fp32 N={ROWS} D={DIM} (L2): foveal.vq.assign vs torch")
    print(
        f"{'K':>6}{'threads':>8}{'foveal ms':>11}{'cdist ms':>10}{'vs cdist':>10}"
        f"{'matmul ms':>11}{'vs matmul':>11}{'GFLOP/s':>9}{'foveal MiB':>12}{'matmul MiB':>12}"
        f"{'agree':>8}"
    )
    generator = torch.Generator().manual_seed(0)
    rows = []
    for codes in CODE_COUNTS:
        x = torch.randn(ROWS, DIM, generator=generator)
        codebook = torch.randn(codes, DIM, generator=generator)
        for threads in threads_list:
            torch.set_num_threads(threads)
            foveal.set_num_threads(threads)

            def run_foveal(x=x, codebook=codebook):
                return vq.assign(x, codebook).indices

            def run_cdist(x=x, codebook=codebook):
                return torch.cdist(x, codebook).argmin(1)

            def run_matmul(x=x, codebook=codebook):
                return (codebook.norm(dim=1) ** 2 - 2 * x @ codebook.T).argmin(1)

            foveal_mib = peak_extra_mib(run_foveal)
            matmul_mib = peak_extra_mib(run_matmul)
            agree = (run_foveal() == run_cdist()).double().mean().item()
            foveal_s, cdist_s = interleaved(run_foveal, run_cdist, seconds)
            foveal_again_s, matmul_s = interleaved(run_foveal, run_matmul, seconds)
            foveal_s = min(foveal_s, foveal_again_s)
            row = dict(
                op="vq_assign",
                K=codes,
                N=ROWS,
                D=DIM,
                threads=threads,
                foveal_ms=foveal_s * 1e3,
                cdist_ms=cdist_s * 1e3,
                matmul_ms=matmul_s * 1e3,
                ratio_cdist=cdist_s / foveal_s,
                ratio_matmul=matmul_s / foveal_s,
                foveal_gflops=2 * ROWS * codes * DIM / foveal_s * 1e-9,
                foveal_peak_extra_mib=foveal_mib,
                matmul_peak_extra_mib=matmul_mib,
                index_agreement_with_cdist=agree,
            )
            rows.append(row)
            print(
                f"{codes:>6}{threads:>8}{row['foveal_ms']:>11.2f}{row['cdist_ms']:>10.2f}"
                f"{row['ratio_cdist']:>9.2f}x{row['matmul_ms']:>11.2f}{row['ratio_matmul']:>10.2f}x"
                f"{row['foveal_gflops']:>9.1f}{foveal_mib if foveal_mib is not None else -1:>12.1f}"
                f"{matmul_mib if matmul_mib is not None else -1:>12.1f}{agree:>8.4f}"
            )
    return rows
