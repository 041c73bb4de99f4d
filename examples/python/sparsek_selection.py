"""Which keys does each query of SparseK attention see? A small example, printed and plotted.

    python3 examples/python/sparsek_selection.py [--plot sparsek_selection.png]

64 tokens, scores u from a linear scorer with a position slope, topk = 8, a window of the last
6 keys and 2 sinks. Each query row shows its sinks and window (always visible, gate 1) and the
8 keys it selects from the rest of its prefix, shaded by their SPARSEK gates. Thresholds of
nested prefixes never decrease, so a key that drops out of the selection never comes back:
in the plot every selected key is one unbroken vertical run.
"""

from __future__ import annotations

import argparse

import foveal
import numpy as np
from foveal import sparsek as sk

LENGTH, TOPK, WINDOW, SINKS, MODEL_DIM = 64, 8, 6, 2, 16


def visibility(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[L, L] gates of the selected keys and [L, L] booleans of the always-visible ones."""
    indices, gates = sk.sparsek_select(u, TOPK, LENGTH, window=WINDOW, sink_tokens=SINKS)
    selected = np.zeros((LENGTH, LENGTH))
    for query in range(LENGTH):
        for key, gate in zip(indices[0, 0, query], gates[0, 0, query]):
            if key >= 0:
                selected[query, key] = gate
    positions = np.arange(LENGTH)
    distance = positions[:, None] - positions[None, :]
    always = ((distance >= 0) & (distance < WINDOW)) | (positions[None, :] < SINKS)
    return selected, always


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plot", default="sparsek_selection.png", help="PNG to write")
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, LENGTH, MODEL_DIM))
    w = rng.standard_normal((1, MODEL_DIM)) / np.sqrt(MODEL_DIM)
    u = sk.linear_scores(x, w, slope=0.02)  # [1, 1, L]
    selected, always = visibility(u)

    print(f"L={LENGTH} topk={TOPK} window={WINDOW} sinks={SINKS}; '#' window/sink, digits gate*9")
    for query in range(0, LENGTH, 4):
        row = "".join(
            "#"
            if always[query, key]
            else (str(int(selected[query, key] * 9)) if selected[query, key] > 0 else ".")
            for key in range(LENGTH)
        )
        print(f"q{query:>3} {row}")

    # The attention itself: the gated SparseK output of every query.
    q = rng.standard_normal((1, 1, LENGTH, MODEL_DIM))
    k = rng.standard_normal((1, 1, LENGTH, MODEL_DIM))
    v = rng.standard_normal((1, 1, LENGTH, MODEL_DIM))
    out = foveal.sparsek_attention(q, k, v, u, TOPK, window=WINDOW, sink_tokens=SINKS)
    print(f"sparsek_attention out: {out.shape}, row norms {np.linalg.norm(out[0, 0], axis=1)[:4]}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (scores_axis, grid_axis) = plt.subplots(
        2, 1, figsize=(7, 8.5), gridspec_kw=dict(height_ratios=[1, 4]), sharex=True
    )
    scores_axis.bar(np.arange(LENGTH), u[0, 0], color="tab:gray")
    scores_axis.set_ylabel("score u")
    scores_axis.set_title(f"SparseK selection: topk={TOPK}, window={WINDOW}, sinks={SINKS}")
    image = np.where(always, np.nan, selected)
    grid_axis.imshow(always, cmap="Blues", vmin=0, vmax=2.5, aspect="auto", interpolation="none")
    shown = grid_axis.imshow(
        np.ma.masked_where(~(selected > 0), image),
        cmap="Oranges",
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="none",
    )
    grid_axis.set_xlabel("key position (blue: window and sinks, gate 1)")
    grid_axis.set_ylabel("query position")
    fig.colorbar(shown, ax=grid_axis, label="SPARSEK gate of a selected key", shrink=0.8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
