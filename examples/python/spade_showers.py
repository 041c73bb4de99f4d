"""SPADE on synthetic calorimeter showers: delay pattern, embedding, and the layout as a plot.

A shower is a point cloud of hits, each with (z, x, y) cell bins and a deposited energy. Hits
are ordered by layer z; x and y spread around a shower axis; energies fall off with depth.
    python3 examples/python/spade_showers.py [--plot spade_showers.png]
"""

from __future__ import annotations

import argparse

import numpy as np
from foveal import spade

NUM_BINS = 30


def synthetic_showers(rng: np.random.Generator, batch: int, max_hits: int):
    """ids [B, n, 3] (z, x, y bins in 1..30), energies [B, n, 1] and per-shower hit counts."""
    lengths = rng.integers(max_hits // 3, max_hits + 1, batch)
    ids = np.zeros((batch, max_hits, 3), np.int64)
    energies = np.zeros((batch, max_hits, 1), np.float32)
    for b, length in enumerate(lengths):
        depth = np.sort(rng.gamma(3.0, 4.0, length))
        axis_x, axis_y = rng.uniform(10, 20, 2)
        spread = 1.0 + 0.15 * depth
        z = np.clip(depth.astype(int) + 1, 1, NUM_BINS)
        x = np.clip(np.rint(rng.normal(axis_x, spread)), 1, NUM_BINS)
        y = np.clip(np.rint(rng.normal(axis_y, spread)), 1, NUM_BINS)
        ids[b, :length] = np.stack([z, x, y], axis=-1).astype(np.int64)
        energies[b, :length, 0] = rng.exponential(1.0, length) * np.exp(-depth / 12.0)
    return ids, energies, lengths


def print_delay_table(schema: spade.Schema, delayed_ids, delayed_values, mask, steps: int):
    """The first `steps` steps of shower 0: one row per stream, M = MISSING, . = PAD."""
    print(f"{'step':>8} " + " ".join(f"{t:>5}" for t in range(steps)))
    discrete = [f.name for f in schema.discrete]
    for f, feature in enumerate(schema.features):
        cells = []
        for t in range(steps):
            if feature.discrete:
                value = int(delayed_ids[0, t, discrete.index(feature.name)])
                text = str(value)
            else:
                text = f"{delayed_values[0, t, 0]:.2f}"
            if not mask[0, t, f]:
                missing = feature.discrete and value == feature.missing_id
                text = "M" if (missing or not feature.discrete) else "."
            cells.append(f"{text:>5}")
        print(f"{feature.name}:{feature.shift:<4}" + " ".join(cells))


def plot_layout(mask, lengths, path: str) -> bool:
    """The delayed layout of a few showers: data (per stream), MISSING and PAD steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = min(4, mask.shape[0])
    fig, axes = plt.subplots(shown, 1, figsize=(10, 1.2 * shown + 1), sharex=True, squeeze=False)
    for b, axis in enumerate(axes[:, 0]):
        steps = np.arange(mask.shape[1])
        layout = mask[b].T.astype(float)  # [F, T]: 1 = data
        layout[:, steps >= lengths[b] + mask.shape[2]] = 0.35  # PAD (max shift = F here)
        axis.imshow(layout, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        axis.set_yticks(range(4), ["z", "x", "y", "E"])
        axis.set_ylabel(f"shower {b}\n{lengths[b]} hits", fontsize=8)
    axes[-1, 0].set_xlabel("delayed step t (black: data, white: MISSING, grey: PAD)")
    fig.suptitle("SPADE delay pattern: stream f starts at step s_f = f + 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plot", default="spade_showers.png", help="PNG to write (matplotlib)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    schema = spade.Schema(
        [
            spade.Feature.binned("z", NUM_BINS),
            spade.Feature.binned("x", NUM_BINS),
            spade.Feature.binned("y", NUM_BINS),
            spade.Feature.continuous("E"),
        ]
    )
    ids, energies, lengths = synthetic_showers(rng, batch=8, max_hits=40)
    delayed_ids, delayed_values, mask = spade.delay(schema, ids, energies, lengths)
    print(f"{schema}: {ids.shape[0]} showers, hits per shower {lengths.tolist()}")
    print(f"delayed ids {delayed_ids.shape}, values {delayed_values.shape}, mask {mask.shape}\n")
    print_delay_table(schema, delayed_ids, delayed_values, mask, steps=12)

    # A random (untrained) embedding, as a trained model's weights would be loaded.
    d_model, width = 64, 16
    features = {
        f.name: {"table": rng.standard_normal((f.vocab_size, width), dtype=np.float32)}
        for f in schema.discrete
    }
    features["E"] = {
        "hidden_weight": rng.standard_normal((16, 1), dtype=np.float32),
        "hidden_bias": rng.standard_normal(16, dtype=np.float32),
        "output_weight": rng.standard_normal((width, 16), dtype=np.float32) * 0.25,
        "output_bias": np.zeros(width, np.float32),
    }
    projection = rng.standard_normal((d_model, 4 * width), dtype=np.float32) * 0.125
    embedding = spade.SpadeEmbedding(schema, features, projection_weight=projection)
    embedded = embedding(delayed_ids, delayed_values)
    pad_steps = delayed_ids[..., 0] == 0
    print(f"\nembedding: {embedded.shape}, PAD steps are zero: {not embedded[pad_steps].any()}")
    pairs = spade.next_step(delayed_ids, delayed_values, mask)
    print(f"training: inputs {pairs.input_ids.shape}, {int(pairs.loss_mask.sum())} valid targets")

    undelayed_ids, undelayed_energies = spade.undelay(schema, delayed_ids, delayed_values)
    same = all(
        (undelayed_ids[b, :n] == ids[b, :n]).all()
        and (undelayed_energies[b, :n] == energies[b, :n]).all()
        for b, n in enumerate(lengths)
    )
    print(f"undelay(delay(x)) == x: {same}")
    if plot_layout(mask, lengths, args.plot):
        print(f"wrote {args.plot}")
    else:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
