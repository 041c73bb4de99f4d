"""Long-range multi-query associative recall: SparseK attention against dense attention and a
sliding window alone, in a 2-layer decoder trained from scratch (docs/training.md).

Task (synthetic, generated here from a fixed seed): a sequence of ``--length`` tokens opens with
``--pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (distinct keys), then random filler tokens, and
ends with the ``--pairs`` keys again in a random order; at each of those final positions the
model must output the value that followed that key at the start, more than ``length - 2 pairs``
tokens back. Loss and accuracy count only these query positions.

Models: the same 2-layer pre-norm decoder (rotary attention + GELU MLP) with three attention
layers: ``dense`` (``foveal.torch.DenseAttention``, causal), ``sparsek``
(``foveal.torch.SparseKAttention``, topk 64, window 64: the learned scorer chooses which far keys
each query sees) and ``window`` (``DenseAttention(window=64)``: the last 64 tokens only, which
cannot reach the pairs). Then the time of one training step (forward + backward) of each model
at growing lengths with a fixed number of tokens per batch.

    python3 examples/training/sparsek_recall.py            # full run (< 10 min on 2 cores)
    python3 examples/training/sparsek_recall.py --smoke    # a few steps, asserts the loss falls

The full run writes its section of docs/training.md (between its markers) and
docs/images/training_sparsek_recall.png. Deterministic: fixed seeds, fixed thread count.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import foveal
import torch
from foveal.torch import DenseAttention, SparseKAttention
from torch import nn
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_common import (
    DOC,
    IMAGES,
    ROOT,
    base_parser,
    smoothed,
    train_all,
    write_section,
)

PLOT = IMAGES / "training_sparsek_recall.png"
KINDS = ("dense", "sparsek", "window")


# --------------------------------------------------------------------------------------------
# Data.


class Recall:
    """Token ids: keys [0, keys), values [keys, keys + values), filler after them."""

    def __init__(self, length: int, pairs: int, keys: int, values: int, filler: int) -> None:
        if keys < pairs or length < 4 * pairs:
            raise ValueError("need keys >= pairs and length >= 4 * pairs")
        self.length, self.pairs, self.keys, self.values, self.filler = (
            length,
            pairs,
            keys,
            values,
            filler,
        )
        self.vocab = keys + values + filler

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [size, length] (int64), targets [size, length] (-100 where not scored)."""
        pairs, length = self.pairs, self.length
        keys = torch.rand(size, self.keys, generator=generator).argsort(dim=1)[:, :pairs]
        values = self.keys + torch.randint(0, self.values, (size, pairs), generator=generator)
        tokens = self.keys + self.values
        tokens = tokens + torch.randint(0, self.filler, (size, length), generator=generator)
        tokens[:, 0 : 2 * pairs : 2] = keys
        tokens[:, 1 : 2 * pairs : 2] = values
        order = torch.rand(size, pairs, generator=generator).argsort(dim=1)
        tokens[:, length - pairs :] = keys.gather(1, order)
        targets = torch.full((size, length), -100, dtype=torch.int64)
        targets[:, length - pairs :] = values.gather(1, order)
        return tokens, targets


# --------------------------------------------------------------------------------------------
# Model.


def attention_layer(kind: str, d_model: int, heads: int, topk: int, window: int) -> nn.Module:
    # No rotary embedding: recall matches content at any distance (the token shift and the causal
    # mask carry the order the task needs).
    if kind == "sparsek":
        return SparseKAttention(d_model, heads, heads, topk, window=window, rotary=False)
    window = window if kind == "window" else 0
    return DenseAttention(d_model, heads, heads, window=window, rotary=False)


class Block(nn.Module):
    def __init__(self, kind: str, d_model: int, heads: int, topk: int, window: int) -> None:
        super().__init__()
        self.norm_attention, self.norm_mlp = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attention = attention_layer(kind, d_model, heads, topk, window)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm_attention(x))
        return x + self.mlp(self.norm_mlp(x))


class Decoder(nn.Module):
    def __init__(self, kind: str, vocab: int, d_model: int, heads: int, topk: int, window: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.previous = nn.Embedding(vocab, d_model)  # token shift: what preceded each token
        self.blocks = nn.ModuleList(Block(kind, d_model, heads, topk, window) for _ in range(2))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + functional.pad(self.previous(tokens[:, :-1]), (0, 0, 1, 0))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_and_accuracy(model: Decoder, tokens: torch.Tensor, targets: torch.Tensor) -> tuple:
    logits = model(tokens)
    scored = targets >= 0
    loss = functional.cross_entropy(logits[scored], targets[scored])
    accuracy = (logits[scored].argmax(dim=-1) == targets[scored]).double().mean()
    return loss, float(accuracy)


# --------------------------------------------------------------------------------------------
# Training and timing.


def stages(args: argparse.Namespace) -> list:
    """[(length, batch, steps)]: the curriculum, ending at --length."""
    result = []
    for item in args.curriculum:
        length, batch, steps = (int(v) for v in item.split(":"))
        result.append((length, batch, steps))
    return result


def train(kind: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    task = Recall(args.length, args.pairs, args.keys, args.values, args.filler)
    model = Decoder(kind, task.vocab, args.d_model, args.heads, args.topk, args.window)
    plan = [(length, batch) for length, batch, steps in stages(args) for _ in range(steps)]
    total = len(plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    data = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every model
    evaluation = task.batch(args.eval_batch, torch.Generator().manual_seed(args.seed + 2))
    losses, seconds, final_steps = [], 0.0, 0
    for length, batch in plan:
        stage = Recall(length, args.pairs, args.keys, args.values, args.filler)
        tokens, targets = stage.batch(batch, data)
        start = time.perf_counter()
        loss, _ = loss_and_accuracy(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if length == args.length:  # the time per step reported: at the full length
            seconds += time.perf_counter() - start
            final_steps += 1
        losses.append(float(loss.detach()))
    with torch.no_grad():
        eval_loss, accuracy = loss_and_accuracy(model, *evaluation)
    parameters = sum(p.numel() for p in model.parameters())
    return dict(
        kind=kind,
        losses=losses,
        eval_loss=float(eval_loss),
        accuracy=accuracy,
        step_ms=1e3 * seconds / max(1, final_steps),
        parameters=parameters,
    )


def step_time(kind: str, length: int, tokens_per_batch: int, args: argparse.Namespace) -> float:
    """Median ms of one forward + backward of the model at this length (untrained weights)."""
    torch.manual_seed(args.seed)
    model = Decoder(kind, 64 + 64 + 64, args.d_model, args.heads, args.topk, args.window)
    tokens = torch.randint(0, 192, (max(1, tokens_per_batch // length), length))
    times = []
    for _ in range(args.timing_reps):
        start = time.perf_counter()
        model(tokens).float().square().mean().backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return 1e3 * sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------------------------
# Report.


def markdown(results: list, timing: dict, args: argparse.Namespace) -> str:
    plan = ", ".join(f"{length} x {batch} x {steps}" for length, batch, steps in stages(args))
    lines = [
        f"`python3 examples/training/sparsek_recall.py` — foveal {foveal.__version__}, torch "
        f"{torch.__version__}, {args.threads} threads. Length {args.length}, {args.pairs} "
        f"key-value pairs ({args.keys} keys, {args.values} values), d_model {args.d_model}, "
        f"{args.heads} heads, 2 layers. Curriculum (length x batch x steps): {plan}; the "
        f"accuracy is on {args.eval_batch} held-out sequences of length {args.length} (chance "
        f"{100 / args.values:.1f} %), the time per step is the mean over the steps at length "
        f"{args.length}.",
        "",
        "| attention | parameters | eval loss | eval accuracy | ms / training step |",
        "|---|---:|---:|---:|---:|",
    ]
    names = dict(
        dense="dense (causal)",
        sparsek=f"SparseK (topk {args.topk}, window {args.window})",
        window=f"sliding window {args.window}",
    )
    for result in results:
        lines.append(
            f"| {names[result['kind']]} | {result['parameters']:,} | {result['eval_loss']:.3f} | "
            f"**{100 * result['accuracy']:.1f} %** | {result['step_ms']:.0f} |"
        )
    lines += [
        "",
        f"Forward + backward of the whole model, {args.timing_tokens} tokens per batch, "
        f"median of {args.timing_reps}:",
        "",
        "| length | " + " | ".join(f"{names[k]} ms" for k in KINDS) + " | dense / SparseK |",
        "|---:|" + "---:|" * (len(KINDS) + 1),
    ]
    for length, row in timing.items():
        cells = " | ".join(f"{row[k]:.0f}" for k in KINDS)
        lines.append(f"| {length} | {cells} | **{row['dense'] / row['sparsek']:.2f}x** |")
    lines += ["", "![loss curves](images/training_sparsek_recall.png)"]
    return "\n".join(lines)


def plot(results: list, timing: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        label = f"{result['kind']} ({100 * result['accuracy']:.0f} % recall)"
        left.plot(*smoothed(result["losses"], len(result["losses"]) // 50), label=label)
    boundary = 0
    for length, _, steps in stages(args)[:-1]:
        boundary += steps
        left.axvline(boundary, color="grey", linewidth=0.5)
        left.text(boundary, 1.0, f" L={length} | ", ha="right", va="bottom", fontsize=7)
    left.set(xlabel="step", ylabel="training loss (query positions)", yscale="log")
    left.set_title(f"recall at length {args.length}")
    left.legend()
    lengths = list(timing)
    for kind in KINDS:
        right.plot(lengths, [timing[n][kind] for n in lengths], marker="o", label=kind)
    right.set(xlabel="sequence length", ylabel="ms per forward + backward", xscale="log")
    right.set(yscale="log")
    right.set_title(f"{args.timing_tokens} tokens per batch")
    right.legend()
    figure.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT, dpi=110)


def parse(argv=None) -> argparse.Namespace:
    defaults = dict(
        length=1024,
        pairs=8,
        keys=16,
        values=16,
        filler=64,
        eval_batch=256,
        d_model=64,
        heads=2,
        topk=64,
        window=64,
        lr=3e-3,
        timing_tokens=16384,
        timing_reps=3,
    )
    parser = base_parser(__doc__, defaults)
    parser.add_argument(
        "--curriculum",
        nargs="+",
        default=["64:32:200", "256:16:100", "1024:8:100"],
        help="length:batch:steps stages (the last at --length)",
    )
    parser.add_argument("--timing-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args(argv)
    if args.smoke:
        args.length, args.pairs, args.eval_batch = 160, 4, 32
        args.curriculum = ["160:8:30"]
        args.topk, args.window, args.timing_lengths = 16, 16, []
    return args


def main(argv=None) -> list:
    args = parse(argv)
    results = train_all(args.kinds, train, args, lambda r: (
        f"eval loss {r['eval_loss']:.3f}, accuracy {100 * r['accuracy']:.1f} %, "
        f"{r['step_ms']:.0f} ms/step"
    ))  # fmt: skip
    if args.smoke:
        return results
    timing = {}
    for length in args.timing_lengths:
        timing[length] = {kind: step_time(kind, length, args.timing_tokens, args) for kind in KINDS}
        print(
            f"length {length}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in timing[length].items())
        )
    heading = "Run 1: SparseK long-range associative recall"
    write_section("sparsek-recall", heading, markdown(results, timing, args))
    plot(results, timing, args)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return results


if __name__ == "__main__":
    main()
