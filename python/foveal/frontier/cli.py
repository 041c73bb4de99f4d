"""The command line of foveal.frontier (``python -m foveal.frontier --help``) and the JSON
report it writes."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import foveal

from . import methods as registry
from .capture import load_npz
from .planted import parse_kinds, planted
from .plot import budget_label, write_plot
from .recommend import recommend
from .sweep import SCHEMA, Layer, parse_budget, sweep

REPORT_NAME = "frontier.json"


def report(
    rows: list,
    tolerance: float,
    config: Optional[dict] = None,
    planted_heads: Optional[list] = None,
) -> dict:
    """The JSON document: schema, configuration, foveal build, the measured methods (the
    phases and budget kind of each), the rows, the recommendation and, for planted data, what
    was planted per head."""
    build = foveal.build_info()
    measured = defaultdict(dict)
    for row in rows:
        spec = registry.method(row["method"], row["phase"])
        measured[spec.name][spec.phase] = {"budget": spec.budget}
    return {
        "schema": SCHEMA,
        "config": dict(config or {}),
        "foveal": {
            "version": build["version"],
            "level": build["level"],
            "threads": foveal.get_num_threads(),
        },
        "methods": dict(measured),
        "planted": planted_heads or [],
        "rows": rows,
        "recommendation": recommend(rows, tolerance),
    }


def write_report(document: dict, directory: str | Path) -> Path:
    """Writes the document as ``frontier.json`` in ``directory`` (created); the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / REPORT_NAME
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def describe(head, length: int, index: int) -> dict:
    """A PlantedHead as JSON: where its structure is and how strong it came out."""
    return dict(
        length=length,
        head=index,
        kind=head.kind,
        strength=head.strength,
        mass=head.mass,
        pairs=head.pairs.tolist(),
        columns=list(head.columns),
        offsets=list(head.offsets),
        sinks=head.sinks,
        width=head.width,
    )


def _list(text: str) -> list:
    return [part.strip() for part in text.split(",") if part.strip()]


def _lengths(text: str) -> list:
    try:
        lengths = [int(part) for part in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--length must be integers, got {text!r}") from None
    if not lengths or min(lengths) < 16:
        raise argparse.ArgumentTypeError(f"--length must be integers >= 16, got {text!r}")
    return lengths


def _budgets(text: str) -> list:
    try:
        return [parse_budget(part) for part in _list(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m foveal.frontier",
        description="Measure sparse attention methods against dense attention (error, recall, "
        "time per layer, head, budget and phase) and recommend the fastest that "
        "meets an error tolerance.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--planted",
        metavar="KINDS",
        help="planted heads: comma-separated kinds (local, slash, sink, "
        "vertical, retrieval, or mixtures such as local+sink)",
    )
    source.add_argument(
        "--npz",
        metavar="FILES",
        help="captured Q/K/V: layer<n>.q / .k / .v arrays [1, H, L, D]; several files "
        "(comma-separated, e.g. one per length) name their layers file:layer<n>",
    )
    # flag, type, default, help: every option with a value.
    options = [
        ("--length", _lengths, [4096], "planted sequence length(s), comma-separated"),
        ("--heads", int, None, "planted heads (default: one per kind; kinds repeat in turn)"),
        ("--dim", int, 128, "planted head dimension"),
        ("--seed", int, 0, "planted seed"),
        ("--mass", float, 0.7, "planted softmax mass on each component's keys"),
        (
            "--basis",
            str,
            "rotated",
            "planted basis: rotated (a random rotation hides the structure from every channel) "
            "or channels (each component in channels of its own)",
        ),
        ("--methods", _list, ["dense", "window"], "registered methods, comma-separated"),
        ("--budgets", _budgets, "1/64,1/32,1/16,1/8,1/4", "fractions of the keys"),
        ("--phases", _list, ["prefill", "decode"], "prefill, decode or both"),
        ("--decode-queries", int, 1, "the last positions that decode"),
        ("--repeats", int, 3, "timing: the best of at least this many calls"),
        ("--min-seconds", float, 0.2, "timing: more calls while their total stays under this"),
        ("--num-threads", int, None, "threads per foveal call (default: foveal's setting)"),
        ("--tolerance", float, 0.05, "the relative L2 error a recommendation must meet"),
    ]
    for flag, kind, default, text in options:
        shown = default if not isinstance(default, list) else ",".join(map(str, default))
        text = text if default is None else f"{text} (default {shown})"
        p.add_argument(flag, type=kind, default=default, help=text)
    p.add_argument(
        "--svg", action="store_true", help="write the plot as SVG even when matplotlib is installed"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the command line; 0 on success. Bad arguments, inputs or method names exit with
    status 2 and the message (argparse's convention)."""
    command = parser()
    args = command.parse_args(argv)
    try:
        layers, described = _inputs(args)
        rows = sweep(
            layers,
            args.methods,
            args.budgets,
            args.phases,
            decode_queries=args.decode_queries,
            repeats=args.repeats,
            min_seconds=args.min_seconds,
            num_threads=args.num_threads,
        )
        document = report(rows, args.tolerance, vars(args), described)
    except (ValueError, TypeError) as error:
        command.error(str(error))
    out = Path(args.out)
    path = write_report(document, out)
    plot = write_plot(rows, out, use_matplotlib=not args.svg)
    print(summary(document))
    print(f"wrote {path} and {plot}")
    return 0


def _inputs(args: argparse.Namespace) -> tuple:
    """(layers, what was planted) from --planted or --npz."""
    if args.npz is not None:
        files = _list(args.npz)
        layers = []
        for path in files:
            for layer in load_npz(path):
                if len(files) > 1:
                    layer.name = f"{Path(path).stem}:{layer.name}"
                layers.append(layer)
        return layers, []
    kinds = parse_kinds(args.planted)
    options = dict(heads=args.heads, dim=args.dim, seed=args.seed, mass=args.mass, basis=args.basis)
    layers, described = [], []
    for length in args.length:
        data = planted(kinds, length, decode_queries=args.decode_queries, **options)
        layers.append(Layer("planted", data.q, data.k, data.v, data.kinds, data.pairs))
        described.extend(describe(head, length, index) for index, head in enumerate(data.heads))
    return layers, described


def summary(document: dict) -> str:
    """A plain-text table per phase and length: method, budget, error (mean / worst head),
    recall (mean / worst head), time and speed-up over dense; then the recommendations."""
    groups = defaultdict(list)
    for row in document["rows"]:
        groups[row["phase"], row["length"], row["method"], row["budget"]].append(row)
    lines = []
    header = (
        f"{'phase':8} {'L':>6} {'method':12} {'budget':>7} {'error':>8} {'worst':>8} "
        f"{'recall':>7} {'worst':>7} {'ms':>9} {'speedup':>7}"
    )
    lines.append(header)
    for (phase, length, method, budget), rows in sorted(groups.items()):
        errors = [row["error"] for row in rows]
        recalls = [row["recall"] for row in rows]
        calls = {row["layer"]: (row["time_s"], row["dense_time_s"]) for row in rows}
        time = sum(t for t, _ in calls.values())
        dense = sum(d for _, d in calls.values())
        lines.append(
            f"{phase:8} {length:6d} {method:12} {budget_label(budget):>7} "
            f"{sum(errors) / len(errors):8.4f} {max(errors):8.4f} "
            f"{sum(recalls) / len(recalls):7.3f} {min(recalls):7.3f} {time * 1e3:9.3f} "
            f"{dense / time:7.2f}"
        )
    lines.extend(_recall_by_kind(document["rows"]))
    advice = document["recommendation"]
    lines.append(f"recommendation at tolerance {advice['tolerance']}:")
    for phase, entries in sorted(advice["phases"].items()):
        for entry in entries:
            best = entry["overall"]
            chosen = (
                "none"
                if best is None
                else (
                    f"{best['method']} at budget {budget_label(best['budget'])} "
                    f"(worst error {best['error']:.4f}, {best['time_s'] * 1e3:.3f} ms)"
                )
            )
            lines.append(f"  {phase}, L = {entry['length']}: {chosen}")
    for trend in advice["scaling"]:
        name = f"  {trend['phase']} {trend['method']}:"
        if trend["exponent"] is None:
            lines.append(f"{name} meets the tolerance at fewer than two lengths: no trend")
        elif len(trend["at_smallest"]) == len(trend["budgets"]):
            lines.append(
                f"{name} meets the tolerance at the smallest budget measured at every length; "
                "measure smaller budgets for a trend"
            )
        else:
            lines.append(f"{name} the budget needed scales as L^{trend['exponent']:.2f}")
    return "\n".join(lines)


def _recall_by_kind(rows: list) -> list:
    """Lines of the mean recall per planted kind and budget, for each phase, length and method
    other than dense (nothing for inputs without kinds), then of the planted retrieval keys
    found (for kinds with retrieval pairs)."""
    lines = []
    for field, title in (("recall", "recall"), ("found", "planted retrieval keys found")):
        values = defaultdict(list)
        for row in rows:
            if row["kind"] is not None and row["method"] != "dense" and row[field] is not None:
                key = (row["phase"], row["length"], row["method"], row["kind"], row["budget"])
                values[key].append(row[field])
        tables = defaultdict(lambda: defaultdict(dict))
        for (phase, length, method, kind, budget), each in values.items():
            tables[phase, length, method][kind][budget] = sum(each) / len(each)
        for (phase, length, method), by_kind in sorted(tables.items()):
            budgets = sorted({budget for cells in by_kind.values() for budget in cells})
            lines.append(f"{title} by kind: {phase}, L = {length}, {method}")
            lines.append(f"  {'kind':18}" + "".join(f"{budget_label(b):>8}" for b in budgets))
            for kind, cells in sorted(by_kind.items()):
                text = "".join(f"{cells[b]:8.3f}" if b in cells else f"{'':8}" for b in budgets)
                lines.append(f"  {kind:18}{text}")
    return lines
