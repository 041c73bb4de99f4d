"""Ring attention over torch.distributed (foveal.distributed, docs/distributed.md).

2 and 4 processes (torch.multiprocessing, gloo on the loopback interface) run
foveal.distributed.ring_attention on their shards of one sequence; their outputs, lse and
gradients, put back together, match one foveal.torch.attention call over the whole sequence.
Tolerance: float32 max |difference| <= 1e-6 on out and lse of unit-variance inputs (8 ulp of
1.0: the ring merges up to 2N partial states and adds up to N gradient parts, each rounding
once; measured up to 4.8e-7), and <= 4e-6 times the gradient's largest magnitude (at least 1)
on the gradients (measured up to 2.6e-6 on a gradient of magnitude 3); float64 <= 1e-13
(measured 1.3e-15). Each process also checks that a second run gives the same bits at another
thread count (deterministic). The same worlds run the ring over a subgroup and feed it bad input
(every rank must raise the same clear error). Skipped without torch or gloo.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import foveal  # noqa: E402
import foveal.distributed as fdist  # noqa: E402
import foveal.torch as ftorch  # noqa: E402

SEED = 20240611

# (name, B, Hq, Hkv, L, D, Dv, causal, layout, dtype, scale[, band options]): L = 37 and 3 are
# no multiple of 2N (the chunks differ by a row; with L = 3 and 4 ranks some shards are empty), 64
# is one. The band options: a softcap, windows shorter and longer than a chunk (with 4 ranks a
# 64-row sequence has chunks of 8), sinks inside the first chunk and past it, and learned sink
# logits (their gradient reaches q and k through lse).
CASES = [
    ("causal_zigzag_gqa", 1, 4, 2, 64, 16, 8, True, "zigzag", torch.float32, None),
    ("causal_uneven", 2, 2, 1, 37, 8, 8, True, "zigzag", torch.float32, 0.3),
    ("full_uneven", 1, 2, 2, 37, 8, 12, False, "zigzag", torch.float32, None),
    ("causal_contiguous", 1, 3, 3, 29, 8, 8, True, "contiguous", torch.float32, None),
    ("causal_float64", 1, 2, 1, 40, 8, 8, True, "zigzag", torch.float64, None),
    ("causal_tiny", 1, 1, 1, 3, 4, 4, True, "zigzag", torch.float32, None),
    ("softcap_full", 1, 2, 1, 37, 8, 8, False, "zigzag", torch.float32, None, {"softcap": 2.0}),
    (
        "window_short",
        1,
        4,
        2,
        64,
        8,
        8,
        True,
        "zigzag",
        torch.float32,
        None,
        {"window_left": 5, "softcap": 3.0},
    ),
    (
        "window_sinks",
        2,
        2,
        1,
        61,
        8,
        4,
        True,
        "zigzag",
        torch.float64,
        0.4,
        {"window_left": 11, "sink_tokens": 3},
    ),
    (
        "window_wide_sinks",
        1,
        2,
        2,
        40,
        8,
        8,
        True,
        "contiguous",
        torch.float32,
        None,
        {"window_left": 23, "sink_tokens": 13},
    ),
    (
        "sink_logits",
        1,
        4,
        2,
        37,
        8,
        8,
        True,
        "zigzag",
        torch.float64,
        None,
        {"window_left": 9, "sink_logits": True},
    ),
]


def _band(case: tuple) -> dict:
    """A case's band options (sink_logits=True: the case's learned sinks, drawn in _inputs)."""
    return dict(case[11]) if len(case) > 11 else {}


def _inputs(case: tuple) -> dict:
    """The full-sequence tensors of a case (the same in every process: a seeded generator)."""
    _, batch, hq, hkv, length, dim, dim_v, _, _, dtype, _ = case[:11]
    generator = torch.Generator().manual_seed(SEED + length * 7 + hq)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return {
        "q": draw(batch, hq, length, dim),
        "k": draw(batch, hkv, length, dim),
        "v": draw(batch, hkv, length, dim_v),
        "grad": draw(batch, hq, length, dim_v),
        "sinks": draw(hq),
    }


def _ring_run(case: tuple, rank: int, world_size: int, num_threads: int, group=None) -> dict:
    _, _, _, _, _, _, _, causal, layout, _, scale = case[:11]
    full = _inputs(case)
    sinks = full.pop("sinks").requires_grad_()
    local = {
        name: fdist.shard(x, rank, world_size, layout=layout).requires_grad_(name != "grad")
        for name, x in full.items()
    }
    band = _band(case)
    if band.pop("sink_logits", False):
        band["sink_logits"] = sinks
    out, lse = fdist.ring_attention(
        local["q"],
        local["k"],
        local["v"],
        causal=causal,
        scale=scale,
        layout=layout,
        return_lse=True,
        num_threads=num_threads,
        group=group,
        **band,
    )
    out.backward(local["grad"])
    result = {"out": out.detach(), "lse": lse.detach()}
    result.update({f"grad_{name}": local[name].grad for name in ("q", "k", "v")})
    if sinks.grad is not None:  # each rank's rows' share of the sinks' gradient
        result["grad_sinks"] = sinks.grad
    return result


def _error_of(function) -> str:
    try:
        function()
    except (ValueError, TypeError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _worker(rank: int, world_size: int, port: int, directory: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:  # an exception reaches the test through torch.multiprocessing.spawn, traceback included
        results = {}
        for case in CASES:
            first = _ring_run(case, rank, world_size, num_threads=1)
            again = _ring_run(case, rank, world_size, num_threads=2)
            for name, value in first.items():
                assert torch.equal(value, again[name]), f"{case[0]}: {name} differs between runs"
            results[case[0]] = first
        # A subgroup: ranks 1 and 3 of 4 form a ring of 2 (group-local ranks 0 and 1).
        subgroup = dist.new_group([1, 3]) if world_size == 4 else None
        if rank in (1, 3) and subgroup is not None:
            case = CASES[1]
            results["subgroup"] = _ring_run(case, dist.get_rank(subgroup), 2, 1, subgroup)
        # Bad input: shards of the wrong length (every rank raises the same error), and
        # heads or scales that differ between ranks.
        q = torch.zeros(1, 2, 5 + (rank == 0), 8)
        results["wrong_rows"] = _error_of(lambda: fdist.ring_attention(q, q[:, :1], q[:, :1]))
        heads = torch.zeros(1, 2 + 2 * (rank == 1), 8, 8)
        results["wrong_heads"] = _error_of(
            lambda: fdist.ring_attention(heads, heads[:, :1], heads[:, :1])
        )
        results["other_scale"] = _error_of(
            lambda: fdist.ring_attention(
                q[:, :, :5], q[:, :1, :5], q[:, :1, :5], scale=rank or None
            )
        )
        results["bad_scale"] = _error_of(
            lambda: fdist.ring_attention(q[:, :, :5], q[:, :1, :5], q[:, :1, :5], scale="x")
        )
        five = (q[:, :, :5], q[:, :1, :5], q[:, :1, :5])
        results["window_not_causal"] = _error_of(lambda: fdist.ring_attention(*five, window_left=3))
        results["other_window"] = _error_of(
            lambda: fdist.ring_attention(*five, causal=True, window_left=3 + rank)
        )
        results["bad_sinks"] = _error_of(
            lambda: fdist.ring_attention(*five, sink_logits=torch.zeros(3))
        )
        torch.save(results, Path(directory) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=[2, 4])
def ring_results(request, tmp_path_factory) -> tuple:
    """Every case run by ``world_size`` processes: (world_size, per-rank results)."""
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"ring{world_size}")
    torch.multiprocessing.spawn(
        _worker, args=(world_size, _free_port(), str(directory)), nprocs=world_size, join=True
    )
    return world_size, [torch.load(directory / f"rank{r}.pt") for r in range(world_size)]


def _reference(case: tuple) -> dict:
    _, _, _, _, _, _, _, causal, _, _, scale = case[:11]
    full = _inputs(case)
    q, k, v, sinks = (full[name].clone().requires_grad_() for name in ("q", "k", "v", "sinks"))
    band = _band(case)
    learned = band.pop("sink_logits", False)
    out = ftorch.attention(
        q, k, v, causal=causal, scale=scale, sink_logits=sinks if learned else None, **band
    )
    out.backward(full["grad"])
    _, lse = foveal.attention(
        full["q"], full["k"], full["v"], causal=causal, scale=scale, return_lse=True, **band
    )
    result = {"out": out.detach(), "lse": lse, "grad_q": q.grad, "grad_k": k.grad}
    result["grad_v"] = v.grad
    if learned:
        result["grad_sinks"] = sinks.grad
    return result


def _assert_matches_one_process(case: tuple, shards_of: list, label: str) -> None:
    """The unsharded results (``shards_of[r]`` from group rank r) against one foveal call."""
    layout, dtype = case[8], case[9]
    for name, want in _reference(case).items():
        if name == "grad_sinks":  # summed over the ranks' rows (a sum in rank order)
            got = torch.stack([results[name] for results in shards_of]).sum(dim=0)
        else:
            got = fdist.unshard([results[name] for results in shards_of], layout=layout)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if name == "lse":
            assert torch.equal(torch.isinf(got), torch.isinf(want)), name
            got, want = torch.nan_to_num(got, neginf=0.0), torch.nan_to_num(want, neginf=0.0)
        error = (got - want).abs().max().item()
        if dtype == torch.float64:
            bound = 1e-13
        elif name.startswith("grad"):
            bound = 4e-6 * max(1.0, want.abs().max().item())
        else:
            bound = 1e-6
        assert error <= bound, f"{case[0]} {label} {name}: max |diff| {error} > {bound}"


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_ring_matches_one_process(ring_results, case):
    world_size, per_rank = ring_results
    shards_of = [results[case[0]] for results in per_rank]
    _assert_matches_one_process(case, shards_of, f"N={world_size}")


def test_ring_over_a_subgroup(ring_results):
    world_size, per_rank = ring_results
    if world_size != 4:
        pytest.skip("the subgroup runs in the 4-process world")
    shards_of = [per_rank[r]["subgroup"] for r in (1, 3)]
    _assert_matches_one_process(CASES[1], shards_of, "ranks 1 and 3 of 4")


def test_ring_bad_input_names_the_problem_on_every_rank(ring_results):
    _, per_rank = ring_results
    for results in per_rank:
        assert (
            results["wrong_rows"].startswith("ValueError")
            and "rank 0 holds 6 rows" in (results["wrong_rows"])
        )
        assert "foveal.distributed.shard" in results["wrong_rows"]
        assert results["wrong_heads"].startswith("ValueError")
        assert "q.shape[1] is 2 on rank 0 and 4 on rank 1" in results["wrong_heads"]
        assert "scale is None on rank 0 and 1.0 on rank 1" in results["other_scale"]
        assert results["bad_scale"].startswith("TypeError")
        assert "scale must be a float or None, got 'x'" in results["bad_scale"]
        assert "window_left needs causal=True" in results["window_not_causal"]
        assert "window_left is 3 on rank 0 and 4 on rank 1" in results["other_window"]
        assert "sink_logits must have shape [Hq] = [2]" in results["bad_sinks"]
    messages = {results["wrong_rows"] for results in per_rank}
    assert len(messages) == 1  # the same error on every rank


def test_ring_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match=r"torch\.distributed is not initialized"):
        fdist.ring_attention(q, q, q)


@pytest.mark.parametrize("layout", fdist.LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [0, 1, 5, 16, 37])
def test_shard_and_unshard_round_trip(layout, world_size, length):
    x = torch.arange(2 * length).reshape(1, 2, length, 1)
    shards = [fdist.shard(x, r, world_size, layout=layout) for r in range(world_size)]
    assert torch.equal(fdist.unshard(shards, layout=layout), x)
    for r, part in enumerate(shards):
        positions = fdist.shard_positions(length, r, world_size, layout=layout)
        assert torch.equal(part[0, 0, :, 0], positions)


def test_zigzag_gives_rank_r_chunks_r_and_mirror():
    # 8 rows, 2 ranks: chunks of 2 rows; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    assert fdist.shard_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert fdist.shard_positions(8, 1, 2).tolist() == [2, 3, 4, 5]


def test_shard_bad_arguments_are_named():
    x = torch.zeros(1, 1, 8, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        fdist.shard(x, 0, 2, layout="striped")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        fdist.shard(x, 2, 2)
    with pytest.raises(ValueError, match="world_size must be an int >= 1"):
        fdist.shard(x, 0, 0)
    with pytest.raises(
        ValueError,
        match=r"shards\[0\] has 3 rows along dim 2, but the zigzag layout of 8 rows over 2 "
        r"ranks gives it 4",
    ):
        fdist.unshard([x[:, :, :3], x[:, :, :5]])
