"""Smoke run of examples/training/pde_dit_flow.py: a few flow-matching steps of the PDE-SSM and
the attention DiT; the training loss must fall for both, at matched parameter counts."""

from __future__ import annotations


def test_pde_dit_smoke_run_lowers_the_loss_of_both_models(smoke_run):
    results = smoke_run("pde_dit_flow")
    assert [r["kind"] for r in results] == ["pde", "attention"]
    pde, attention = results
    assert abs(pde["parameters"] - attention["parameters"]) < 0.01 * attention["parameters"]
    for result in results:
        losses = result["losses"]
        assert sum(losses[-5:]) < sum(losses[:5]), result["kind"]
        assert result["samples"].shape[1:] == (1, 32, 32)
