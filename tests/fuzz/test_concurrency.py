"""Concurrency: foveal calls from 8 Python threads at once (the kernels release the GIL) give
bitwise the results of the same calls run alone, for float32 / float64 and for the 16-bit
storage types, the sparse kernels (block-sparse prefill, Quest decode) among them; a cache
mutated from two threads at once (one with page bounds too) is rejected, never corrupted. Each
test runs in a child process so a crash fails it cleanly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 240


def _run_child(source: str) -> str:
    """Runs source in a fresh interpreter; fails the test on a crash, a hang or an error."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(source)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child process hung for {TIMEOUT} s")
    assert done.returncode == 0, (
        f"child exited with {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


CALLS = r"""
import threading
import numpy as np
import foveal, foveal.vq, foveal.sparsek

def calls(index):
    # One call per index: a different kind, shape and thread count for every thread.
    rng = np.random.default_rng(index)
    kind = index % 7
    threads = 1 + index % 3
    dtype = np.float32 if index % 2 == 0 else np.float64
    if kind == 0:  # a variable-length batch: the second row left-padded by 5
        b, hkv, g, lq, lk, d = 2, 1 + index % 2, 2, 3 + index, 40 + 7 * index, 16 + index
        q = rng.standard_normal((b, hkv * g, lq, d)).astype(dtype)
        k = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
        v = rng.standard_normal((b, hkv, lk, d + 1)).astype(dtype)
        return lambda: foveal.attention(q, k, v, causal=index % 3 == 0, return_lse=True,
                                        key_start=[0, 5], num_threads=threads)
    if kind == 1:
        b, hkv, d = 2, 2, 8 + index
        cache = foveal.KVCache(b, hkv, 1500, d, dtype=dtype)
        cache.append(rng.standard_normal((b, hkv, 1100 + index, d)).astype(dtype),
                     rng.standard_normal((b, hkv, 1100 + index, d)).astype(dtype))
        q = rng.standard_normal((b, hkv * 2, 1, d)).astype(dtype)
        return lambda: foveal.decode_attention(q, cache, return_lse=True, num_threads=threads)
    if kind == 2:
        x = rng.standard_normal((300 + index, 12)).astype(dtype)
        c = rng.standard_normal((37, 12)).astype(dtype)
        metric = "cosine" if index % 3 == 0 else "l2"
        return lambda: tuple(foveal.vq.assign(x, c, metric=metric, num_threads=threads))
    if kind == 3:
        b, hkv, l, d = 1, 2, 60 + index, 8
        q = rng.standard_normal((b, 2 * hkv, l, d)).astype(dtype)
        k = rng.standard_normal((b, hkv, l, d)).astype(dtype)
        v = rng.standard_normal((b, hkv, l, d)).astype(dtype)
        u = rng.standard_normal((b, hkv, l)).astype(dtype)
        out, lse = foveal.sparsek.sparsek_attention(q, k, v, u, 8, window=4, return_lse=True)
        g = rng.standard_normal(out.shape).astype(dtype)
        return lambda: foveal.sparsek.sparsek_attention_backward(
            q, k, v, u, out, lse, g, 8, window=4, num_threads=threads)
    if kind == 4:
        b, hkv, l, d = 1, 2, 70 + index, 12
        q = rng.standard_normal((b, 2 * hkv, l, d)).astype(dtype)
        k = rng.standard_normal((b, hkv, l, d)).astype(dtype)
        v = rng.standard_normal((b, hkv, l, d)).astype(dtype)
        bias = rng.standard_normal((l, l)).astype(dtype)
        out, lse = foveal.attention(q, k, v, causal=True, sink_tokens=2, bias=bias,
                                    return_lse=True)
        g = rng.standard_normal(out.shape).astype(dtype)
        g_lse = rng.standard_normal(lse.shape).astype(dtype)  # a loss that reads lse too
        return lambda: foveal.attention_backward(q, k, v, out, lse, g, causal=True,
                                                 sink_tokens=2, bias=bias, return_bias_grad=True,
                                                 grad_lse=g_lse, num_threads=threads)
    if kind == 6:
        hkv, d = 2, 8 + index
        cache = foveal.PagedKVCache(64, 16, hkv, d, dtype=dtype)
        prompt = cache.add_sequence()
        cache.append(prompt, rng.standard_normal((hkv, 300, d)).astype(dtype),
                     rng.standard_normal((hkv, 300, d)).astype(dtype))
        ids = [prompt, cache.fork(prompt), cache.add_sequence()]
        cache.append(ids, rng.standard_normal((3, hkv, 5, d)).astype(dtype),
                     rng.standard_normal((3, hkv, 5, d)).astype(dtype))
        q = rng.standard_normal((3, 2 * hkv, 1, d)).astype(dtype)
        return lambda: foveal.batch_decode_attention(q, cache, ids, return_lse=True,
                                                     num_threads=threads)
    b, hkv, lq, lk, d = 1, 2, 24, 64 + index, 8
    q = rng.standard_normal((b, hkv, lq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    u = rng.standard_normal((b, hkv, lk)).astype(dtype)
    return lambda: foveal.sparsek_attention(q, k, v, u, 8, window=4, return_lse=True,
                                            num_threads=threads)

"""

# Runs the calls of `calls(index)` alone, then from THREADS threads at once, ROUNDS times each.
RUN = r"""
def as_arrays(result):
    # The bytes of every result (a torch bfloat16 tensor has no numpy dtype).
    arrays = []
    for x in result if isinstance(result, tuple) else (result,):
        if hasattr(x, "detach"):
            x = x.detach().contiguous().view(-1).view(torch.uint8).numpy()
        arrays.append(np.asarray(x))
    return arrays

THREADS, ROUNDS = 8, 6
work = [calls(i) for i in range(THREADS)]
alone = [as_arrays(call()) for call in work]
results = [[] for _ in range(THREADS)]
barrier = threading.Barrier(THREADS)

def worker(i):
    barrier.wait()
    for _ in range(ROUNDS):
        results[i].append(as_arrays(work[i]()))

threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
for t in threads: t.start()
for t in threads: t.join()
for i in range(THREADS):
    assert len(results[i]) == ROUNDS, f"thread {i} did not finish"
    for got in results[i]:
        for a, b in zip(got, alone[i]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), f"thread {i}: result differs from the lone run"
print("ok", THREADS * ROUNDS)
"""

# The 16-bit storage paths: torch bfloat16 / float16 and numpy float16 inputs; one 16-bit
# KVCache and one paged pool read by several threads at once, a cache of its own for others,
# and prefills into pools made inside the call.
HALF_CALLS = r"""
import threading
import numpy as np
import torch
import foveal

generator = torch.Generator().manual_seed(0)

def draw(dtype, *shape):
    return torch.randn(*shape, generator=generator).to(dtype)

SHARED = {}
for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
    cache = foveal.KVCache(2, 2, 1300, 64, 48, dtype=name)
    cache.append(draw(dtype, 2, 2, 1300, 64), draw(dtype, 2, 2, 1300, 48), counts=[1250, 333])
    pool = foveal.PagedKVCache(64, 16, 2, 32, dtype=name)
    prompt = pool.add_sequence()
    pool.append(prompt, draw(dtype, 2, 300, 32), draw(dtype, 2, 300, 32))
    ids = [prompt, pool.fork(prompt), pool.add_sequence()]
    pool.append(ids, draw(dtype, 3, 2, 5, 32), draw(dtype, 3, 2, 5, 32))
    SHARED[dtype] = cache, pool, ids

def calls(index):
    # One call per index: 8 kinds in bfloat16, then in float16; two threads (of different thread
    # counts) read each dtype's shared cache, two its shared pool.
    kind = (0, 1, 2, 2, 3, 4, 4, 5)[index % 8]
    dtype = torch.bfloat16 if index < 8 else torch.float16
    name = str(dtype).replace("torch.", "")
    threads = 1 + index % 3
    cache, pool, ids = SHARED[dtype]
    if kind == 0:
        q, k, v = draw(dtype, 1, 4, 130, 32), draw(dtype, 1, 2, 200, 32), draw(dtype, 1, 2, 200, 24)
        bias = draw(dtype, 4, 130, 200)
        return lambda: foveal.attention(q, k, v, bias=bias, causal=True, return_lse=True,
                                        num_threads=threads)
    if kind == 1:
        rng = np.random.default_rng(index)
        q, k, v = (rng.standard_normal(shape).astype(np.float16)
                   for shape in ((1, 4, 150, 32), (1, 2, 150, 32), (1, 2, 150, 32)))
        return lambda: foveal.sliding_window_attention(q, k, v, causal=True, window_left=40,
                                                       return_lse=True, num_threads=threads)
    if kind == 2:
        q = draw(dtype, 2, 8, 2, 64)
        return lambda: foveal.decode_attention(q, cache, causal=True, return_lse=True,
                                               num_threads=threads)
    if kind == 3:
        own = foveal.KVCache(1, 2, 900, 64, 48, dtype=name)
        own.append(draw(dtype, 1, 2, 900, 64), draw(dtype, 1, 2, 900, 48))
        q = draw(dtype, 1, 8, 1, 64)
        return lambda: foveal.decode_attention(q, own, return_lse=True, num_threads=threads)
    if kind == 4:
        q = draw(dtype, 3, 4, 1, 32)
        return lambda: foveal.batch_decode_attention(q, pool, ids, return_lse=True,
                                                     num_threads=threads)
    q, k, v = draw(dtype, 2, 4, 150, 32), draw(dtype, 2, 2, 150, 32), draw(dtype, 2, 2, 150, 32)

    def prefill():
        fresh = foveal.PagedKVCache(32, 16, 2, 32, dtype=name)
        sequences = [fresh.add_sequence(), fresh.add_sequence()]
        return foveal.batch_prefill_attention(q, k, v, fresh, sequences, counts=[150, 97],
                                              causal=True, return_lse=True, num_threads=threads)
    return prefill
"""


# The sparse kernels on shared read-only inputs: q, k, v and the block and token selections made
# from them, a ring cache with page bounds past its first wrap, a float16 cache with page bounds;
# and the 8-bit storage: a KVCache (decode, Quest) and a paged pool with a forked prompt.
SPARSE_CALLS = r"""
import threading
import numpy as np
import foveal

rng = np.random.default_rng(7)

def draw(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)

q, k, v = draw(1, 4, 300, 32), draw(1, 2, 300, 32), draw(1, 2, 300, 24)
wide = [t.astype(np.float64) for t in (q, k, v)]
selection = foveal.block_sparse_select(q, k, budget=0.3, block_size=32)
tokens = foveal.token_topk_select(*wide[:2], budget=0.2, block_size=24, local_tokens=8)
ring = foveal.KVCache(2, 2, 700, 32, ring=True, sink_tokens=4, page_bounds=16)
ring.append(draw(2, 2, 900, 32), draw(2, 2, 900, 32), counts=[900, 650])
half = foveal.KVCache(1, 2, 800, 32, dtype="float16", page_bounds=32)
half.append(draw(1, 2, 800, 32, dtype=np.float16), draw(1, 2, 800, 32, dtype=np.float16))
step, half_step = draw(2, 4, 1, 32), draw(1, 8, 2, 32, dtype=np.float16)
int8 = foveal.KVCache(1, 2, 1500, 40, dtype="int8", page_bounds=16)
int8.append(draw(1, 2, 1300, 40), draw(1, 2, 1300, 40))
int8_step = draw(1, 8, 1, 40)
int8_pool = foveal.PagedKVCache(64, 16, 2, 40, dtype="int8")
prompt = int8_pool.add_sequence()
int8_pool.append(prompt, draw(2, 300, 40), draw(2, 300, 40))
int8_ids = [prompt, int8_pool.fork(prompt), int8_pool.add_sequence()]
int8_pool.append(int8_ids, draw(3, 2, 5, 40), draw(3, 2, 5, 40))
int8_batch = draw(3, 4, 1, 40)

def calls(index):
    # Two threads of different thread counts per kind.
    kind, threads = index % 10, 1 + index % 3
    if kind == 9:  # the 8-bit pool, with a shared prefix
        return lambda: foveal.batch_decode_attention(
            int8_batch, int8_pool, int8_ids, return_lse=True, num_threads=threads)
    if kind == 8:  # the 8-bit cache: decode, then Quest
        if index < 9:
            return lambda: foveal.decode_attention(
                int8_step, int8, return_lse=True, num_threads=threads)
        return lambda: foveal.quest_decode_attention(
            int8_step, int8, budget=0.25, return_lse=True, num_threads=threads)
    if kind == 7:
        return lambda: foveal.snapkv_compress(
            q, k, v, budget=0.2, threshold=0.6 if index > 7 else 0.0, window=32,
            sink_tokens=2, num_threads=threads)
    if kind == 6:
        return lambda: foveal.vertical_slash_attention(
            q, k, v, budget=0.1, threshold=0.7 if index > 6 else 0.0, block_size=16,
            last_queries=40, return_lse=True, num_threads=threads)
    if kind == 4:
        return lambda: foveal.token_topk_attention(
            q, k, v, budget=0.1, threshold=0.8 if index > 5 else 0.0, block_size=16,
            return_lse=True, num_threads=threads)
    if kind == 5:
        return lambda: foveal.token_topk_attention(
            *wide, selection=tokens, return_lse=True, num_threads=threads)
    if kind == 0:
        threshold = 0.9 if index > 3 else 0.0
        return lambda: foveal.block_sparse_attention(
            q, k, v, budget=0.25, threshold=threshold, block_size=32, return_lse=True,
            num_threads=threads)
    if kind == 1:
        return lambda: foveal.block_sparse_attention(
            *wide, selection=selection, return_lse=True, num_threads=threads)
    if kind == 2:
        return lambda: foveal.quest_decode_attention(
            step, ring, budget=0.2, window_left=500, return_lse=True, num_threads=threads)
    return lambda: foveal.quest_decode_attention(
        half_step, half, budget=0.1, causal=True, return_lse=True, num_threads=threads)
"""


def test_sparse_kernels_and_the_8_bit_caches_from_twenty_threads_match_lone_runs():
    output = _run_child(SPARSE_CALLS + RUN.replace("THREADS, ROUNDS = 8", "THREADS, ROUNDS = 20"))
    assert output.startswith("ok")


def test_eight_threads_match_lone_runs():
    assert _run_child(CALLS + RUN).startswith("ok")


def test_sixteen_bit_calls_from_sixteen_threads_match_lone_runs():
    pytest.importorskip("torch")
    output = _run_child(HALF_CALLS + RUN.replace("THREADS, ROUNDS = 8", "THREADS, ROUNDS = 16"))
    assert output.startswith("ok")


CACHE_RACE = r"""
import threading
import time
import numpy as np
import foveal

cache = foveal.KVCache(1, 2, 4096, 32, ring=True)
step = np.ones((1, 2, 8, 32), np.float32)
q = np.ones((1, 4, 1, 32), np.float32)
errors, barrier = [], threading.Barrier(3)
# The threads run until a collision was rejected (the race is timing-dependent: on a busy machine
# it may take many rounds), or for at most 30 s.
deadline = time.monotonic() + 30

def running():
    return not errors and time.monotonic() < deadline

def mutate():
    barrier.wait()
    while running():
        try:
            cache.append(step, step)
            cache.truncate(cache.lengths[0] // 2)
        except (ValueError, RuntimeError) as error:
            errors.append(error)

def read():
    barrier.wait()
    while running():
        try:
            foveal.decode_attention(q, cache)
        except (ValueError, RuntimeError) as error:
            errors.append(error)

threads = [threading.Thread(target=f) for f in (mutate, mutate, read)]
for t in threads: t.start()
for t in threads: t.join()
assert errors, "two threads mutated one cache at once and nothing was rejected"
print("ok", len(errors))
"""


def _edited(source: str, *edits: tuple) -> str:
    """source with each (old, new) edit made; every old text must be there."""
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    return source


# The same race over a cache with page bounds, the mutators refreshing them too and the reader
# running Quest; afterwards the bounds must still be those of the stored keys.
PAGED_RACE = _edited(
    CACHE_RACE,
    ("ring=True)", "ring=True, page_bounds=16)"),
    (
        "            cache.truncate(cache.lengths[0] // 2)\n",
        "            cache.truncate(cache.lengths[0] // 2)\n            cache.refresh_page_bounds()\n",
    ),
    ("foveal.decode_attention(q, cache)", "foveal.quest_decode_attention(q, cache)"),
    (
        'print("ok", len(errors))',
        "bounds = cache.page_bounds\ncache.refresh_page_bounds()\n"
        "assert np.array_equal(bounds, cache.page_bounds), 'the race corrupted the page bounds'\n"
        'print("ok", len(errors))',
    ),
)


@pytest.mark.parametrize("source", [CACHE_RACE, PAGED_RACE], ids=["plain", "page_bounds"])
def test_cache_mutated_from_two_threads_raises(source):
    assert _run_child(source).startswith("ok")
