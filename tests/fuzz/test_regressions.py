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
    # A ring KVCache adopted a length near 2**63 and an append overflowed the position (it
    # became negative); now the append is rejected and the length kept.
    "kv_cache_ring_length_overflow": (
        "keys = mk((1, 1, 4, 2), 'float32')\nvalues = mk((1, 1, 4, 2), 'float32')\n"
        "step = mk((1, 1, 1, 2), 'float32')",
        "cache = foveal.KVCache.wrap(keys, values, ring=True, lengths=[2**63 - 1])\n"
        "try:\n    cache.append(step, step)\nexcept ValueError:\n    pass\n"
        "assert cache.lengths == [2**63 - 1], cache.lengths",
    ),
    # A ring append looped over every one of its n steps, also those a later step overwrites:
    # an empty k (Hkv = 0) with n = 2**40 hung.
    "kv_cache_ring_append_huge_n": (
        "import numpy as np\n"
        "k = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (1, 0, 2**40, 2), "
        "(0, 0, 0, 0))",
        "cache = foveal.KVCache(1, 0, 4, 2, ring=True)\ncache.append(k, k)\n"
        "assert cache.lengths == [2**40], cache.lengths",
    ),
    # merge_states checked every lse element in a loop over B and H even when the lse was empty:
    # B = 2**40 with H = 0 hung.
    "merge_states_huge_empty": (
        "import numpy as np\nz = np.zeros(1, np.float32)\n"
        "o = np.lib.stride_tricks.as_strided(z, (2**40, 0, 1, 4), (0, 0, 0, 0))\n"
        "l = np.lib.stride_tricks.as_strided(z, (2**40, 0, 1), (0, 0, 0))",
        "r = foveal.merge_states(o, l, o, l)\nexpect(r[0], o.shape, o)",
    ),
    # pde_ssm built the block's multiplier table and transform plan for the grid even for an
    # empty batch: x [0, 4, 2**31 + 1, 3] hung.
    "pde_ssm_empty_batch_huge_grid": (
        "x = mk((0, 4, 2**31 + 1, 3), 'float32', 'zero')",
        "r = foveal.pde_ssm.pde_ssm(x, [0.1, 0.0, 0.1], [0.0, 0.0], [0.0], [1.0], "
        "mode='forced')\nexpect(r, x.shape, x)",
    ),
    # attention converted a boolean bias to 0 / -inf in a loop over its leading extents even
    # when it was empty: bias [2**40, 0, 4] (Hq = 2**40, Lq = 0) hung.
    "attention_empty_bool_bias_huge_heads": (
        "import numpy as np\nas_strided = np.lib.stride_tricks.as_strided\n"
        "q = as_strided(np.zeros(1, np.float32), (1, 2**40, 0, 8), (0, 0, 0, 4))\n"
        "k = mk((1, 1, 4, 8), 'float32')\nv = mk((1, 1, 4, 8), 'float32')\n"
        "bias = as_strided(np.ones(1, bool), (2**40, 0, 4), (0, 0, 1))",
        "r = foveal.attention(q, k, v, bias=bias)\nexpect(r, (1, 2**40, 0, 8), q)",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_regression(name, runner):
    setup, call = CASES[name]
    status, detail = runner.run(setup, call)
    assert status == "ok", f"{name}: {status}: {detail}"
