"""Findings of the fuzzers, fixed, kept as fixed cases (each in the child process)."""

from __future__ import annotations

import pytest

CASES = {
    # sparsek.linear_scores looped over all B * L rows even with H = 0 (an empty output):
    # a stride-0 x of 2**40 rows hung.
    "linear_scores_empty_output_huge_rows": (
        "x = mk((1, 2**40, 0), 'float32', 'zero')\nw = mk((0, 0), 'float32')",
        "r = foveal.sparsek.linear_scores(x, w)\nexpect(r, (1, 0, 2**40), x)",
    ),
    # foveal.torch.pde_ssm called .detach() on every parameter: numbers and lists (accepted by
    # foveal.pde_ssm) raised AttributeError.
    "torch_pde_ssm_number_parameters": (
        "import torch\nx = torch.ones(1, 3, 3, 2)",
        "import foveal.torch\n"
        "r = foveal.torch.pde_ssm(x, [0.1, 0.0, 0.1], [0.0, 0.0], 0.0, 1.0, 0.5)\n"
        "expect(r, (1, 3, 3, 2), x)",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_regression(name, runner):
    setup, call = CASES[name]
    status, detail = runner.run(setup, call)
    assert status == "ok", f"{name}: {status}: {detail}"
