"""bfloat16 and float16 storage from Python: torch.bfloat16 / torch.float16 tensors and
numpy.float16 arrays in, the same dtype out, lse float32.

foveal computes on 16-bit inputs in float32 and rounds only what it writes, so a 16-bit call
equals the float32 call on the same values with out rounded (round to nearest even, as torch's
``.to(torch.bfloat16)``), bit for bit, except on AMX tiles (conftest.on_amx_tiles). The
accuracy rule is FlashAttention's: the error against float64 is at most 2x that of a plain
same-precision torch implementation.
"""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from conftest import assert_rounded

torch = pytest.importorskip("torch")

HALF = [torch.bfloat16, torch.float16]
NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _inputs(seed, b, hq, hkv, lq, lk, d, dv, dtype):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=generator).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=generator).to(dtype)
    v = torch.randn(b, hkv, lk, dv, generator=generator).to(dtype)
    return q, k, v


CASES = [
    # seed, B, Hq, Hkv, Lq, Lk, D, Dv, options
    (1, 1, 2, 2, 1, 1, 1, 1, {}),
    (2, 2, 4, 2, 65, 129, 64, 64, {"causal": True}),
    (3, 1, 3, 1, 129, 65, 31, 17, {}),
    (4, 1, 8, 2, 200, 200, 128, 128, {"causal": True, "window_left": 37, "sink_tokens": 2}),
    (5, 2, 2, 1, 97, 300, 80, 80, {"softcap": 30.0}),
]


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"seed{c[0]}")
def test_attention_is_the_float32_call_rounded(dtype, case):
    seed, b, hq, hkv, lq, lk, d, dv, options = case
    q, k, v = _inputs(seed, b, hq, hkv, lq, lk, d, dv, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True, **options)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = foveal.attention(q.float(), k.float(), v.float(), return_lse=True, **options)
    assert_rounded(out, want, d, dv, lse, want_lse)
    again = foveal.attention(q, k, v, num_threads=1, **options)
    assert torch.equal(again, out), "thread count changed the result"


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_bias_and_mask_in_the_storage_dtype(dtype):
    q, k, v = _inputs(7, 1, 2, 2, 40, 50, 32, 32, dtype)
    bias = torch.randn(1, 2, 40, 50).to(dtype)
    out = foveal.attention(q, k, v, bias=bias)
    want = foveal.attention(q.float(), k.float(), v.float(), bias=bias.float())
    assert_rounded(out, want, 32, 32)
    mask = torch.rand(40, 50) > 0.3
    out = foveal.attention(q, k, v, bias=mask)
    want = foveal.attention(q.float(), k.float(), v.float(), bias=mask)
    assert_rounded(out, want, 32, 32)


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_sliding_window(dtype):
    q, k, v = _inputs(8, 1, 4, 2, 300, 300, 64, 64, dtype)
    options = {"causal": True, "window_left": 64, "sink_tokens": 4}
    out = foveal.sliding_window_attention(q, k, v, **options)
    want = foveal.sliding_window_attention(q.float(), k.float(), v.float(), **options)
    assert out.dtype == dtype
    assert_rounded(out, want, 64, 64)


def test_numpy_float16():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 33, 16)).astype(np.float16)
    k = rng.standard_normal((1, 2, 45, 16)).astype(np.float16)
    v = rng.standard_normal((1, 2, 45, 16)).astype(np.float16)
    out, lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    want = foveal.attention(
        q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), causal=True
    )
    np.testing.assert_array_equal(out, want.astype(np.float16))


def _plain_torch(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v in q's dtype, as a plain implementation writes it."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if causal:
        lq, lk = scores.shape[-2:]
        seen = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        scores = scores.masked_fill(~seen, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
@pytest.mark.parametrize(
    "shape",
    [(113, 203, 32, False), (128, 128, 64, True), (108, 256, 128, True), (512, 512, 256, False)],
    ids=lambda s: f"{s[0]}x{s[1]}d{s[2]}{'c' if s[3] else ''}",
)
def test_flash_attention_accuracy_rule(dtype, shape):
    """Error against float64 <= 2x a plain torch implementation's in the same dtype."""
    lq, lk, d, causal = shape
    q, k, v = _inputs(lq + d, 1, 4, 2, lq, lk, d, d, dtype)
    exact = _plain_torch(q.double(), k.double(), v.double(), causal)
    ours = foveal.attention(q, k, v, causal=causal).double()
    plain = _plain_torch(q, k, v, causal).double()
    our_error = (ours - exact).abs().max().item()
    plain_error = (plain - exact).abs().max().item()
    assert our_error <= 2 * plain_error, (our_error, plain_error)


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
@pytest.mark.parametrize("ring", [False, True])
def test_decode_over_a_16_bit_cache(dtype, ring):
    name = NAMES[dtype]
    generator = torch.Generator().manual_seed(3)
    lengths = [1500, 7, 1030]
    capacity = 600 if ring else 1500
    options = {"causal": True}
    if ring:
        options.update(window_left=500, sink_tokens=4)
    half = foveal.KVCache(
        3, 2, capacity, 64, 48, dtype=name, ring=ring, sink_tokens=4 if ring else 0
    )
    single = foveal.KVCache(3, 2, capacity, 64, 48, ring=ring, sink_tokens=4 if ring else 0)
    assert half.dtype == (name if name == "bfloat16" else np.dtype(name))
    for start in range(0, 1500, 500):
        k = torch.randn(3, 2, 500, 64, generator=generator).to(dtype)
        v = torch.randn(3, 2, 500, 48, generator=generator).to(dtype)
        counts = [max(0, min(500, n - start)) for n in lengths]
        half.append(k, v, counts=counts)
        single.append(k.float(), v.float(), counts=counts)
    assert half.lengths == lengths
    keys = half.keys
    # numpy float16 for a float16 cache, torch.bfloat16 for a bfloat16 one (numpy has none)
    assert str(keys.dtype).replace("torch.", "") == name and tuple(keys.shape) == (
        3,
        2,
        capacity,
        64,
    )
    q = torch.randn(3, 8, 1, 64, generator=generator).to(dtype)
    for threads in (1, 2):
        out, lse = foveal.decode_attention(q, half, return_lse=True, num_threads=threads, **options)
        want, want_lse = foveal.decode_attention(q.float(), single, return_lse=True, **options)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_rounded(out, want, 64, 48, lse, want_lse)


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_wrap_16_bit_storage(dtype):
    keys = torch.zeros(1, 2, 16, 8, dtype=dtype)
    values = torch.zeros(1, 2, 16, 8, dtype=dtype)
    cache = foveal.KVCache.wrap(keys, values)
    k = torch.randn(1, 2, 3, 8).to(dtype)
    cache.append(k, k)
    assert torch.equal(keys[:, :, :3], k)
    assert cache.dtype == (NAMES[dtype] if dtype == torch.bfloat16 else np.dtype("float16"))


def test_bad_dtypes_are_named_and_write_nothing():
    q, k, v = _inputs(9, 1, 2, 2, 5, 6, 8, 8, torch.bfloat16)
    out = torch.full((1, 2, 5, 8), 7.0, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="k must have dtype bfloat16"):
        foveal.attention(q, k.float(), v, out=out)
    with pytest.raises(TypeError, match="v must have dtype bfloat16"):
        foveal.attention(q, k, v.half(), out=out)
    with pytest.raises(TypeError, match="lse must have dtype float32"):  # the compiled call
        foveal._core.attention(q, k, v, out, torch.empty(1, 2, 5, dtype=torch.bfloat16), None)
    assert (out == 7).all()
    cache = foveal.KVCache(1, 2, 8, 8, dtype="bfloat16")
    with pytest.raises(TypeError, match="k must have dtype bfloat16"):
        cache.append(k.float(), v.float())
    with pytest.raises(TypeError, match="k must have dtype bfloat16"):
        cache.append(k.half(), v.half())
    assert cache.lengths == [0]
    with pytest.raises(
        TypeError, match="dtype must be float32, float64, bfloat16, float16 or int8"
    ):
        foveal.KVCache(1, 2, 8, 8, dtype="int16")
    with pytest.raises(TypeError, match="numpy has no bfloat16"):
        foveal.decode_attention(np.zeros((1, 2, 1, 8), np.float32), cache)


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_autograd_through_16_bit_attention(dtype):
    """foveal.torch.attention trains on 16-bit tensors: forward in the storage dtype, backward in
    float32 on the widened values, gradients rounded to the inputs' dtype."""
    import foveal.torch as ft

    q, k, v = _inputs(12, 1, 4, 2, 70, 90, 32, 32, dtype)
    bias = torch.randn(1, 4, 70, 90).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bias)]
    wide = [t.float().requires_grad_(True) for t in (q, k, v, bias)]
    grad_out = torch.randn(1, 4, 70, 32)
    out = ft.attention(*leaves[:3], bias=leaves[3], causal=True)
    assert out.dtype == dtype
    out.backward(grad_out.to(dtype))
    want = ft.attention(*wide[:3], bias=wide[3], causal=True)
    want.backward(grad_out.to(dtype).float())
    assert_rounded(out.detach(), want.detach(), 32, 32)
    # The backward reads the forward's 16-bit out (rounded), the float32 reference its float32
    # out: they differ by that rounding, a few units of the 16-bit precision at most.
    precision = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    for got, ref in zip(leaves, wide):
        assert got.grad.dtype == dtype
        error = (got.grad.float() - ref.grad).abs().max() / ref.grad.abs().max()
        assert error <= 4 * precision, error
    compiled = torch.compile(lambda a, b, c: ft.attention(a, b, c, causal=True), fullgraph=True)
    assert torch.equal(compiled(q, k, v), ft.attention(q, k, v, causal=True))


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_paged_pool_in_16_bit(dtype):
    """A 16-bit PagedKVCache: chunked prefill and batch decode over a forked prompt (the shared
    prefix path) equal the float32 pool's results rounded."""
    name = NAMES[dtype]
    generator = torch.Generator().manual_seed(21)
    results = {}
    for pool_dtype in (name, "float32"):
        wide = pool_dtype == "float32"

        def draw(*shape, wide=wide):
            values = torch.randn(*shape, generator=generator).to(dtype)
            return values.float() if wide else values

        pool = foveal.PagedKVCache(120, 16, 2, 64, dtype=pool_dtype)
        assert foveal.paged.PagedKVCache is type(pool)
        prompt, other = pool.add_sequence(), pool.add_sequence()
        q, k, v = draw(2, 8, 500, 64), draw(2, 2, 500, 64), draw(2, 2, 500, 64)
        out, lse = foveal.batch_prefill_attention(
            q, k, v, pool, [prompt, other], counts=[500, 200], causal=True, return_lse=True
        )
        ids = [pool.fork(prompt), pool.fork(prompt), other]
        pool.append(ids, draw(3, 2, 1, 64), draw(3, 2, 1, 64))
        out1, lse1 = foveal.batch_decode_attention(draw(3, 8, 1, 64), pool, ids, return_lse=True)
        results[pool_dtype] = (out, lse, out1, lse1)
        generator.manual_seed(21)
    half, single = results[name], results["float32"]
    assert half[0].dtype == dtype and half[1].dtype == torch.float32
    for out, lse, want, want_lse in ((*half[:2], *single[:2]), (*half[2:], *single[2:])):
        assert_rounded(out, want, 64, 64, lse, want_lse)


def _thread_calls(dtype):
    """name -> a function of num_threads calling one 16-bit entry point (shapes whose task
    counts 3 does not divide; split-KV decode; a forked prompt for the shared-prefix path)."""
    name = NAMES[dtype]
    generator = torch.Generator().manual_seed(31)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    q, k, v = draw(2, 6, 77, 40), draw(2, 2, 131, 40), draw(2, 2, 131, 24)
    bias = draw(1, 6, 77, 131)
    band_q, band_k, band_v = draw(1, 4, 300, 64), draw(1, 2, 300, 64), draw(1, 2, 300, 48)
    cache = foveal.KVCache(3, 2, 1500, 64, 48, dtype=name)
    cache.append(draw(3, 2, 1500, 64), draw(3, 2, 1500, 48), counts=[1500, 3, 777])
    ring = foveal.KVCache(2, 2, 600, 32, dtype=name, ring=True, sink_tokens=4)
    for _ in range(4):
        ring.append(draw(2, 2, 500, 32), draw(2, 2, 500, 32), counts=[500, 40])
    decode_q, ring_q = draw(3, 6, 1, 64), draw(2, 4, 2, 32)
    pool = foveal.PagedKVCache(120, 16, 2, 64, dtype=name)
    prompt, other = pool.add_sequence(), pool.add_sequence()
    prefill = (draw(2, 8, 500, 64), draw(2, 2, 500, 64), draw(2, 2, 500, 64))
    foveal.batch_prefill_attention(*prefill, pool, [prompt, other], counts=[500, 200])
    ids = [pool.fork(prompt), pool.fork(prompt), other]
    pool.append(ids, draw(3, 2, 1, 64), draw(3, 2, 1, 64))
    batch_q = draw(3, 8, 1, 64)

    def fresh_prefill(threads):
        fresh = foveal.PagedKVCache(60, 16, 2, 64, dtype=name)
        sequences = [fresh.add_sequence(), fresh.add_sequence()]
        return foveal.batch_prefill_attention(
            *prefill,
            fresh,
            sequences,
            counts=[500, 301],
            causal=True,
            return_lse=True,
            num_threads=threads,
        )

    band_options = {"causal": True, "window_left": 50, "sink_tokens": 2, "return_lse": True}
    ring_options = {"causal": True, "window_left": 500, "sink_tokens": 4, "return_lse": True}
    return {
        "attention": lambda threads: foveal.attention(
            q, k, v, bias=bias, causal=True, softcap=30.0, return_lse=True, num_threads=threads
        ),
        "sliding_window_attention": lambda threads: foveal.sliding_window_attention(
            band_q, band_k, band_v, num_threads=threads, **band_options
        ),
        "decode_attention": lambda threads: foveal.decode_attention(
            decode_q, cache, causal=True, return_lse=True, num_threads=threads
        ),
        "decode_attention_ring": lambda threads: foveal.decode_attention(
            ring_q, ring, num_threads=threads, **ring_options
        ),
        "batch_decode_attention": lambda threads: foveal.batch_decode_attention(
            batch_q, pool, ids, return_lse=True, num_threads=threads
        ),
        "batch_prefill_attention": fresh_prefill,
    }


@pytest.mark.parametrize("dtype", HALF, ids=lambda t: NAMES[t])
def test_identical_bits_for_one_two_and_three_threads(dtype):
    for name, call in _thread_calls(dtype).items():
        one = call(1)
        for threads in (2, 3):
            for got, want in zip(call(threads), one):
                assert got.dtype == want.dtype
                assert torch.equal(
                    got.view(torch.int16 if got.itemsize == 2 else torch.int32),
                    want.view(torch.int16 if want.itemsize == 2 else torch.int32),
                ), f"{name}: {threads} threads changed the bits"


def test_identical_bits_for_one_two_and_three_threads_numpy_float16():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 6, 77, 40)).astype(np.float16)
    k = rng.standard_normal((1, 2, 131, 40)).astype(np.float16)
    v = rng.standard_normal((1, 2, 131, 24)).astype(np.float16)
    cache = foveal.KVCache(1, 2, 1200, 40, 24, dtype="float16")
    cache.append(
        rng.standard_normal((1, 2, 1200, 40)).astype(np.float16),
        rng.standard_normal((1, 2, 1200, 24)).astype(np.float16),
    )
    results = [
        (
            foveal.attention(q, k, v, causal=True, num_threads=threads),
            foveal.decode_attention(q[:, :, :1], cache, num_threads=threads),
        )
        for threads in (1, 2, 3)
    ]
    for dense, decode in results[1:]:
        assert dense.tobytes() == results[0][0].tobytes()
        assert decode.tobytes() == results[0][1].tobytes()
