"""The smoke mode of training run 3 (examples/training/vqvae_collapse.py, docs/training.md):
a few steps of each VQ-VAE setup, in-process; the script asserts that every loss falls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "training" / "vqvae_collapse.py"


def test_vqvae_collapse_smoke():
    spec = importlib.util.spec_from_file_location("vqvae_collapse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke"])
    assert [r["setup"]["name"] for r in results] == [s["name"] for s in module.SETUPS]
    used = {r["setup"]["name"]: r["history"][-1]["codes_used"] for r in results}
    # Even after a few steps the fix shows: k-means init + restart keeps more codes in use.
    assert used["k-means + restart, weak encoder"] > used["random init, weak encoder"]
    assert used["k-means + restart, strong encoder"] > used["random init, strong encoder"]
