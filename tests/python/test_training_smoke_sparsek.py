"""Smoke run of examples/training/sparsek_recall.py: a few steps of each attention variant (dense,
SparseK, sliding window) on the recall task; the training loss must fall for every one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import foveal  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "training" / "sparsek_recall.py"


def test_sparsek_recall_smoke_run_lowers_the_loss_of_every_model():
    spec = importlib.util.spec_from_file_location("sparsek_recall", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    saved = torch.get_num_threads(), foveal.get_num_threads()
    try:
        results = script.main(["--smoke"])  # asserts the loss falls, writes nothing
    finally:  # the script fixes its thread count
        torch.set_num_threads(saved[0])
        foveal.set_num_threads(saved[1])
    assert [r["kind"] for r in results] == ["dense", "sparsek", "window"]
    for result in results:
        losses = result["losses"]
        assert sum(losses[-5:]) < sum(losses[:5]), result["kind"]
