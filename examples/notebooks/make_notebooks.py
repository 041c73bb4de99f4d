"""Writes the notebooks of this folder (their cells live here, as text; outputs stripped).

    python3 examples/notebooks/make_notebooks.py          # rewrite the .ipynb files
    python3 examples/notebooks/make_notebooks.py --check  # fail if a file differs from this

Each notebook is small and runs in seconds; tests/python/test_notebooks.py executes them all.
Edit the cells here, run this script, and commit both.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import nbformat
from nbformat import v4

HERE = Path(__file__).resolve().parent

PLOT_SETUP = """\
%matplotlib inline
import matplotlib.pyplot as plt"""

GETTING_STARTED = [
    """\
# Getting started with foveal: dense, windowed and decode attention

foveal computes exact attention on the CPU without ever forming the `[Lq, Lk]` matrix of
scores. This notebook runs the three everyday calls on small random inputs, checks each against
a plain float64 numpy formula, and draws which keys every query attends to.""",
    """\
import foveal
import numpy as np

rng = np.random.default_rng(0)
print(foveal.build_info()["level"], "kernels,", foveal.get_num_threads(), "threads")""",
    """\
## Dense attention

Shapes are `[batch, heads, length, head_dim]`. Here 8 query heads share 2 key/value heads
(grouped-query attention, 4 query heads per group). `return_lse=True` also returns each row's
log-sum-exp, which is what lets partial results be merged later.""",
    """\
B, Hq, Hkv, L, D = 1, 8, 2, 48, 16
q = rng.standard_normal((B, Hq, L, D), dtype=np.float32)
k = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
v = rng.standard_normal((B, Hkv, L, D), dtype=np.float32)
out, lse = foveal.attention(q, k, v, causal=True, return_lse=True)
print("out", out.shape, "lse", lse.shape)""",
    """\
The same thing written out in float64 numpy: scores, a causal mask, a softmax. The two agree to
float32 rounding.""",
    """\
def reference(q, k, v, visible):
    group = q.shape[1] // k.shape[1]
    k, v = (np.repeat(x.astype(np.float64), group, axis=1) for x in (k, v))
    scores = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)) @ v


causal = np.tril(np.ones((L, L), dtype=bool))
print("max |foveal - reference| =", np.abs(out - reference(q, k, v, causal)).max())""",
    """\
## Sliding-window attention with sink tokens

`sliding_window_attention` keeps only the `window_left` keys before each query (cost grows
with `L * window`, not `L^2`) plus the first `sink_tokens` keys, which stay visible to every
query.""",
    """\
window, sinks = 8, 2
local = foveal.sliding_window_attention(q, k, v, window_left=window, causal=True, sink_tokens=sinks)
i, j = np.arange(L)[:, None], np.arange(L)[None, :]
band = (j <= i) & ((i - j <= window) | (j < sinks))
print("max |foveal - reference| =", np.abs(local - reference(q, k, v, band)).max())""",
    """\
To *see* the attention weights, use a trick: with one-hot values (`v` = the identity matrix),
each output row is exactly that query's row of softmax weights. Dense causal attention spreads
over the whole past; the window keeps a band plus the sink columns.""",
    """\
eye = np.eye(L, dtype=np.float32)[None, None]  # one head, values = one-hot keys
q1, k1 = 2 * q[:, :1], 2 * k[:, :1]
weights_dense = foveal.attention(q1, k1, eye, causal=True)[0, 0]
weights_window = foveal.sliding_window_attention(
    q1, k1, eye, window_left=window, causal=True, sink_tokens=sinks
)[0, 0]
print("rows sum to one:", np.allclose(weights_dense.sum(1), 1))
print("and the window's too:", np.allclose(weights_window.sum(1), 1))""",
    PLOT_SETUP,
    """\
figure, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
for axis, weights, title in (
    (axes[0], weights_dense, "dense, causal"),
    (axes[1], weights_window, f"window {window} + {sinks} sinks"),
):
    axis.imshow(weights, cmap="viridis")
    axis.set_title(title)
    axis.set_xlabel("key position")
axes[0].set_ylabel("query position")
figure.tight_layout()""",
    """\
## Decoding with a KV cache

Generation appends one token at a time. `KVCache` holds the keys and values
(`[batch, kv_heads, capacity, head_dim]`); `decode_attention` attends the newest queries over
everything cached. The last query of the causal prompt above sees every key, so one decode step
over the cached prompt reproduces the last row of the dense result.""",
    """\
cache = foveal.KVCache(B, Hkv, 256, D, ring=False)
cache.append(k, v)  # the prompt: L tokens
print("cached:", cache.lengths)
step = foveal.decode_attention(q[:, :, -1:], cache)
print("max |decode - dense last row| =", np.abs(step - out[:, :, -1:]).max())

new_k = rng.standard_normal((B, Hkv, 1, D), dtype=np.float32)
new_v = rng.standard_normal((B, Hkv, 1, D), dtype=np.float32)
cache.append(new_k, new_v)  # one generated token
new_q = rng.standard_normal((B, Hq, 1, D), dtype=np.float32)
step = foveal.decode_attention(new_q, cache)
full_k, full_v = np.concatenate([k, new_k], axis=2), np.concatenate([v, new_v], axis=2)
print("max |decode - dense| =", np.abs(step - foveal.attention(new_q, full_k, full_v)).max())""",
    """\
Next: `docs/attention.md` (every option), `docs/decode.md` (caches, split-KV decode,
`merge_states`) and `docs/serving.md` (a paged cache for many sequences).""",
]

SPARSEK = [
    """\
# SparseK: which keys does each query see?

SparseK attention gives every query a fixed budget of `topk` keys from its causal prefix,
chosen by a learned score `u` per key, plus an optional sliding window and sink tokens. The
SPARSEK projection turns the scores into gates in [0, 1] that weight the chosen keys, so the
scorer is trained by gradient descent. This notebook draws the selection of 64 tokens.""",
    """\
import foveal
import numpy as np
from foveal import sparsek as sk

L, TOPK, WINDOW, SINKS, MODEL_DIM = 64, 8, 6, 2, 16
rng = np.random.default_rng(7)""",
    """\
## Scores

`linear_scores` is the simplest scorer: `u = x @ w`, plus a slope that favours later
positions (so recent keys win ties). Its shape is `[batch, heads, L]`.""",
    """\
x = rng.standard_normal((1, L, MODEL_DIM))
w = rng.standard_normal((1, MODEL_DIM)) / np.sqrt(MODEL_DIM)
u = sk.linear_scores(x, w, slope=0.02)
print("u", u.shape)""",
    """\
## Selection

`sparsek_select` returns, for each query, the indices of its selected keys (-1 = unused slot)
and their gates. The window and sinks are always visible with gate 1, so the `topk` budget is
spent on the rest of the prefix.""",
    """\
indices, gates = sk.sparsek_select(u, TOPK, L, window=WINDOW, sink_tokens=SINKS)
# [L, L] gates: row = query, column = key (unused slots, index -1, land in a spare column).
selected = np.zeros((L, L + 1))
np.put_along_axis(selected, np.where(indices[0, 0] >= 0, indices[0, 0], L), gates[0, 0], axis=1)
selected = selected[:, :L]
position = np.arange(L)
distance = position[:, None] - position[None, :]
always = ((distance >= 0) & (distance < WINDOW)) | ((position[None, :] < SINKS) & (distance >= 0))
print("selected keys per query (first 12):", (selected > 0).sum(1)[:12])
print("a query never selects a later key:", not np.triu(selected, 1).any())""",
    """\
The prefix thresholds never decrease, so once a key drops out of the selection it never comes
back: in the picture, each selected key is one unbroken vertical run.""",
    PLOT_SETUP,
    """\
figure, (top, grid) = plt.subplots(
    2, 1, figsize=(7, 8), gridspec_kw=dict(height_ratios=[1, 4]), sharex=True
)
top.bar(position, u[0, 0], color="tab:gray")
top.set_ylabel("score u")
grid.imshow(always, cmap="Blues", vmin=0, vmax=2.5, aspect="auto", interpolation="none")
shown = grid.imshow(
    np.ma.masked_where(selected <= 0, selected),
    cmap="Oranges",
    vmin=0,
    vmax=1,
    aspect="auto",
    interpolation="none",
)
grid.set_xlabel("key position (blue: window and sinks)")
grid.set_ylabel("query position")
figure.colorbar(shown, ax=grid, label="gate of a selected key", shrink=0.8)
figure.tight_layout()""",
    """\
## The attention

`sparsek_attention` runs attention over exactly these keys (the window, the sinks and the
selected keys, weighted by their gates) in `O(L * (topk + window) * D)`, never over the whole
prefix. A query whose prefix lies inside its window sees the same keys as dense causal
attention, so the first rows agree with it.""",
    """\
q = rng.standard_normal((1, 1, L, MODEL_DIM))
k = rng.standard_normal((1, 1, L, MODEL_DIM))
v = rng.standard_normal((1, 1, L, MODEL_DIM))
out = foveal.sparsek_attention(q, k, v, u, TOPK, window=WINDOW, sink_tokens=SINKS)
dense = foveal.attention(q, k, v, causal=True)
print("out", out.shape)
# The first WINDOW queries see their whole prefix through the window alone: dense rows.
print("first rows equal dense:", np.allclose(out[0, 0, :WINDOW], dense[0, 0, :WINDOW]))""",
]

PDE_SSM = [
    """\
# PDE-SSM: a picture evolved by a learnable PDE

The PDE-SSM block mixes the tokens of an `H x W` grid by solving, per channel, a
convection-diffusion-reaction equation for a time `tau`, exactly, with an FFT. Each channel has
its own diffusion matrix `K`, velocity `b` and reaction rate `r` (the learnable parameters).""",
    """\
import numpy as np
from foveal import pde_ssm as pde

SIDE = 48
y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
picture = ((y - 16) ** 2 + (x - 16) ** 2 < 50).astype(np.float64)  # a disk
picture += ((np.abs(x - 34) < 2) & (y > 22) & (y < 44)).astype(np.float64)  # a bar
print(picture.shape, picture.sum())""",
    """\
## Three channels, three equations

The input is `[batch, H, W, channels]`; the picture goes into three channels:

- channel 0 diffuses (`K = I`): it blurs and keeps its mean;
- channel 1 is carried by the velocity `(b_y, b_x) = (3, 6)` cells per unit time: it moves and
  wraps around the periodic boundary, unchanged in shape;
- channel 2 does both, with an anisotropic `K` and a decay `r = -0.2`.

The diffusion is given by its Cholesky factor `(l_yy, l_xy, l_xx)`, so `K = L Lᵀ` is always
positive semi-definite.""",
    """\
grid = np.repeat(picture[None, :, :, None], 3, axis=3)
diffusion = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.4, 0.0, 1.2]])
velocity = np.array([[0.0, 0.0], [3.0, 6.0], [3.0, 6.0]])
reaction = np.array([0.0, 0.0, -0.2])
times = [0.5, 1.0, 2.0, 4.0]
frames = [pde.pde_ssm(grid, diffusion, velocity, reaction, [t])[0] for t in times]
for t, frame in zip(times, frames):
    print(f"tau={t}: channel means", np.round(frame.mean(axis=(0, 1)), 4))""",
    """\
Diffusion and convection keep the mean (`picture.mean()` below); the reaction term scales it by
`exp(r * tau)`.""",
    """\
print(
    "input mean",
    round(picture.mean(), 4),
    "  expected decayed mean at tau=4:",
    round(picture.mean() * np.exp(-0.2 * 4), 4),
)""",
    """\
%matplotlib inline
import matplotlib.pyplot as plt

names = ("diffusion", "convection", "both + decay")
figure, axes = plt.subplots(3, len(times) + 1, figsize=(11, 6.6))
for row, name in enumerate(names):
    axes[row][0].imshow(picture, cmap="magma", vmin=0, vmax=1)
    axes[row][0].set_ylabel(name)
    for column, (t, frame) in enumerate(zip(times, frames), start=1):
        axes[row][column].imshow(frame[:, :, row], cmap="magma", vmin=0, vmax=1)
        if row == 0:
            axes[row][column].set_title(f"tau = {t}")
axes[0][0].set_title("input")
for axis in axes.flat:
    axis.set_xticks([])
    axis.set_yticks([])
figure.tight_layout()""",
    """\
`foveal.torch.pde_ssm` and `foveal.nn` make the same block differentiable in the input and every
parameter, for training (see `docs/pde_ssm.md`).""",
]

SPADE = [
    """\
# SPADE: split-and-delay embeddings of multi-feature tokens

Some sequences have several features per token: here a calorimeter shower is a list of hits,
each with `(z, x, y)` cell bins and an energy. SPADE gives every feature its own stream and
delays stream `f` by `s_f` steps, so an autoregressive model predicts the features of a token
one after the other, each conditioned on the ones before it.""",
    """\
import numpy as np
from foveal import spade

BINS = 20
schema = spade.Schema(
    [
        spade.Feature.binned("z", BINS),
        spade.Feature.binned("x", BINS),
        spade.Feature.binned("y", BINS),
        spade.Feature.continuous("E"),
    ]
)
print(schema, "shifts", schema.shifts)""",
    """\
## Synthetic showers

Hits sorted by depth `z`; `x` and `y` scatter around an axis, wider with depth; energies fall
off with depth. Showers have different numbers of hits (`lengths`).""",
    """\
rng = np.random.default_rng(0)
batch, max_hits = 4, 24
lengths = rng.integers(8, max_hits + 1, batch)
ids = np.zeros((batch, max_hits, 3), np.int64)
energies = np.zeros((batch, max_hits, 1), np.float32)
for b, n in enumerate(lengths):
    depth = np.sort(rng.gamma(3.0, 2.5, n))
    spread = 1.0 + 0.2 * depth
    z = np.clip(depth.astype(int) + 1, 1, BINS)
    x = np.clip(np.rint(rng.normal(10, spread)), 1, BINS)
    y = np.clip(np.rint(rng.normal(10, spread)), 1, BINS)
    ids[b, :n] = np.stack([z, x, y], axis=-1)
    energies[b, :n, 0] = rng.exponential(1.0, n) * np.exp(-depth / 8)
print("hits per shower:", lengths.tolist())""",
    """\
## Delay and undelay

`delay` lays the streams out over `n + max_shift` steps; `mask` tells which steps of which
stream carry data (the others are MISSING at the start of a stream or PAD after its end).
`undelay` is the exact inverse.""",
    """\
delayed_ids, delayed_values, mask = spade.delay(schema, ids, energies, lengths)
print("delayed ids", delayed_ids.shape, "values", delayed_values.shape, "mask", mask.shape)
back_ids, back_energies = spade.undelay(schema, delayed_ids, delayed_values)
print(
    "undelay(delay(x)) == x:",
    all(
        (back_ids[b, :n] == ids[b, :n]).all() and (back_energies[b, :n] == energies[b, :n]).all()
        for b, n in enumerate(lengths)
    ),
)""",
    """\
## The embedding

`SpadeEmbedding` sums one embedding per stream (a table for a binned feature, a small MLP for a
continuous one) and projects to the model width. Its weights come from a trained PyTorch model;
here they are random. PAD steps embed to zero.""",
    """\
width, hidden, d_model = 8, 16, 32


def random(*shape, gain=1.0):
    return (gain * rng.standard_normal(shape)).astype(np.float32)


weights = {f.name: {"table": random(f.vocab_size, width)} for f in schema.discrete}
# The continuous energy goes through a one-hidden-layer MLP: 1 -> hidden -> width.
weights["E"] = dict(
    hidden_weight=random(hidden, 1),
    hidden_bias=random(hidden),
    output_weight=random(width, hidden, gain=0.25),
    output_bias=np.zeros(width, np.float32),
)
projection = random(d_model, 4 * width, gain=0.2)
embedding = spade.SpadeEmbedding(schema, weights, projection_weight=projection)
embedded = embedding(delayed_ids, delayed_values)
pad = delayed_ids[..., 0] == 0
print("embedded", embedded.shape, " PAD steps zero:", not embedded[pad].any())""",
    """\
%matplotlib inline
import matplotlib.pyplot as plt

figure, axes = plt.subplots(batch, 1, figsize=(9, 1.1 * batch + 1), sharex=True)
for b, axis in enumerate(axes):
    axis.imshow(mask[b].T, aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    axis.set_yticks(range(4), ["z", "x", "y", "E"])
    axis.set_ylabel(f"{lengths[b]} hits", fontsize=8)
axes[-1].set_xlabel("delayed step (black: data)")
figure.suptitle("each stream starts one step after the previous one")
figure.tight_layout()""",
]

VQ_COLLAPSE = [
    """\
# Codebook collapse in vector quantization, and its two fixes

A vector quantizer maps each input row to its nearest code. Initialize the codebook at random
near the origin while the data sits far away, and every input is nearest to the same few codes:
EMA updates move only those, the rest never get a row again (*collapse*). Initializing from the
data (k-means++) and restarting dead codes keep the whole codebook in use.""",
    """\
import numpy as np
from foveal import vq

CODES, DIM, CLUSTERS, STEPS, BATCH = 128, 8, 32, 60, 512
rng = np.random.default_rng(0)
centers = 4.0 + 2.0 * rng.standard_normal((CLUSTERS, DIM))


def batch_of(rng, rows):
    labels = rng.integers(0, CLUSTERS, rows)
    return (centers[labels] + 0.3 * rng.standard_normal((rows, DIM))).astype(np.float32)


held_out = batch_of(rng, 8192)""",
    """\
## Two quantizers, the same training

Both see the same batches and EMA updates; the second starts from k-means++ on data and, after
every step, moves dead codes onto rows of the batch.""",
    """\
def train(quantizer, restart):
    data_rng = np.random.default_rng(1)
    for step in range(STEPS):
        rows = batch_of(data_rng, BATCH)
        quantizer.update(rows)
        if restart:
            quantizer.restart_dead_codes(rows, seed=step)
    return quantizer


options = dict(decay=0.9, dead_threshold=0.05)
random_codebook = rng.standard_normal((CODES, DIM)).astype(np.float32)
collapsed = train(vq.VectorQuantizer(random_codebook, **options), restart=False)
from_data = vq.VectorQuantizer.from_data(batch_of(np.random.default_rng(2), 4096), CODES, **options)
healthy = train(from_data, restart=True)
setups = (("random init", collapsed), ("k-means++ + restart", healthy))""",
    """\
## Diagnostics

Codes used on held-out data, perplexity (the effective number of codes in use), dead codes and
the mean squared quantization error.""",
    """\
def usage(quantizer):
    indices, _, sq_distances = quantizer.quantize(held_out)
    counts = np.bincount(indices, minlength=CODES)
    return counts, float(sq_distances.mean())


for name, quantizer in setups:
    counts, mse = usage(quantizer)
    print(
        f"{name:<20} used {(counts > 0).sum():>3}/{CODES}",
        f" perplexity {vq.perplexity(counts):6.1f}",
        f" dead {quantizer.num_dead_codes():>3}  mse {mse:.3f}",
    )""",
    """\
%matplotlib inline
import matplotlib.pyplot as plt

figure, axes = plt.subplots(1, 2, figsize=(10, 3.2), sharey=True)
for axis, (name, quantizer) in zip(axes, setups):
    counts, _ = usage(quantizer)
    axis.bar(np.arange(CODES), np.sort(counts)[::-1] / len(held_out), width=1.0)
    axis.set_title(f"{name}: {(counts > 0).sum()} codes used")
    axis.set_xlabel("code (sorted by usage)")
axes[0].set_ylabel("share of held-out rows")
axes[0].set_yscale("log")
figure.tight_layout()""",
]

TRANSFORMERS = [
    """\
# foveal inside a transformers model

`foveal.transformers.register()` makes foveal an attention implementation of Hugging Face
transformers: `attn_implementation="foveal"`. This notebook builds a tiny Llama with random
weights (nothing is downloaded), runs it with transformers' own `sdpa` attention and with
foveal, and compares logits and greedy generation.""",
    """\
import foveal.transformers
import torch
import transformers

torch.manual_seed(0)
print("transformers", transformers.__version__, " torch", torch.__version__)
print("registered:", foveal.transformers.register())""",
    """\
## A tiny random Llama

Two layers, hidden size 64, 4 query heads sharing 2 key/value heads (GQA). foveal runs
float32 and float64 models.""",
    """\
config = transformers.LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
model = transformers.LlamaForCausalLM(config).eval()
tokens = torch.randint(3, config.vocab_size, (2, 24))
print(sum(p.numel() for p in model.parameters()), "parameters")""",
    """\
## The same logits

Switch the attention implementation of the loaded model and run the same batch. The second
sequence is left-padded, so the padding mask matters.""",
    """\
attention_mask = torch.ones_like(tokens)
attention_mask[1, :5] = 0


def logits_with(implementation):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(tokens, attention_mask=attention_mask).logits


reference, ours = logits_with("sdpa"), logits_with("foveal")
real = attention_mask.bool()
difference = (ours - reference).abs()[real]
print("max |foveal - sdpa| over real tokens:", difference.max().item())""",
    """\
## Greedy generation over a KV cache

Decoding goes through foveal too, with transformers' `DynamicCache`.""",
    """\
prompt = tokens[:1, :8]


def generate_with(implementation):
    model.set_attn_implementation(implementation)
    return model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)


print("sdpa  :", generate_with("sdpa")[0, 8:].tolist())
print("foveal:", generate_with("foveal")[0, 8:].tolist())""",
    """\
%matplotlib inline
import matplotlib.pyplot as plt

figure, axis = plt.subplots(figsize=(5, 4.5))
axis.scatter(reference[real].flatten()[:4000], ours[real].flatten()[:4000], s=2)
axis.set_xlabel("logit with sdpa")
axis.set_ylabel("logit with foveal")
axis.set_title("the same model, two attention implementations")
figure.tight_layout()""",
]

NOTEBOOKS = {
    "getting_started": GETTING_STARTED,
    "sparsek": SPARSEK,
    "pde_ssm": PDE_SSM,
    "spade": SPADE,
    "vq_collapse": VQ_COLLAPSE,
    "transformers": TRANSFORMERS,
}


def build(cells: list) -> nbformat.NotebookNode:
    """A notebook from cell sources: a source that is Python (IPython's % lines aside) is a code
    cell, any other (prose, always with a sentence that is no Python) is markdown."""
    notebook = v4.new_notebook()
    for index, source in enumerate(cells):
        cell = v4.new_code_cell(source) if _is_code(source) else v4.new_markdown_cell(source)
        cell["id"] = f"cell-{index}"
        notebook.cells.append(cell)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return notebook


def _is_code(source: str) -> bool:
    python = "\n".join(line for line in source.split("\n") if not line.startswith("%"))
    try:
        ast.parse(python)
    except SyntaxError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = nbformat.writes(build(cells)) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print("stale notebooks (run examples/notebooks/make_notebooks.py):", *stale)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
