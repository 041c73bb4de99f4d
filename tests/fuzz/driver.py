"""Runs fuzz cases of foveal's Python API in a child process and judges each one.

A case is standalone Python source in two parts: ``setup`` builds the inputs (a failure there
only means the generator drew inputs numpy or torch cannot build: the case does not count) and
``call`` calls foveal and checks the documented shape and dtype of what comes back. The oracle:
the call either returns such a result or raises ValueError, TypeError or MemoryError. Anything
else is a finding: another exception type (SystemError, RuntimeError, IndexError, ...), a
wrong result shape or dtype (AssertionError from the checks), a crash of the process (signal,
abort, sanitizer) or a hang (no answer within the timeout).

The cases run in a persistent worker process (``python driver.py --worker``) that is started
again after a crash or a hang, so one finding never hides the cases after it. The worker caps
its address space (FOVEAL_FUZZ_MEMORY_MB, default 6144) so that an attempt to allocate a huge
buffer fails fast with MemoryError instead of swapping the machine.

``reproducer(setup, call)`` is the standalone script of a case (PRELUDE + setup + call): save
it and run it with ``python`` to see the finding again.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict

# Helpers every case may use; part of every reproducer.
PRELUDE = r'''
import numpy as np
import foveal
import foveal.pde_ssm, foveal.spade, foveal.sparsek, foveal.vq
from numpy.lib.stride_tricks import as_strided

_ALLOWED = (ValueError, TypeError, MemoryError)


def _fill(rng, shape, dtype, fill):
    """An array of the shape and dtype holding the fill pattern."""
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        return rng.integers(-3, 10, size=shape).astype(dt)
    if dt.kind == "b":
        return rng.random(shape) < 0.7
    a = rng.standard_normal(shape)
    if fill == "zeros":
        a = np.zeros(shape)
    elif fill == "nan":
        a = np.full(shape, np.nan)
    elif fill in ("inf", "-inf"):
        a = np.full(shape, float(fill))
    elif fill == "huge":
        a = a * 1e38
    elif fill == "tiny":
        a = a * 1e-40
    elif fill == "mixed" and a.size:
        flat = a.reshape(-1)
        flat[rng.integers(0, flat.size, size=max(1, flat.size // 4))] = rng.choice(
            [np.nan, np.inf, -np.inf, 0.0], size=max(1, flat.size // 4))
    with np.errstate(over="ignore", under="ignore"):
        return a.astype(dt)


def mk(shape, dtype="float32", layout="c", fill="randn", lib="np", seed=0):
    """An array of `shape` with the given memory layout:
    c: contiguous; f: axes reversed in memory; swap: axes 1 and 2 swapped in memory;
    neg: first axis reversed (negative stride), negin: the last one too; step: every other
    row of a larger buffer, stepin: every other element; zero: one element seen through all-zero strides (any shape, even huge);
    overlap: every stride one element (rows overlap); readonly: contiguous, not writable.
    lib="torch" gives a torch tensor of the same memory; dtype="bf16" a bfloat16 copy."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    base_dtype = "float32" if dtype == "bf16" else dtype
    nd = len(shape)
    if layout == "zero":
        a = as_strided(_fill(rng, (1,), base_dtype, fill), shape, (0,) * nd)
    elif layout == "overlap":
        n = 1 + sum(max(s - 1, 0) for s in shape)
        base = _fill(rng, (n,), base_dtype, fill)
        a = as_strided(base, shape, (base.itemsize,) * nd)
    elif layout == "f":
        a = _fill(rng, shape[::-1], base_dtype, fill).transpose()
    elif layout == "swap" and nd >= 3:
        s = list(shape)
        s[1], s[2] = s[2], s[1]
        a = _fill(rng, tuple(s), base_dtype, fill).swapaxes(1, 2)
    elif layout in ("neg", "negin") and nd >= 1:
        a = _fill(rng, shape, base_dtype, fill)[::-1]
        a = a[..., ::-1] if nd > 1 and layout == "negin" else a
    elif layout in ("step", "stepin"):
        inner = 2 if layout == "stepin" else 1
        big = _fill(rng, tuple(2 * s for s in shape[:-1]) + (inner * shape[-1],), base_dtype, fill)
        a = big[tuple(slice(None, None, 2) for _ in shape[:-1]) + (slice(None, None, inner),)]
    else:
        a = _fill(rng, shape, base_dtype, fill)
        if layout == "readonly":
            a.flags.writeable = False
    if lib == "torch":
        import torch

        t = torch.from_numpy(a)
        return t.to(torch.bfloat16) if dtype == "bf16" else t
    return a


def _dtype_name(x):
    return str(x.dtype).replace("torch.", "")


def expect(result, shape, like, dtype=None):
    """result has this shape, the dtype of `like` (or dtype) and the kind (numpy/torch)."""
    assert tuple(result.shape) == tuple(shape), f"shape {tuple(result.shape)} != {tuple(shape)}"
    want = dtype if dtype is not None else _dtype_name(like)
    assert _dtype_name(result) == str(want), f"dtype {_dtype_name(result)} != {want}"
    assert type(result).__module__.split(".")[0] == type(like).__module__.split(".")[0], (
        f"kind {type(result).__module__} != {type(like).__module__}")


def lse_dtype(like):
    """The dtype of lse next to inputs like `like`: float32 for the 16-bit types."""
    name = _dtype_name(like)
    return "float32" if name in ("float16", "bfloat16") else name


def is_half(x):
    return _dtype_name(x) in ("float16", "bfloat16")


def widened(x):
    """A 16-bit array or tensor as float32; anything else as it is."""
    if not is_half(x):
        return x
    return x.float() if hasattr(x, "float") else x.astype(np.float32)


def _float32_numpy(x):
    return x.detach().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)


def expect_rounded(result, single):
    """A 16-bit call's result is the float32 call's (`single`, on the widened inputs) with out
    rounded to the 16-bit type and lse the same (NaN matches NaN)."""
    got = result if isinstance(result, tuple) else (result,)
    want = single if isinstance(single, tuple) else (single,)
    assert len(got) == len(want)
    for index, (g, w) in enumerate(zip(got, want)):
        if index == 0:
            w = w.to(g.dtype) if hasattr(w, "to") else w.astype(g.dtype)
        assert np.array_equal(_float32_numpy(g), _float32_numpy(w), equal_nan=True), (
            f"result {index} differs from the float32 call's" + (", rounded" if index == 0 else ""))


def _widened_numpy(x):
    """A numpy copy of x, 16-bit types widened to float32 (exactly)."""
    if hasattr(x, "detach"):
        return x.detach().float().numpy() if is_half(x) else x.detach().numpy()
    return np.asarray(x, np.float32) if is_half(x) else np.asarray(x)


def check_page_bounds(cache):
    """A KVCache's page bounds are [B, Hkv, pages, 2, D]: each page's min and max over its
    stored keys (NaN ignored; +inf / -inf where it stores none), rounded outward to bfloat16
    unless the keys are float64; none without page_bounds."""
    size, bounds = cache.page_size, cache.page_bounds
    if size == 0:
        assert bounds.size == 0, f"page bounds {bounds.shape} without page_bounds"
        return
    shape = (cache.batch, cache.heads_kv, -(-cache.capacity // size), 2, cache.dim)
    assert tuple(bounds.shape) == shape, f"page bounds shape {tuple(bounds.shape)} != {shape}"
    if bounds.size == 0:
        return
    keys, sinks, capacity = _widened_numpy(cache.keys), cache.sink_tokens, cache.capacity
    for b, length in enumerate(cache.lengths):
        if cache.ring:
            kept = list(range(min(sinks, length)))
            kept += range(max(cache.first_retained(b), sinks), length)
            rows = [p if p < sinks else sinks + (p - sinks) % (capacity - sinks) for p in kept]
        else:
            rows = range(length)
        low = np.full(bounds.shape[2:3] + bounds.shape[1:2] + bounds.shape[4:], np.inf)
        high = -low
        for row in rows:
            low[row // size] = np.fmin(low[row // size], keys[b, :, row])
            high[row // size] = np.fmax(high[row // size], keys[b, :, row])
        if bounds.dtype != np.float64:  # kept in bfloat16, rounded outward
            low, high = _bfloat16_toward(low, False), _bfloat16_toward(high, True)
        want = np.stack([low.swapaxes(0, 1), high.swapaxes(0, 1)], axis=2).astype(bounds.dtype)
        assert np.array_equal(bounds[b], want), f"page bounds of sequence {b} are not the min/max"


def _bfloat16_toward(x, up):
    """float32 values (infinities included) to the bfloat16 next to them toward +inf (``up``)
    or -inf, by their bits: dropping the low 16 bits moves toward zero, so one step away from
    zero where that is the wrong side."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    negative = (bits >> np.uint32(31)) == 1
    away = ((bits & np.uint32(0xFFFF)) != 0) & (negative != up)
    moved = (bits & np.uint32(0xFFFF0000)) + away.astype(np.uint32) * np.uint32(0x10000)
    return moved.view(np.float32)


def selection_ok(selection, q, k, q_offset):
    """Whether a BlockSelection or TokenSelection of int64 arrays follows its rules for q, k and
    q_offset (None or -1: Lk - Lq); None when its arrays are not int64 vectors (the call may
    convert them)."""
    tokens = isinstance(selection, foveal.TokenSelection)
    offsets, items = selection.offsets, selection.keys if tokens else selection.blocks
    for array in (offsets, items):
        if not isinstance(array, np.ndarray) or array.dtype != np.int64 or array.ndim != 1:
            return None
    size = selection.block_size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
        return None
    if not 16 <= size <= 4096:
        return False
    lq, lk = q.shape[2], k.shape[2]
    offset = lk - lq if q_offset is None or q_offset == -1 else q_offset
    first = offset // size if lq else 0
    count = (offset + lq - 1) // size - first + 1 if lq else 0
    want = (q.shape[0], k.shape[1], first, count, lk if tokens else -(-lk // size))
    got = (selection.batch, selection.heads_kv, selection.first_query_block,
           selection.query_blocks, selection.len_k if tokens else selection.key_blocks)
    if want != got or len(offsets) != q.shape[0] * k.shape[1] * count + 1:
        return False
    if offsets[0] != 0 or offsets[-1] != len(items) or (np.diff(offsets) < 0).any():
        return False
    for begin, end in zip(offsets[:-1], offsets[1:]):
        kept = items[begin:end]
        if len(kept) and (kept[0] < 0 or kept[-1] >= want[4] or (np.diff(kept) <= 0).any()):
            return False
    return True


def attempt(function, *args, state=None, **kwargs):
    """Calls function; an allowed rejection returns None. With `state` (a function returning
    the object's observable state) a rejected call must leave that state unchanged."""
    before = state() if state is not None else None
    try:
        return function(*args, **kwargs)
    except _ALLOWED:
        if state is not None:
            after = state()
            assert after == before, f"rejected call changed the state: {before} -> {after}"
        return None
'''

ALLOWED = (ValueError, TypeError, MemoryError)


def reproducer(setup: str, call: str) -> str:
    """The standalone script of a case."""
    return f"{PRELUDE}\n# --- setup\n{setup}\n# --- call\n{call}\n"


def save_reproducer(label: str, status: str, setup: str, call: str) -> str:
    """Writes the reproducer of a finding under FOVEAL_FUZZ_FINDINGS (default
    build/fuzz-findings) and returns its path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folder = os.environ.get("FOVEAL_FUZZ_FINDINGS", os.path.join(root, "build", "fuzz-findings"))
    os.makedirs(folder, exist_ok=True)
    text = reproducer(setup, call)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    path = os.path.join(folder, f"{label.replace('.', '_')}-{status}-{digest}.py")
    with open(path, "w") as file:
        file.write(text)
    return path


# --------------------------------------------------------------------------------------------
# The worker (child process).


def _worker_main() -> None:
    import resource

    limit = int(os.environ.get("FOVEAL_FUZZ_MEMORY_MB", "6144")) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = sys.stdout
    sys.stdout = sys.stderr  # a case's prints must not corrupt the protocol
    base: dict = {}
    exec(compile(PRELUDE, "<prelude>", "exec"), base)
    foveal = base["foveal"]
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        case = json.loads(line)
        namespace = dict(base)
        try:
            exec(compile(case["setup"], "<setup>", "exec"), namespace)
        except BaseException as error:
            reply = {"status": "invalid", "detail": f"{type(error).__name__}: {error}"}
        else:
            try:
                exec(compile(case["call"], "<call>", "exec"), namespace)
                reply = {"status": "ok", "detail": ""}
            except ALLOWED as error:
                reply = {"status": "rejected", "detail": f"{type(error).__name__}: {error}"}
            except AssertionError as error:
                reply = {"status": "wrong", "detail": traceback.format_exc(limit=-3)}
                del error
            except BaseException:
                reply = {"status": "exception", "detail": traceback.format_exc(limit=-3)}
        try:
            foveal.set_num_threads(0)  # a case may change the global setting
        except BaseException:
            pass
        out.write(json.dumps(reply) + "\n")
        out.flush()


# --------------------------------------------------------------------------------------------
# The parent side.

FAILURES = ("exception", "wrong", "crash", "hang")
COUNTS: dict = defaultdict(Counter)  # label -> status -> cases (this process)
FINDINGS: list = []  # (label, status, detail, reproducer)
REASONS: dict = defaultdict(Counter)  # label -> first line of rejections (FOVEAL_FUZZ_REASONS=1)


class Runner:
    """Sends cases to a worker process; starts a new one after a crash or a hang."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.stderr = None
        self.restarts = 0

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "2")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=env,
        )
        line = self._read_line(120.0)
        if line != b"ready\n":
            raise RuntimeError(f"fuzz worker did not start: {line!r} {self._stderr_tail()}")

    def _read_line(self, timeout: float):
        """A line from the worker, None on timeout, b"" on EOF."""
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        return self.proc.stdout.readline()

    def _stderr_tail(self, size: int = 1500) -> str:
        if self.stderr is None:
            return ""
        self.stderr.seek(0, os.SEEK_END)
        length = self.stderr.tell()
        self.stderr.seek(max(0, length - size))
        return self.stderr.read().decode(errors="replace")

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.restarts += 1

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def run(self, setup: str, call: str) -> tuple[str, str]:
        """(status, detail): status ok, rejected, invalid, or one of FAILURES."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        if self.stderr is not None:
            self.stderr.seek(0)
            self.stderr.truncate()
        try:
            self.proc.stdin.write((json.dumps({"setup": setup, "call": call}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        started = time.monotonic()
        line = self._read_line(self.timeout)
        if line is None:
            self._stop()
            return "hang", f"no answer within {self.timeout:.0f} s"
        if not line:
            code = self.proc.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            tail = self._stderr_tail()
            self._stop()
            return "crash", f"worker died ({how}) after {time.monotonic() - started:.1f} s\n{tail}"
        reply = json.loads(line)
        return reply["status"], reply["detail"]


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker_main()
    else:
        # Run a reproducer file through the same oracle: python driver.py case.py
        source = open(sys.argv[1]).read()
        runner = Runner(float(os.environ.get("FOVEAL_FUZZ_TIMEOUT", "10")))
        print(runner.run("", source.replace(PRELUDE, "")))
        runner.close()
