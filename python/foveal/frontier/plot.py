"""The Pareto plot of a sweep: error against time, one panel per phase, one marker per method,
each point one budget (the worst head's error, the time summed over the layers) at the longest
length measured; dense attention (error 0) is the dashed vertical line at its time. PNG through
matplotlib when it is installed, else an SVG written here."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

# Errors are drawn on a log axis: an exact result (error 0) sits on this floor.
ERROR_FLOOR = 1e-7
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def points(rows: Sequence[dict]) -> dict:
    """{phase: (length, dense time_s, {method other than dense: [(time_s, error, budget), ...]
    sorted by time})}, for the phases in which some method other than dense was measured."""
    longest = {}
    for row in rows:
        longest[row["phase"]] = max(longest.get(row["phase"], 0), row["length"])
    calls = {}
    for row in rows:
        if row["length"] != longest[row["phase"]]:
            continue
        key = (row["phase"], row["method"], row["budget"], row["layer"])
        error = max(calls[key][0], row["error"]) if key in calls else row["error"]
        calls[key] = (error, row["time_s"])
    merged = defaultdict(lambda: [0.0, 0.0])
    for (phase, method, budget, _), (error, time) in calls.items():
        total = merged[phase, method, budget]
        total[0], total[1] = max(total[0], error), total[1] + time
    series = {phase: defaultdict(list) for phase in longest}
    dense = {}
    for (phase, method, budget), (error, time) in merged.items():
        if method == "dense":
            dense[phase] = time
        else:
            series[phase][method].append((time, max(error, ERROR_FLOOR), budget))
    for by_method in series.values():
        for points_of_method in by_method.values():
            points_of_method.sort()
    return {
        phase: (longest[phase], dense[phase], series[phase])
        for phase in longest
        if series[phase] and phase in dense
    }


def pareto_front(series: Sequence[tuple]) -> list:
    """The points (time, error, ...) that no other point beats in both time and error."""
    front, best = [], math.inf
    for point in sorted(series):
        if point[1] < best:
            front.append(point)
            best = point[1]
    return front


def budget_label(budget: float) -> str:
    inverse = 1.0 / budget
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{budget:g}"


def write_plot(rows: Sequence[dict], directory: str | Path, *, use_matplotlib: bool = True) -> Path:
    """Writes ``pareto.png`` (matplotlib) or ``pareto.svg`` into ``directory`` (created); the
    path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = points(rows)
    if not data:
        # Dense alone (or no dense baseline): no trade-off to draw.
        path = directory / "pareto.svg"
        path.write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" width="420" height="40">'
            '<text x="10" y="25" font-size="13">foveal.frontier: no sparse method was measured '
            "next to dense</text></svg>\n"
        )
        return path
    if use_matplotlib:
        try:
            import matplotlib
        except ImportError:
            pass
        else:
            matplotlib.use("Agg")
            return _matplotlib(data, directory / "pareto.png")
    path = directory / "pareto.svg"
    path.write_text(_svg(data))
    return path


def _style(methods: list) -> dict:
    return {
        name: (MARKERS[i % len(MARKERS)], COLORS[i % len(COLORS)])
        for i, name in enumerate(sorted(methods))
    }


def _matplotlib(data: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    methods = sorted({name for _, _, by_method in data.values() for name in by_method})
    style = _style(methods)
    figure, axes = plt.subplots(1, len(data), figsize=(5.5 * len(data), 4.2), squeeze=False)
    for axis, (phase, (length, dense, by_method)) in zip(axes[0], sorted(data.items())):
        axis.axvline(dense * 1e3, color="black", linestyle="--", linewidth=1, label="dense (exact)")
        every = []
        for name, series in sorted(by_method.items()):
            marker, color = style[name]
            times, errors = [p[0] * 1e3 for p in series], [p[1] for p in series]
            axis.plot(times, errors, marker, color=color, label=name, markersize=7)
            for time, error, budget in series:
                axis.annotate(
                    budget_label(budget),
                    (time * 1e3, error),
                    fontsize=7,
                    xytext=(4, 3),
                    textcoords="offset points",
                )
            every.extend(series)
        front = pareto_front(every)
        axis.plot(
            [p[0] * 1e3 for p in front],
            [p[1] for p in front],
            "-",
            color="0.6",
            linewidth=1,
            zorder=0,
            label="Pareto front",
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("time, all layers (ms)")
        axis.set_ylabel("relative L2 error (worst head)")
        axis.set_title(f"{phase}, L = {length}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _svg(data: dict) -> str:
    """The same panels as plain SVG text: log axes with decade ticks, one shape per method."""
    width, height, margin = 460, 340, 60
    methods = sorted({name for _, _, by_method in data.values() for name in by_method})
    shapes = ("circle", "square", "triangle", "diamond")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(data)}" '
        f'height="{height}" font-family="sans-serif" font-size="11">'
    ]
    for panel, (phase, (length, dense, by_method)) in enumerate(sorted(data.items())):
        every = [p for series in by_method.values() for p in series]
        x_low, x_high = _decades([p[0] for p in every] + [dense])
        y_low, y_high = _decades([p[1] for p in every] or [1.0])
        left = panel * width + margin

        def x_of(time, x_low=x_low, x_high=x_high, left=left):
            return left + (math.log10(time) - x_low) / (x_high - x_low) * (width - 1.5 * margin)

        def y_of(error, y_low=y_low, y_high=y_high):
            return (
                height
                - margin
                - (math.log10(error) - y_low) / (y_high - y_low) * (height - 1.7 * margin)
            )

        parts.append(f'<text x="{left}" y="20">{phase}, L = {length}</text>')
        parts.append(
            f'<rect x="{left}" y="{0.7 * margin}" width="{width - 1.5 * margin}" '
            f'height="{height - 1.7 * margin}" fill="none" stroke="black"/>'
        )
        for decade in range(x_low, x_high + 1):
            x = x_of(10.0**decade)
            parts.append(
                f'<text x="{x:.1f}" y="{height - margin + 15}" text-anchor="middle">'
                f"1e{decade}</text>"
            )
        for decade in range(y_low, y_high + 1):
            y = y_of(10.0**decade)
            parts.append(
                f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">1e{decade}</text>'
            )
        parts.append(f'<text x="{left + 100}" y="{height - 20}">time, all layers (s)</text>')
        x = x_of(dense)
        parts.append(
            f'<line x1="{x:.1f}" y1="{0.7 * margin}" x2="{x:.1f}" y2="{height - margin}" '
            'stroke="black" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{x - 4:.1f}" y="{0.7 * margin + 12}" text-anchor="end">dense</text>'
        )
        parts.append(f'<text x="{left - 50}" y="{0.7 * margin - 8}">error (worst head)</text>')
        front = pareto_front(every)
        line = " ".join(f"{x_of(p[0]):.1f},{y_of(p[1]):.1f}" for p in front)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#999"/>')
        for index, name in enumerate(methods):
            color = COLORS[index % len(COLORS)]
            shape = shapes[index % len(shapes)]
            for time, error, budget in by_method.get(name, []):
                parts.append(_shape(shape, x_of(time), y_of(error), color))
                parts.append(
                    f'<text x="{x_of(time) + 5:.1f}" y="{y_of(error) - 4:.1f}" '
                    f'font-size="8">{budget_label(budget)}</text>'
                )
            legend_y = 0.7 * margin + 15 + 14 * index
            parts.append(_shape(shape, left + width - 1.5 * margin - 70, legend_y - 4, color))
            parts.append(
                f'<text x="{left + width - 1.5 * margin - 62}" y="{legend_y}">{name}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _decades(values: Sequence[float]) -> tuple:
    low = math.floor(math.log10(min(values)))
    high = math.ceil(math.log10(max(values)))
    return low, max(high, low + 1)


def _shape(shape: str, x: float, y: float, color: str) -> str:
    size = 4
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size}" fill="{color}"/>'
    if shape == "square":
        return (
            f'<rect x="{x - size:.1f}" y="{y - size:.1f}" width="{2 * size}" '
            f'height="{2 * size}" fill="{color}"/>'
        )
    if shape == "triangle":
        corners = [(x, y - size), (x - size, y + size), (x + size, y + size)]
    else:
        corners = [(x, y - size), (x - size, y), (x, y + size), (x + size, y)]
    listed = " ".join(f"{a:.1f},{b:.1f}" for a, b in corners)
    return f'<polygon points="{listed}" fill="{color}"/>'
