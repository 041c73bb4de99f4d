"""foveal.frontier: planted data with known answers, the lse recall identity, the method
registry, the sweep's JSON, the recommendation and the command line (docs/frontier.md)."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from conftest import SEED, reference_attention, visible_keys
from foveal import frontier
from foveal.frontier import methods as registry
from foveal.frontier import plot

DIM = 64  # small heads keep the planted generator fast


def causal_probabilities(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """[H, L, L] float64 causal softmax of q k^T / sqrt(D) for one batch item (Hq == Hkv)."""
    q, k = q[0].astype(np.float64), k[0].astype(np.float64)
    logits = np.einsum("hid,hjd->hij", q, k) / math.sqrt(q.shape[-1])
    length = q.shape[1]
    logits = np.where(visible_keys(length, length, causal=True), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def mixed() -> frontier.Planted:
    return frontier.planted(
        "local,slash,sink,vertical,retrieval,local+sink", 256, dim=DIM, seed=SEED
    )


def test_planted_is_deterministic_and_shaped(mixed):
    again = frontier.planted(
        "local,slash,sink,vertical,retrieval,local+sink", 256, dim=DIM, seed=SEED
    )
    other = frontier.planted(
        "local,slash,sink,vertical,retrieval,local+sink", 256, dim=DIM, seed=SEED + 1
    )
    for name in "qkv":
        array = getattr(mixed, name)
        assert array.shape == (1, 6, 256, DIM) and array.dtype == np.float32
        np.testing.assert_array_equal(array, getattr(again, name))
        assert not np.array_equal(array, getattr(other, name))
    assert mixed.kinds == ["local", "slash", "sink", "vertical", "retrieval", "local+sink"]
    cycled = frontier.planted("local,sink", 64, heads=5, dim=32, seed=1)
    assert cycled.kinds == ["local", "sink", "local", "sink", "local"]
    assert cycled.q.shape == (1, 5, 64, 32)


def test_planted_mass_is_what_was_asked_for(mixed):
    """Recomputed from the float32 arrays in float64, each single-kind head puts the requested
    0.7 of its softmax on its planted keys (rotation and calibration kept the structure)."""
    probabilities = causal_probabilities(mixed.q, mixed.k)
    rows = np.unique(np.linspace(128, 255, 64).astype(np.int64))
    for head, info in enumerate(mixed.heads):
        measured = info.pairs[:, 0] if info.kind == "retrieval" else rows
        kept = (probabilities[head, measured] * info.planted_keys(measured, 256)).sum(axis=1)
        if "+" not in info.kind:
            assert abs(kept.mean() - 0.7) < 0.01, (info.kind, kept.mean(), SEED)
        assert 0.5 <= kept.mean() <= 0.95, (info.kind, kept.mean(), SEED)
        assert abs(kept.mean() - info.mass["all"]) < 0.01, (info.kind, SEED)


def test_dense_attention_finds_the_planted_retrieval_keys(mixed):
    head = mixed.kinds.index("retrieval")
    pairs = mixed.heads[head].pairs
    probabilities = causal_probabilities(mixed.q, mixed.k)[head]
    assert len(pairs) == 8 and pairs[-1, 0] == 255  # the last position is a planted query
    assert (pairs[:, 0] - pairs[:, 1] >= 256 // 4).all()  # far back
    for query, key in pairs:
        row = probabilities[query]
        assert row.argmax() == key, (query, key, SEED)
        assert row[key] > 0.3, (query, key, row[key], SEED)
    # Elsewhere no key stands out: a query that was not planted spreads its mass.
    assert probabilities[200].max() < 0.2


def test_decode_variant_plants_the_last_queries():
    """decode_queries=3: the last three positions are retrieval queries with far keys, and the
    decode phase measures those three queries (a window misses their keys)."""
    data = frontier.planted("retrieval,local", 128, dim=32, seed=SEED, decode_queries=3)
    pairs = data.heads[0].pairs
    assert pairs[-3:, 0].tolist() == [125, 126, 127] and len(set(pairs[:, 1].tolist())) == 8
    assert (pairs[:, 0] - pairs[:, 1] >= 128 // 4).all()
    layer = frontier.Layer("l0", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep(
        [layer], ["window"], ["1/8"], ["decode"], decode_queries=3, repeats=1, min_seconds=0
    )
    recall = {r["kind"]: r["recall"] for r in rows if r["method"] == "window"}
    assert recall["retrieval"] < 0.25 and recall["local"] > 0.5, recall
    with pytest.raises(ValueError, match="decode_queries must be <= the length"):
        frontier.sweep([layer], ["window"], ["1/8"], ["decode"], decode_queries=129)
    with pytest.raises(ValueError, match="slash needs length >= 4 \\* width \\+ 4 = 36"):
        frontier.planted("slash", 35, dim=32)


def test_lse_recall_identity_against_float64_reference(rng):
    """exp(lse_window - lse_dense) equals the dense softmax mass on the window's keys, summed
    explicitly in float64 (GQA 4:2, a length that is not a multiple of any tile)."""
    length, budget = 203, 1 / 8
    q = rng.standard_normal((1, 4, length, 32)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, length, 32)).astype(np.float32) for _ in range(2))
    dense_out, dense_lse = registry.dense(q, k, v, 1.0)
    out, lse = registry.window(q, k, v, budget)
    keys = frontier.keys_for(budget, length)
    sinks = min(4, keys // 2)
    seen = visible_keys(
        length, length, causal=True, window_left=keys - sinks - 1, sink_tokens=sinks
    )
    assert 1 < seen.sum(axis=1).max() == keys < length
    k64 = np.repeat(k[0].astype(np.float64), 2, axis=0)
    logits = np.einsum("hid,hjd->hij", q[0].astype(np.float64), k64) / math.sqrt(32)
    logits = np.where(visible_keys(length, length, causal=True), logits, -np.inf)
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = weights / weights.sum(axis=-1, keepdims=True)
    kept = (probabilities * seen).sum(axis=-1)
    identity = np.exp(lse[0].astype(np.float64) - dense_lse[0].astype(np.float64))
    np.testing.assert_allclose(identity, kept, rtol=1e-5, atol=1e-6, err_msg=f"seed {SEED}")
    assert kept[:, -1].max() < 0.5  # the window misses most of a late row's mass
    error, recall, recall_min = frontier.head_metrics(out, lse, dense_out, dense_lse)
    np.testing.assert_allclose(recall, kept.mean(axis=1), rtol=1e-5)
    # The error against the float64 references of both (conftest's reference_attention).
    exact, _ = reference_attention(q, k, v, causal=True)
    windowed, _ = reference_attention(
        q, k, v, causal=True, window_left=keys - sinks - 1, sink_tokens=sinks
    )
    expected = np.linalg.norm((windowed - exact)[0], axis=(1, 2)) / np.linalg.norm(
        exact[0], axis=(1, 2)
    )
    np.testing.assert_allclose(error, expected, rtol=1e-4)
    assert (error > 0.1).all()
    np.testing.assert_allclose(recall_min, kept.min(axis=1), rtol=1e-5, atol=1e-6)


def test_window_keeps_local_heads_and_misses_retrieval():
    """What planted data is for: at 1/8 of the keys the window keeps most of a local head's
    mass and almost none of a retrieval query's, in prefill and decode."""
    data = frontier.planted("local,retrieval", 512, dim=DIM, seed=SEED, mass=0.9)
    layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep([layer], ["window"], ["1/8"], repeats=1, min_seconds=0)
    recall = {(r["phase"], r["kind"]): r["recall"] for r in rows if r["method"] == "window"}
    assert recall["prefill", "local"] > 0.9 and recall["decode", "local"] > 0.9, recall
    assert recall["decode", "retrieval"] < 0.1, recall
    # At the planted retrieval queries in prefill: the planted key lies outside the window.
    queries = data.heads[1].pairs[:, 0]
    _, dense_lse = registry.dense(data.q, data.k, data.v, 1.0)
    _, lse = registry.window(data.q, data.k, data.v, 1 / 8)
    kept = np.exp(lse[0, 1, queries].astype(np.float64) - dense_lse[0, 1, queries])
    assert kept.max() < 0.15, kept
    # The window does not lose on local heads what it loses on retrieval heads.
    errors = {(r["phase"], r["kind"]): r["error"] for r in rows if r["method"] == "window"}
    assert errors["prefill", "local"] < errors["prefill", "retrieval"] / 2, errors


def test_block_sparse_and_quest_run_in_their_phases_and_find_retrieval_keys():
    """block_sparse serves prefill and quest decode: a sweep over both phases runs each where it
    is registered. Quest's page bounds find a planted retrieval key that a window misses."""
    data = frontier.planted("retrieval,local", 1024, dim=DIM, seed=SEED, mass=0.9)
    layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep(
        [layer], ["block_sparse", "quest", "window"], ["1/8"], repeats=1, min_seconds=0
    )
    phases = {(r["method"], r["phase"]) for r in rows}
    assert ("block_sparse", "prefill") in phases and ("block_sparse", "decode") not in phases
    assert ("quest", "decode") in phases and ("quest", "prefill") not in phases
    recall = {(r["method"], r["phase"], r["kind"]): r["recall"] for r in rows}
    assert recall["quest", "decode", "retrieval"] > 0.6, recall
    assert recall["quest", "decode", "retrieval"] > 4 * recall["window", "decode", "retrieval"]
    assert recall["block_sparse", "prefill", "local"] > 0.8, recall


def test_token_topk_keeps_more_of_planted_retrieval_keys_than_block_pooling():
    """token_topk selects single keys, so lone planted retrieval keys keep more of their mass
    than under block_sparse, whose pooled estimate averages each into its block's mean."""
    data = frontier.planted("retrieval", 1024, dim=DIM, seed=SEED, mass=0.9)
    layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep(
        [layer], ["token_topk", "block_sparse"], ["1/16"], repeats=1, min_seconds=0
    )
    assert {(r["method"], r["phase"]) for r in rows if r["method"] != "dense"} == {
        ("token_topk", "prefill"),
        ("block_sparse", "prefill"),
    }
    recall = {r["method"]: r["recall"] for r in rows if r["phase"] == "prefill"}
    assert recall["token_topk"] > 1.5 * recall["block_sparse"], recall


def test_vertical_slash_follows_planted_slash_and_vertical_heads():
    """vertical_slash keeps whole lines: on heads whose mass lies on a few diagonals or columns
    (planted slash and vertical heads) it keeps more than half of it, and on the diagonals more than
    token_topk, whose block-mean query cannot tell a diagonal from its neighbours. (At 1/16 of
    2048 keys both keep only their 128 local keys: the budget is 1/4.)"""
    recall = {}
    for kind in ("slash", "vertical"):
        data = frontier.planted(kind, 2048, dim=DIM, seed=SEED, mass=0.9)
        layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds)
        rows = frontier.sweep(
            [layer], ["vertical_slash", "token_topk"], ["1/4"], repeats=1, min_seconds=0
        )
        for r in rows:
            if r["phase"] == "prefill":
                recall[kind, r["method"]] = r["recall"]
    assert recall["slash", "vertical_slash"] > 0.55, recall
    assert recall["vertical", "vertical_slash"] > 0.55, recall
    assert recall["slash", "vertical_slash"] > 1.3 * recall["slash", "token_topk"], recall


def test_channels_basis_keeps_the_logits_and_lets_quest_bounds_find_retrieval_keys():
    """The same heads in both bases (values equal, logits equal to float32 rounding); in the
    channels basis each planted direction lies in a channel of its own, so Quest's per-channel
    page bounds find every planted retrieval key of the decode queries at 1/16, where the
    rotation (which spreads each direction over all channels) hides most of them."""
    # Four decode queries share one selection (Quest keeps the pages any of them needs): their
    # four planted pages and the newest page fit the 8 pages of 1/16.
    options = dict(dim=DIM, seed=SEED, mass=0.9, pairs=8, decode_queries=4)
    rotated = frontier.planted("retrieval,retrieval+local", 2048, **options)
    channels = frontier.planted("retrieval,retrieval+local", 2048, basis="channels", **options)
    assert channels.basis == "channels" and rotated.basis == "rotated"
    np.testing.assert_array_equal(channels.v, rotated.v)
    for head in range(2):
        np.testing.assert_array_equal(channels.heads[head].pairs, rotated.heads[head].pairs)
        rows = channels.heads[head].pairs[:, 0]
        logits = channels.q[0, head, rows].astype(np.float64) @ channels.k[0, head].T
        turned = rotated.q[0, head, rows].astype(np.float64) @ rotated.k[0, head].T
        np.testing.assert_allclose(logits, turned, atol=1e-3 * np.abs(turned).max())
        # The planted key of each pair: one channel holds its whole retrieval part.
        for index, key in enumerate(channels.heads[head].pairs[:, 1].tolist()):
            column = channels.k[0, head, :, DIM // 4 + index]
            assert np.count_nonzero(column) == 1 and column[key] > 0
    found = {}
    for data in (rotated, channels):
        layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds, data.pairs)
        rows = frontier.sweep(
            [layer], ["quest"], ["1/16"], ["decode"], decode_queries=4, repeats=1, min_seconds=0
        )
        for r in rows:
            if r["method"] == "quest":
                found[data.basis, r["kind"]] = r["found"]
    assert found["channels", "retrieval"] == 1.0, found
    assert found["channels", "retrieval+local"] == 1.0, found
    assert found["rotated", "retrieval"] < 0.75, found


def test_found_counts_the_planted_retrieval_keys_a_method_visits():
    """``found``: the share of a retrieval head's planted pairs whose query visited its planted
    key (one more call with values that mark the planted keys). Dense finds all, a window
    (the keys lie at least L/4 back) almost none; other heads have none to find."""
    data = frontier.planted("retrieval,local", 2048, dim=DIM, seed=3, mass=0.9, heads=2)
    layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds, data.pairs)
    rows = frontier.sweep([layer], ["window", "token_topk"], ["1/4"], repeats=1, min_seconds=0)
    found = {(r["method"], r["phase"], r["kind"]): r["found"] for r in rows}
    assert found["dense", "prefill", "retrieval"] == 1.0
    assert found["dense", "decode", "retrieval"] == 1.0
    assert found["dense", "prefill", "local"] is None
    assert found["window", "prefill", "retrieval"] == 0.0, found
    assert found["token_topk", "prefill", "retrieval"] >= 0.5, found
    with pytest.raises(ValueError, match="pairs"):
        frontier.Layer("bad", data.q, data.k, data.v, data.kinds, [[(0, 5000)], []])
    with pytest.raises(ValueError, match="one entry per query head"):
        frontier.Layer("bad", data.q, data.k, data.v, data.kinds, [[]])
    # Without pairs (captured layers) nothing is counted.
    plain = frontier.Layer("plain", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep([plain], ["window"], ["1/16"], repeats=1, min_seconds=0)
    assert all(r["found"] is None for r in rows)


@pytest.fixture
def scratch_method():
    """Registers methods for one test and removes them afterwards."""
    names = []

    def add(name, phase, fn, **options):
        frontier.register_method(name, phase, fn, **options)
        names.append(name)

    yield add
    for key in [key for key in registry._REGISTRY if key[0] in names]:
        del registry._REGISTRY[key]


def test_registry_adds_a_method_in_a_few_lines(scratch_method):
    calls = []

    def half_window(q, k, v, budget, *, sink_tokens, num_threads=None):
        calls.append((budget, sink_tokens, num_threads))
        return registry.window(
            q, k, v, budget / 2, sink_tokens=sink_tokens, num_threads=num_threads
        )

    scratch_method("half_window", "prefill", half_window, sink_tokens=0)
    scratch_method("thresholded", ("prefill", "decode"), registry.window, budget="threshold")
    assert frontier.method("thresholded", "decode").budget == "threshold"
    assert "half_window" in frontier.method_names("prefill")
    assert "half_window" not in frontier.method_names("decode")
    assert {"dense", "window"} <= set(frontier.method_names("decode"))
    data = frontier.planted("local", 128, dim=32, seed=SEED)
    layer = frontier.Layer("l0", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep(
        [layer],
        ["half_window", "window"],
        ["1/4"],
        ["prefill"],
        repeats=2,
        min_seconds=0,
        num_threads=1,
    )
    assert calls == [(0.25, 0, 1)] * 2
    recall = {r["method"]: r["recall"] for r in rows}
    document = frontier.report(rows, 0.1)
    assert document["methods"]["half_window"] == {"prefill": {"budget": "fraction"}}
    assert recall["half_window"] < recall["window"] < recall["dense"] == 1.0
    with pytest.raises(ValueError, match="'half_window' is not registered for decode"):
        frontier.sweep([layer], ["half_window"], ["1/4"], ["decode"])


def test_registry_rejects_bad_registrations():
    with pytest.raises(ValueError, match="phase must be one of prefill, decode, got 'train'"):
        frontier.register_method("x", "train", registry.dense)
    with pytest.raises(TypeError, match="fn must be callable"):
        frontier.register_method("x", "prefill", 3)
    with pytest.raises(ValueError, match="budget must be one of fraction, threshold"):
        frontier.register_method("x", "prefill", registry.dense, budget="tokens")
    with pytest.raises(ValueError, match="name must be"):
        frontier.register_method("a,b", "prefill", registry.dense)
    assert "x" not in frontier.method_names()


def test_json_document_schema(tmp_path):
    data = frontier.planted("sink,retrieval", 96, dim=32, seed=SEED)
    layers = [frontier.Layer(f"layer{n}", data.q, data.k, data.v, data.kinds) for n in range(2)]
    rows = frontier.sweep(
        layers, ["dense", "window"], ["1/8", "1/4", "1/2"], repeats=1, min_seconds=0
    )
    # 2 layers x 2 phases x (dense + 3 window budgets) x 2 heads
    assert len(rows) == 2 * 2 * 4 * 2
    for row in rows:
        assert tuple(row) == frontier.ROW_FIELDS
        assert row["time_s"] > 0 and row["dense_time_s"] > 0
        assert 0.0 <= row["recall_min"] <= row["recall"] <= 1.0
        if row["method"] == "dense":
            assert row["budget"] == 1.0 and row["error"] == 0.0 and row["recall"] == 1.0
    document = frontier.report(rows, 0.1, {"note": "test"})
    path = frontier.write_report(document, tmp_path / "out")
    loaded = json.loads(path.read_text())
    assert loaded["schema"] == frontier.SCHEMA == "foveal.frontier/1"
    assert set(loaded) == {
        "schema",
        "config",
        "foveal",
        "methods",
        "planted",
        "rows",
        "recommendation",
    }
    fraction = {"budget": "fraction"}
    assert loaded["methods"]["window"] == {"prefill": fraction, "decode": fraction}
    assert loaded["rows"] == rows
    assert set(loaded["recommendation"]) == {"tolerance", "phases", "heads", "scaling"}
    assert set(loaded["recommendation"]["phases"]) == {"prefill", "decode"}


def _row(layer, head, method, budget, error, time, length=1024, phase="prefill"):
    return dict(
        layer=layer,
        length=length,
        head=head,
        kind=None,
        phase=phase,
        method=method,
        budget=budget,
        error=error,
        recall=1.0 - error,
        recall_min=1.0 - error,
        time_s=time,
        dense_time_s=1.0,
    )


def test_plot_leaves_out_phases_without_a_sparse_method(tmp_path):
    """A sweep of prefill-only methods measures dense in decode too: the plot has no decode
    panel (nothing to trade off there) instead of failing on an empty log axis; dense alone
    writes a note."""
    data = frontier.planted("local", 256, dim=DIM, seed=SEED)
    layer = frontier.Layer("planted", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep([layer], ["block_sparse"], ["1/4"], repeats=1, min_seconds=0)
    assert {r["phase"] for r in rows} == {"prefill", "decode"}
    assert set(plot.points(rows)) == {"prefill"}
    for use_matplotlib in (False, True):
        assert plot.write_plot(rows, tmp_path / str(use_matplotlib), use_matplotlib=use_matplotlib)
    dense_only = [r for r in rows if r["method"] == "dense"]
    assert plot.points(dense_only) == {}
    assert "no sparse method" in plot.write_plot(dense_only, tmp_path / "dense").read_text()


def test_recommendation_on_a_handcrafted_table():
    rows = []
    for layer in ("a", "b"):
        rows += [_row(layer, h, "dense", 1.0, 0.0, 1.0) for h in (0, 1)]
    # Layer a: window 1/8 meets 0.1 on both heads and is fastest; 1/16 fails on head 1.
    rows += [_row("a", 0, "window", 1 / 16, 0.02, 0.1), _row("a", 1, "window", 1 / 16, 0.3, 0.1)]
    rows += [_row("a", 0, "window", 1 / 8, 0.01, 0.2), _row("a", 1, "window", 1 / 8, 0.08, 0.2)]
    rows += [_row("a", h, "other", 1 / 8, 0.05, 0.5) for h in (0, 1)]
    # Layer b: the window fails everywhere; "other" meets it at 1/8.
    rows += [_row("b", h, "window", 1 / 8, 0.5, 0.2) for h in (0, 1)]
    rows += [_row("b", h, "window", 1 / 16, 0.6, 0.1) for h in (0, 1)]
    rows += [_row("b", h, "other", 1 / 8, 0.09, 0.4) for h in (0, 1)]
    advice = frontier.recommend(rows, 0.1)
    [entry] = advice["phases"]["prefill"]
    assert entry["layers"]["a"] == {
        "method": "window",
        "budget": 0.125,
        "error": 0.08,
        "time_s": 0.2,
    }
    assert entry["layers"]["b"]["method"] == "other"
    # Overall one choice serves both layers: "other" 1/8 (0.5 + 0.4 s) beats dense (2 s).
    assert entry["overall"]["method"] == "other" and entry["overall"]["time_s"] == 0.9
    heads = {(h["layer"], h["head"], h["method"]): h["budget"] for h in advice["heads"]}
    assert heads["a", 0, "window"] == 1 / 16 and heads["a", 1, "window"] == 1 / 8
    assert heads["b", 0, "window"] is None
    # A tighter tolerance leaves only dense.
    assert frontier.recommend(rows, 0.01)["phases"]["prefill"][0]["overall"]["method"] == "dense"
    assert advice["scaling"] == []  # one length: no trend


def test_budget_scaling_fits_the_trend():
    """A method that needs a fixed 64 keys: its budget halves as L doubles (exponent -1)."""
    rows = []
    for length in (1024, 2048, 4096):
        for budget in (1 / 64, 1 / 32, 1 / 16):
            error = 0.01 if budget * length >= 64 else 0.5
            rows.append(_row("a", 0, "window", budget, error, budget, length=length))
    [trend] = frontier.budget_scaling(rows, 0.05)
    assert trend["budgets"] == {"1024": 1 / 16, "2048": 1 / 32, "4096": 1 / 64}
    assert trend["exponent"] == pytest.approx(-1.0)
    assert trend["coefficient"] == pytest.approx(64.0)
    assert trend["at_smallest"] == [4096]  # 1/64 was the smallest budget measured


def run_cli(arguments: str, out) -> int:
    """frontier.main with the arguments, one timed call per run, writing into out."""
    return frontier.main(
        [*arguments.split(), "--repeats", "1", "--min-seconds", "0", "--out", str(out)]
    )


def test_command_line_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(
        "--planted local,retrieval+sink --length 128,256 --dim 32 --budgets 1/8,1/4 "
        "--num-threads 1 --tolerance 0.5",
        out,
    )
    assert code == 0
    document = json.loads((out / "frontier.json").read_text())
    lengths = {row["length"] for row in document["rows"]}
    assert lengths == {128, 256}
    assert {row["kind"] for row in document["rows"]} == {"local", "retrieval+sink"}
    assert len(document["planted"]) == 4 and document["config"]["num_threads"] == 1
    assert [t["method"] for t in document["recommendation"]["scaling"]] == ["window", "window"]
    assert (out / "pareto.png").exists() or (out / "pareto.svg").exists()
    printed = capsys.readouterr().out
    assert "recommendation at tolerance 0.5" in printed and "window" in printed
    svg = tmp_path / "svg"
    run_cli("--planted sink --length 64 --dim 32 --budgets 1/4 --phases decode --svg", svg)
    root = ElementTree.parse(svg / "pareto.svg").getroot()
    assert root.tag.endswith("svg") and len(root) > 10


def test_command_line_rejects_bad_arguments(tmp_path, capsys):
    for argv, message in [
        (["--planted", "local", "--budgets", "0"], "budget must be in (0, 1]"),
        (["--planted", "local", "--budgets", "x"], "budget must be a number"),
        (["--planted", "diagonal"], "kind must be one of"),
        (["--planted", "local", "--length", "8"], "--length must be integers >= 16"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            frontier.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("--planted local --length 32 --dim 32 --methods dense,nope", tmp_path)
    assert "method 'nope' is not registered for prefill" in capsys.readouterr().err


def test_npz_round_trip(tmp_path):
    data = frontier.planted("local,sink", 64, dim=32, seed=SEED)
    arrays = {
        "layer0.q": data.q,
        "layer0.k": data.k,
        "layer0.v": data.v,
        "layer1.q": data.q,
        "layer1.k": data.k[:, :1],
        "layer1.v": data.v[:, :1],
    }
    frontier.save_npz(tmp_path / "qkv.npz", arrays)
    layers = frontier.load_npz(tmp_path / "qkv.npz")
    assert [layer.name for layer in layers] == ["layer0", "layer1"]
    np.testing.assert_array_equal(layers[1].k, data.k[:, :1])
    assert layers[1].kinds == [None, None]  # GQA 2:1, no kinds stored
    code = run_cli(f"--npz {tmp_path / 'qkv.npz'} --budgets 1/4", tmp_path / "out")
    assert code == 0
    # Two files (say, two lengths): the layers are named by file, the trend is fitted.
    longer = frontier.planted("local,sink", 128, dim=32, seed=SEED)
    frontier.save_npz(tmp_path / "long.npz", {f"layer0.{x}": getattr(longer, x) for x in "qkv"})
    files = f"{tmp_path / 'qkv.npz'},{tmp_path / 'long.npz'}"
    run_cli(f"--npz {files} --budgets 1/8,1/4 --tolerance 1", tmp_path / "two")
    document = json.loads((tmp_path / "two" / "frontier.json").read_text())
    names = {(row["layer"], row["length"]) for row in document["rows"]}
    assert names == {("qkv:layer0", 64), ("qkv:layer1", 64), ("long:layer0", 128)}
    assert len(document["recommendation"]["scaling"]) == 2  # window, prefill and decode
    with pytest.raises(ValueError, match=r"layer2 lacks layer2\.v"):
        frontier.layers_of({"layer2.q": data.q, "layer2.k": data.k})
    with pytest.raises(ValueError, match="key 'weights' is not layer<n>"):
        frontier.layers_of({"weights": data.q})


def test_bad_inputs_name_the_argument():
    data = frontier.planted("local", 32, dim=16, seed=SEED)
    q, k, v = data.q, data.k, data.v
    with pytest.raises(TypeError, match="q must be float32, got float64"):
        frontier.Layer("x", q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="k must be a numpy array, got list"):
        frontier.Layer("x", q, k.tolist(), v)
    with pytest.raises(ValueError, match=r"v must be \[1, H, L, D\], got \[32, 16\]"):
        frontier.Layer("x", q, k, v[0, 0])
    with pytest.raises(ValueError, match="q must have as many positions as k"):
        frontier.Layer("x", q[:, :, :8], k, v)
    with pytest.raises(ValueError, match="q's heads must be a multiple of k's"):
        frontier.Layer(
            "x",
            np.concatenate([q] * 3, axis=1),
            np.concatenate([k] * 2, axis=1),
            np.concatenate([v] * 2, axis=1),
        )
    with pytest.raises(ValueError, match="kinds must have one entry per query head"):
        frontier.Layer("x", q, k, v, ["local", "sink"])
    layer = frontier.Layer("x", q, k, v)
    for budget in (0, 1.5, -0.25, "2/1"):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            frontier.sweep([layer], ["window"], [budget])
    with pytest.raises(ValueError, match="phase must be one of prefill, decode"):
        frontier.sweep([layer], ["window"], ["1/4"], ["train"])
    with pytest.raises(TypeError, match=r"layers must be frontier\.Layer objects"):
        frontier.sweep([(q, k, v)])
    with pytest.raises(ValueError, match="decode_queries must be an int >= 1"):
        frontier.sweep([layer], decode_queries=0)
    with pytest.raises(ValueError, match="min_seconds must be a number >= 0"):
        frontier.sweep([layer], min_seconds=-1)
    with pytest.raises(ValueError, match="mass must be in"):
        frontier.planted("local", 64, mass=1.0)
    with pytest.raises(TypeError, match=r"mass must be a number, got '0\.7'"):
        frontier.planted("local", 64, mass="0.7")
    with pytest.raises(ValueError, match="decode_queries must be <= 4 retrieval pairs"):
        frontier.planted("retrieval", 16, dim=16, decode_queries=5)
    with pytest.raises(TypeError, match="length must be an int"):
        frontier.planted("local", 64.0)
    with pytest.raises(ValueError, match="basis must be one of rotated, channels, got 'pca'"):
        frontier.planted("local", 64, basis="pca")
    with pytest.raises(ValueError, match="tolerance must be a number >= 0"):
        frontier.recommend([], -1)


def test_capture_from_a_tiny_llama():
    """capture() records every layer's post-rotary Q/K/V from a randomly initialised Llama
    (no download); the model's logits are those of transformers' own attention."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(SEED)
    from test_transformers import COMMON, VOCAB  # the tiny decoder of the integration tests

    config = transformers.LlamaConfig(**COMMON)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.eval()
    ids = torch.randint(3, VOCAB, (1, 40))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    captured = frontier.capture(model, {"input_ids": ids})
    assert model.config._attn_implementation == "sdpa"
    assert sorted(captured) == [f"layer{n}.{x}" for n in (0, 1) for x in "kqv"]
    assert captured["layer0.q"].shape == (1, 4, 40, 16)
    assert captured["layer1.k"].shape == (1, 2, 40, 16)
    # Layer 0's inputs recomputed by hand: projections, then the rotary embedding on q and k.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        cos, sin = model.model.rotary_emb(hidden, torch.arange(40)[None])
        q, k, v = (
            projection(hidden).view(1, 40, -1, 16).transpose(1, 2)
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    for name, tensor in zip("qkv", (q, k, v)):
        np.testing.assert_allclose(
            captured[f"layer0.{name}"], tensor.numpy(), rtol=1e-5, atol=1e-5, err_msg=name
        )
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    layers = frontier.layers_of(captured)
    rows = frontier.sweep(layers, ["window"], ["1/4"], ["prefill"], repeats=1, min_seconds=0)
    assert len(rows) == 2 * 2 * 4  # 2 layers x (dense + window) x 4 query heads
