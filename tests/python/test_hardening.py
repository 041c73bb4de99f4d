"""Hostile input (issue 14): checked sizes, bounded thread counts, caches that detect concurrent
misuse, MemoryError for allocations that fail, self-overlapping outputs rejected, NaN in NaN out,
clear messages, k-means that converges and can be interrupted, explicit SPADE shifts.

Reproducers that used to crash the interpreter run in a subprocess, so a regression fails the
test instead of killing the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import foveal
import numpy as np
import pytest
from foveal import spade, vq
from foveal.pde_ssm import PdeSsm
from foveal.sparsek import SparseKCache, sparsek, sparsek_attention


def run_isolated(code: str, timeout: float = 120, env: dict | None = None):
    """Runs `code` in a fresh interpreter; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def expect_output(code: str, expected: str, **options) -> None:
    done = run_isolated(code, **options)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert expected in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# 1. Sizes.


def test_kv_cache_whose_size_overflows_is_a_value_error_not_a_crash():
    expect_output(
        """
        import numpy as np, foveal
        try:
            c = foveal.KVCache(1, 1, 2**62, 128)
            ones = np.ones((1, 1, 1, 128), np.float32)
            c.append(ones, ones)
        except ValueError as error:
            print("ValueError:", error)
        """,
        "KVCache keys: shape [1, 1, 4611686018427387904, 128]",
    )


def test_spade_decoder_whose_size_overflows_is_a_value_error_not_a_crash():
    expect_output(
        """
        from foveal import spade
        try:
            spade.Decoder(spade.Schema([spade.Feature.binned("a", 3)]), 4, 2**62)
        except ValueError as error:
            print("ValueError:", error)
        """,
        "SpadeDecoder ids: shape [4, 4611686018427387904, 1]",
    )


def test_sparsek_cache_whose_row_count_overflows_is_a_value_error():
    with pytest.raises(ValueError, match=r"sink_tokens \+ window \+ topk"):
        SparseKCache(1, 1, 4, 4, topk=2**63 - 1, window=4)


# ---------------------------------------------------------------------------------------------
# 2. Thread counts.


def test_absurd_num_threads_is_a_value_error_not_a_crash():
    expect_output(
        """
        import numpy as np
        from foveal.sparsek import sparsek
        for n in (100000, 1500, 2**31, 2**70):
            try:
                sparsek(np.ones((64, 8), np.float32), 3, num_threads=n)
            except ValueError as error:
                print("ValueError:", error)
        """,
        "sparsek: num_threads must be in [0, 1024] (0 = the global setting), got 2147483648",
    )
    with pytest.raises(ValueError, match=r"num_threads must be in \[0, 1024\].*got 1500"):
        sparsek(np.ones((64, 8), np.float32), 3, num_threads=1500)
    with pytest.raises(ValueError, match=r"set_num_threads: num_threads must be in \[0, 1024\]"):
        foveal.set_num_threads(1025)
    with pytest.raises(ValueError, match=r"attention: num_threads must be in \[0, 1024\]"):
        q = np.ones((1, 1, 4, 8), np.float32)
        foveal.attention(q, q, q, num_threads=2**31)
    assert foveal.MAX_THREADS == 1024


def test_a_call_starts_no_more_threads_than_tasks():
    # 5 rows (at most 5 tasks) and one attention tile: the largest thread count starts at most
    # 5 threads (OpenMP keeps its team between calls), where it used to start 1024.
    expect_output(
        """
        import os, numpy as np, foveal
        from foveal.sparsek import sparsek
        before = len(os.listdir("/proc/self/task"))
        p = sparsek(np.ones((5, 8), np.float32), 3, num_threads=foveal.MAX_THREADS)
        q = np.ones((1, 1, 8, 16), np.float32)
        foveal.attention(q, q, q, num_threads=foveal.MAX_THREADS)
        started = len(os.listdir("/proc/self/task")) - before
        print("ok" if started <= 4 else "started %d" % started, p.sum())
        """,
        "ok 15.0",
    )


def test_omp_num_threads_above_the_maximum_is_clamped():
    expect_output(
        """
        import numpy as np, foveal
        from foveal.sparsek import sparsek
        p = sparsek(np.ones((64, 8), np.float32), 3)
        print("threads:", foveal.get_num_threads(), p.sum())
        """,
        "threads: 1024 192.0",
        env={"OMP_NUM_THREADS": "100000"},
    )


# ---------------------------------------------------------------------------------------------
# 3. Concurrent use of one cache.


def test_concurrent_append_and_reset_of_one_kv_cache_raise_instead_of_crashing():
    # Two appends of 2 steps each pass the capacity check of a batch of 4 sequences; without
    # the guard the second then starts from the first one's new length (length 10 of 8).
    expect_output(
        """
        import threading, numpy as np, foveal
        cache = foveal.KVCache(4, 4, 8, 2048)
        step = np.ones((4, 4, 2, 2048), np.float32)
        errors, lengths = [], []

        def work(seed):
            for i in range(4000):
                try:
                    if i % 40 == seed:
                        cache.reset()
                    else:
                        cache.append(step, step)
                except ValueError as error:
                    text = str(error)
                    if "another thread" in text:
                        errors.append(text)
                    elif "exceed the capacity" not in text:
                        raise
                lengths.append(max(cache.lengths))

        threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("max length", max(lengths), "rejected", len(errors))
        assert max(lengths) <= 8, max(lengths)
        print("ok")
        """,
        "ok",
    )


def test_a_mutation_during_decode_raises_with_a_clear_message():
    cache = foveal.KVCache(1, 1, 1 << 16, 64)
    step = np.ones((1, 1, 1, 64), np.float32)
    cache.append(step, step)
    q = np.ones((1, 8, 1, 64), np.float32)
    stop = threading.Event()
    messages = []

    def writer():
        while not stop.is_set() and cache.lengths[0] < (1 << 16) - 1:
            try:
                cache.append(step, step)
            except ValueError as error:
                messages.append(str(error))

    thread = threading.Thread(target=writer)
    thread.start()
    done = 0
    try:
        for _ in range(2000):
            try:
                out = foveal.decode_attention(q, cache)
                assert np.isfinite(out).all()
                done += 1
            except ValueError as error:
                messages.append(str(error))
    finally:
        stop.set()
        thread.join()
    assert done > 0
    for message in messages:
        assert "another thread" in message, message


def test_concurrent_sparsek_cache_use_raises_instead_of_crashing():
    # Without the guard this crashes the interpreter (concurrent pushes into one head's state).
    expect_output(
        """
        import threading, numpy as np
        from foveal.sparsek import SparseKCache
        cache = SparseKCache(2, 4, 64, 64, topk=64, window=16)
        rng = np.random.default_rng(0)
        k = rng.standard_normal((2, 4, 96, 64)).astype(np.float32)
        u = rng.standard_normal((2, 4, 96)).astype(np.float32)
        q = np.ones((2, 4, 1, 64), np.float32)
        cache.append(k, k, u)
        rejected = []

        def work(role):
            for i in range(1500):
                try:
                    if role == 2:
                        out = cache.attend(q)
                        assert np.isfinite(out).all()
                    elif (i + role) % 7 == 0:
                        cache.reset()
                    else:
                        cache.append(k, k, u)
                except ValueError as error:
                    assert "another thread" in str(error) or "empty" in str(error), error
                    rejected.append(1)
                assert cache.stored_rows <= cache.capacity, (cache.stored_rows, cache.capacity)

        threads = [threading.Thread(target=work, args=(r,)) for r in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("ok", len(rejected))
        """,
        "ok",
    )


# ---------------------------------------------------------------------------------------------
# 4. Allocation failures.


def test_an_allocation_the_system_cannot_provide_is_memory_error_with_the_byte_count():
    # 2^53 rows of 16 floats: 2^59 bytes, more than any address space.
    with pytest.raises(MemoryError, match="KVCache keys: cannot allocate 576460752303423488 bytes"):
        foveal.KVCache(1, 1, 2**53, 16)


def test_a_large_kv_cache_takes_no_memory_until_written():
    expect_output(
        """
        import numpy as np, foveal

        def resident():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096

        before = resident()
        cache = foveal.KVCache(1, 8, 2**17, 512)  # 2 GiB of keys, 2 GiB of values
        grown = resident() - before
        cache.append(np.ones((1, 8, 3, 512), np.float32), np.ones((1, 8, 3, 512), np.float32))
        print("grown MiB:", grown >> 20, "ok" if grown < (64 << 20) else "TOO MUCH")
        """,
        "ok",
    )


def test_torch_output_allocation_failure_is_memory_error(torch):
    with pytest.raises(MemoryError, match=r"cannot allocate an output tensor of shape"):
        foveal._common.new_like(torch.empty(1), (2**40, 2**20))
    # An empty shape whose strides pass 2^63 (a fuzz finding: sparsek_select's top-k output
    # over an empty batch with k near 2^63): torch cannot represent it either.
    with pytest.raises(MemoryError, match=r"cannot allocate an output tensor of shape"):
        foveal._common.new_like(torch.empty(1), (2**31 + 1, 0, 2**63 - 1, 3))
    u = torch.zeros(2**31 + 1, 0, 6, dtype=torch.float64)
    with pytest.raises(MemoryError, match=r"cannot allocate an output tensor of shape"):
        foveal.sparsek.sparsek_select(u, 3, 2**63 - 1, window=3)


# ---------------------------------------------------------------------------------------------
# 5. Outputs whose elements overlap each other.


def _stride0(shape, dtype=np.float32, fill=7.0):
    """A writable view of `shape` whose first dimension has stride 0, and its memory."""
    base = np.full(shape[1:], fill, dtype)
    view = np.lib.stride_tricks.as_strided(base, shape, (0, *base.strides))
    return view, base


def _entry_points():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 8, 16)).astype(np.float32)
    u = rng.standard_normal((2, 4, 8)).astype(np.float32)
    lse = np.zeros((2, 4, 8), np.float32)
    cache = foveal.KVCache(2, 4, 8, 16)
    cache.append(q, q)
    sk_cache = SparseKCache(2, 4, 16, 16, topk=2, window=2)
    sk_cache.append(q, q, u)
    block = PdeSsm(
        4,
        5,
        6,
        diffusion=[[1.0, 0.0, 1.0]],
        velocity=[[0.5, 0.5]],
        reaction=[0.0],
        time=[1.0],
        dtype=np.float64,
    )
    schema = spade.Schema([spade.Feature.binned("a", 3)])
    embedding = spade.SpadeEmbedding(
        schema, {"a": {"table": np.ones((5, 4), np.float32)}}, combine="sum"
    )
    dense = foveal.make_attention("dense")
    return {
        "attention": ((2, 4, 8, 16), lambda out: foveal.attention(q, q, q, out=out)),
        "sliding_window_attention": (
            (2, 4, 8, 16),
            lambda out: foveal.sliding_window_attention(
                q, q, q, window_left=2, causal=True, out=out
            ),
        ),
        "merge_states": (
            (2, 4, 8, 16),
            lambda out: foveal.merge_states(q, lse, q, lse, out=out),
        ),
        "decode_attention": (
            (2, 4, 8, 16),
            lambda out: foveal.decode_attention(q, cache, out=out),
        ),
        "dense attention": ((2, 4, 8, 16), lambda out: dense(q, q, q, out=out)),
        "sparsek": ((4, 8), lambda out: sparsek(u[0], 3, out=out)),
        "sparsek_attention": (
            (2, 4, 8, 16),
            lambda out: sparsek_attention(q, q, q, u, topk=2, out=out),
        ),
        "SparseKCache.attend": ((2, 4, 1, 16), lambda out: sk_cache.attend(q[:, :, :1], out=out)),
        "pde_ssm": ((2, 4, 5, 6), lambda out: block.forward(np.ones((2, 4, 5, 6)), out=out)),
        "spade.undelay_logits": (
            (2, 1, 1, 5),
            lambda out: spade.undelay_logits(schema, np.ones((2, 2, 1, 5), np.float32), out=out),
        ),
        "SpadeEmbedding": (
            (2, 3, 4),
            lambda out: embedding(np.ones((2, 3, 1), np.int64), out=out),
        ),
    }


@pytest.mark.parametrize("name", list(_entry_points()))
def test_every_out_argument_rejects_a_self_overlapping_view(name):
    shape, call = _entry_points()[name]
    dtype = np.float64 if name == "pde_ssm" else np.float32
    out, memory = _stride0(shape, dtype)
    with pytest.raises(ValueError, match=r"(out|p) is an output whose elements may overlap"):
        call(out)
    assert (memory == 7.0).all(), "out was written before the error"


def test_the_issue_reproducer_with_a_torch_view(torch):
    q = torch.randn(2, 4, 8, 16)
    out = torch.as_strided(torch.zeros((1, 4, 8, 16)), (2, 4, 8, 16), (0, 128, 16, 1))
    with pytest.raises(ValueError, match="out is an output whose elements may overlap"):
        foveal.attention(q, q, q, out=out)
    # A view with negative steps overlaps nothing and is fine.
    memory = np.zeros((2, 4, 8, 16), np.float32)
    mirrored = memory[:, :, ::-1]
    foveal.attention(q.numpy(), q.numpy(), q.numpy(), out=mirrored)
    np.testing.assert_array_equal(mirrored, foveal.attention(q.numpy(), q.numpy(), q.numpy()))


def test_merge_states_rejects_a_self_overlapping_lse():
    out = np.zeros((2, 1, 3, 4), np.float32)
    lse = np.zeros((2, 1, 3), np.float32)
    bad, _ = _stride0((2, 1, 3))
    with pytest.raises(ValueError, match="lse is an output whose elements may overlap"):
        foveal.merge_states(out, lse, out, lse, lse=bad)


# ---------------------------------------------------------------------------------------------
# 6. NaN in, NaN out.


def _causal_qkv(where: str):
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 9, 16)).astype(np.float32) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 1, 4, 3] = np.nan
    return q, k, v


def _check_nan_rows(out, lse, where):
    # Head 1: rows 0-3 do not see key 4 (causal); a NaN in q hits only its own row 4.
    assert np.isfinite(out[0, 0]).all() and np.isfinite(lse[0, 0]).all()
    assert np.isfinite(out[0, 1, :4]).all() and np.isfinite(lse[0, 1, :4]).all()
    nan_rows = slice(4, 5) if where == "q" else slice(4, 9)
    if where == "v":
        assert np.isnan(out[0, 1, nan_rows, 3]).all()
    else:
        assert np.isnan(out[0, 1, nan_rows]).all() and np.isnan(lse[0, 1, nan_rows]).all()
    if where == "q":
        assert np.isfinite(out[0, 1, 5:]).all()


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_dense_and_sliding_window_attention_propagate_nan(where):
    q, k, v = _causal_qkv(where)
    _check_nan_rows(*foveal.attention(q, k, v, causal=True, return_lse=True), where)
    _check_nan_rows(
        *foveal.sliding_window_attention(q, k, v, window_left=16, causal=True, return_lse=True),
        where,
    )


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_decode_attention_propagates_nan_like_attention(where):
    q, k, v = _causal_qkv(where)
    cache = foveal.KVCache(1, 2, 9, 16)
    cache.append(k, v)
    _check_nan_rows(*foveal.decode_attention(q, cache, causal=True, return_lse=True), where)


def test_the_issue_reproducer_decode_and_attention_agree_on_a_nan_key():
    rng = np.random.default_rng(6)
    k = rng.standard_normal((1, 1, 9, 8)).astype(np.float32)
    k[0, 0, 2, 0] = np.nan
    q = rng.standard_normal((1, 1, 1, 8)).astype(np.float32)
    cache = foveal.KVCache(1, 1, 9, 8)
    cache.append(k, k)
    out_d, lse_d = foveal.decode_attention(q, cache, return_lse=True)
    out_a, lse_a = foveal.attention(q, k, k, return_lse=True)
    assert np.isnan(out_d).all() and np.isnan(lse_d).all()
    assert np.isnan(out_a).all() and np.isnan(lse_a).all()
    # Across the split-KV merge too (one NaN among 5000 keys, 5 chunks).
    long_k = rng.standard_normal((1, 1, 5000, 8)).astype(np.float32)
    long_k[0, 0, 3333, 5] = np.nan
    big = foveal.KVCache(1, 1, 5000, 8)
    big.append(long_k, long_k)
    out, lse = foveal.decode_attention(q, big, return_lse=True)
    assert np.isnan(out).all() and np.isnan(lse).all()


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_sparsek_attention_propagates_nan(where):
    q, k, v = _causal_qkv(where)
    u = np.zeros((1, 2, 9), np.float32)
    # topk covers the whole pool: row i sees keys 0..i, as in causal attention.
    out, lse = sparsek_attention(q, k, v, u, topk=9, window=2, gate="none", return_lse=True)
    _check_nan_rows(out, lse, where)


@pytest.mark.parametrize("where", ["k", "v"])
def test_sparsek_cache_propagates_nan(where):
    q, k, v = _causal_qkv(where)
    cache = SparseKCache(1, 2, 16, 16, topk=9, window=2, gate="none")
    u = np.zeros((1, 2, 1), np.float32)
    for position in range(9):
        cache.append(k[:, :, position : position + 1], v[:, :, position : position + 1], u)
        out, lse = cache.attend(q[:, :, position : position + 1], return_lse=True)
        if position < 4:
            assert np.isfinite(out).all() and np.isfinite(lse).all()
        else:
            assert np.isfinite(out[0, 0]).all() and np.isfinite(lse[0, 0]).all()
            if where == "v":
                assert np.isnan(out[0, 1, 0, 3])
            else:
                assert np.isnan(out[0, 1]).all() and np.isnan(lse[0, 1]).all()


# ---------------------------------------------------------------------------------------------
# 7. Messages.


def test_bfloat16_tensors_get_a_type_error_naming_the_dtypes_an_op_takes(torch):
    # attention takes 16-bit storage (test_half_precision.py); merge_states' states are float.
    out = torch.ones((1, 1, 4, 8), dtype=torch.bfloat16)
    lse = torch.zeros((1, 1, 4), dtype=torch.float32)
    with pytest.raises(
        TypeError,
        match=r"foveal: merge_states: out_a must have dtype float32 or float64, got bfloat16",
    ):
        foveal.merge_states(out, lse, out, lse)
    with pytest.raises(
        TypeError,
        match=r"foveal: attention: q must have dtype float32, float64, bfloat16 or float16, "
        r"got int8",
    ):
        foveal.attention(*(torch.ones((1, 1, 4, 8), dtype=torch.int8),) * 3)


def test_integers_outside_int64_get_a_value_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"KVCache: capacity must fit in a 64-bit integer"):
        foveal.KVCache(1, 1, 2**64, 8)
    q = np.ones((1, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"attention: window_left must fit in a 64-bit integer"):
        foveal.attention(q, q, q, window_left=-(2**70))
    with pytest.raises(ValueError, match=r"num_threads must be in \[0, 1024\].*got 2147483648"):
        foveal.decode_attention(q, foveal.KVCache(1, 1, 4, 8), num_threads=2**31)


# ---------------------------------------------------------------------------------------------
# 8. k-means.


def test_huge_lloyd_iterations_return_once_assignments_stop_changing():
    x = np.random.default_rng(7).standard_normal((500, 4)).astype(np.float32)
    start = time.monotonic()
    quantizer = vq.VectorQuantizer.from_data(x, 4, lloyd_iterations=2**40, seed=3)
    assert time.monotonic() - start < 30
    bounded = vq.VectorQuantizer.from_data(x, 4, lloyd_iterations=500, seed=3)
    np.testing.assert_array_equal(quantizer.codebook, bounded.codebook)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_interrupts_a_long_k_means():
    code = textwrap.dedent(
        """
        import sys, time, numpy as np
        from foveal import vq
        x = np.random.default_rng(1).standard_normal((200000, 8)).astype(np.float32)
        print("started", flush=True)
        start = time.monotonic()
        try:
            vq.VectorQuantizer.from_data(x, 2048, lloyd_iterations=2**40, num_threads=1)
            print("finished", time.monotonic() - start, flush=True)
        except KeyboardInterrupt:
            print("interrupted", time.monotonic() - start, flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "started"
        time.sleep(3.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        latency = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert "interrupted" in stdout, stdout + stderr
    assert latency < 10, latency


# ---------------------------------------------------------------------------------------------
# 9. SPADE shifts.


def test_an_explicit_shift_of_zero_is_rejected_with_its_value():
    with pytest.raises(ValueError, match=r"features\[0\]\.shift \(feature 'a'|\"a\"\).*got 0"):
        spade.Schema([spade.Feature.binned("a", 3, shift=0)])
    with pytest.raises(ValueError, match=r"features\[1\]\.shift .* must be >= 1.*got 0"):
        spade.Schema([spade.Feature.binned("a", 3, shift=2), spade.Feature.binned("b", 3, shift=0)])
    assert spade.Schema([spade.Feature.binned("a", 3), spade.Feature.continuous("e")]).shifts == (
        1,
        2,
    )
