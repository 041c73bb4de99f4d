"""A small DiT trained by flow matching on 32 x 32 synthetic images (random soft ellipses), with
PDE-SSM spatial mixing (``foveal.torch.PdeSsm2d``) against attention (``foveal.torch.
DenseAttention``, non-causal here through the same projections) at equal parameter count
(docs/training.md).

Data (generated here from a fixed seed): one channel, 1 to 3 ellipses of random centre, axes,
angle and brightness with soft edges on a dark background, scaled to [-1, 1]. Model: 2 x 2
patches -> a 16 x 16 token grid of width ``--width``, a learned position embedding, ``--depth``
blocks ``x + mixer(modulate(norm(x), t))``, ``x + mlp(modulate(norm(x), t))`` (adaLN: shift and
scale from the time embedding), then a linear un-patchify. Mixers:

- ``pde``: in-projection to (u, g), ``PdeSsm2d`` on u over the token grid (channels last,
  periodic, initial value), ``u * silu(g)``, out-projection: 3 width² weights, and an MLP of
  hidden width 4.5 x width;
- ``attention``: 4-head self-attention over the 256 tokens (q, k, v, o: 4 width² weights) and
  an MLP of hidden width 4 x width. Both models have the same number of weights to within the
  PDE's few per-group numbers.

Flow matching: ``x_t = (1 - t) noise + t image``, the model predicts ``image - noise``;
sampling integrates ``dx/dt = model(x, t)`` by 24 Euler steps from noise.

    python3 examples/training/pde_dit_flow.py            # full run (< 10 min on 2 cores)
    python3 examples/training/pde_dit_flow.py --smoke    # a few steps, asserts the loss falls

The full run writes its section of docs/training.md (between its markers),
docs/images/training_pde_dit_loss.png and docs/images/training_pde_dit_samples.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import foveal
import torch
from foveal.torch import DenseAttention, PdeSsm2d
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

LOSS_PLOT = IMAGES / "training_pde_dit_loss.png"
SAMPLES_PLOT = IMAGES / "training_pde_dit_samples.png"
KINDS = ("pde", "attention")
SIDE, PATCH = 32, 2


def ellipses(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 1, 32, 32] images in [-1, 1]: 1 to 3 soft ellipses each."""
    coordinates = (torch.arange(SIDE, dtype=torch.float32) + 0.5) / SIDE
    y, x = coordinates[:, None], coordinates[None, :]
    images = torch.zeros(count, SIDE, SIDE)
    shapes = torch.randint(1, 4, (count,), generator=generator)
    for slot in range(3):
        centre = 0.2 + 0.6 * torch.rand(count, 2, generator=generator)
        axes = 0.06 + 0.2 * torch.rand(count, 2, generator=generator)
        angle = math.pi * torch.rand(count, generator=generator)
        brightness = 0.4 + 0.6 * torch.rand(count, generator=generator)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        dy, dx = y - centre[:, 0, None, None], x - centre[:, 1, None, None]
        along, across = cos * dx + sin * dy, -sin * dx + cos * dy
        radius = (along / axes[:, 0, None, None]) ** 2 + (across / axes[:, 1, None, None]) ** 2
        shape = torch.sigmoid(12 * (1 - radius)) * brightness[:, None, None]
        images = torch.maximum(images, shape * (slot < shapes).float()[:, None, None])
    return (2 * images - 1).unsqueeze(1)


def time_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    half = width // 2
    frequencies = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = 100.0 * t[:, None] * frequencies[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


class PdeMixer(nn.Module):
    def __init__(self, width: int, groups: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, 2 * width)
        self.pde = PdeSsm2d(width, groups=groups)
        self.outer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        u, gate = self.inner(x).chunk(2, dim=-1)
        return self.outer(self.pde(u.contiguous()) * functional.silu(gate))


class AttentionMixer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention = DenseAttention(width, heads, rotary=False, bias=True, causal=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        batch, height, width, channels = x.shape
        tokens = self.attention(x.reshape(batch, height * width, channels))
        return tokens.view(batch, height, width, channels)


class Block(nn.Module):
    def __init__(self, kind: str, width: int, groups: int, heads: int) -> None:
        super().__init__()
        self.norm_mix = nn.LayerNorm(width, elementwise_affine=False)
        self.norm_mlp = nn.LayerNorm(width, elementwise_affine=False)
        self.mixer = PdeMixer(width, groups) if kind == "pde" else AttentionMixer(width, heads)
        hidden = width * 9 // 2 if kind == "pde" else 4 * width
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.modulation = nn.Linear(width, 4 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, shift_b, scale_b = self.modulation(condition)[:, None, None].chunk(4, -1)
        x = x + self.mixer(self.norm_mix(x) * (1 + scale_a) + shift_a)
        return x + self.mlp(self.norm_mlp(x) * (1 + scale_b) + shift_b)


class FlowDiT(nn.Module):
    def __init__(self, kind: str, width: int, depth: int, groups: int, heads: int) -> None:
        super().__init__()
        grid = SIDE // PATCH
        self.width = width
        self.patch = nn.Linear(PATCH * PATCH, width)
        self.position = nn.Parameter(0.02 * torch.randn(grid, grid, width))
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(kind, width, groups, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.unpatch = nn.Linear(width, PATCH * PATCH)

    def forward(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        batch, grid = images.shape[0], SIDE // PATCH
        patches = images.view(batch, grid, PATCH, grid, PATCH).permute(0, 1, 3, 2, 4)
        x = self.patch(patches.reshape(batch, grid, grid, PATCH * PATCH)) + self.position
        condition = self.time(time_embedding(t, self.width))
        for block in self.blocks:
            x = block(x, condition)
        out = self.unpatch(self.norm(x)).view(batch, grid, grid, PATCH, PATCH)
        return out.permute(0, 1, 3, 2, 4).reshape(batch, 1, SIDE, SIDE)


def flow_loss(model: FlowDiT, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=generator)
    t = torch.rand(images.shape[0], generator=generator)
    x_t = (1 - t)[:, None, None, None] * noise + t[:, None, None, None] * images
    return functional.mse_loss(model(x_t, t), images - noise)


@torch.no_grad()
def sample(model: FlowDiT, count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(count, 1, SIDE, SIDE, generator=generator)
    for step in range(steps):
        t = torch.full((count,), step / steps)
        x = x + model(x, t) / steps
    return x.clamp(-1, 1)


def train(kind: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = FlowDiT(kind, args.width, args.depth, args.groups, args.heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed + 1)  # the same images and noise for both
    losses, seconds = [], 0.0
    for _ in range(args.steps):
        images = ellipses(args.batch, data)
        start = time.perf_counter()
        loss = flow_loss(model, images, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))
    evaluation = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        held_out = ellipses(256, evaluation)
        eval_loss = float(flow_loss(model, held_out, evaluation))
    samples = sample(model, args.samples, args.sample_steps, torch.Generator().manual_seed(7))
    return dict(
        kind=kind,
        losses=losses,
        eval_loss=eval_loss,
        step_ms=1e3 * seconds / args.steps,
        parameters=sum(p.numel() for p in model.parameters()),
        samples=samples,
    )


def markdown(results: list, args: argparse.Namespace) -> str:
    names = dict(pde="PDE-SSM (PdeSsm2d)", attention="attention (DenseAttention)")
    lines = [
        f"`python3 examples/training/pde_dit_flow.py` — foveal {foveal.__version__}, torch "
        f"{torch.__version__}, {args.threads} thread(s). {args.steps} steps of batch "
        f"{args.batch}, width {args.width}, depth {args.depth}, 2 x 2 patches (16 x 16 tokens), "
        f"AdamW lr {args.lr}; eval loss: the flow-matching loss on 256 held-out images.",
        "",
        "| mixer | parameters | final train loss (mean of last 50) | eval loss | ms / step |",
        "|---|---:|---:|---:|---:|",
    ]
    for result in results:
        tail = result["losses"][-50:]
        lines.append(
            f"| {names[result['kind']]} | {result['parameters']:,} | "
            f"{sum(tail) / len(tail):.4f} | **{result['eval_loss']:.4f}** | "
            f"{result['step_ms']:.0f} |"
        )
    lines += [
        "",
        "![loss curves](images/training_pde_dit_loss.png)",
        "",
        "![samples](images/training_pde_dit_samples.png)",
    ]
    return "\n".join(lines)


def plot(results: list, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for result in results:
        label = (
            f"{result['kind']} ({result['parameters']:,} weights, {result['step_ms']:.0f} ms/step)"
        )
        axis.plot(*smoothed(result["losses"], args.steps // 40), label=label)
    axis.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    axis.legend()
    figure.tight_layout()
    IMAGES.mkdir(parents=True, exist_ok=True)
    figure.savefig(LOSS_PLOT, dpi=110)

    real = ellipses(args.samples, torch.Generator().manual_seed(11))
    rows = [("training data", real)] + [(r["kind"], r["samples"]) for r in results]
    figure, axes = plt.subplots(len(rows), args.samples, figsize=(args.samples, len(rows) + 0.3))
    for row, (title, images) in enumerate(rows):
        for column in range(args.samples):
            axes[row, column].imshow(images[column, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[row, column].axis("off")
        axes[row, 0].set_title(title, loc="left", fontsize=8)
    figure.tight_layout()
    figure.savefig(SAMPLES_PLOT, dpi=110)


def parse(argv=None) -> argparse.Namespace:
    defaults = dict(
        steps=400,
        batch=32,
        width=64,
        depth=4,
        groups=16,
        heads=4,
        lr=2e-3,
        samples=8,
        sample_steps=24,
    )
    parser = base_parser(__doc__, defaults)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.depth, args.samples, args.sample_steps = 30, 8, 2, 2, 2
    return args


def main(argv=None) -> list:
    args = parse(argv)
    results = train_all(KINDS, train, args, lambda r: (
        f"{r['parameters']:,} weights, eval loss {r['eval_loss']:.4f}, {r['step_ms']:.0f} ms/step"
    ))  # fmt: skip
    if args.smoke:
        return results
    heading = "Run 2: PDE-SSM DiT with flow matching on synthetic ellipses"
    write_section("pde-dit", heading, markdown(results, args))
    plot(results, args)
    print(f"wrote {DOC.relative_to(ROOT)}, {LOSS_PLOT.relative_to(ROOT)}, {SAMPLES_PLOT.name}")
    return results


if __name__ == "__main__":
    main()
