"""Training run 3: VQ-VAE codebook collapse and its fixes (docs/training.md).

Data with a known cluster structure: 64 clusters in a 4-dimensional latent space, pushed
through a fixed random two-layer network (tanh) into 32 dimensions, plus noise. A VQ-VAE
(encoder, foveal.nn.VectorQuantize with K = 128 codes of D = 16, decoder; Adam on the
reconstruction error plus 0.25 x the commitment loss) is trained four ways:

- random codebook init, no dead-code restart, weak (linear) encoder;
- random codebook init, no restart, higher-capacity encoder (two hidden layers of 128);
- k-means init + dead-code restart, weak encoder;
- k-means init + dead-code restart, higher-capacity encoder.

Every 100 steps a held-out set of 8192 rows measures codes used, perplexity, the effective rank
of the quantized latents and the reconstruction error. Fixed seeds, one process: the same
numbers on every run with the same thread count (--threads, default 1).

    python3 examples/training/vqvae_collapse.py            # the full run (~3 minutes on 2 cores)
    python3 examples/training/vqvae_collapse.py --smoke    # a few steps, asserts the loss falls

The full run writes its table into docs/training.md (between this run's markers) and the plot
to docs/images/vqvae_collapse.png.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from foveal import vq
from foveal.nn import VectorQuantize

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "training.md"
PLOT = ROOT / "docs" / "images" / "vqvae_collapse.png"
BEGIN, END = "<!-- vqvae_collapse:begin -->", "<!-- vqvae_collapse:end -->"

CLUSTERS, LATENT, OBSERVED, CODE_DIM, CODES = 64, 4, 32, 16, 128
BATCH, HELD_OUT, EVERY = 512, 8192, 100
COMMITMENT = 0.25

SETUPS = [
    dict(name="random init, weak encoder", kmeans=False, strong=False),
    dict(name="random init, strong encoder", kmeans=False, strong=True),
    dict(name="k-means + restart, weak encoder", kmeans=True, strong=False),
    dict(name="k-means + restart, strong encoder", kmeans=True, strong=True),
]


class ClusterData:
    """Rows x = tanh(W2 relu(W1 z + b1)) + noise, z one of CLUSTERS centers plus jitter."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        g = self.generator
        self.centers = 2.0 * torch.randn(CLUSTERS, LATENT, generator=g)
        self.w1 = torch.randn(LATENT, 64, generator=g)
        self.b1 = 0.5 * torch.randn(64, generator=g)
        self.w2 = torch.randn(64, OBSERVED, generator=g) / 8.0

    def sample(self, rows: int) -> torch.Tensor:
        g = self.generator
        labels = torch.randint(CLUSTERS, (rows,), generator=g)
        z = self.centers[labels] + 0.1 * torch.randn(rows, LATENT, generator=g)
        x = torch.tanh(torch.relu(z @ self.w1 + self.b1) @ self.w2)
        return x + 0.02 * torch.randn(rows, OBSERVED, generator=g)


def mlp(sizes: list) -> torch.nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.GELU())
    return torch.nn.Sequential(*layers)


class VqVae(torch.nn.Module):
    def __init__(self, kmeans: bool, strong: bool, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        hidden = [OBSERVED, 128, 128, CODE_DIM] if strong else [OBSERVED, CODE_DIM]
        self.encoder = mlp(hidden)
        self.quantizer = VectorQuantize(
            CODE_DIM,
            CODES,
            decay=0.99,
            commitment_weight=COMMITMENT,
            kmeans_init=kmeans,
            threshold_dead=0.05 if kmeans else 0.0,
            seed=seed,
        )
        self.decoder = mlp([CODE_DIM, 128, 128, OBSERVED])

    def forward(self, x: torch.Tensor):
        quantized, indices, commit_loss = self.quantizer(self.encoder(x))
        return self.decoder(quantized), quantized, indices, commit_loss


def evaluate(model: VqVae, held_out: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        recon, quantized, _, _ = model(held_out)
    model.train()
    return dict(
        codes_used=model.quantizer.codes_used,
        perplexity=model.quantizer.perplexity,
        quantized_rank=vq.effective_rank(quantized.contiguous()),
        recon_mse=torch.nn.functional.mse_loss(recon, held_out).item(),
    )


def train(setup: dict, steps: int, data: ClusterData, held_out: torch.Tensor) -> dict:
    model = VqVae(setup["kmeans"], setup["strong"], seed=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history, losses = [], []
    for step in range(steps + 1):
        if step % EVERY == 0 or step == steps:
            history.append(dict(step=step, **evaluate(model, held_out)))
        if step == steps:
            break
        x = data.sample(BATCH)
        recon, _, _, commit_loss = model(x)
        loss = torch.nn.functional.mse_loss(recon, x) + commit_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return dict(setup=setup, history=history, losses=losses)


def table(results: list, steps: int, data_rank: float, command: str, seconds: float) -> str:
    lines = [
        f"`{command}` — {steps} steps of {BATCH} rows per setup, held-out set of {HELD_OUT} "
        f"rows (its own effective rank {data_rank:.2f}), K = {CODES} codes of D = {CODE_DIM}, "
        f"{CLUSTERS} true clusters; {seconds:.0f} s in all on {torch.get_num_threads()} "
        "thread(s). Final values:",
        "",
        "| setup | codes used | perplexity | effective rank (quantized) | reconstruction MSE |",
        "|---|---:|---:|---:|---:|",
    ]
    for result in results:
        last = result["history"][-1]
        lines.append(
            f"| {result['setup']['name']} | {last['codes_used']} / {CODES} "
            f"| {last['perplexity']:.1f} | {last['quantized_rank']:.2f} "
            f"| {last['recon_mse']:.5f} |"
        )
    return "\n".join(lines)


def write_doc(text: str) -> None:
    """Replaces this run's section body in docs/training.md (creating it when missing)."""
    block = f"{BEGIN}\n{text}\n{END}"
    doc = DOC.read_text() if DOC.exists() else "# Training runs\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(doc)


def plot(results: list, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        ("codes_used", "codes used (of 128)", False),
        ("perplexity", "perplexity", False),
        ("quantized_rank", "effective rank of quantized latents", False),
        ("recon_mse", "reconstruction MSE (held out)", True),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for axis, (key, label, log) in zip(axes, panels):
        for result in results:
            steps = [h["step"] for h in result["history"]]
            axis.plot(steps, [h[key] for h in result["history"]], label=result["setup"]["name"])
        if log:
            axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps; assert the loss falls")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.smoke else 3000)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        data = ClusterData(seed=0)
        held_out = data.sample(HELD_OUT)
        results = []
        for setup in SETUPS:
            result = train(setup, steps, data, held_out)
            results.append(result)
            last = result["history"][-1]
            print(
                f"{setup['name']:<36} codes used {last['codes_used']:>4}  perplexity "
                f"{last['perplexity']:7.1f}  eff. rank {last['quantized_rank']:5.2f}  "
                f"recon MSE {last['recon_mse']:.5f}"
            )
        seconds = time.perf_counter() - start
        for result in results:
            losses = result["losses"]
            window = max(1, len(losses) // 6)
            first, final = sum(losses[:window]) / window, sum(losses[-window:]) / window
            assert math.isfinite(final) and final < first, (result["setup"]["name"], first, final)
        if not args.smoke:
            command = "python3 examples/training/vqvae_collapse.py"
            text = table(results, steps, vq.effective_rank(held_out), command, seconds)
            print(text)
            write_doc(text)
            if plot(results, PLOT):
                print(f"wrote {PLOT.relative_to(ROOT)}")
        print(f"{seconds:.1f} s")
        return results
    finally:
        torch.set_num_threads(saved_threads)


if __name__ == "__main__":
    main()
