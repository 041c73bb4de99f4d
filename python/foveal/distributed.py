"""Context-parallel ring attention over ``torch.distributed`` (imports torch; foveal itself owns
no network code).

The sequence is split into shards, one per process. Each process keeps its query shard and
passes its key/value shard around the ring: at every step it computes foveal attention of its
queries against the visiting block (with the log-sum-exp) and folds the result into its running
state with :func:`foveal.merge_states`, while the next block is already in flight. After
``world_size`` steps every process holds the exact attention output of its queries over the
whole sequence. The backward pass runs the ring again: the gradient of each key/value block
travels with the block and collects every process's contribution in ring order, so the
gradients are deterministic (the same bits on every run).

Layouts (``layout=``): the sequence of length L is cut into chunks at ``floor(i * L / n)``.

- ``"zigzag"`` (default): ``2 * world_size`` chunks; rank r holds chunks r and
  ``2 * world_size - 1 - r``. Under a causal mask every rank then does the same work (the
  first chunks see few keys, the last ones many), so no rank idles.
- ``"contiguous"``: ``world_size`` chunks; rank r holds chunk r (balanced without a mask only).

:func:`shard` and :func:`unshard` cut a full sequence into a rank's shard and put the shards
back together; :func:`shard_positions` gives the global positions a rank's rows stand for.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

import foveal as _foveal

from . import torch as _ftorch

__all__ = ["LAYOUTS", "ring_attention", "shard", "shard_positions", "unshard"]

LAYOUTS = ("zigzag", "contiguous")

_DTYPES = (torch.float32, torch.float64)


def _chunk_ranges(seq_len: int, world_size: int, layout: str) -> list[list[tuple[int, int]]]:
    """For every rank, the global position ranges [begin, end) of its chunks, in the order its
    shard holds them."""
    chunks = 2 * world_size if layout == "zigzag" else world_size
    bounds = [i * seq_len // chunks for i in range(chunks + 1)]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(chunks)]
    if layout == "contiguous":
        return [[ranges[rank]] for rank in range(world_size)]
    return [[ranges[rank], ranges[chunks - 1 - rank]] for rank in range(world_size)]


def _check_layout(function: str, rank: int, world_size: int, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"foveal.distributed.{function}: layout must be one of {LAYOUTS}, got {layout!r}"
        )
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(
            f"foveal.distributed.{function}: world_size must be an int >= 1, got {world_size!r}"
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(
            f"foveal.distributed.{function}: rank must be an int in [0, {world_size}), got {rank!r}"
        )


def shard_positions(
    seq_len: int, rank: int, world_size: int, layout: str = "zigzag"
) -> torch.Tensor:
    """The global positions (int64, ascending within each chunk) of the rows that ``rank``'s
    shard of a length-``seq_len`` sequence holds, in the shard's order."""
    _check_layout("shard_positions", rank, world_size, layout)
    ranges = _chunk_ranges(seq_len, world_size, layout)[rank]
    return torch.cat([torch.arange(begin, end) for begin, end in ranges])


def shard(
    x: torch.Tensor, rank: int, world_size: int, *, dim: int = 2, layout: str = "zigzag"
) -> torch.Tensor:
    """``rank``'s shard of the full sequence ``x`` along ``dim`` (2 for ``[B, H, L, D]``): its
    chunks concatenated in the layout's order (a new contiguous tensor). Any length works; the
    chunks differ in length by at most one row."""
    _check_layout("shard", rank, world_size, layout)
    ranges = _chunk_ranges(x.shape[dim], world_size, layout)[rank]
    return torch.cat([x.narrow(dim, begin, end - begin) for begin, end in ranges], dim=dim)


def unshard(shards: list, *, dim: int = 2, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence from the shards of every rank (``shards[r]`` from rank r, as made by
    :func:`shard`): the inverse of :func:`shard`."""
    world_size = len(shards)
    _check_layout("unshard", 0, max(world_size, 1), layout)
    seq_len = sum(part.shape[dim] for part in shards)
    ranges = _chunk_ranges(seq_len, world_size, layout)
    pieces = []
    for rank, part in enumerate(shards):
        expected = sum(end - begin for begin, end in ranges[rank])
        if part.shape[dim] != expected:
            raise ValueError(
                f"foveal.distributed.unshard: shards[{rank}] has {part.shape[dim]} rows along dim "
                f"{dim}, but the {layout} layout of {seq_len} rows over {world_size} ranks gives "
                f"it {expected}"
            )
        offset = 0
        for begin, end in ranges[rank]:
            pieces.append((begin, part.narrow(dim, offset, end - begin)))
            offset += end - begin
    return torch.cat([piece for _, piece in sorted(pieces, key=lambda item: item[0])], dim=dim)


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive global positions [begin, end) stored at local rows [local, ...)."""

    begin: int
    end: int
    local: int

    @property
    def length(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class _Ring:
    """Everything the ring needs to know, the same on every rank (checked)."""

    group: Any
    rank: int
    world_size: int
    segments: list  # segments[r]: rank r's list of _Segment
    kv_shapes: list  # kv_shapes[r]: ((B, Hkv, Lr, D), (B, Hkv, Lr, Dv)) of rank r's block
    dtype: torch.dtype
    causal: bool
    scale: Optional[float]
    softcap: float
    window_left: int  # -1: no window (causal only)
    sink_tokens: int  # global positions [0, sink_tokens) stay visible to a windowed query
    num_threads: Optional[int]

    def peer(self, step: int) -> int:
        """The group-local rank whose block this rank holds at ring step ``step``."""
        return (self.rank - step) % self.world_size

    def global_rank(self, offset: int) -> int:
        return dist.get_global_rank(self.group, (self.rank + offset) % self.world_size)


def _fail(message: str, error: type = ValueError) -> None:
    raise error(f"foveal.distributed.ring_attention: {message}")


def _check_local(q: Any, k: Any, v: Any) -> None:
    """Checks that need no other rank, raised at once by the rank whose input fails them (the
    other ranks then wait in the all_gather of _make_ring until torch.distributed's timeout)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
        if x.dim() != 4:
            _fail(f"{name} must be 4-D [B, H, L, D], got shape {tuple(x.shape)}")
        if x.device.type != "cpu":
            _fail(f"{name} must be a CPU tensor, got device {x.device}")
        if x.dtype not in _DTYPES:
            _fail(f"{name} must be float32 or float64, got {x.dtype}", TypeError)


# What every rank tells the others before any data moves: its shapes, dtypes and options, as
# float64 (the integers are exact there). The sequence lengths (q, k and v's dimension 2) may
# differ between ranks; everything else must be the same.
_FIELDS = (
    *(f"q.shape[{d}]" for d in range(4)),
    *(f"k.shape[{d}]" for d in range(4)),
    *(f"v.shape[{d}]" for d in range(4)),
    "q.dtype",
    "k.dtype",
    "v.dtype",
    "causal",
    "layout",
    "softcap",
    "window_left",
    "sink_tokens",
    "scale",
)
_PER_RANK = ("q.shape[2]", "k.shape[2]", "v.shape[2]")


def _describe(q, k, v, causal, scale, layout, softcap, window_left, sink_tokens) -> torch.Tensor:
    options = (_DTYPES.index(q.dtype), _DTYPES.index(k.dtype), _DTYPES.index(v.dtype))
    scale_value = float("nan") if scale is None else float(scale)
    values = (*q.shape, *k.shape, *v.shape, *options, bool(causal), LAYOUTS.index(layout))
    band = (float(softcap), window_left, sink_tokens)
    return torch.tensor((*values, *band, scale_value), dtype=torch.float64)


def _check_ranks(rows: list) -> None:
    """Checks every rank's description (the same checks, so the same error, on every rank)."""
    for r, row in enumerate(rows):
        field = dict(zip(_FIELDS, row))
        for name in _FIELDS[:-1]:
            if name != "softcap":
                field[name] = int(field[name])
        dtypes = [str(_DTYPES[field[f"{name}.dtype"]]) for name in "qkv"]
        if len(set(dtypes)) != 1:
            _fail(
                f"q, k and v must have the same dtype, got {', '.join(dtypes)} on rank {r}",
                TypeError,
            )
        shape = {name: tuple(field[f"{name}.shape[{d}]"] for d in range(4)) for name in "qkv"}
        if shape["k"][:3] != shape["v"][:3]:
            _fail(f"k {shape['k']} and v {shape['v']} must agree in B, Hkv and L (rank {r})")
        if shape["q"][0] != shape["k"][0] or shape["q"][3] != shape["k"][3]:
            _fail(f"q {shape['q']} and k {shape['k']} must agree in B and D (rank {r})")
        if shape["k"][1] < 1 or shape["q"][1] % shape["k"][1] != 0:
            _fail(
                f"q's heads ({shape['q'][1]}) must be a multiple of k's heads "
                f"({shape['k'][1]}) (rank {r})"
            )
        if shape["q"][2] != shape["k"][2]:
            _fail(
                f"q and k must hold the same rows of the sequence (self-attention), got "
                f"{shape['q'][2]} and {shape['k'][2]} rows on rank {r}"
            )
        for index, name in enumerate(_FIELDS):
            mine, first = row[index], rows[0][index]
            same = mine == first or (name == "scale" and mine != mine and first != first)  # NaN
            if name not in _PER_RANK and not same:
                _fail(
                    f"every rank must pass the same shapes (but for the sequence length), "
                    f"dtype and options: {name} is {_shown(name, first)} on rank 0 and "
                    f"{_shown(name, mine)} on rank {r}"
                )


def _shown(name: str, value: float) -> str:
    if name == "scale":
        return "None" if value != value else repr(value)
    if name == "softcap":
        return repr(value)
    if name == "layout":
        return repr(LAYOUTS[int(value)])
    if name.endswith("dtype"):
        return str(_DTYPES[int(value)])
    return str(bool(value)) if name == "causal" else str(int(value))


def _check_band(causal: Any, softcap: Any, window_left: Any, sink_tokens: Any) -> None:
    """The band options, checked on the rank that passes them (the all_gather then compares)."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap >= 0:
        _fail(f"softcap must be a float >= 0, got {softcap!r}")
    if softcap == float("inf"):
        _fail("softcap must be finite, got inf")
    for name, value in (("window_left", window_left), ("sink_tokens", sink_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(f"{name} must be an int, got {type(value).__name__}", TypeError)
    if window_left < -1:
        _fail(f"window_left must be -1 (no window) or >= 0, got {window_left}")
    if window_left >= 0 and not causal:
        _fail("window_left needs causal=True (a window over the keys before each query)")
    if sink_tokens < 0:
        _fail(f"sink_tokens must be >= 0, got {sink_tokens}")


def _make_ring(
    q, k, v, causal, scale, layout, group, num_threads, softcap=0.0, window_left=-1, sink_tokens=0
) -> _Ring:
    if not dist.is_available() or not dist.is_initialized():
        _fail(
            "torch.distributed is not initialized: call "
            "torch.distributed.init_process_group('gloo', ...) in every process first",
            RuntimeError,
        )
    if layout not in LAYOUTS:
        _fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        _fail(f"scale must be a float or None, got {scale!r}", TypeError)
    _check_local(q, k, v)
    _check_band(causal, softcap, window_left, sink_tokens)
    group = dist.group.WORLD if group is None else group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        _fail("this process is not a member of group", RuntimeError)
    # One small all_gather: every rank then checks all of them and raises the same error,
    # instead of a mismatched transfer hanging or failing later.
    mine = _describe(q, k, v, causal, scale, layout, softcap, window_left, sink_tokens)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine, group=group)
    rows = [row.tolist() for row in gathered]
    _check_ranks(rows)
    rows = [[int(x) for x in row[:12]] for row in rows]
    seq_len = sum(row[2] for row in rows)
    ranges = _chunk_ranges(seq_len, world_size, layout)
    segments = []
    for r in range(world_size):
        expected = sum(end - begin for begin, end in ranges[r])
        if rows[r][2] != expected:
            _fail(
                f"rank {r} holds {rows[r][2]} rows, but the {layout} layout of a {seq_len}-row "
                f"sequence over {world_size} ranks gives it {expected}: cut the sequence with "
                f"foveal.distributed.shard(x, rank, world_size, layout={layout!r})"
            )
        local, parts = 0, []
        for begin, end in ranges[r]:
            parts.append(_Segment(begin, end, local))
            local += end - begin
        segments.append(parts)
    kv_shapes = [(tuple(row[4:8]), tuple(row[8:12])) for row in rows]
    return _Ring(
        group,
        rank,
        world_size,
        segments,
        kv_shapes,
        q.dtype,
        bool(causal),
        scale,
        float(softcap),
        window_left,
        sink_tokens,
        num_threads,
    )


def _pairs(ring: _Ring, peer: int) -> list:
    """The (query segment, key segment, keywords) calls that rank's queries make against peer's
    block; one whole-shard call when every query sees every key of the block. Positions are
    global, so the causal mask between blocks is exact: a key segment after the last query is
    skipped, one before the first query is seen whole, and an overlapping one (the same chunk:
    chunks are aligned) gets the causal mask with q_offset = its distance from the keys.

    With a window (window_left = w) every call gets the causal mask, the window and q_offset =
    qs.begin - ks.begin, so a query at global position p sees the keys of ks in [p - w, p]
    exactly; the global sinks [0, sink_tokens) are the first sink_tokens - ks.begin keys of a
    segment that starts before sink_tokens. A segment wholly before every query's window and
    past the sinks is skipped."""
    base = {"scale": ring.scale, "softcap": ring.softcap, "num_threads": ring.num_threads}
    q_segments, k_segments = ring.segments[ring.rank], ring.segments[peer]
    if not ring.causal:
        q_rows = sum(segment.length for segment in q_segments)
        k_rows = sum(segment.length for segment in k_segments)
        return [((0, q_rows), (0, k_rows), base)] if q_rows and k_rows else []
    window, sinks = ring.window_left, ring.sink_tokens
    calls = []
    for qs in q_segments:
        for ks in k_segments:
            if not qs.length or not ks.length or ks.begin > qs.end - 1:
                continue  # no query of qs sees a key of ks
            if window >= 0:
                # The first query (the earliest window) sees back to qs.begin - window.
                if ks.end - 1 < qs.begin - window and ks.begin >= sinks:
                    continue
                keywords = {
                    **base,
                    "causal": True,
                    "q_offset": qs.begin - ks.begin,
                    "window_left": window,
                    "sink_tokens": min(max(sinks - ks.begin, 0), ks.length),
                }
            elif ks.end - 1 <= qs.begin:
                keywords = base
            else:
                assert ks.begin <= qs.begin, "chunks of a layout are aligned"
                keywords = {**base, "causal": True, "q_offset": qs.begin - ks.begin}
            calls.append(((qs.local, qs.length), (ks.local, ks.length), keywords))
    return calls


def _pack(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(buffer: torch.Tensor, shapes: tuple) -> list:
    parts, offset = [], 0
    for shape in shapes:
        count = 1
        for extent in shape:
            count *= extent
        parts.append(buffer[offset : offset + count].view(shape))
        offset += count
    return parts


def _numel(shapes: tuple) -> int:
    total = 0
    for shape in shapes:
        count = 1
        for extent in shape:
            count *= extent
        total += count
    return total


class _Transfers:
    """The asynchronous sends and receives of one ring step: start() posts them, wait() ends
    them (gloo moves the data while the caller computes)."""

    def __init__(self) -> None:
        self.works: list = []

    # An empty block (a shard of no rows) is not sent: both ends know its size.

    def send(self, ring: _Ring, tensor: torch.Tensor, tag: int) -> None:
        if tensor.numel():
            self.works.append(dist.isend(tensor, ring.global_rank(1), group=ring.group, tag=tag))

    def recv(self, ring: _Ring, tensor: torch.Tensor, tag: int) -> torch.Tensor:
        if tensor.numel():
            self.works.append(dist.irecv(tensor, ring.global_rank(-1), group=ring.group, tag=tag))
        return tensor

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


_KV_TAG, _GRAD_TAG = 0, 1


def _ring_forward(ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    batch, heads, rows = q.shape[:3]
    out = torch.zeros((batch, heads, rows, v.shape[3]), dtype=q.dtype)
    lse = torch.full((batch, heads, rows), float("-inf"), dtype=q.dtype)
    block = _pack(k, v)
    for step in range(ring.world_size):
        peer = ring.peer(step)
        transfers = _Transfers()
        if step + 1 < ring.world_size:
            transfers.send(ring, block, 2 * step + _KV_TAG)
            incoming = torch.empty(_numel(ring.kv_shapes[ring.peer(step + 1)]), dtype=ring.dtype)
            transfers.recv(ring, incoming, 2 * step + _KV_TAG)
        k_block, v_block = _unpack(block, ring.kv_shapes[peer])
        for (q_local, q_len), (k_local, k_len), keywords in _pairs(ring, peer):
            part, part_lse = _foveal.attention(
                q.narrow(2, q_local, q_len),
                k_block.narrow(2, k_local, k_len),
                v_block.narrow(2, k_local, k_len),
                return_lse=True,
                **keywords,
            )
            out_rows, lse_rows = out.narrow(2, q_local, q_len), lse.narrow(2, q_local, q_len)
            _foveal.merge_states(
                out_rows,
                lse_rows,
                part,
                part_lse,
                out=out_rows,
                lse=lse_rows,
                num_threads=ring.num_threads,
            )
        transfers.wait()
        if step + 1 < ring.world_size:
            block = incoming
    return out, lse


def _ring_backward(ring, q, k, v, out, lse, grad_out, grad_lse):
    grad_q = torch.zeros_like(q)
    block = _pack(k, v)
    carried = None  # the gradient of the visiting block, summed over the ranks it has visited
    grad_in: Optional[torch.Tensor] = None
    grad_transfers = _Transfers()
    for step in range(ring.world_size):
        peer = ring.peer(step)
        shapes = ring.kv_shapes[peer]
        kv_transfers = _Transfers()
        if step + 1 < ring.world_size:
            kv_transfers.send(ring, block, 2 * step + _KV_TAG)
            incoming = torch.empty(_numel(ring.kv_shapes[ring.peer(step + 1)]), dtype=ring.dtype)
            kv_transfers.recv(ring, incoming, 2 * step + _KV_TAG)
        k_block, v_block = _unpack(block, shapes)
        part = torch.zeros(_numel(shapes), dtype=ring.dtype)
        grad_k, grad_v = _unpack(part, shapes)
        for (q_local, q_len), (k_local, k_len), keywords in _pairs(ring, peer):
            rows = [x.narrow(2, q_local, q_len) for x in (q, out, lse, grad_out)]
            # The rows' global lse and its gradient: the same dS = P (dP - D + g) per block.
            dq, dk, dv = _foveal.attention_backward(
                rows[0],
                k_block.narrow(2, k_local, k_len),
                v_block.narrow(2, k_local, k_len),
                rows[1],
                rows[2],
                rows[3],
                grad_lse=grad_lse.narrow(2, q_local, q_len),
                **keywords,
            )
            grad_q.narrow(2, q_local, q_len).add_(dq)
            grad_k.narrow(2, k_local, k_len).add_(dk)
            grad_v.narrow(2, k_local, k_len).add_(dv)
        # Add this rank's part to the block's gradient from the ranks before it (a fixed order:
        # deterministic), then pass it on with the block.
        grad_transfers.wait()
        carried = part if grad_in is None else grad_in.add_(part)
        if ring.world_size == 1:
            grad_in = carried
            break
        grad_transfers = _Transfers()
        grad_transfers.send(ring, carried, 2 * step + _GRAD_TAG)
        grad_in = torch.empty(_numel(ring.kv_shapes[ring.peer(step + 1)]), dtype=ring.dtype)
        grad_transfers.recv(ring, grad_in, 2 * step + _GRAD_TAG)
        kv_transfers.wait()
        if step + 1 < ring.world_size:
            block = incoming
    # After world_size steps the gradient of this rank's own block has visited every rank.
    grad_transfers.wait()
    grad_k, grad_v = _unpack(grad_in, ring.kv_shapes[ring.rank])
    return grad_q, grad_k.clone(), grad_v.clone()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q, k, v, ring):
        q, k, v = q.detach(), k.detach(), v.detach()
        out, lse = _ring_forward(ring, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out, grad_lse):
        # Autograd materializes both gradients (zeros for an output the loss does not read).
        q, k, v, out, lse = ctx.saved_tensors
        # Autograd may hand over an expanded (stride-0) gradient: the kernel reads unit rows.
        grad_out = grad_out.detach().contiguous()
        grads = _ring_backward(ctx.ring, q, k, v, out, lse, grad_out, grad_lse.detach())
        return (*grads, None)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    window_left: int = -1,
    sink_tokens: int = 0,
    sink_logits: Optional[torch.Tensor] = None,
    layout: str = "zigzag",
    group: Any = None,
    return_lse: bool = False,
    num_threads: Optional[int] = None,
):
    """Exact attention over a sequence sharded across the processes of ``group`` (default: the
    world), differentiable in q, k and v (torch autograd).

    Every process passes its shard (made by :func:`shard` with the same ``layout``): q
    ``[B, Hq, Lr, D]``, k ``[B, Hkv, Lr, D]``, v ``[B, Hkv, Lr, Dv]`` (CPU, float32 or float64;
    Hq a multiple of Hkv), and gets its rows of ``attention(q_full, k_full, v_full)``:
    out ``[B, Hq, Lr, Dv]`` (and lse ``[B, Hq, Lr]`` with ``return_lse=True``, differentiable
    too). Positions are global, so ``causal=True`` masks exactly as one call over the whole
    sequence does, and so do the band options of :func:`foveal.attention`: ``softcap``,
    ``window_left`` (with ``causal=True``: query p sees keys p - window_left .. p) and
    ``sink_tokens`` (the sequence's first tokens, seen by every later query). ``sink_logits``
    ``[Hq]`` (learned sinks, as in :func:`foveal.torch.attention`) scales each row by
    ``sigmoid(lse - s_h)``, with gradients. ``scale`` defaults to ``1/sqrt(D)``. Every process
    of the group must call it with the same
    B, heads, D, Dv, dtype and options; this is checked on every rank with one small all_gather
    and a mismatch raises the same error everywhere. ``torch.distributed`` must be initialized
    (the gloo backend: CPU tensors). ``num_threads`` is foveal's per-call thread count.
    """
    ring = _make_ring(
        q, k, v, causal, scale, layout, group, num_threads, softcap, window_left, sink_tokens
    )
    out, lse = _RingAttention.apply(q, k, v, ring)
    if sink_logits is not None:
        out = _ftorch._with_sink_logits("ring_attention", out, lse, sink_logits)
    return (out, lse) if return_lse else out
