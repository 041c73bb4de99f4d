"""The foveal.nn modules of SparseK and PDE-SSM against their twins, for compare_torch.py
--suite modules (one training step's work: forward, then backward to the input and every
parameter; fp32, interleaved rounds).

- ``SparseKAttention`` (d_model 256, 4 heads of 64, 4 kv heads, topk 64, window 64, rotary,
  the linear scorer) against its dense twin ``DenseAttention.from_sparsek`` (the same
  projections, causal ``foveal.torch.attention``), B = 1, L = 2048 and 8192 (--full; the quick
  run: 2048 and 4096), and at the longest length also with 1 kv head (grouped-query: smaller
  k/v projections). Target: SparseK >= 4x its dense twin at L = 8192, 1 and 2 threads.
- ``PdeSsm2d`` (C = 256, 64 groups, periodic, initial value, skip, [B, H, W, C]) against a
  torch.fft twin of the same module (its parameter maps, then rfft2 · multiplier · irfft2 on
  [B, C, H, W], autograd backward), B = 8, 32² and 64². Target: >= 1.0x.
- ``SpadeEmbedding`` (foveal.torch, C++ forward and backward) against the PyTorch embedding of
  bench/spade_cases.py (nn.Embedding per bin feature, optional LayerNorm, the energy MLP, one
  Linear) with the same weights: the case of issue 7, B = 32, n = 1024 hits, z/x/y with 30 bins
  (width 64), energy MLP 1-16-16, d_model = 256; the gradient of every weight. Target: >= 2x.

``run(...)`` prints a table and returns rows with ``module``, ``case``, ``threads``,
``foveal_ms``, ``twin_ms`` and ``ratio`` (twin / foveal).
"""

from __future__ import annotations

from typing import Callable, Optional

import foveal
import torch
from foveal.torch import DenseAttention, PdeSsm2d, SpadeEmbedding, SparseKAttention
from pde_cases import torch_pde_ssm
from spade_cases import D_MODEL as SPADE_D_MODEL
from spade_cases import HIDDEN, WIDTH, build_case

D_MODEL, HEADS, TOPK, WINDOW = 256, 4, 64, 64
CHANNELS, GROUPS, PDE_BATCH = 256, 64, 8


def pde_twin(layer: PdeSsm2d, x_grid: torch.Tensor) -> torch.Tensor:
    """The module in torch ops on [B, C, H, W]: its group parameters mapped and expanded per
    channel, then bench/pde_cases.py's rfft2 · multiplier · irfft2 (periodic, initial value)."""
    per = layer.channels // layer.groups
    params = dict(
        diffusion=layer.diffusion,
        velocity=layer.velocity,
        reaction=layer.reaction,
        time=layer.time,
        skip=layer.skip,
    )
    params = {name: value.repeat_interleave(per, dim=0) for name, value in params.items()}
    return torch_pde_ssm(x_grid, params, layer.boundary)


def training_step(module: torch.nn.Module, function: Callable, x: torch.Tensor) -> Callable:
    """A closure: forward through ``function``, backward of a fixed linear loss."""
    weights = torch.randn_like(function(x).detach())

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        (function(x) * weights).sum().backward()

    return step


def attention_cases(full: bool) -> list:
    top = 8192 if full else 4096
    cases = []
    for length, kv_heads in ((2048, HEADS), (top, HEADS), (top, 1)):
        torch.manual_seed(0)
        sparse = SparseKAttention(D_MODEL, HEADS, kv_heads, TOPK, window=WINDOW)
        dense = DenseAttention.from_sparsek(sparse)
        x = torch.randn(1, length, D_MODEL, requires_grad=True)
        cases.append(
            (
                f"SparseKAttention L={length} Hkv={kv_heads}",
                training_step(sparse, sparse, x),
                training_step(dense, dense, x),
            )
        )
    return cases


def pde_cases(full: bool) -> list:
    cases = []
    for side in (32, 64) if full else (32,):
        torch.manual_seed(0)
        layer = PdeSsm2d(CHANNELS, groups=GROUPS)
        x_tokens = torch.randn(PDE_BATCH, side, side, CHANNELS, requires_grad=True)
        x_grid = x_tokens.detach().permute(0, 3, 1, 2).contiguous().requires_grad_()
        with torch.no_grad():
            difference = (layer(x_tokens) - pde_twin(layer, x_grid).permute(0, 2, 3, 1)).abs()
        print(f"PdeSsm2d {side}²: max |Δy| against the torch.fft twin {difference.max():.1e}")
        cases.append(
            (
                f"PdeSsm2d {side}² B={PDE_BATCH} C={CHANNELS}",
                training_step(layer, layer, x_tokens),
                training_step(layer, lambda x, m=layer: pde_twin(m, x), x_grid),
            )
        )
    return cases


def spade_module(case: dict) -> SpadeEmbedding:
    """foveal.torch.SpadeEmbedding holding the weights of bench/spade_cases.py's torch module."""
    twin = case["module"]
    widths = dict(z=WIDTH, x=WIDTH, y=WIDTH, energy=HIDDEN)
    module = SpadeEmbedding(
        case["schema"], SPADE_D_MODEL, embedding_dim=widths, hidden=HIDDEN,
        layer_norm=case["layer_norm"],
    )  # fmt: skip
    with torch.no_grad():
        for column, name in enumerate(("z", "x", "y")):
            module.features[name].table.weight.copy_(twin.tables[column].weight)
            if case["layer_norm"]:
                module.features[name].norm.load_state_dict(twin.norms[column].state_dict())
        module.features["energy"].mlp.load_state_dict(twin.energy.state_dict())
        module.projection.load_state_dict(twin.projection.state_dict())
    return module


def spade_cases(full: bool) -> list:
    del full  # one size
    cases = []
    for layer_norm in (False, True):
        case = build_case(layer_norm=layer_norm)
        module, twin = spade_module(case), case["module"].train()
        tokens = (case["delayed_ids"], case["delayed_values"])
        with torch.no_grad():
            difference = (module(*tokens) - twin(*tokens)).abs().max()
        label = "concat + LayerNorm" if layer_norm else "concat"
        print(f"SpadeEmbedding {label}: max |Δout| against the torch module {difference:.1e}")
        cases.append(
            (
                f"SpadeEmbedding {label} B=32 T=1028",
                training_step(module, lambda _, m=module, t=tokens: m(*t), tokens[1]),
                training_step(twin, lambda _, m=twin, t=tokens: m(*t), tokens[1]),
            )
        )
    return cases


def run(
    threads_list: list,
    seconds: float,
    interleaved: Callable,
    median_time,
    full: bool = True,
    only: Optional[list] = None,
) -> list:
    """Prints the table and returns its rows (see the module docstring); ``only``: the module
    names to run (None: all)."""
    rows = []
    print(f"\n{'case':>40}{'threads':>8}{'foveal ms':>11}{'twin ms':>10}{'twin / foveal':>15}")
    suites = (
        ("SparseKAttention", attention_cases),
        ("PdeSsm2d", pde_cases),
        ("SpadeEmbedding", spade_cases),
    )
    for module, cases in suites:
        if only is not None and module not in only:
            continue
        for case, run_foveal, run_twin in cases(full):
            for threads in threads_list:
                torch.set_num_threads(threads)
                foveal.set_num_threads(threads)
                foveal_s, twin_s = interleaved(run_foveal, run_twin, seconds, rounds=2)
                row = dict(
                    module=module,
                    case=case,
                    passes="fwd+bwd",
                    threads=threads,
                    foveal_ms=foveal_s * 1e3,
                    twin_ms=twin_s * 1e3,
                    ratio=twin_s / foveal_s,
                )
                rows.append(row)
                print(
                    f"{case:>40}{threads:>8}{row['foveal_ms']:>11.1f}{row['twin_ms']:>10.1f}"
                    f"{row['ratio']:>14.2f}x",
                    flush=True,
                )
    return rows


def markdown_lines(rows: list) -> list:
    """The rows as a markdown table."""
    lines = [
        "| module | case | threads | foveal ms | twin ms | twin / foveal |",
        "|---|---|---:|---:|---:|---:|",
    ]
    twins = dict(
        SparseKAttention="dense twin", PdeSsm2d="torch.fft twin", SpadeEmbedding="torch module"
    )
    for row in rows:
        lines.append(
            f"| {row['module']} (vs {twins[row['module']]}) | {row['case']} | {row['threads']} "
            f"| {row['foveal_ms']:.1f} | {row['twin_ms']:.1f} | **{row['ratio']:.2f}x** |"
        )
    return lines
