"""foveal.sparsek_attention, sparsek_select, prefix_thresholds, linear_scores and the "sparsek"
registry kernel against a float64 numpy reference written here (docs/sparsek.md), and for gate
"none" also against torch's scaled_dot_product_attention with the reference's selection as
its boolean mask.

Query i sits at position q_offset + i (default Lk - Lq). It always sees the sinks (j <
sink_tokens, j <= position when causal) and, when causal, the window (position - window < j <=
position). Its pool is sink_tokens <= j <= position - window (causal) or sink_tokens <= j < Lk
(non-causal); it selects the topk keys of the pool with the largest u (ties: lower index) with
gates SPARSEK(u_pool, topk).
"""

from __future__ import annotations

import math

import foveal
import numpy as np
import pytest
from conftest import DTYPES, assert_close, assert_rounded, on_amx_tiles
from foveal import sparsek as sk

GATES = ["value", "kv", "none"]

# ---------------------------------------------------------------------------------------------
# The float64 reference.


def sparsek_projection(z: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(p, tau) of SPARSEK(z, k) for one row by sort-and-scan: f(tau) = sum clip(z - tau, 0, 1)
    is piecewise linear with breakpoints z and z - 1; walk them downwards until f reaches k."""
    z = np.asarray(z, dtype=np.float64)
    n = z.size
    if k >= n:
        return np.ones(n), -math.inf
    points = np.concatenate([z, z - 1])
    changes = np.concatenate([np.ones(n), -np.ones(n)])
    order = np.lexsort((-changes, -points))  # descending position, a "+1" before a "-1"
    f, slope, previous = 0.0, 0.0, points[order[0]]
    tau = previous
    for position, change in zip(points[order], changes[order]):
        f_here = f + slope * (previous - position)
        if f_here >= k:
            tau = previous - (k - f) / slope
            break
        f, previous, slope = f_here, position, slope + change
        tau = previous
    return np.clip(z - tau, 0.0, 1.0), float(tau)


def threshold_interval(z: np.ndarray, k: int) -> tuple[float, float]:
    """Every tau solving SPARSEK(z, k): with z_(k) the k-th largest score, [z_(k+1), z_(k) - 1]
    when that gap is at least 1 (the top k all 1, the rest 0), else the one point sort-and-scan
    finds; (-inf, -inf) for k >= n."""
    _, tau = sparsek_projection(z, k)
    if k >= z.size:
        return tau, tau
    descending = np.sort(z)[::-1]
    if descending[k - 1] - 1 >= descending[k]:
        return float(descending[k]), float(descending[k - 1] - 1)
    return tau, tau


def top_k(u: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The k candidates with the largest u (ties: lower index first), increasing."""
    order = np.lexsort((candidates, -u[candidates]))
    return np.sort(candidates[order][:k])


def query_positions(len_q: int, len_k: int, q_offset) -> np.ndarray:
    return (len_k - len_q if q_offset is None else q_offset) + np.arange(len_q)


def pool_of(position: int, len_k: int, window: int, sink_tokens: int, causal: bool) -> np.ndarray:
    keys = np.arange(sink_tokens, len_k)
    return keys[keys <= position - window] if causal else keys


def reference_select(u, topk, len_q, window=0, sink_tokens=0, causal=True, q_offset=None):
    """u [B, Hkv, Lk] -> indices [B, Hkv, Lq, topk] (increasing, -1 padded), gates (0 there)."""
    u = np.asarray(u, dtype=np.float64)
    batch, heads_kv, len_k = u.shape
    indices = np.full((batch, heads_kv, len_q, topk), -1, dtype=np.int64)
    gates = np.zeros((batch, heads_kv, len_q, topk))
    for b in range(batch):
        for h in range(heads_kv):
            row = u[b, h]
            for i, position in enumerate(query_positions(len_q, len_k, q_offset)):
                pool = pool_of(position, len_k, window, sink_tokens, causal)
                pool_gates, _ = sparsek_projection(row[pool], topk)
                keys = top_k(row, pool, topk)
                indices[b, h, i, : keys.size] = keys
                gates[b, h, i, : keys.size] = pool_gates[np.searchsorted(pool, keys)]
    return indices, gates


def reference_key_gates(u, len_q, topk, window=0, sink_tokens=0, causal=True, q_offset=None):
    """(visible [B, Hkv, Lq, Lk] bool, gate [B, Hkv, Lq, Lk]): sinks and window with gate 1,
    the selection with its SPARSEK gates."""
    u = np.asarray(u, dtype=np.float64)
    batch, heads_kv, len_k = u.shape
    position = query_positions(len_q, len_k, q_offset)[:, None]
    key = np.arange(len_k)[None, :]
    always = (key < sink_tokens) & ((key <= position) if causal else True)
    if causal:
        always = always | ((key > position - window) & (key <= position))
    visible = np.broadcast_to(always, (batch, heads_kv, len_q, len_k)).copy()
    gate = visible.astype(np.float64)
    indices, gates = reference_select(u, topk, len_q, window, sink_tokens, causal, q_offset)
    for b, h, i, slot in zip(*np.nonzero(indices >= 0)):
        visible[b, h, i, indices[b, h, i, slot]] = True
        gate[b, h, i, indices[b, h, i, slot]] = gates[b, h, i, slot]
    return visible, gate


def reference_sparsek_attention(
    q, k, v, u, topk, window=0, sink_tokens=0, gate="value", causal=True, scale=None,
    softcap=0.0, q_offset=None,
):  # fmt: skip
    """(out [B, Hq, Lq, Dv], lse [B, Hq, Lq]) in float64: a dense softmax over the visible keys
    with value: l = cap(s q.k), O = sum softmax(l) g v; kv: l = cap(s g q.k), O = sum
    softmax(l) g v; none: g = 1. A query that sees no key: O = 0, lse = -inf."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    heads_q, len_q, dim = q.shape[1], q.shape[2], q.shape[3]
    group = heads_q // k.shape[1]
    visible, gates = reference_key_gates(u, len_q, topk, window, sink_tokens, causal, q_offset)
    visible, gates = (np.repeat(x, group, axis=1) for x in (visible, gates))
    if gate == "none":
        gates = np.ones_like(gates)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if gate == "kv":
        logits = logits * gates
    if softcap > 0:
        logits = softcap * np.tanh(logits / softcap)
    any_visible = visible.any(axis=-1)
    row_max = np.where(any_visible, np.where(visible, logits, -np.inf).max(axis=-1), 0.0)
    weights = np.where(visible, np.exp(logits - row_max[..., None]), 0.0)
    row_sum = np.where(any_visible, weights.sum(axis=-1), 1.0)
    out = np.einsum("bhij,bhjd->bhid", weights * gates / row_sum[..., None], v)
    with np.errstate(divide="ignore"):
        lse = np.where(any_visible, row_max + np.log(row_sum), -np.inf)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Inputs.


def make_inputs(rng, shape, dtype, integer_scores=False):
    """q, k, v ~ N(0, 1) and u ~ N(0, 1.5^2) (or small integers, many ties) as `dtype`."""
    batch, heads_q, heads_kv, len_q, len_k, dim, dim_v = shape
    q = rng.standard_normal((batch, heads_q, len_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, heads_kv, len_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads_kv, len_k, dim_v)).astype(dtype)
    if integer_scores:
        u = rng.integers(0, 5, (batch, heads_kv, len_k)).astype(dtype)
    else:
        u = (1.5 * rng.standard_normal((batch, heads_kv, len_k))).astype(dtype)
    return q, k, v, u


# (B, Hq, Hkv, Lq, Lk, D, Dv): GQA, MQA, Lq > Lk, a single query, past a 64-row tile.
SHAPES = [
    (2, 4, 2, 13, 29, 8, 5),
    (1, 3, 1, 37, 11, 7, 7),
    (1, 1, 1, 1, 70, 16, 3),
    (1, 2, 2, 131, 131, 5, 9),
]

# (topk, window, sink_tokens, causal)
SETTINGS = [(1, 0, 0, True), (7, 3, 2, True), (5, 0, 3, False), (64, 33, 0, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(dtype, gate, shape):
    rng = np.random.default_rng(sum(shape) + GATES.index(gate))
    q, k, v, u = make_inputs(rng, shape, dtype, integer_scores=shape[4] == 11)
    for topk, window, sinks, causal in SETTINGS:
        options = dict(window=window, sink_tokens=sinks, gate=gate, causal=causal)
        out, lse = foveal.sparsek_attention(q, k, v, u, topk, return_lse=True, **options)
        assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[3])
        assert lse.dtype == dtype and lse.shape == q.shape[:3]
        want_out, want_lse = reference_sparsek_attention(q, k, v, u, topk, **options)
        assert_close(out, want_out, dtype, f"out {options} topk={topk}")
        assert_close(lse, want_lse, dtype, f"lse {options} topk={topk}")


@pytest.mark.parametrize("gate", GATES)
def test_scale_softcap_and_q_offset_match_reference(gate):
    rng = np.random.default_rng(7)
    q, k, v, u = make_inputs(rng, (1, 4, 2, 20, 45, 8, 8), np.float64)
    for options in [
        dict(scale=0.3),
        dict(softcap=2.0),
        dict(scale=2.0, softcap=0.7),
        dict(q_offset=0),
        dict(q_offset=30, window=4, sink_tokens=1),
    ]:
        out, lse = foveal.sparsek_attention(q, k, v, u, 6, gate=gate, return_lse=True, **options)
        want_out, want_lse = reference_sparsek_attention(q, k, v, u, 6, gate=gate, **options)
        assert_close(out, want_out, np.float64, f"out {options}")
        assert_close(lse, want_lse, np.float64, f"lse {options}")


def test_queries_before_every_key_get_zero_and_minus_infinity():
    rng = np.random.default_rng(8)
    q, k, v, u = make_inputs(rng, (1, 2, 1, 30, 10, 4, 4), np.float32)
    out, lse = foveal.sparsek_attention(q, k, v, u, 3, sink_tokens=2, return_lse=True)
    assert np.all(out[:, :, :20] == 0) and np.all(np.isneginf(lse[:, :, :20]))
    assert np.all(np.isfinite(lse[:, :, 20:]))


def test_gate_none_matches_torch_sdpa(torch):
    """Hard top-k is ordinary attention under the selection's boolean mask."""
    rng = np.random.default_rng(9)
    shape = (2, 4, 2, 70, 90, 16, 12)
    q, k, v, u = make_inputs(rng, shape, np.float64)
    for topk, window, sinks, causal in SETTINGS:
        out = foveal.sparsek_attention(
            torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(u),
            topk, window=window, sink_tokens=sinks, gate="none", causal=causal,
        )  # fmt: skip
        visible, _ = reference_key_gates(u, shape[3], topk, window, sinks, causal)
        group = shape[1] // shape[2]
        mask = torch.from_numpy(np.repeat(visible, group, axis=1))
        want = torch.nn.functional.scaled_dot_product_attention(
            torch.from_numpy(q),
            torch.from_numpy(np.repeat(k, group, axis=1)),
            torch.from_numpy(np.repeat(v, group, axis=1)),
            attn_mask=mask,
        )
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


def test_torch_inputs_out_and_lse(torch):
    rng = np.random.default_rng(10)
    q, k, v, u = (torch.from_numpy(x) for x in make_inputs(rng, (2, 2, 1, 9, 17, 4, 6), np.float32))
    out, lse = foveal.sparsek_attention(q, k, v, u, 4, window=2, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert isinstance(lse, torch.Tensor) and lse.shape == (2, 2, 9)
    given = torch.empty(2, 2, 9, 6)
    assert foveal.sparsek_attention(q, k, v, u, 4, window=2, out=given) is given
    assert torch.equal(given, out)
    # [B, L, H, D] memory passed as a transposed view.
    q_blhd = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_blhd = k.transpose(1, 2).contiguous().transpose(1, 2)
    strided = foveal.sparsek_attention(q_blhd, k_blhd, v, u, 4, window=2)
    want_out, _ = reference_sparsek_attention(q, k, v, u, 4, window=2)
    assert_close(strided, want_out, np.float32)


def test_every_key_selected_without_gates_is_dense_attention():
    rng = np.random.default_rng(11)
    for shape in [(1, 4, 2, 70, 70, 16, 16), (2, 2, 1, 5, 130, 8, 3), (1, 3, 3, 40, 20, 4, 4)]:
        for dtype in DTYPES:
            q, k, v, u = make_inputs(rng, shape, dtype)
            for causal in (True, False):
                got = foveal.sparsek_attention(q, k, v, u, shape[4] + 1, gate="none", causal=causal)
                assert np.array_equal(got, foveal.attention(q, k, v, causal=causal)), (
                    shape,
                    dtype,
                    causal,
                )


def test_thread_counts_give_identical_bits():
    rng = np.random.default_rng(12)
    q, k, v, u = make_inputs(rng, (2, 4, 2, 150, 200, 16, 16), np.float32)
    results = [
        foveal.sparsek_attention(q, k, v, u, 20, window=9, sink_tokens=2, num_threads=threads)
        for threads in (1, 2, 3)
    ]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


# ---------------------------------------------------------------------------------------------
# Selection, thresholds, scorer.


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_matches_reference(dtype):
    rng = np.random.default_rng(13)
    for len_q, len_k in [(1, 1), (9, 40), (40, 9), (33, 33)]:
        for integer_scores in (False, True):
            u = make_inputs(rng, (2, 2, 2, 1, len_k, 1, 1), dtype, integer_scores)[3]
            for topk, window, sinks, causal in [*SETTINGS, (len_k + 2, 1, 1, True)]:
                for q_offset in (None, 0, len_k // 2):
                    options = dict(
                        window=window, sink_tokens=sinks, causal=causal, q_offset=q_offset
                    )
                    indices, gates = sk.sparsek_select(u, topk, len_q, **options)
                    want_indices, want_gates = reference_select(u, topk, len_q, **options)
                    assert indices.dtype == np.int64 and gates.dtype == dtype
                    np.testing.assert_array_equal(indices, want_indices, err_msg=str(options))
                    atol = 1e-5 if dtype == np.float32 else 1e-12
                    np.testing.assert_allclose(gates, want_gates, atol=atol, err_msg=str(options))
                    assert np.all(gates[indices < 0] == 0)


def test_select_with_torch_scores(torch):
    u = torch.tensor([[[2.0, 1.0, 1.0, 1.0, 0.0, 1.0]]], dtype=torch.float64)
    indices, gates = sk.sparsek_select(u, 2, 1, causal=False)
    assert isinstance(indices, torch.Tensor) and indices.dtype == torch.int64
    assert indices.tolist() == [[[[0, 1]]]]
    torch.testing.assert_close(gates, torch.tensor([[[[1.0, 0.25]]]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_thresholds_match_reference(dtype):
    rng = np.random.default_rng(14)
    for n in (1, 2, 7, 13, 64, 97):
        for integer_scores in (False, True):
            if integer_scores:
                z = rng.integers(0, 5, (2, 3, n)).astype(dtype)
            else:
                z = (2 * rng.standard_normal((2, 3, n))).astype(dtype)
            for k in sorted({1, 2, 5, max(1, n // 2), n, n + 3}):
                tau, evicted_at = sk.prefix_thresholds(z, k, return_evicted=True)
                assert tau.shape == z.shape and tau.dtype == dtype
                assert evicted_at.shape == z.shape and evicted_at.dtype == np.int64
                assert np.array_equal(sk.prefix_thresholds(z, k), tau)
                slack = 8 * np.finfo(dtype).eps + 64 * n * np.finfo(np.float64).eps
                for row in np.ndindex(z.shape[:-1]):
                    scores = z[row].astype(np.float64)
                    for m in range(1, n + 1):
                        low, high = threshold_interval(scores[:m], k)
                        if m <= k:
                            assert tau[row][m - 1] == -np.inf
                        else:
                            tolerance = slack * (1 + max(abs(low), abs(high)))
                            assert low - tolerance <= tau[row][m - 1] <= high + tolerance, (n, k, m)
                        selected = np.nonzero(evicted_at[row][:m] > m)[0]
                        np.testing.assert_array_equal(
                            selected, top_k(scores, np.arange(m), k), err_msg=f"n={n} k={k} m={m}"
                        )


def test_prefix_thresholds_never_decrease():
    z = np.random.default_rng(15).standard_normal((3, 5000)).astype(np.float32)
    for k in (1, 16, 300):
        tau = sk.prefix_thresholds(z, k)
        assert np.all(np.diff(tau[:, k:], axis=-1) >= 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_scores_match_reference(dtype):
    rng = np.random.default_rng(16)
    x = rng.standard_normal((2, 37, 11)).astype(dtype)
    w = rng.standard_normal((3, 11)).astype(dtype)
    for slope in (0.0, 0.01, -2.0):
        u = sk.linear_scores(x, w, slope=slope)
        want = np.einsum("bld,hd->bhl", x.astype(np.float64), w.astype(np.float64))
        want = want + slope * np.arange(37)
        assert u.shape == (2, 3, 37) and u.dtype == dtype
        assert_close(u, want, dtype, f"slope={slope}")


# ---------------------------------------------------------------------------------------------
# The registry.


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("causal", [True, False])
def test_registry_kernel_equals_direct_call(gate, causal):
    rng = np.random.default_rng(17)
    q, k, v, u = make_inputs(rng, (2, 4, 2, 30, 50, 8, 8), np.float32)
    window = 3 if causal else 0
    kernel = foveal.make_attention(
        "sparsek", topk=5, window=window, sink_tokens=2, gate=gate, causal=causal
    )
    assert kernel.name == "sparsek" and "sparsek" in foveal.attention_kernel_names()
    out, lse = kernel(q, k, v, u=u, return_lse=True)
    want_out, want_lse = foveal.sparsek_attention(
        q, k, v, u, 5, window=window, sink_tokens=2, gate=gate, causal=causal, return_lse=True
    )
    assert np.array_equal(out, want_out) and np.array_equal(lse, want_lse)


# ---------------------------------------------------------------------------------------------
# Rejected input.


def small_inputs(dtype=np.float32):
    return make_inputs(np.random.default_rng(18), (2, 4, 2, 5, 7, 3, 6), dtype)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (dict(topk=0), "topk"),
        (dict(topk=-2), "topk"),
        (dict(window=-1), "window"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(causal=False, window=2), "window"),
        (dict(gate="soft"), "gate.*value.*kv.*none|gate.*soft"),
        (dict(scale=float("nan")), "scale"),
        (dict(softcap=float("nan")), "softcap"),
    ],
)
def test_bad_options_raise_value_error(change, pattern):
    q, k, v, u = small_inputs()
    arguments = dict(topk=3)
    arguments.update(change)
    topk = arguments.pop("topk")
    with pytest.raises(ValueError, match=pattern):
        foveal.sparsek_attention(q, k, v, u, topk, **arguments)


def test_unknown_gate_names_the_choices():
    q, k, v, u = small_inputs()
    with pytest.raises(ValueError) as error:
        foveal.sparsek_attention(q, k, v, u, 3, gate="soft")
    for choice in ("value", "kv", "none"):
        assert choice in str(error.value)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_score_shape_mismatch_names_the_dimension(dim):
    q, k, v, u = small_inputs()
    shape = list(u.shape)
    shape[dim] += 1
    with pytest.raises(ValueError, match=rf"u\.shape\[{dim}\]|u must have shape"):
        foveal.sparsek_attention(q, k, v, np.zeros(shape, np.float32), 3)


def test_score_rank_and_dtype_are_checked():
    q, k, v, u = small_inputs()
    with pytest.raises(ValueError, match="u must have 3 dimensions"):
        foveal.sparsek_attention(q, k, v, u[0], 3)
    with pytest.raises(TypeError, match="u must have dtype float32"):
        foveal.sparsek_attention(q, k, v, u.astype(np.float64), 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_name_the_position(bad):
    q, k, v, u = small_inputs()
    u[1, 0, 4] = bad
    out = np.full((2, 4, 5, 6), 7.0, np.float32)
    position = r"(finite.*u\[1, 0, 4\]|u\[1, 0, 4\].*finite)"
    with pytest.raises(ValueError, match=position):
        foveal.sparsek_attention(q, k, v, u, 3, out=out)
    assert np.all(out == 7.0), "out was written before the error"
    with pytest.raises(ValueError, match=position):
        sk.sparsek_select(u, 3, 5)


def test_query_heads_must_be_a_multiple_of_key_heads():
    q, k, v, u = small_inputs()
    with pytest.raises(ValueError, match="multiple"):
        foveal.sparsek_attention(q[:, :3], k, v, u, 3)


def test_bad_selection_threshold_and_scorer_arguments():
    u = small_inputs()[3]
    with pytest.raises(ValueError, match="topk"):
        sk.sparsek_select(u, 0, 5)
    with pytest.raises(ValueError, match="window"):
        sk.sparsek_select(u, 2, 5, window=-1)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sk.prefix_thresholds(np.zeros((2, 4)), 0)
    z = np.zeros((2, 4))
    z[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"(finite.*z\[1, 2\]|z\[1, 2\].*finite)"):
        sk.prefix_thresholds(z, 1)
    with pytest.raises(ValueError, match="slope"):
        sk.linear_scores(np.zeros((1, 3, 2)), np.zeros((2, 2)), slope=float("nan"))
    with pytest.raises(ValueError, match=r"w"):
        sk.linear_scores(np.zeros((1, 3, 2)), np.zeros((2, 3)))


def test_registry_rejects_bad_params():
    with pytest.raises(ValueError, match="topk"):
        foveal.make_attention("sparsek", topk=0, causal=True)
    with pytest.raises(ValueError, match="gate"):
        foveal.make_attention("sparsek", topk=3, gate="soft", causal=True)


def test_empty_batch_and_no_queries_are_no_ops():
    for shape in [(0, 2, 1, 5, 7, 4, 4), (2, 2, 1, 0, 7, 4, 4)]:
        q, k, v, u = make_inputs(np.random.default_rng(19), shape, np.float32)
        out, lse = foveal.sparsek_attention(q, k, v, u, 3, return_lse=True)
        assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and out.size == 0
        assert lse.size == 0


# ---------------------------------------------------------------------------------------------
# 16-bit storage: q, k, v, u and out in bfloat16 or float16, lse float32.

# (B, Hq, Hkv, Lq, Lk, D, Dv): odd dims (the float kernels), AMX-shaped dims (D % 32, Dv % 16)
# with many rows per head, and a single query.
HALF_SHAPES = [(2, 4, 2, 37, 53, 7, 5), (1, 4, 1, 150, 203, 64, 32), (1, 2, 2, 1, 70, 32, 16)]


def _half_inputs(torch, rng, shape, half, integer_scores=False):
    arrays = make_inputs(rng, shape, np.float32, integer_scores)
    return [torch.from_numpy(x).to(half) for x in arrays]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", HALF_SHAPES)
@pytest.mark.parametrize("settings", SETTINGS)
def test_half_storage_is_the_float32_call_rounded(torch, dtype_name, shape, settings):
    # The scores are widened exactly, so the selection and the gates are the float32 call's on
    # the same values, and so is out (rounded) and lse; where a bfloat16 call runs on AMX tiles,
    # within bfloat16 rounding.
    half = getattr(torch, dtype_name)
    topk, window, sinks, causal = settings
    rng = np.random.default_rng(sum(shape) + topk)
    for gate in GATES:
        q, k, v, u = _half_inputs(torch, rng, shape, half, integer_scores=gate == "none")
        options = dict(window=window, sink_tokens=sinks, causal=causal, gate=gate)
        out, lse = foveal.sparsek_attention(q, k, v, u, topk, return_lse=True, **options)
        want, want_lse = foveal.sparsek_attention(
            *(x.float() for x in (q, k, v, u)), topk, return_lse=True, **options
        )
        assert out.dtype == half and lse.dtype == torch.float32
        # Tiles of more than 8 rows (query rows per kv head) may run on AMX.
        many_rows = shape[3] * shape[1] // shape[2] > 8
        if many_rows and on_amx_tiles(half, shape[5], shape[6]):
            assert_rounded(out, want, shape[5], shape[6], lse, want_lse)
        else:
            assert torch.equal(out, want.to(half)), gate
            assert torch.equal(lse, want_lse), gate


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("gate", GATES)
def test_half_storage_error_is_within_twice_plain_torch(torch, dtype_name, gate):
    # FlashAttention's rule: against float64, foveal's 16-bit error is at most twice that of a
    # plain implementation in the same dtype (torch: logits, masked softmax, gates and the
    # product with v, all in 16 bits), on the reference's selection and gates.
    half = getattr(torch, dtype_name)
    shape = (1, 4, 2, 96, 300, 64, 64)
    rng = np.random.default_rng(71 + GATES.index(gate))
    q, k, v, u = _half_inputs(torch, rng, shape, half)
    options = dict(window=16, sink_tokens=2)
    wide = [x.double().numpy() for x in (q, k, v, u)]
    want, _ = reference_sparsek_attention(*wide, 24, gate=gate, **options)
    out = foveal.sparsek_attention(q, k, v, u, 24, gate=gate, **options)

    visible, gates = reference_key_gates(wide[3], shape[3], 24, **options)
    group = shape[1] // shape[2]
    visible = torch.from_numpy(np.repeat(visible, group, axis=1))
    gates = torch.from_numpy(np.repeat(gates, group, axis=1)).to(half)
    if gate == "none":
        gates = torch.ones_like(gates)
    keys, values = (x.repeat_interleave(group, dim=1) for x in (k, v))
    logits = (q @ keys.transpose(-1, -2)) * torch.tensor(1 / math.sqrt(shape[5]), dtype=half)
    if gate == "kv":
        logits = logits * gates
    weights = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
    plain = (weights * gates) @ values

    error = np.abs(out.double().numpy() - want).max()
    plain_error = np.abs(plain.double().numpy() - want).max()
    assert error <= 2 * plain_error, (error, plain_error)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_storage_trains_through_foveal_torch(torch, dtype_name):
    # foveal.torch.sparsek_attention on 16-bit leaves: 16-bit gradients, those of the float32
    # backward on the same values (run on widened copies) within the dtype's rounding.
    import foveal.torch as ft

    half = getattr(torch, dtype_name)
    shape = (1, 4, 2, 40, 40, 16, 8)
    rng = np.random.default_rng(5)
    leaves = [x.requires_grad_() for x in _half_inputs(torch, rng, shape, half)]
    grad_out = torch.from_numpy(rng.standard_normal((1, 4, 40, 8)).astype(np.float32))
    options = dict(window=4, sink_tokens=1, gate="value")
    out = ft.sparsek_attention(*leaves, 6, **options)
    out.backward(grad_out.to(half))
    wide = [x.detach().float().requires_grad_() for x in leaves]
    ft.sparsek_attention(*wide, 6, **options).backward(grad_out.to(half).float())
    assert out.dtype == half
    for leaf, reference in zip(leaves, wide):
        assert leaf.grad.dtype == half
        scale = reference.grad.abs().max().clamp_min(1e-6)
        assert ((leaf.grad.float() - reference.grad).abs().max() / scale).item() <= 2e-2


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_half_storage_thread_counts_give_identical_bits(torch, dtype_name):
    # D 32, Dv 16 and 8 rows per kv head: bfloat16 runs on AMX tiles where the CPU has them.
    half = getattr(torch, dtype_name)
    q, k, v, u = _half_inputs(torch, np.random.default_rng(13), (2, 8, 2, 150, 200, 32, 16), half)
    results = [
        foveal.sparsek_attention(
            q, k, v, u, 20, window=9, sink_tokens=2, return_lse=True, num_threads=threads
        )
        for threads in (1, 2, 3)
    ]
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])


def test_half_storage_rejects_mixed_dtypes(torch):
    q = torch.zeros((1, 1, 3, 4), dtype=torch.bfloat16)
    u = torch.zeros((1, 1, 3), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="u must have dtype bfloat16"):
        foveal.sparsek_attention(q, q, q, u.float(), 2)
    with pytest.raises(TypeError, match="k must have dtype bfloat16"):
        foveal.sparsek_attention(q, q.half(), q, u, 2)
    out = torch.full((1, 1, 3, 4), 7.0, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="lse"):
        foveal._core.sparsek_attention(
            q, q, q, u, out, torch.zeros((1, 1, 3), dtype=torch.bfloat16), topk=2
        )
    assert bool((out == 7).all()), "out changed"
