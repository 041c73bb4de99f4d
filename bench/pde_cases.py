"""PDE-SSM 2-D Fourier block: foveal against PyTorch, for compare_torch.py --suite pde.

The case of issue 6: fp32, B = 8, C = 256, H = W in {32, 64, 128}, periodic and zero
boundary, initial-value mode with per-channel parameters and a skip. PyTorch runs the
straightforward implementation on [B, C, H, W] (its natural layout): the multiplier built from
the parameters, ``torch.fft.rfft2`` · multiplier · ``torch.fft.irfft2`` (and autograd for the
backward). foveal runs ``foveal.torch.pde_ssm`` on [B, H, W, C] (tokens, channels last), which
also builds its multiplier at every call. Both forward and forward + backward (gradients of the
input and every parameter) run interleaved at each thread count.

Then a size sweep (foveal forward with a cached multiplier, 1 thread, a fixed token count per
call) shows the time per token from 32² to 256², and the crossover against foveal's own dense
attention on the same grid (L = H·W tokens, 4 heads of D = 64 = C 256, B = 1, 1 thread).
"""

from __future__ import annotations

import math
from typing import Callable

import foveal
import torch
from foveal import pde_ssm as pde
from foveal import torch as foveal_torch

BATCH, CHANNELS = 8, 256
SIDES = (32, 64, 128)
SWEEP_SIDES = (32, 64, 128, 256)
CROSSOVER_SIDES = (4, 6, 8, 12, 16, 24, 32, 48, 64)


def make_parameters(generator: torch.Generator, requires_grad: bool = False) -> dict:
    """Per-channel parameters: Cholesky factors of K, velocity, decay, τ near 1, a skip."""
    params = dict(
        diffusion=0.5 + 0.2 * torch.rand(CHANNELS, 3, generator=generator),
        velocity=torch.randn(CHANNELS, 2, generator=generator),
        reaction=-0.1 * torch.rand(CHANNELS, generator=generator),
        time=0.5 + torch.rand(CHANNELS, generator=generator),
        skip=torch.randn(CHANNELS, generator=generator),
    )
    return {name: value.requires_grad_(requires_grad) for name, value in params.items()}


def torch_pde_ssm(x: torch.Tensor, params: dict, boundary: str) -> torch.Tensor:
    """x: [B, C, H, W]  ->  the block (initial value) by rfft2 · multiplier · irfft2."""
    height, width = x.shape[-2:]
    rows, columns = (2 * height, 2 * width) if boundary == "zero" else (height, width)
    f_y = torch.arange(rows, dtype=x.dtype)
    k_y = (2 * math.pi / rows * torch.where(f_y <= rows // 2, f_y, f_y - rows))[:, None]
    k_x = (2 * math.pi / columns * torch.arange(columns // 2 + 1, dtype=x.dtype))[None, :]
    l_yy, l_xy, l_xx = (v[:, None, None] for v in params["diffusion"].unbind(-1))
    b_y, b_x = (v[:, None, None] for v in params["velocity"].unbind(-1))
    reaction, time, skip = (params[name][:, None, None] for name in ("reaction", "time", "skip"))
    # kᵀ L Lᵀ k = (l_yy k_y + l_xy k_x)² + (l_xx k_x)².
    quadratic = (l_yy * k_y + l_xy * k_x) ** 2 + (l_xx * k_x) ** 2
    multiplier = torch.polar(
        torch.exp(time * (reaction - quadratic)), -time * (b_y * k_y + b_x * k_x)
    )
    spectrum = torch.fft.rfft2(x, s=(rows, columns))
    y = torch.fft.irfft2(spectrum * (multiplier + skip), s=(rows, columns))
    return y[..., :height, :width]


def foveal_pde_ssm(x: torch.Tensor, params: dict, boundary: str) -> torch.Tensor:
    """x: [B, H, W, C]  ->  foveal.torch.pde_ssm with the same parameters."""
    return foveal_torch.pde_ssm(x, *params.values(), boundary=boundary)


def forward_and_backward(function: Callable, x: torch.Tensor, params: dict, boundary: str):
    """One training step's work: forward, then the gradients of x and every parameter."""
    x.grad = None
    for value in params.values():
        value.grad = None
    y = function(x, params, boundary)
    y.backward(torch.ones_like(y))


def run(
    threads_list: list, seconds: float, interleaved: Callable, median_time, full: bool = True
) -> list:
    """Prints the tables of compare_torch.py --suite pde and returns their rows. Without `full`
    (the quick demo) the grids stop at 64 and the sweep at 128 with fewer tokens."""
    sides = SIDES if full else SIDES[:2]
    generator = torch.Generator().manual_seed(0)
    params = make_parameters(generator)
    rows = []
    print(f"\nPDE-SSM fp32 B={BATCH} C={CHANNELS}: foveal.torch.pde_ssm vs torch rfft2·m·irfft2")
    print(
        f"{'grid':>8}{'boundary':>10}{'threads':>8}{'pass':>9}{'foveal ms':>11}{'torch ms':>10}"
        f"{'ratio':>8}{'ns/token':>10}{'max|dy|':>10}"
    )
    for side in sides:
        x_tokens = torch.randn(BATCH, side, side, CHANNELS, generator=generator)
        x_grid = x_tokens.permute(0, 3, 1, 2).contiguous()
        for boundary in ("periodic", "zero"):
            with torch.no_grad():
                difference = (
                    (
                        foveal_pde_ssm(x_tokens, params, boundary)
                        - torch_pde_ssm(x_grid, params, boundary).permute(0, 2, 3, 1)
                    )
                    .abs()
                    .max()
                    .item()
                )
            for threads in threads_list:
                torch.set_num_threads(threads)
                foveal.set_num_threads(threads)
                for passes in ("fwd", "fwd+bwd"):
                    if passes == "fwd":

                        def run_foveal(b=boundary, x=x_tokens):
                            with torch.no_grad():
                                return foveal_pde_ssm(x, params, b)

                        def run_torch(b=boundary, x=x_grid):
                            with torch.no_grad():
                                return torch_pde_ssm(x, params, b)

                    else:
                        trainable = {k: v.clone().requires_grad_() for k, v in params.items()}
                        x_f = x_tokens.clone().requires_grad_()
                        x_t = x_grid.clone().requires_grad_()

                        def run_foveal(b=boundary, x=x_f, p=trainable):
                            forward_and_backward(foveal_pde_ssm, x, p, b)

                        def run_torch(b=boundary, x=x_t, p=trainable):
                            forward_and_backward(torch_pde_ssm, x, p, b)

                    foveal_s, torch_s = interleaved(run_foveal, run_torch, seconds, rounds=2)
                    row = dict(
                        op="pde_ssm",
                        case="main",
                        side=side,
                        boundary=boundary,
                        threads=threads,
                        passes=passes,
                        foveal_ms=foveal_s * 1e3,
                        torch_ms=torch_s * 1e3,
                        ratio=torch_s / foveal_s,
                        foveal_ns_per_token=foveal_s * 1e9 / (BATCH * side * side),
                        max_abs_difference=difference,
                    )
                    rows.append(row)
                    print(
                        f"{f'{side}x{side}':>8}{boundary:>10}{threads:>8}{passes:>9}"
                        f"{row['foveal_ms']:>11.2f}{row['torch_ms']:>10.2f}{row['ratio']:>7.2f}x"
                        f"{row['foveal_ns_per_token']:>10.1f}{difference:>10.1e}"
                    )
    rows += size_sweep(seconds, median_time, generator, params, full)
    rows += crossover(seconds, median_time, generator, params, full)
    return rows


def cached_forward(side: int, batch: int, params: dict, generator) -> Callable:
    """A call of PdeSsm.forward (multiplier cached) on a fresh [batch, side, side, C] input."""
    x = torch.randn(batch, side, side, CHANNELS, generator=generator)
    out = torch.empty_like(x)
    block = pde.PdeSsm(side, side, CHANNELS, *(value.detach().numpy() for value in params.values()))
    return lambda: block(x, out=out)


def size_sweep(seconds: float, median_time, generator, params: dict, full: bool) -> list:
    """foveal forward (cached multiplier, periodic, 1 thread) over a fixed token count."""
    tokens = BATCH * 128 * 128 if full else 2 * 128 * 128
    sides = SWEEP_SIDES if full else SWEEP_SIDES[:3]
    print(f"\nsize sweep: foveal PdeSsm.forward, C={CHANNELS}, {tokens} tokens per call, 1 thread")
    print(f"{'grid':>8}{'batch':>7}{'foveal ms':>11}{'ns/token':>10}{'vs 32x32':>10}")
    foveal.set_num_threads(1)
    rows = []
    for side in sides:
        batch = max(1, tokens // (side * side))
        seconds_per_call = median_time(cached_forward(side, batch, params, generator), seconds, 3)
        per_token = seconds_per_call * 1e9 / (batch * side * side)
        growth = per_token / rows[0]["foveal_ns_per_token"] if rows else 1.0
        rows.append(
            dict(
                op="pde_ssm",
                case="sweep",
                side=side,
                batch=batch,
                threads=1,
                foveal_ms=seconds_per_call * 1e3,
                foveal_ns_per_token=per_token,
                growth=growth,
            )
        )
        print(
            f"{f'{side}x{side}':>8}{batch:>7}{seconds_per_call * 1e3:>11.2f}{per_token:>10.1f}"
            f"{growth:>9.2f}x"
        )
    return rows


def crossover(seconds: float, median_time, generator, params: dict, full: bool) -> list:
    """foveal PdeSsm.forward against foveal.attention on the same grid (B=1, 1 thread)."""
    sides = CROSSOVER_SIDES if full else CROSSOVER_SIDES[:7]
    heads, dim = 4, CHANNELS // 4
    print(
        f"\ncrossover: PdeSsm.forward (C={CHANNELS}) vs dense attention ({heads} heads x D={dim})"
        " on L = H*W tokens, B=1, 1 thread"
    )
    print(f"{'grid':>8}{'L':>7}{'pde ms':>10}{'attention ms':>14}{'attn / pde':>12}")
    foveal.set_num_threads(1)
    rows = []
    for side in sides:
        length = side * side
        run_pde = cached_forward(side, 1, params, generator)
        q, k, v = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
        attention_out = torch.empty_like(q)
        pde_s = median_time(run_pde, seconds / 2, 3)
        attention_s = median_time(
            lambda q=q, k=k, v=v, o=attention_out: foveal.attention(q, k, v, out=o), seconds / 2, 3
        )
        rows.append(
            dict(
                op="pde_ssm",
                case="crossover",
                side=side,
                L=length,
                threads=1,
                foveal_ms=pde_s * 1e3,
                attention_ms=attention_s * 1e3,
                ratio=attention_s / pde_s,
            )
        )
        print(
            f"{f'{side}x{side}':>8}{length:>7}{pde_s * 1e3:>10.3f}{attention_s * 1e3:>14.3f}"
            f"{attention_s / pde_s:>11.2f}x"
        )
    cheaper = [row["side"] for row in rows if row["ratio"] > 1]
    print(
        f"PDE-SSM is cheaper from {cheaper[0]}x{cheaper[0]} on"
        if cheaper
        else "PDE-SSM was not cheaper on any grid tried"
    )
    return rows
