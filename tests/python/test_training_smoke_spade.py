"""Smoke run of examples/training/spade_showers.py: a few steps of the SPADE shower model (the
trainable foveal.torch.SpadeEmbedding under a small transformer), then generation through
foveal.spade.Decoder; the training loss must fall and every distance be finite."""

from __future__ import annotations

import math


def test_spade_showers_smoke_run_lowers_the_loss_and_generates(smoke_run):
    results = smoke_run("spade_showers")
    assert [r["kind"] for r in results] == ["spade"]
    losses = results[0]["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert set(results[0]["trained"]) == {"z", "x", "y", "log E", "hits"}
    assert all(math.isfinite(value) for value in results[0]["trained"].values())
    generated = results[0]["generated"]
    assert len(generated["hits"]) == 16 and (generated["hits"] <= 24).all()
    assert ((generated["x"] >= 1) & (generated["x"] <= 30)).all()
