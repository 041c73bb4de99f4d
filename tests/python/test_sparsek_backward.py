"""foveal.sparsek.sparsek_attention_backward and the custom op foveal.torch.sparsek_attention:
gradients to q, k, v and the scores u against torch autograd through a float64 reference built
from the sort-based SPARSEK projection, gradcheck, thread-count invariance, bad input.

The reference: each query's pool and selection as in test_sparsek_attention; its gates
p = clip(u - tau, 0, 1) with tau written as a function of u on the solution's pieces (the
support F = {0 < p < 1} and the ones found by sort-and-scan stay fixed under a small change of
u): tau = (sum_F u - (k - #ones)) / |F|. Autograd through it gives SPARSEK's Jacobian.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from foveal import sparsek as sk
from test_sparsek_attention import pool_of, query_positions, sparsek_projection, top_k

GATES = ["value", "kv", "none"]


def reference(torch, q, k, v, u, topk, window=0, sink_tokens=0, gate="value", causal=True,
              scale=None, softcap=0.0, q_offset=None):  # fmt: skip
    """out [B, Hq, Lq, Dv] as a float64 torch expression of q, k, v and u."""
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = []
    for b in range(batch):
        heads = []
        for h in range(heads_q):
            hk = h // group
            scores = u[b, hk]
            row_outputs = []
            for i, position in enumerate(query_positions(len_q, len_k, q_offset)):
                pool = pool_of(position, len_k, window, sink_tokens, causal)
                gates = torch.zeros(len_k, dtype=torch.float64)
                visible = torch.zeros(len_k, dtype=torch.bool)
                keys = np.arange(len_k)
                always = (keys < sink_tokens) & ((keys <= position) if causal else True)
                if causal:
                    always |= (keys > position - window) & (keys <= position)
                visible[torch.from_numpy(always)] = True
                gates[torch.from_numpy(always)] = 1.0
                if pool.size:
                    p, _ = sparsek_projection(scores[pool].detach().numpy(), topk)
                    pool_index = torch.from_numpy(pool)
                    if topk >= pool.size:
                        pool_gates = torch.ones(pool.size, dtype=torch.float64)
                    else:
                        fractional = torch.from_numpy((p > 0) & (p < 1))
                        ones = int(np.sum(p >= 1))
                        z = scores[pool_index]
                        if bool(fractional.any()):
                            tau = (z[fractional].sum() - (topk - ones)) / fractional.sum()
                            pool_gates = torch.clamp(z - tau, 0.0, 1.0)
                        else:  # every gate 0 or 1: locally constant
                            pool_gates = torch.from_numpy(p)
                    selected = top_k(scores.detach().numpy(), pool, topk)
                    chosen = torch.from_numpy(np.searchsorted(pool, selected))
                    visible[torch.from_numpy(selected)] = True
                    gates = gates.index_put((torch.from_numpy(selected),), pool_gates[chosen])
                if gate == "none":
                    gates = visible.to(torch.float64)
                logits = scale * (k[b, hk] @ q[b, h, i])
                if gate == "kv":
                    logits = logits * gates
                if softcap > 0:
                    logits = softcap * torch.tanh(logits / softcap)
                if not bool(visible.any()):
                    row_outputs.append(torch.zeros(v.shape[3], dtype=torch.float64))
                    continue
                weights = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=0)
                row_outputs.append((weights * gates) @ v[b, hk])
            heads.append(torch.stack(row_outputs))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def inputs(torch, seed, shape):
    """q, k, v ~ N(0, 1), u spread (gaps of at least 0.2 between scores) in float64."""
    batch, heads_q, heads_kv, len_q, len_k, dim, dim_v = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, heads_q, len_q, dim))
    k = rng.standard_normal((batch, heads_kv, len_k, dim))
    v = rng.standard_normal((batch, heads_kv, len_k, dim_v))
    order = np.stack([rng.permutation(len_k) for _ in range(batch * heads_kv)])
    u = 0.37 * order.reshape(batch, heads_kv, len_k) + 0.1 * rng.random((batch, heads_kv, len_k))
    return [torch.from_numpy(x).requires_grad_(True) for x in (q, k, v, u)]


# (B, Hq, Hkv, Lq, Lk, D, Dv), (topk, window, sink_tokens, causal, softcap, q_offset)
CASES = [
    ((1, 2, 1, 9, 9, 4, 3), (3, 0, 0, True, 0.0, None)),
    ((2, 2, 2, 7, 12, 5, 5), (4, 2, 1, True, 0.0, None)),
    ((1, 3, 1, 5, 11, 3, 4), (6, 0, 2, False, 0.0, None)),
    ((1, 2, 1, 6, 10, 4, 2), (2, 1, 1, True, 2.5, 3)),
]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradients_match_autograd_through_the_float64_reference(torch, gate, case):
    shape, (topk, window, sinks, causal, softcap, q_offset) = CASES[case]
    q, k, v, u = inputs(torch, 10 + case, shape)
    options = dict(window=window, sink_tokens=sinks, gate=gate, causal=causal, softcap=softcap,
                   q_offset=q_offset)  # fmt: skip
    expected = reference(torch, q, k, v, u, topk, **options)
    weight = torch.from_numpy(np.random.default_rng(case).standard_normal(expected.shape))
    (expected * weight).sum().backward()
    arrays = [x.detach().numpy() for x in (q, k, v, u)]
    out, lse = sk.sparsek_attention(*arrays, topk, return_lse=True, **options)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=0, atol=1e-12)
    grads = sk.sparsek_attention_backward(*arrays, out, lse, weight.numpy(), topk, **options)
    for name, got, tensor in zip("qkvu", grads, (q, k, v, u)):
        want = np.zeros(got.shape) if tensor.grad is None else tensor.grad.numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9, err_msg=name)
    if gate == "none":
        assert not np.any(grads[3])
    else:
        assert np.any(grads[3]), "a case without fractional gates tests nothing of grad_u"


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck_of_the_custom_op(torch, gate):
    import foveal.torch as ft

    q, k, v, u = inputs(torch, 3, (1, 2, 1, 6, 9, 3, 2))

    def f(q, k, v, u):
        return ft.sparsek_attention(q, k, v, u, 3, window=1, sink_tokens=1, gate=gate)

    assert torch.autograd.gradcheck(f, (q, k, v, u), eps=1e-6, atol=1e-7)


def test_grad_u_trains_a_linear_scorer(torch):
    """The scores' gradient reaches the weights of a scorer in front of the op."""
    import foveal.torch as ft

    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((1, 12, 6)))
    w = torch.from_numpy(rng.standard_normal((1, 6))).requires_grad_(True)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 2, 12, 4))) for _ in range(3))
    k, v = k[:, :1], v[:, :1]
    out = ft.sparsek_attention(q, k, v, torch.einsum("bld,hd->bhl", x, w), 4)
    out.square().sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thread_counts_and_repeated_calls_give_identical_bits(dtype):
    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 4, 70, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, 90, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, 90, 8)).astype(dtype)
    u = rng.standard_normal((2, 2, 90)).astype(dtype)
    grad_out = rng.standard_normal((2, 4, 70, 8)).astype(dtype)
    out, lse = sk.sparsek_attention(q, k, v, u, 16, window=8, return_lse=True)
    first = sk.sparsek_attention_backward(q, k, v, u, out, lse, grad_out, 16, window=8,
                                          num_threads=1)  # fmt: skip
    for threads in (1, 2, 3):
        again = sk.sparsek_attention_backward(q, k, v, u, out, lse, grad_out, 16, window=8,
                                              num_threads=threads)  # fmt: skip
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()


def test_score_grad_false_skips_grad_u_and_torch_in_gives_torch_out(torch):
    q, k, v, u = (x.detach().float() for x in inputs(torch, 4, (1, 2, 2, 5, 8, 4, 4)))
    out, lse = sk.sparsek_attention(q, k, v, u, 3, return_lse=True)
    grads = sk.sparsek_attention_backward(q, k, v, u, out, lse, out, 3, score_grad=False)
    assert grads[3] is None
    assert all(isinstance(g, torch.Tensor) and g.dtype == torch.float32 for g in grads[:3])


def test_bad_input_names_the_argument_and_writes_nothing():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 8, 4)).astype(np.float32)
    u = rng.standard_normal((1, 1, 8)).astype(np.float32)
    out, lse = sk.sparsek_attention(q, k, k, u, 3, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have 3 dimensions"):
        sk.sparsek_attention_backward(q, k, k, u, out, lse[0], out, 3)
    with pytest.raises(TypeError, match=r"grad_out must have dtype float32 \(the dtype of q\)"):
        sk.sparsek_attention_backward(q, k, k, u, out, lse, out.astype(np.float64), 3)
    bad = out.copy()
    bad[0, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"grad_out"):
        sk.sparsek_attention_backward(q, k, k, u, out, lse, bad, 3)
    with pytest.raises(TypeError, match=r"topk must be an int, got str"):
        sk.sparsek_attention_backward(q, k, k, u, out, lse, out, "3")


def test_the_custom_op_passes_opcheck(torch):
    import foveal.torch

    q, k, v, u = inputs(torch, 6, (1, 2, 1, 5, 7, 3, 3))
    torch.library.opcheck(
        torch.ops.foveal.sparsek_attention.default,
        (q, k, v, u, None, None, 3, 1, "value", 1, True, None, 0.0, None, None),
    )
    assert foveal.sparsek.sparsek_attention_backward is sk.sparsek_attention_backward
