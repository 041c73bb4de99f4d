"""Recommendations from a sweep's rows: the fastest method and budget that meets an error
tolerance, per layer and overall, per phase and length; and how the budget a method needs
scales with the sequence length."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence


def _check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"foveal.frontier: tolerance must be a number >= 0, got {tolerance!r}")
    return float(tolerance)


def _runs(rows: Sequence[dict]) -> dict:
    """{(phase, length, layer, method, budget): (largest head error, time_s)}: one entry per
    call, its error the worst of its heads (the call serves all of them)."""
    runs = {}
    for row in rows:
        key = (row["phase"], row["length"], row["layer"], row["method"], row["budget"])
        error = max(runs[key][0], row["error"]) if key in runs else row["error"]
        runs[key] = (error, row["time_s"])
    return runs


def _fastest(candidates: dict, tolerance: float):
    """The (method, budget) entry of candidates {(method, budget): (error, time)} with the
    smallest time among those with error <= tolerance (ties: the smaller budget), or None."""
    meeting = [
        (time, budget, method, error)
        for (method, budget), (error, time) in candidates.items()
        if error <= tolerance
    ]
    if not meeting:
        return None
    time, budget, method, error = min(meeting)
    return {"method": method, "budget": budget, "error": error, "time_s": time}


def recommend(rows: Sequence[dict], tolerance: float) -> dict:
    """For each phase and length: per layer, the fastest (method, budget) whose worst head error
    is within ``tolerance``; overall, the one whose worst error over all layers is within it,
    fastest in total time over the layers. Per head, the smallest budget of each method that
    meets the tolerance. ``scaling``: the budget-vs-length trend (see :func:`budget_scaling`)."""
    tolerance = _check_tolerance(tolerance)
    runs = _runs(rows)
    per_layer = defaultdict(dict)
    overall = defaultdict(dict)
    for (phase, length, layer, method, budget), (error, time) in runs.items():
        per_layer[phase, length, layer][method, budget] = (error, time)
        total = overall[phase, length].get((method, budget), (0.0, 0.0))
        overall[phase, length][method, budget] = (max(total[0], error), total[1] + time)
    layers_needed = defaultdict(set)
    for phase, length, layer in per_layer:
        layers_needed[phase, length].add(layer)
    for (phase, length), candidates in overall.items():
        # A (method, budget) measured on only some layers cannot be recommended for all.
        for key in list(candidates):
            measured = {
                layer
                for layer in layers_needed[phase, length]
                if key in per_layer[phase, length, layer]
            }
            if measured != layers_needed[phase, length]:
                del candidates[key]
    result = {"tolerance": tolerance, "phases": {}}
    for phase, length in sorted(overall):
        entry = {
            "length": length,
            "overall": _fastest(overall[phase, length], tolerance),
            "layers": {
                layer: _fastest(per_layer[phase, length, layer], tolerance)
                for layer in sorted(layers_needed[phase, length])
            },
        }
        result["phases"].setdefault(phase, []).append(entry)
    result["heads"] = smallest_budgets(rows, tolerance)
    result["scaling"] = budget_scaling(rows, tolerance)
    return result


def _smallest_meeting(errors: dict, tolerance: float) -> dict:
    """{key: the smallest budget whose error is within tolerance, or None} from errors
    {(*key, budget): error}."""
    found = {}
    for (*key, budget), error in errors.items():
        key = tuple(key)
        best = found.get(key)
        if error <= tolerance and (best is None or budget < best):
            found[key] = budget
        else:
            found.setdefault(key, None)
    return found


def smallest_budgets(rows: Sequence[dict], tolerance: float) -> list:
    """Per (phase, length, layer, head, method other than dense): the smallest budget whose error
    for that head is within ``tolerance`` (None when no budget is)."""
    tolerance = _check_tolerance(tolerance)
    errors = {
        (r["phase"], r["length"], r["layer"], r["head"], r["method"], r["budget"]): r["error"]
        for r in rows
        if r["method"] != "dense"
    }
    found = _smallest_meeting(errors, tolerance)
    fields = ("phase", "length", "layer", "head", "method")
    return [
        dict(zip(fields, key), budget=found[key]) for key in sorted(found, key=lambda k: str(k))
    ]


def budget_scaling(rows: Sequence[dict], tolerance: float) -> list:
    """Per (phase, method other than dense) measured at two or more lengths: the smallest budget
    meeting ``tolerance`` on every layer at each length, and the least-squares fit
    ``budget = c * L^exponent`` over the lengths where one does (exponent 0: a fixed fraction
    of the keys; -1: a fixed number of keys). ``at_smallest``: the lengths where that budget is
    the smallest one measured, so that the need may be smaller still (the fit is then a bound,
    not a trend, and smaller budgets should be measured)."""
    tolerance = _check_tolerance(tolerance)
    worst = defaultdict(float)
    for row in rows:
        if row["method"] == "dense":
            continue
        key = (row["phase"], row["method"], row["length"], row["budget"])
        worst[key] = max(worst[key], row["error"])
    smallest = {}
    for phase, method, length, budget in worst:
        key = (phase, method, length)
        smallest[key] = min(budget, smallest.get(key, budget))
    needed = defaultdict(dict)
    for (phase, method, length), budget in _smallest_meeting(worst, tolerance).items():
        needed[phase, method][length] = budget
    trends = []
    for (phase, method), by_length in sorted(needed.items()):
        if len(by_length) < 2:
            continue
        points = [
            (length, budget) for length, budget in sorted(by_length.items()) if budget is not None
        ]
        trend = dict(
            phase=phase,
            method=method,
            budgets={str(length): budget for length, budget in sorted(by_length.items())},
            at_smallest=[
                length
                for length, budget in sorted(by_length.items())
                if budget is not None and budget == smallest[phase, method, length]
            ],
            exponent=None,
            coefficient=None,
        )
        if len(points) >= 2:
            exponent, coefficient = _power_fit(points)
            trend.update(exponent=exponent, coefficient=coefficient)
        trends.append(trend)
    return trends


def _power_fit(points: Sequence[tuple]) -> tuple:
    """(p, c) of the least-squares line log y = log c + p log x through the points."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return slope, math.exp(mean_y - slope * mean_x)
