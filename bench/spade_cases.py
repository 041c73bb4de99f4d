"""SPADE embedding: foveal against the same module in PyTorch, for compare_torch.py --suite spade.

The case of issue 7: B = 32 sequences of n = 1024 calorimeter hits, 4 features (z, x, y binned
into 30 bins, energy continuous), delayed to T = n + 4 steps, d_model = 256. PyTorch runs
nn.Embedding (width 64) per bin feature, Linear(1, 16)-SiLU-Linear(16, 16) on the energy, a
concatenation and one Linear(208, 256), under torch.inference_mode(); foveal loads the same
weights. Every sequence is full length, so no step is PAD and both compute the same thing.
Also timed: foveal.spade.delay of the token batch followed by undelay of the delayed batch, as a
fraction of the embedding time (the two interleaved), and each alone.
"""

from __future__ import annotations

from typing import Callable

import foveal
import torch
from foveal import spade

BATCH, LENGTH, NUM_BINS, WIDTH, HIDDEN, D_MODEL = 32, 1024, 30, 64, 16, 256


class TorchShowerEmbedding(torch.nn.Module):
    """The PyTorch SPADE embedding of the benchmark (three bin tables, one energy MLP)."""

    def __init__(self, layer_norm: bool) -> None:
        super().__init__()
        nn = torch.nn
        self.tables = nn.ModuleList(nn.Embedding(NUM_BINS + 2, WIDTH) for _ in range(3))
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in range(3)) if layer_norm else None
        self.energy = nn.Sequential(nn.Linear(1, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN))
        self.projection = nn.Linear(3 * WIDTH + HIDDEN, D_MODEL)

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        parts = [table(ids[..., column]) for column, table in enumerate(self.tables)]
        if self.norms is not None:
            parts = [norm(part) for norm, part in zip(self.norms, parts)]
        return self.projection(torch.cat([*parts, self.energy(values)], dim=-1))


def build_case(layer_norm: bool = False, seed: int = 0) -> dict:
    """The schema, both modules with the same weights, tokens and their delayed batch."""
    torch.manual_seed(seed)
    module = TorchShowerEmbedding(layer_norm).eval()
    schema = spade.Schema(
        [spade.Feature.binned(name, NUM_BINS) for name in ("z", "x", "y")]
        + [spade.Feature.continuous("energy")]
    )
    features = {}
    for column, name in enumerate(("z", "x", "y")):
        features[name] = {"table": module.tables[column].weight.detach()}
        if layer_norm:
            norm = module.norms[column]
            features[name].update(norm_weight=norm.weight.detach(), norm_bias=norm.bias.detach())
    first, last = module.energy[0], module.energy[2]
    features["energy"] = {
        "hidden_weight": first.weight.detach(),
        "hidden_bias": first.bias.detach(),
        "output_weight": last.weight.detach(),
        "output_bias": last.bias.detach(),
    }
    embedding = spade.SpadeEmbedding(
        schema,
        features,
        projection_weight=module.projection.weight.detach(),
        projection_bias=module.projection.bias.detach(),
    )
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, NUM_BINS + 1, (BATCH, LENGTH, 3), generator=generator)
    values = torch.rand((BATCH, LENGTH, 1), generator=generator) * 10
    delayed_ids, delayed_values, _ = spade.delay(schema, ids, values)
    return dict(
        schema=schema,
        module=module,
        embedding=embedding,
        ids=ids,
        values=values,
        delayed_ids=delayed_ids,
        delayed_values=delayed_values,
        layer_norm=layer_norm,
    )


def time_case(case: dict, threads: int, seconds: float, interleaved: Callable, median_time) -> dict:
    """Times both embeddings interleaved, then delay and undelay, at `threads` threads."""
    torch.set_num_threads(threads)
    foveal.set_num_threads(threads)
    schema, module, embedding = case["schema"], case["module"], case["embedding"]
    delayed_ids, delayed_values = case["delayed_ids"], case["delayed_values"]

    def run_torch():
        with torch.inference_mode():
            return module(delayed_ids, delayed_values)

    def run_foveal():
        return embedding(delayed_ids, delayed_values)

    def run_delay_undelay():
        spade.undelay(schema, *spade.delay(schema, case["ids"], case["values"])[:2])

    error = (run_foveal() - run_torch()).abs().max().item()
    foveal_s, torch_s = interleaved(run_foveal, run_torch, seconds)
    # Timed against the embedding in alternating rounds too, so both see the same noise.
    delay_undelay_s, embedding_s = interleaved(run_delay_undelay, run_foveal, seconds)
    delay_s = median_time(lambda: spade.delay(schema, case["ids"], case["values"]), 0.1, 5)
    undelay_s = median_time(lambda: spade.undelay(schema, delayed_ids, delayed_values), 0.1, 5)
    rows = BATCH * (LENGTH + schema.max_shift)
    return dict(
        op="spade",
        layer_norm=case["layer_norm"],
        threads=threads,
        foveal_ms=foveal_s * 1e3,
        torch_ms=torch_s * 1e3,
        ratio=torch_s / foveal_s,
        foveal_mtokens_per_s=rows / foveal_s * 1e-6,
        delay_ms=delay_s * 1e3,
        undelay_ms=undelay_s * 1e3,
        delay_undelay_fraction=delay_undelay_s / embedding_s,
        max_abs_diff=error,
    )


def run(threads_list: list, seconds: float, interleaved: Callable, median_time) -> list:
    """Prints the table of compare_torch.py --suite spade and returns its rows."""
    print(
        f"\nSPADE embedding B={BATCH} n={LENGTH} F=4 (z, x, y: {NUM_BINS} bins, width {WIDTH}; "
        f"energy: MLP 1-{HIDDEN}-{HIDDEN}) d_model={D_MODEL}, T={LENGTH + 4}"
    )
    print(
        f"{'case':<22}{'threads':>8}{'foveal ms':>11}{'torch ms':>10}{'ratio':>8}"
        f"{'Mtok/s':>8}{'delay ms':>10}{'undelay ms':>11}{'(d+u)/emb':>10}{'max|diff|':>11}"
    )
    rows = []
    for layer_norm in (False, True):
        case = build_case(layer_norm)
        for threads in threads_list:
            row = time_case(case, threads, seconds, interleaved, median_time)
            rows.append(row)
            label = "concat + LayerNorm" if layer_norm else "concat"
            print(
                f"{label:<22}{threads:>8}{row['foveal_ms']:>11.2f}{row['torch_ms']:>10.2f}"
                f"{row['ratio']:>7.2f}x{row['foveal_mtokens_per_s']:>8.1f}{row['delay_ms']:>10.3f}"
                f"{row['undelay_ms']:>11.3f}{row['delay_undelay_fraction']:>10.1%}"
                f"{row['max_abs_diff']:>11.1e}"
            )
    return rows
