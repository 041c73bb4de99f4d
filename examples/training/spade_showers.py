"""SPADE on synthetic calorimeter showers: a small causal transformer reads delayed
multi-feature hit tokens through ``foveal.torch.SpadeEmbedding`` (C++ forward and backward),
learns to predict the next delayed step of every stream, and generates new showers with
``foveal.spade.Decoder``; the generated hits are compared with held-out showers feature by
feature (histograms and Wasserstein-1 distances) (docs/training.md).

Data: ``synthetic_showers`` of examples/python/spade_showers.py (fixed seeds): hits with cell
bins z, x, y (30 bins each, sorted by depth z) and an energy, 8 to 24 hits per shower. Tokens
carry z, x, y as discrete features and ``log E`` as the continuous one; delay shifts 1, 2, 3, 4,
so the model predicts a hit's x after seeing its z, y after x, and the energy after all three.

Model: SpadeEmbedding (tables of width 16 with LayerNorm, energy MLP 1-16-16, projection to
``--width``) plus a learned step embedding, ``--depth`` pre-norm ``nn.TransformerEncoderLayer``
blocks with a causal mask, then per stream a head: logits over the 32 ids of z, x, y and the
mean and log-std of a Gaussian on log E. Loss: cross-entropy of the three id streams and the
Gaussian negative log-likelihood of the energies, each averaged over the valid target steps of
``loss_mask(include_stop=True)`` (the z stream also learns to stop), summed.

Generation: the decoder's state machine (MISSING before a stream starts, the stop when z predicts
MISSING or PAD, the owed steps of the later streams); ids sampled from the softmax (x and y never
PAD or MISSING), log E from the Gaussian.

    python3 examples/training/spade_showers.py            # full run (about 3 min on 1 core)
    python3 examples/training/spade_showers.py --smoke    # a few steps, asserts the loss falls

The full run writes its section of docs/training.md (between its markers) and
docs/images/training_spade_showers.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import foveal
import numpy as np
import torch
from foveal import spade
from foveal.torch import SpadeEmbedding
from torch import nn
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from spade_showers import NUM_BINS, synthetic_showers
from training_common import DOC, IMAGES, ROOT, base_parser, smoothed, train_all, write_section

PLOT = IMAGES / "training_spade_showers.png"
FEATURES = ("z", "x", "y", "log E")
MAX_HITS = 24


def shower_schema() -> spade.Schema:
    return spade.Schema(
        [spade.Feature.binned(name, NUM_BINS) for name in ("z", "x", "y")]
        + [spade.Feature.continuous("E")]
    )


def showers(count: int, seed: int) -> tuple:
    """ids [count, MAX_HITS, 3], log energies [count, MAX_HITS, 1] (0 past a shower's end),
    lengths [count], as torch tensors."""
    ids, energies, lengths = synthetic_showers(np.random.default_rng(seed), count, MAX_HITS)
    log_energy = np.zeros_like(energies)
    for b, length in enumerate(lengths):
        log_energy[b, :length] = np.log(np.maximum(energies[b, :length], 1e-6))
    return torch.from_numpy(ids), torch.from_numpy(log_energy), torch.from_numpy(lengths)


class ShowerModel(nn.Module):
    def __init__(self, schema: spade.Schema, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embedding = SpadeEmbedding(schema, width, embedding_dim=16, hidden=16, layer_norm=True)
        self.steps = nn.Embedding(schema.delayed_length(MAX_HITS), width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.id_heads = nn.ModuleList(nn.Linear(width, f.vocab_size) for f in schema.discrete)
        self.energy_head = nn.Linear(width, 2)

    def forward(self, ids: torch.Tensor, values: torch.Tensor) -> tuple:
        steps = ids.shape[1]
        x = self.embedding(ids, values) + self.steps.weight[:steps]
        mask = nn.Transformer.generate_square_subsequent_mask(steps)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        mean, log_std = self.energy_head(x).unbind(-1)
        return [head(x) for head in self.id_heads], mean, log_std.clamp(-5.0, 3.0)


def loss_of(model: ShowerModel, ids, values, lengths) -> torch.Tensor:
    """Next-step loss of a batch of token sequences (see the module docstring)."""
    delayed_ids, delayed_values, _ = model.embedding.delay(ids, values, lengths)
    pairs = spade.next_step(delayed_ids, delayed_values)
    mask = model.embedding.loss_mask(lengths, delayed_ids.shape[1], include_stop=True)
    logits, mean, log_std = model(pairs.input_ids, pairs.input_values)
    loss = torch.zeros(())
    for column, stream_logits in enumerate(logits):
        valid = mask[..., column]
        targets = pairs.target_ids[..., column]
        loss = loss + functional.cross_entropy(stream_logits[valid], targets[valid])
    valid = mask[..., 3]
    target = pairs.target_values[..., 0][valid]
    std_log = log_std[valid]
    nll = 0.5 * ((target - mean[valid]) / std_log.exp()) ** 2 + std_log
    return loss + nll.mean()


@torch.no_grad()
def generate(model: ShowerModel, count: int, seed: int) -> tuple:
    """``count`` showers from the model: (ids [count, MAX_HITS, 3], log E [count, MAX_HITS, 1],
    lengths [count]) as numpy arrays."""
    schema = model.embedding.schema
    decoder = spade.Decoder(schema, batch=count, max_tokens=MAX_HITS)
    generator = torch.Generator().manual_seed(seed)
    first_ids, first_values = decoder.first_step()
    step_ids, step_values = [torch.from_numpy(first_ids)], [torch.from_numpy(first_values)]
    no_stop = torch.zeros(schema.discrete[0].vocab_size)
    no_stop[[schema.discrete[0].pad_id, schema.discrete[0].missing_id]] = -float("inf")
    while not decoder.done:
        logits, mean, log_std = model(torch.stack(step_ids, 1), torch.stack(step_values, 1))
        predicted = []
        for column, stream_logits in enumerate(logits):
            last = stream_logits[:, -1]
            if column > 0:  # only the first stream may stop
                last = last + no_stop
            probabilities = torch.softmax(last, dim=-1)
            predicted.append(torch.multinomial(probabilities, 1, generator=generator)[:, 0])
        noise = torch.randn(count, generator=generator)
        energy = mean[:, -1] + log_std[:, -1].exp() * noise
        ids, values, _ = decoder.step(
            torch.stack(predicted, -1).contiguous(), energy[:, None].contiguous()
        )
        step_ids.append(ids)
        step_values.append(values)
    ids, values = decoder.tokens()
    return ids, values, np.array(decoder.lengths)


def hit_features(ids, values, lengths) -> dict:
    """Every hit's z, x, y and log E, and the number of hits per shower."""
    ids, values, lengths = (np.asarray(a) for a in (ids, values, lengths))
    hits = np.arange(ids.shape[1])[None, :] < lengths[:, None]
    features = {
        name: ids[..., column][hits].astype(np.float64) for column, name in enumerate("zxy")
    }
    features["log E"] = values[..., 0][hits].astype(np.float64)
    features["hits"] = lengths.astype(np.float64)
    return features


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 of two 1-D samples: the integral of |F_a - F_b| over the merged support."""
    support = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), support[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), support[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(support)))


def distances(features: dict, reference: dict) -> dict:
    return {name: wasserstein_1(features[name], reference[name]) for name in reference}


def train(kind: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    schema = shower_schema()
    model = ShowerModel(schema, args.width, args.depth, args.heads)
    ids, values, lengths = showers(args.train_showers, args.seed + 1)
    held_out = hit_features(*showers(args.eval_showers, args.seed + 2))
    reference_sample = hit_features(*showers(args.eval_showers, args.seed + 3))
    untrained = {}
    if not args.smoke:
        untrained = distances(
            hit_features(*generate(model, args.eval_showers, args.seed + 4)), held_out
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    batches = torch.Generator().manual_seed(args.seed + 5)
    losses, seconds = [], 0.0
    for _ in range(args.steps):
        pick = torch.randint(0, args.train_showers, (args.batch,), generator=batches)
        start = time.perf_counter()
        loss = loss_of(model, ids[pick], values[pick], lengths[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
    start = time.perf_counter()
    generated = hit_features(*generate(model, args.eval_showers, args.seed + 6))
    generate_seconds = time.perf_counter() - start
    return dict(
        kind=kind,
        losses=losses,
        step_ms=1e3 * seconds / args.steps,
        generate_s=generate_seconds,
        parameters=sum(p.numel() for p in model.parameters()),
        generated=generated,
        held_out=held_out,
        trained=distances(generated, held_out),
        untrained=untrained,
        floor=distances(reference_sample, held_out),
    )


def markdown(result: dict, args: argparse.Namespace) -> str:
    lines = [
        f"`python3 examples/training/spade_showers.py` — foveal {foveal.__version__}, torch "
        f"{torch.__version__}, {args.threads} thread(s). {args.train_showers} training showers, "
        f"{args.steps} steps of batch {args.batch}, width {args.width}, depth {args.depth}, "
        f"{args.heads} heads ({result['parameters']:,} weights), AdamW one-cycle lr {args.lr}; "
        f"{result['step_ms']:.0f} ms / step, generation of {args.eval_showers} showers "
        f"{result['generate_s']:.1f} s. Wasserstein-1 distance of every hit feature (and of the "
        f"number of hits per shower) to {args.eval_showers} held-out showers:",
        "",
        "| feature | generated (trained) | generated (untrained) | another real sample |",
        "|---|---:|---:|---:|",
    ]
    for name in (*FEATURES, "hits"):
        label = "hits per shower" if name == "hits" else name
        lines.append(
            f"| {label} | **{result['trained'][name]:.3f}** | {result['untrained'][name]:.3f} | "
            f"{result['floor'][name]:.3f} |"
        )
    tail = result["losses"][-50:]
    lines += [
        "",
        f"Training loss (sum of the four streams): {sum(result['losses'][:10]) / 10:.3f} over the "
        f'first 10 steps, {sum(tail) / len(tail):.3f} over the last 50. "another real sample": '
        f"{args.eval_showers} more showers from the generator, the distance sampling noise alone "
        "gives.",
        "",
        "![histograms](images/training_spade_showers.png)",
    ]
    return "\n".join(lines)


def plot(result: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for axis, name in zip(axes.flat, (*FEATURES, "hits")):
        real, fake = result["held_out"][name], result["generated"][name]
        if name == "log E":
            bins = np.linspace(min(real.min(), fake.min()), max(real.max(), fake.max()), 41)
        else:
            bins = np.arange(min(real.min(), fake.min()) - 0.5, max(real.max(), fake.max()) + 1.5)
        axis.hist(
            real, bins=bins, density=True, histtype="stepfilled", alpha=0.35, label="held out"
        )
        axis.hist(fake, bins=bins, density=True, histtype="step", linewidth=1.5, label="generated")
        title = "hits per shower" if name == "hits" else name
        axis.set_title(f"{title}  (W1 {result['trained'][name]:.3f})")
    axes.flat[0].legend()
    steps, means = smoothed(result["losses"], 25)
    axes.flat[5].plot(list(steps), means)
    axes.flat[5].set_title("training loss (running mean of 25)")
    axes.flat[5].set_xlabel("step")
    figure.suptitle(
        f"SPADE showers: {args.eval_showers} generated vs held-out ({args.steps} steps, "
        f"{result['parameters']:,} weights)"
    )
    figure.tight_layout()
    figure.savefig(PLOT, dpi=100)


def parse(argv) -> argparse.Namespace:
    parser = base_parser(
        __doc__,
        dict(
            steps=1500,
            batch=64,
            width=64,
            depth=2,
            heads=4,
            lr=3e-3,
            train_showers=8192,
            eval_showers=2048,
        ),
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.train_showers, args.eval_showers = 40, 32, 256, 16
    return args


def main(argv=None) -> list:
    args = parse(argv)
    results = train_all(("spade",), train, args, lambda r: (
        f"{r['parameters']:,} weights, {r['step_ms']:.0f} ms/step, W1 "
        + ", ".join(f"{name} {value:.3f}" for name, value in r["trained"].items())
    ))  # fmt: skip
    if args.smoke:
        return results
    heading = "Run 4: SPADE on synthetic calorimeter showers"
    write_section("spade-showers", heading, markdown(results[0], args))
    plot(results[0], args)
    print(f"wrote {DOC.relative_to(ROOT)}, {PLOT.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
