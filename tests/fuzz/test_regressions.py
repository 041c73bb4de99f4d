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
    # sparsek allocated per-thread scratch of n scores even with no rows: z [0, 2**40] (a
    # stride-0 view) raised MemoryError instead of returning an empty p.
    "sparsek_no_rows_huge_n": (
        "z = mk((0, 2**40), 'float32', 'zero')",
        "r = foveal.sparsek.sparsek(z, 3)\nexpect(r, (0, 2**40), z)",
    ),
    # ... and one flag per row before checking the scores: z [2**31, 0] asked for 16 GiB.
    "sparsek_huge_rows_empty": (
        "z = mk((2**31, 0), 'float64', 'zero')",
        "r = foveal.sparsek.sparsek(z, 2)\nexpect(r, (2**31, 0), z)",
    ),
    # sparsek_select checked u's scores in a loop over B even when u was empty: u [2**40, 0, 3]
    # hung.
    "sparsek_select_empty_u_huge_batch": (
        "u = mk((2**40, 0, 3), 'float32', 'zero')",
        "i, g = foveal.sparsek.sparsek_select(u, 2, 1)\nexpect(i, (2**40, 0, 1, 2), u, 'int64')",
    ),
    # prefix_thresholds checked z's scores in a loop over its rows even when z was empty:
    # z [2**40, 0] hung.
    "prefix_thresholds_huge_rows_empty": (
        "z = mk((2**40, 0), 'float32', 'zero')",
        "r = foveal.sparsek.prefix_thresholds(z, 2)\nexpect(r, (2**40, 0), z)",
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
