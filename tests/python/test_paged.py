"""foveal.PagedKVCache, foveal.batch_decode_attention and foveal.batch_prefill_attention.

Every check compares against the float64 reference over each sequence's history, which the
test keeps itself (forks copy it), never read back from the pool; tolerances as in
test_attention.py (conftest.TOLERANCE).
"""

from __future__ import annotations

import threading

import foveal
import numpy as np
import pytest
from conftest import DTYPES, assert_close, reference_attention


class Server:
    """A PagedKVCache and, beside it, every key and value each live sequence holds."""

    def __init__(self, rng, num_pages, page_size, heads_kv, dim, dim_v, dtype, cache=None):
        self.rng = rng
        self.dtype = dtype
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
        k = self.rng.standard_normal((len(sequences), c.heads_kv, n, c.dim)).astype(self.dtype)
        v = self.rng.standard_normal((len(sequences), c.heads_kv, n, c.dim_v)).astype(self.dtype)
        return k, v

    def record(self, sequences, k, v, counts=None):
        for s, sequence in enumerate(sequences):
            n = k.shape[2] if counts is None else counts[s]
            keys, values = self.history[sequence]
            self.history[sequence] = (
                np.concatenate([keys, k[s, :, :n]], axis=1),
                np.concatenate([values, v[s, :, :n]], axis=1),
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
        q = q.astype(self.dtype)
        out, lse = foveal.batch_decode_attention(
            q, self.cache, sequences, return_lse=True, **options
        )
        want_out, want_lse = self.reference(q, sequences, **options)
        assert_close(out, want_out, self.dtype)
        assert_close(lse, want_lse, self.dtype, "lse")

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


@pytest.mark.parametrize("dtype", DTYPES)
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


@pytest.mark.parametrize("dtype", DTYPES)
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
    q = rng.standard_normal((7, 8, 1, 24)).astype(dtype)
    out, info = foveal.batch_decode_attention(q, server.cache, sequences, return_info=True)
    assert info["shared_groups"] == 1 and info["shared_tokens"] == 1088
    alone, info = foveal.batch_decode_attention(
        q, server.cache, sequences, share_prefixes=False, return_info=True
    )
    assert info["shared_groups"] == 0
    want, _ = server.reference(q, sequences)
    assert_close(out, want, dtype)
    assert_close(alone, want, dtype)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_prefill_matches_reference(rng, dtype):
    server = Server(rng, 256, 16, 2, 16, 16, dtype)
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


def test_bad_input_changes_nothing(rng):
    server = Server(rng, 6, 4, 1, 8, 8, np.float32)
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
