"""Codebook collapse in vector quantization, and the two fixes that undo it (docs/vq.md).

Synthetic "encoder outputs": 64 tight clusters in D = 16 around a mean far from the origin.
A codebook of K = 256 codes initialized at random near the origin (the usual default) sees
every input nearest to the same few codes; EMA updates then drag only those few towards the
data, and the rest never receive a row again: few codes used, low perplexity, low effective
rank. Initializing from the data (k-means++ and Lloyd) and restarting dead codes from the
current batch keep the whole codebook in use. Prints the before/after table and, when
matplotlib is installed, saves the per-code usage as vq_collapse.png (or the path given).

    python3 examples/python/vq_collapse.py [plot.png]
"""

from __future__ import annotations

import sys

import numpy as np
from foveal import vq

CODES, DIM, CLUSTERS, STEPS, BATCH = 256, 16, 64, 200, 1024


def make_data(rng: np.random.Generator, rows: int, centers: np.ndarray) -> np.ndarray:
    labels = rng.integers(0, len(centers), rows)
    return (centers[labels] + 0.3 * rng.standard_normal((rows, DIM))).astype(np.float32)


def train(quantizer: vq.VectorQuantizer, rng, centers, restart: bool) -> None:
    """EMA training on fresh batches; with `restart`, dead codes move onto batch rows."""
    for step in range(STEPS):
        batch = make_data(rng, BATCH, centers)
        quantizer.update(batch)
        if restart:
            quantizer.restart_dead_codes(batch, seed=step)


def diagnostics(quantizer: vq.VectorQuantizer, held_out: np.ndarray) -> dict:
    indices, quantized, sq_distances = quantizer.quantize(held_out)
    counts = np.bincount(indices, minlength=CODES).astype(np.int64)
    return dict(
        counts=counts,
        used=int((counts > 0).sum()),
        perplexity=vq.perplexity(counts),
        dead=quantizer.num_dead_codes(),
        codebook_rank=quantizer.codebook_effective_rank(),
        quantized_rank=vq.effective_rank(quantized),
        mse=float(sq_distances.mean()),
    )


def main() -> None:
    rng = np.random.default_rng(0)
    centers = 4.0 + 2.0 * rng.standard_normal((CLUSTERS, DIM))  # far from the N(0, 1) init
    held_out = make_data(rng, 16384, centers)
    options = dict(decay=0.95, dead_threshold=0.05)

    random_init = vq.VectorQuantizer(
        rng.standard_normal((CODES, DIM)).astype(np.float32), **options
    )
    train(random_init, np.random.default_rng(1), centers, restart=False)

    fixed = vq.VectorQuantizer.from_data(
        make_data(np.random.default_rng(2), 8192, centers), CODES, lloyd_iterations=10, **options
    )
    train(fixed, np.random.default_rng(1), centers, restart=True)

    rows = [
        ("random init + EMA", diagnostics(random_init, held_out)),
        ("k-means++ + EMA + dead-code restart", diagnostics(fixed, held_out)),
    ]
    print(
        f"K={CODES} codes, D={DIM}, {CLUSTERS} clusters, {STEPS} EMA steps of {BATCH} rows; "
        "held-out batch of 16384 rows (data effective rank "
        f"{vq.effective_rank(held_out):.2f})\n"
    )
    print(
        "| setup | codes used | perplexity | dead codes | effective rank (codebook) "
        "| effective rank (quantized) | mean squared error |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows:
        print(
            f"| {name} | {row['used']} / {CODES} | {row['perplexity']:.1f} | {row['dead']} "
            f"| {row['codebook_rank']:.2f} | {row['quantized_rank']:.2f} | {row['mse']:.3f} |"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    path = sys.argv[1] if len(sys.argv) > 1 else "vq_collapse.png"
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
    for axis, (name, row) in zip(axes, rows):
        axis.bar(np.arange(CODES), np.sort(row["counts"])[::-1] / len(held_out), width=1.0)
        axis.set_title(f"{name}\n{row['used']} codes used, perplexity {row['perplexity']:.1f}")
        axis.set_xlabel("code (sorted by usage)")
    axes[0].set_ylabel("share of held-out rows")
    axes[0].set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
