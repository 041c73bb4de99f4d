"""foveal.PagedKVCache, foveal.batch_decode_attention and foveal.batch_prefill_attention.

Every check compares against the float64 reference over each sequence's history, which the
test keeps itself (forks copy it), never read back from the pool; tolerances as in
test_attention.py (conftest.TOLERANCE). For an int8 pool the history holds what the pool's spec
makes of each appended row (conftest.quantize_rows), and the tolerance is float32's.
"""

from __future__ import annotations

import threading

import foveal
import numpy as np
import pytest
from conftest import DTYPES, assert_close, blocks_of, quantize_rows, reference_attention

POOL_DTYPES = [*DTYPES, "int8"]


class Server:
    """A PagedKVCache and, beside it, every key and value each live sequence holds."""

    def __init__(self, rng, num_pages, page_size, heads_kv, dim, dim_v, dtype, cache=None):
        self.rng = rng
        self.dtype = dtype
        # What q, k, v and out are: float32 next to an int8 pool.
        self.input = np.float32 if dtype == "int8" else dtype
        self.cache = cache or foveal.PagedKVCache(
            num_pages, page_size, heads_kv, dim, dim_v, dtype=dtype
        )
        self.history = {}

    def add(self):
        c = self.cache
        sequence = c.add_sequence()
        self.history[sequence] = (
            np.zeros((c.heads_kv, 0, c.dim)),
            np.zeros((c.heads_kv, 0, c.dim_v)),
        )
        return sequence

    def steps(self, sequences, n):
        c = self.cache
        k = self.rng.standard_normal((len(sequences), c.heads_kv, n, c.dim)).astype(self.input)
        v = self.rng.standard_normal((len(sequences), c.heads_kv, n, c.dim_v)).astype(self.input)
        return k, v

    def record(self, sequences, k, v, counts=None):
        for s, sequence in enumerate(sequences):
            n = k.shape[2] if counts is None else counts[s]
            new_k, new_v = k[s, :, :n], v[s, :, :n]
            if self.dtype == "int8":
                new_k, new_v = quantize_rows(new_k), quantize_rows(new_v)
            keys, values = self.history[sequence]
            self.history[sequence] = (
                np.concatenate([keys, new_k], axis=1),
                np.concatenate([values, new_v], axis=1),
            )

    def append(self, sequences, n, counts=None):
        k, v = self.steps(sequences, n)
        self.cache.append(sequences, k, v, counts=counts)
        self.record(sequences, k, v, counts)

    def fork(self, parent):
        child = self.cache.fork(parent)
        self.history[child] = self.history[parent]
        return child

    def remove(self, sequence):
        self.cache.remove(sequence)
        del self.history[sequence]

    def truncate(self, sequence, length):
        self.cache.truncate(sequence, length)
        keys, values = self.history[sequence]
        self.history[sequence] = (keys[:, :length], values[:, :length])

    def reference(self, q, sequences, **options):
        outs, lses = [], []
        for s, sequence in enumerate(sequences):
            keys, values = self.history[sequence]
            out, lse = reference_attention(q[s : s + 1], keys[None], values[None], **options)
            outs.append(out)
            lses.append(lse)
        return np.concatenate(outs), np.concatenate(lses)

    def check(self, sequences, heads_q=4, len_q=1, **options):
        q = self.rng.standard_normal((len(sequences), heads_q, len_q, self.cache.dim))
        q = q.astype(self.input)
        out, lse = foveal.batch_decode_attention(
            q, self.cache, sequences, return_lse=True, **options
        )
        want_out, want_lse = self.reference(q, sequences, **options)
        assert_close(out, want_out, self.input)
        assert_close(lse, want_lse, self.input, "lse")

    def expected_pages(self):
        """Pages in use from the page tables: every page any sequence holds, once."""
        return len({page for s in self.history for page in self.cache.page_table(s)})

    def state(self):
        c = self.cache
        return (
            c.sequences,
            [(c.length(s), c.page_table(s)) for s in c.sequences],
            c.free_pages,
        )


@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_server_loop_matches_reference(rng, dtype):
    """Random add / append / fork / truncate / remove steps, some of which exhaust the pool;
    every 50th step a batch decode of all live sequences is checked, and the pages in use are
    exactly those the page tables hold."""
    server = Server(rng, 96, 16, 2, 16, 8, dtype)
    options = [
        {"causal": True},
        {"causal": True, "window_left": 40, "sink_tokens": 2},
        {"softcap": 20.0},
    ]
    exhausted = 0
    for step in range(1, 1201):
        live = list(server.history)
        action = rng.choice(["add", "append", "append", "append", "fork", "truncate", "remove"])
        if action == "add" or not live:
            if len(live) < 12:
                server.add()
            continue
        sequence = int(rng.choice(live))
        before = server.state()
        try:
            if action == "append":
                server.append([sequence], int(rng.integers(1, 60)))
            elif action == "fork" and len(live) < 12:
                server.fork(sequence)
            elif action == "truncate":
                server.truncate(sequence, int(rng.integers(0, server.cache.length(sequence) + 1)))
            elif action == "remove" and len(live) > 3:
                server.remove(sequence)
        except MemoryError:
            exhausted += 1
            assert server.state() == before
        assert server.cache.pages_in_use == server.expected_pages()
        if step % 50 == 0:
            ready = [s for s in server.history if server.cache.length(s) > 0]
            if ready:
                server.check(ready, **options[(step // 50) % len(options)])
    assert exhausted > 0  # the loop did reach the pool's limit


@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_forks_share_the_prompt_and_its_reads(rng, dtype):
    server = Server(rng, 512, 32, 2, 24, 16, dtype)
    prompt = server.add()
    server.append([prompt], 1100)  # 34 full pages and a partial one
    pages = server.cache.pages_in_use
    children = [server.fork(prompt) for _ in range(6)]
    assert server.cache.pages_in_use == pages + 6  # each fork copied the partial page only
    for i, child in enumerate(children):
        server.append([child], 5 + i)
    sequences = [prompt, *children]
    q = rng.standard_normal((7, 8, 1, 24)).astype(server.input)
    out, info = foveal.batch_decode_attention(q, server.cache, sequences, return_info=True)
    assert info["shared_groups"] == 1 and info["shared_tokens"] == 1088
    alone, info = foveal.batch_decode_attention(
        q, server.cache, sequences, share_prefixes=False, return_info=True
    )
    assert info["shared_groups"] == 0
    want, _ = server.reference(q, sequences)
    assert_close(out, want, server.input)
    assert_close(alone, want, server.input)


@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_nested_forks_share_every_level(rng, dtype):
    # A multi-level cascade: all five over the prompt's 34 full pages, then the extended sample
    # and its two forks over its own next 16 full pages.
    server = Server(rng, 512, 32, 2, 24, 16, dtype)
    prompt = server.add()
    server.append([prompt], 1100)
    extended, other = server.fork(prompt), server.fork(prompt)
    server.append([extended], 510)  # 1610 tokens: 50 full pages
    sequences = [prompt, extended, other, server.fork(extended), server.fork(extended)]
    for i, sequence in enumerate(sequences):
        server.append([sequence], 3 + i)
    q = rng.standard_normal((5, 8, 1, 24)).astype(server.input)
    out, info = foveal.batch_decode_attention(q, server.cache, sequences, return_info=True)
    assert info["shared_groups"] == 2 and info["shared_tokens"] == 1088 + (1600 - 1088)
    want, _ = server.reference(q, sequences)
    assert_close(out, want, server.input)


def test_bitwise_identical_for_any_thread_count(rng):
    server = Server(rng, 1024, 64, 2, 32, 32, np.float32)
    prompt = server.add()
    server.append([prompt], 2500)
    sequences = [prompt, server.fork(prompt), server.add()]
    server.append(sequences, 30)
    server.append([sequences[2]], 4000)
    q = rng.standard_normal((3, 8, 2, 32)).astype(np.float32)
    results = [
        foveal.batch_decode_attention(
            q, server.cache, sequences, causal=True, return_lse=True, num_threads=threads
        )
        for threads in (1, 2, 3)
    ]
    for out, lse in results[1:]:
        assert np.array_equal(out, results[0][0]) and np.array_equal(lse, results[0][1])


@pytest.mark.parametrize("dtype", POOL_DTYPES)
def test_chunked_prefill_matches_reference(rng, dtype):
    server = Server(rng, 256, 16, 2, 16, 16, dtype)
    dtype = server.input
    sequences = [server.add(), server.add()]
    server.append([sequences[1]], 50)
    for counts in ([20, 7], [0, 20], [13, 13]):
        q = rng.standard_normal((2, 4, 20, 16)).astype(dtype)
        k, v = server.steps(sequences, 20)
        out, lse = foveal.batch_prefill_attention(
            q, k, v, server.cache, sequences, counts=counts, return_lse=True
        )
        server.record(sequences, k, v, counts)
        for s, sequence in enumerate(sequences):
            n = counts[s]
            keys, values = server.history[sequence]
            want_out, want_lse = reference_attention(
                q[s : s + 1, :, :n], keys[None], values[None], causal=True
            )
            assert_close(out[s : s + 1, :, :n], want_out, dtype)
            assert_close(lse[s : s + 1, :, :n], want_lse, dtype, "lse")
            assert not out[s, :, n:].any() and np.all(lse[s, :, n:] == -np.inf)


def test_wraps_a_torch_pool(rng, torch):
    pool = torch.zeros((40, 2, 2, 8, 16), dtype=torch.float32)
    cache = foveal.PagedKVCache.wrap(pool)
    server = Server(rng, 0, 0, 0, 0, 0, np.float32, cache=cache)
    a = server.add()
    server.append([a], 30)
    b = server.fork(a)
    server.append([b], 3)
    keys, values = server.history[a]
    page, slot = cache.page_table(a)[29 // 8], 29 % 8  # token 29 of a
    assert np.array_equal(pool[page, 0, :, slot].numpy(), keys[:, 29])
    assert np.array_equal(pool[page, 1, :, slot].numpy(), values[:, 29])
    q = torch.from_numpy(rng.standard_normal((2, 4, 1, 16)).astype(np.float32))
    out = foveal.batch_decode_attention(q, cache, [a, b])
    assert isinstance(out, torch.Tensor)
    assert_close(out.numpy(), server.reference(q.numpy(), [a, b])[0], np.float32)


@pytest.mark.parametrize("dtype", [np.float32, "int8"])
def test_released_pages_bound_a_windowed_server(rng, dtype):
    """Sliding window 48 with 4 sinks: after every step each sequence releases what its next
    query cannot see, so 8 sequences of ~400 tokens live in a pool of 64 pages of 16 (they
    would need 200); decode matches the reference over the full history; a call that would see
    a released key raises and writes nothing."""
    window, sinks = 48, 4
    server = Server(rng, 64, 16, 2, 16, 8, dtype)
    sequences = [server.add() for _ in range(8)]
    for step in range(100):
        server.append(sequences, int(rng.integers(1, 8)))
        for sequence in sequences:
            length = server.cache.length(sequence)
            server.cache.release(sequence, sinks, max(sinks, length - 1 - window))
        if step % 20 == 19:
            server.check(sequences, causal=True, window_left=window, sink_tokens=sinks)
    assert min(server.cache.length(s) for s in sequences) > 300
    assert server.cache.pages_in_use == server.expected_pages() - 1  # less the released -1
    assert all(server.cache.released_pages(s) > 10 for s in sequences)
    assert not server.cache.holds(sequences[0], 20) and server.cache.holds(sequences[0], 0)
    assert -1 in server.cache.page_table(sequences[0])
    q = np.zeros((8, 4, 1, 16), np.float32)
    out = np.full((8, 4, 1, 8), 7, np.float32)
    with pytest.raises(ValueError, match="released"):
        foveal.batch_decode_attention(q, server.cache, sequences, causal=True, out=out)
    assert (out == 7).all()
    before = server.state()
    with pytest.raises(ValueError, match="released page"):
        server.cache.truncate(sequences[0], 21)
    with pytest.raises(ValueError, match="begin"):
        server.cache.release(sequences[0], 5, 4)
    assert server.state() == before
    for sequence in sequences:
        server.remove(sequence)
    assert server.cache.free_pages == 64


def test_wraps_a_torch_uint8_pool_of_8_bit_blocks(rng, torch):
    """An int8 pool over a caller's uint8 [num_pages, 2, Hkv, page, blocks, 36] tensor: the
    blocks land in the tensor, and batch decode matches an owned int8 pool (to float rounding:
    the owned pool's consecutive pages are read as one run, the wrapped one's page by page)."""
    pool = torch.zeros((20, 2, 2, 8, 2, 36), dtype=torch.uint8)
    cache = foveal.PagedKVCache.wrap(pool)
    assert cache.dtype == np.int8 and cache.dim == 64 and cache.page_size == 8
    owned = foveal.PagedKVCache(20, 8, 2, 64, dtype="int8")
    k = rng.standard_normal((2, 30, 64)).astype(np.float32)
    v = rng.standard_normal((2, 30, 64)).astype(np.float32)
    for c in (cache, owned):
        s = c.add_sequence()
        c.append(s, k, v)
        c.fork(s)
    page, slot = cache.page_table(0)[29 // 8], 29 % 8  # token 29
    stored = pool[page, 0, :, slot].numpy()  # [Hkv, blocks, 36]
    np.testing.assert_array_equal(blocks_of(stored), quantize_rows(k[:, 29]).astype(np.float32))
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    out = foveal.batch_decode_attention(q, cache, [0, 1])
    assert_close(out, foveal.batch_decode_attention(q, owned, [0, 1]), np.float32)
    with pytest.raises(ValueError, match="blocks, 36"):
        foveal.PagedKVCache.wrap(torch.zeros((20, 2, 2, 8, 64), dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [np.float32, "int8"])
def test_bad_input_changes_nothing(rng, dtype):
    server = Server(rng, 6, 4, 1, 8, 8, dtype)
    a = server.add()
    server.append([a], 10)
    b = server.fork(a)
    before = server.state()
    k, v = server.steps([a, b], 9)
    with pytest.raises(MemoryError, match="free pages"):
        server.cache.append([a, b], k, v)
    with pytest.raises(ValueError, match="listed twice"):
        server.cache.append([a, a], k, v)
    with pytest.raises(ValueError, match="not in the cache"):
        server.cache.append([a, 99], k, v)
    with pytest.raises(ValueError, match="not in the cache"):
        server.cache.fork(99)
    with pytest.raises(ValueError, match="length"):
        server.cache.truncate(a, 11)
    with pytest.raises(TypeError, match="dtype"):
        server.cache.append([a, b], k.astype(np.float64), v)
    with pytest.raises(ValueError, match="k"):
        server.cache.append([a, b], k[:, :, :, :4], v)
    with pytest.raises(MemoryError):
        foveal.batch_prefill_attention(
            rng.standard_normal((2, 2, 9, 8)).astype(np.float32), k, v, server.cache, [a, b]
        )
    assert server.state() == before
    q = np.zeros((2, 2, 1, 8), np.float32)
    out = np.full((2, 2, 1, 8), np.nan, np.float32)
    server.remove(b)
    with pytest.raises(ValueError, match="not in the cache"):
        foveal.batch_decode_attention(q, server.cache, [a, b], out=out)
    with pytest.raises(ValueError, match="Lq"):
        foveal.batch_decode_attention(np.zeros((1, 2, 11, 8), np.float32), server.cache, [a])
    with pytest.raises(ValueError, match=r"cache.dim\(\) \(D\)"):
        foveal.batch_decode_attention(np.zeros((1, 2, 1, 4), np.float32), server.cache, [a])
    with pytest.raises(TypeError, match="PagedKVCache"):
        foveal.batch_decode_attention(q, foveal.KVCache(2, 1, 4, 8), [a, a])
    assert np.isnan(out).all()
    with pytest.raises(ValueError, match="pool"):
        foveal.PagedKVCache.wrap(np.zeros((4, 3, 1, 4, 8), np.float32))


def test_int8_pool_stores_blocks_and_hands_out_its_dequantized_values(rng):
    """An int8 pool: 36 bytes per 32 values of a row; ``keys`` / ``values`` are float32 copies of
    exactly what the spec stores; decode over it is within the quantization error of the
    float32 pool's."""
    pools = {dtype: Server(rng, 64, 16, 2, 80, 48, dtype) for dtype in (np.float32, "int8")}
    assert pools["int8"].cache.page_bytes == 2 * 16 * (3 + 2) * 36
    assert pools[np.float32].cache.page_bytes == 2 * 16 * (80 + 48) * 4
    k = rng.standard_normal((1, 2, 300, 80)).astype(np.float32)
    v = rng.standard_normal((1, 2, 300, 48)).astype(np.float32)
    for server in pools.values():
        sequence = server.add()
        server.cache.append([sequence], k, v)
        server.record([sequence], k, v)
    cache = pools["int8"].cache
    keys, values = cache.keys, cache.values
    assert keys.dtype == np.float32 and keys.shape == (64, 2, 16, 80)
    assert values.shape == (64, 2, 16, 48)
    table = cache.page_table(0)
    for position in (0, 17, 299):
        page, slot = table[position // 16], position % 16
        want_k, want_v = quantize_rows(k[0, :, position]), quantize_rows(v[0, :, position])
        np.testing.assert_array_equal(keys[page, :, slot], want_k.astype(np.float32))
        np.testing.assert_array_equal(values[page, :, slot], want_v.astype(np.float32))
    q = rng.standard_normal((1, 8, 1, 80)).astype(np.float32)
    exact = foveal.batch_decode_attention(q, pools[np.float32].cache, [0])
    quantized = foveal.batch_decode_attention(q, cache, [0])
    assert quantized.dtype == np.float32
    error = np.linalg.norm(quantized - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.02, error
    with pytest.raises(TypeError, match="float32"):
        foveal.batch_decode_attention(q.astype(np.float64), cache, [0])
    with pytest.raises(TypeError, match="int8"):
        foveal.PagedKVCache(4, 4, 1, 8, dtype=np.int16)


def test_a_fork_during_an_append_is_refused_or_sees_a_whole_append(rng):
    """append and fork of one cache from two threads: the one that overlaps the other is
    refused with ValueError; whatever ran, each sequence holds whole appends."""
    cache = foveal.PagedKVCache(4096, 16, 2, 64, 64)
    parent = cache.add_sequence()
    k = rng.standard_normal((2, 20000, 64)).astype(np.float32)
    errors = []

    def append():
        for _ in range(3):
            try:
                cache.append(parent, k, k)
            except ValueError as error:
                errors.append(str(error))

    thread = threading.Thread(target=append)
    thread.start()
    children = []
    while thread.is_alive():
        try:
            children.append(cache.fork(parent))
        except ValueError as error:
            errors.append(str(error))
        except MemoryError:
            break
    thread.join()
    assert all("another thread" in error for error in errors)
    for child in children:
        assert cache.length(child) % 20000 == 0
