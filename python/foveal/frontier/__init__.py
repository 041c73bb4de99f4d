"""foveal.frontier: how much attention a sparse method keeps, how wrong and how fast it is.

Measures training-free sparse attention methods against dense attention per layer, head,
budget and phase (prefill, decode) on captured or planted Q/K/V, and recommends the fastest
method and budget that meets an error tolerance (docs/frontier.md)::

    python -m foveal.frontier --planted local,sink,retrieval --length 4096 --out results/

    from foveal import frontier
    data = frontier.planted("local,retrieval", 1024, seed=0)
    layers = [frontier.Layer("planted", data.q, data.k, data.v, data.kinds, data.pairs)]
    rows = frontier.sweep(layers, methods=["dense", "window"], budgets=["1/16", "1/4"])
    advice = frontier.recommend(rows, tolerance=0.05)

Methods are plain functions registered with :func:`register_method`
(``fn(q, k, v, budget, **opts) -> (out, lse)``); foveal registers ``dense`` and ``window``.
"""

from __future__ import annotations

from .capture import capture, layers_of, load_npz, save_npz
from .cli import describe, main, report, write_report
from .methods import PHASES, Method, keys_for, method, method_names, register_method
from .planted import KINDS, Planted, PlantedHead, planted
from .plot import write_plot
from .recommend import budget_scaling, recommend, smallest_budgets
from .sweep import ROW_FIELDS, SCHEMA, Layer, head_metrics, parse_budget, sweep

__all__ = [
    "KINDS",
    "PHASES",
    "ROW_FIELDS",
    "SCHEMA",
    "Layer",
    "Method",
    "Planted",
    "PlantedHead",
    "budget_scaling",
    "capture",
    "describe",
    "head_metrics",
    "keys_for",
    "layers_of",
    "load_npz",
    "main",
    "method",
    "method_names",
    "parse_budget",
    "planted",
    "recommend",
    "register_method",
    "report",
    "save_npz",
    "smallest_budgets",
    "sweep",
    "write_plot",
    "write_report",
]
