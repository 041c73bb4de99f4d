"""Smoke run of examples/training/sparsek_recall.py: a few steps of each attention variant (dense,
SparseK, sliding window) on the recall task; the training loss must fall for every one."""

from __future__ import annotations


def test_sparsek_recall_smoke_run_lowers_the_loss_of_every_model(smoke_run):
    results = smoke_run("sparsek_recall")
    assert [r["kind"] for r in results] == ["dense", "sparsek", "window"]
    for result in results:
        losses = result["losses"]
        assert sum(losses[-5:]) < sum(losses[:5]), result["kind"]
