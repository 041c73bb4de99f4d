"""Trainable modules: foveal.nn against reference implementations, for
compare_torch.py --suite modules.

Each entry of CASES times one training step (forward + backward of the same loss, optimizer
excluded) of a foveal.nn module and of its reference on the same float32 input, interleaved;
a case whose reference package is missing runs foveal alone and leaves the reference columns
empty. A case is a dict: ``name``, ``shape`` (a label), ``make_input(generator)``,
``make_foveal(threads)`` and ``make_reference()`` (None when the package is absent), each module
returning a tuple whose outputs ``loss_of(outputs)`` turns into the scalar to differentiate.
"""

from __future__ import annotations

from typing import Callable, Optional

import foveal
import torch

# VectorQuantize: the case of issue 16, N = 65536 rows of D = 64, K = 1024 codes, training
# mode (EMA update and dead-code restart in every step), straight-through gradients.
VQ_ROWS, VQ_DIM, VQ_CODES = 65536, 64, 1024
VQ_DEAD_THRESHOLD = 2.0


def _vq_foveal(threads: int) -> torch.nn.Module:
    from foveal.nn import VectorQuantize

    return VectorQuantize(
        VQ_DIM,
        VQ_CODES,
        decay=0.99,
        commitment_weight=1.0,
        kmeans_init=False,
        threshold_dead=VQ_DEAD_THRESHOLD,
        num_threads=threads,
    )


def _vq_reference() -> Optional[torch.nn.Module]:
    """vector-quantize-pytorch's VectorQuantize with the same settings (the plain
    straight-through estimator: its default rotation trick is another gradient)."""
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return None
    return VectorQuantize(
        dim=VQ_DIM,
        codebook_size=VQ_CODES,
        decay=0.99,
        commitment_weight=1.0,
        kmeans_init=False,
        threshold_ema_dead_code=VQ_DEAD_THRESHOLD,
        rotation_trick=False,
    )


def _quantized_loss(outputs: tuple) -> torch.Tensor:
    quantized, _, commit_loss = outputs
    return quantized.square().mean() + commit_loss.sum()


CASES = [
    dict(
        name="VectorQuantize",
        shape=f"N={VQ_ROWS} D={VQ_DIM} K={VQ_CODES}",
        make_input=lambda generator: torch.randn(VQ_ROWS, VQ_DIM, generator=generator),
        make_foveal=_vq_foveal,
        make_reference=_vq_reference,
        reference_name="vector-quantize-pytorch",
        loss_of=_quantized_loss,
    ),
]


def _train_step(module: torch.nn.Module, x: torch.Tensor, loss_of: Callable) -> Callable:
    def step() -> None:
        leaf = x.detach().requires_grad_()
        loss_of(module(leaf)).backward()

    return step


def run(threads_list: list, seconds: float, interleaved: Callable, median_time, full: bool):
    """Prints the table of compare_torch.py --suite modules and returns its rows."""
    del full  # one size per case
    print(f"{'case':<16}{'shape':<24}{'threads':>8}{'foveal ms':>11}{'ref ms':>10}{'ratio':>8}")
    rows = []
    for case in CASES:
        x = case["make_input"](torch.Generator().manual_seed(0))
        for threads in threads_list:
            torch.set_num_threads(threads)
            foveal.set_num_threads(threads)
            module = case["make_foveal"](threads).train()
            foveal_step = _train_step(module, x, case["loss_of"])
            reference = case["make_reference"]()
            row = dict(case=case["name"], shape=case["shape"], threads=threads)
            if reference is None:
                row["foveal_ms"] = median_time(foveal_step, seconds, 3) * 1e3
            else:
                reference_step = _train_step(reference.train(), x, case["loss_of"])
                foveal_s, reference_s = interleaved(foveal_step, reference_step, seconds)
                row.update(
                    foveal_ms=foveal_s * 1e3,
                    reference=case["reference_name"],
                    reference_ms=reference_s * 1e3,
                    ratio=reference_s / foveal_s,
                )
            rows.append(row)
            reference_ms = f"{row['reference_ms']:>10.1f}" if "ratio" in row else f"{'-':>10}"
            ratio = f"{row['ratio']:>7.2f}x" if "ratio" in row else f"{'-':>8}"
            print(
                f"{case['name']:<16}{case['shape']:<24}{threads:>8}{row['foveal_ms']:>11.1f}"
                f"{reference_ms}{ratio}"
            )
    return rows


def markdown_lines(rows: list) -> list:
    lines = [
        "| module | shape | threads | foveal ms | reference | reference ms | reference / foveal |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        if "ratio" in row:
            reference = f"{row['reference']} | {row['reference_ms']:.1f} | **{row['ratio']:.2f}x**"
        else:
            reference = "(not installed) | - | -"
        lines.append(
            f"| {row['case']} | {row['shape']} | {row['threads']} | {row['foveal_ms']:.1f} "
            f"| {reference} |"
        )
    return lines
