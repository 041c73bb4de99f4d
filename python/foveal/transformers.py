"""foveal as an attention implementation for Hugging Face transformers (optional).

``register()`` adds ``"foveal"`` to transformers' attention interface *and* its mask
interface, so that::

    import foveal.transformers
    foveal.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="foveal")
    # or: model.set_attn_implementation("foveal")

runs every attention layer of the common decoder families (causal, sliding window, softcap,
GQA, left or right padding, dynamic, static and sliding-window caches, learned per-head sink
logits at inference) on ``foveal.torch.attention``.

Why both interfaces: a model builds each layer type's mask once per forward through the mask
interface and hands it to the attention function. The mask registered here does not
materialize the ``[B, 1, Lq, Lk]`` boolean matrix when the pattern is one foveal has flags for
(causal, causal + sliding window, bidirectional): it returns a :class:`FovealMask` that names
the band (causal, window, where the queries sit among the keys) and, only when some key is
padding, the ``[B, Lk]`` key-padding mask. The attention function then runs foveal's banded
kernel, which skips the key blocks outside the band; left or right padding (one run of real
keys per row) becomes foveal's per-row key ranges (``key_start`` / ``key_length``: one
variable-length call that also skips the padding's blocks), other padding a boolean bias read
only inside the band. Any other pattern (packed sequences, custom ``or``/``and`` mask functions,
chunked attention, ...) is materialized exactly as transformers' own ``sdpa`` mask would be and
passed as a boolean bias (correct, without block skipping).

transformers is imported only inside these functions: ``import foveal`` never needs it.

Errors, never a silent fallback: attention dropout in training, ``output_attentions=True``,
T5-style ``position_bias``, the gradient of learned sink logits, and masks shorter than the
keys raise an error that names the feature.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import torch as _ftorch

# FovealCache comes from the module's __getattr__.
__all__ = ["FovealCache", "FovealMask", "attention_forward", "mask_forward", "register"]  # noqa: F822

NAME = "foveal"
# A FovealCache layer's update leaves itself in the attention kwargs under this key
# (transformers hands the attention layer's kwargs to Cache.update, then to the attention).
LAYER_KEY = "foveal_cache_layer"
# Steps of at most this many new tokens over a FovealCache run foveal.decode_attention.
DECODE_MAX_QUERIES = 8


def __getattr__(name: str) -> Any:
    # FovealCache subclasses transformers.Cache: imported on first use, so that importing this
    # module never needs transformers.
    if name in ("FovealCache", "FovealCacheLayer"):
        from . import _transformers_cache

        return getattr(_transformers_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class FovealMask:
    """A layer's mask as foveal options (what the mask interface hands the attention function).

    ``causal`` / ``window_left`` (-1 = none): the band; key j is seen by query i when
    ``q_offset + i - window_left <= j <= q_offset + i`` (causal). ``q_offset``: the key index
    at which query 0 sits (transformers' absolute query position minus the cache's key
    offset). ``key_mask``: ``[B, Lk]`` bool, False for padding keys, or None when no key is
    padding. ``key_ranges``: when each row's real keys are one run (left or right padding,
    the unwritten tail of a static cache), its ``(start, stop)`` per row, else None; the
    attention then runs each row over its run, with no bias. ``dense``: ``[B, 1, Lq, Lk]``
    bool (True = attend) for patterns that have no flags; the band fields are then unused.
    ``shape`` is the ``[B, 1, Lq, Lk]`` the mask stands for: transformers' generate builds the
    mask of a compileable (static) cache ahead of the forward and hands it back through
    ``attention_mask``, where it is read as a 4-D mask.

    transformers passes this object from the mask interface to the attention interface
    unchanged; it is not a tensor, and no other attention implementation accepts it."""

    causal: bool = False
    window_left: int = -1
    q_offset: int = 0
    key_mask: Optional[torch.Tensor] = None
    key_ranges: Optional[tuple] = None
    dense: Optional[torch.Tensor] = None
    shape: tuple = ()

    @property
    def ndim(self) -> int:
        return 4


def _nonlocals(function: Any) -> dict:
    try:
        return inspect.getclosurevars(function).nonlocals
    except (TypeError, ValueError):
        return {}


def _band_of(mask_function: Any) -> Optional[tuple]:
    """(causal, window_left) when mask_function is one of transformers' plain patterns
    (causal, causal sliding window, bidirectional), else None (the pattern is materialized)."""
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        return True, -1
    if mask_function is masking_utils.bidirectional_mask_function:
        return False, -1
    module = masking_utils.__name__
    if getattr(mask_function, "__module__", None) != module:
        return None
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = tuple(_nonlocals(mask_function).get("mask_functions", ()))
    if len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__module__", None) != module:
        return None
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = _nonlocals(overlay).get("sliding_window")
    if not isinstance(window, int) or window < 1:
        return None
    # kv_idx > q_idx - window: a query sees itself and the window - 1 keys before it.
    return True, window - 1


def mask_forward(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> FovealMask:
    """transformers' mask interface: the mask of one layer type for one forward.

    transformers' conventions: query i sits at absolute position ``q_offset + i``, key j at
    ``kv_offset + j``; ``attention_mask`` is the 2-D padding mask indexed by absolute position
    (False = padding), shorter than ``kv_offset + kv_length`` in a static cache (the missing
    positions are padding, and causality hides them anyway)."""
    from transformers import masking_utils

    if isinstance(attention_mask, FovealMask):
        return attention_mask  # built ahead by generate for this very step (see FovealMask)
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    band = _band_of(mask_function)
    device = kwargs.get("device", "cpu")
    if band is None:
        dense = masking_utils.sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=kwargs.get("use_vmap", False),
            device=device,
        )
        return FovealMask(dense=dense, shape=tuple(dense.shape))
    causal, window_left = band
    key_mask = None
    if attention_mask is not None:
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        key_mask = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        if bool(key_mask.all()):
            key_mask = None
    # A static cache passes q_offset as a 0-d tensor (to avoid graph breaks); foveal needs int.
    offset = int(q_offset) - int(kv_offset)
    shape = (batch_size, 1, q_length, kv_length)
    ranges = None if key_mask is None else _key_ranges(key_mask)
    return FovealMask(causal, window_left, offset, key_mask, ranges, None, shape)


def _key_ranges(key_mask: torch.Tensor) -> Optional[tuple]:
    """((start, stop) per row) when every row of key_mask is True on one run and False
    elsewhere (an empty run is (0, 0)), else None."""
    count = key_mask.sum(dim=1)
    start = key_mask.to(torch.int8).argmax(dim=1)  # the first True (0 in a row without one)
    position = torch.arange(key_mask.shape[1], device=key_mask.device)
    run = (position >= start[:, None]) & (position < (start + count)[:, None])
    if not bool(torch.equal(run, key_mask)):
        return None
    return tuple((int(a), int(a + n)) for a, n in zip(start.tolist(), count.tolist()))


def _fail(what: str) -> None:
    raise NotImplementedError(f"foveal: transformers attention: {what}")


def _options_and_bias(
    module: Any,
    mask: Any,
    q_length: int,
    k_length: int,
    sliding_window: Optional[int],
    is_causal: Optional[bool],
    dtype: torch.dtype,
) -> tuple:
    """(foveal's band options, a bias or None, the rows' key runs or None) for transformers'
    attention_mask argument."""
    if isinstance(mask, FovealMask):
        if mask.dense is not None:
            return {}, _fit_keys(mask.dense, k_length), None
        options = {"q_offset": mask.q_offset}
        if mask.causal:
            options["causal"] = True
        if mask.window_left >= 0:
            options["window_left"] = mask.window_left
        if mask.key_ranges is not None and (mask.causal or mask.window_left < 0):
            return options, None, mask.key_ranges
        bias = None
        if mask.key_mask is not None:
            key_mask = _fit_keys(mask.key_mask[:, None, None, :], k_length)
            bias = key_mask.expand(-1, 1, q_length, -1)
        return options, bias, None
    if mask is None:
        # transformers' convention for a missing mask (sdpa's is_causal): top-left aligned
        # causal attention for several queries, every key for one query.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not (causal and q_length > 1):
            return {}, None, None
        options = {"causal": True, "q_offset": 0}
        if sliding_window:
            options["window_left"] = int(sliding_window) - 1
        return options, None, None
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = _fit_keys(mask, k_length)
        return {}, mask if mask.dtype == torch.bool else mask.to(dtype), None
    raise TypeError(
        "foveal: transformers attention: attention_mask must be a FovealMask, None or a 4-D "
        f"torch tensor, got {type(mask).__name__}"
        + (f" of {mask.dim()} dimensions" if isinstance(mask, torch.Tensor) else "")
    )


def _fit_keys(mask: torch.Tensor, k_length: int) -> torch.Tensor:
    """The mask's first k_length key columns (eager's convention for a longer mask)."""
    if mask.shape[-1] < k_length:
        raise ValueError(
            f"foveal: transformers attention: attention_mask covers {mask.shape[-1]} keys, "
            f"the layer has {k_length}"
        )
    return mask[..., :k_length]


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[torch.Tensor] = None,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> tuple:
    """transformers' attention interface: query ``[B, Hq, Lq, D]``, key / value
    ``[B, Hkv, Lk, D]`` -> ``([B, Lq, Hq, Dv], None)`` on ``foveal.torch.attention``.

    ``s_aux`` (``[Hq]``, gpt-oss's learned sink logits) adds one key per head whose logit is
    ``s_aux[h]`` and whose value is zero: ``out * sigmoid(lse - s_aux)``, exact, and
    differentiable in s_aux as in q, k and v (``foveal.torch.attention``'s ``sink_logits``)."""
    if dropout and dropout > 0:
        _fail(
            f"attention dropout (dropout={dropout}) is not supported; call model.eval() or set "
            "the config's attention_dropout to 0"
        )
    if kwargs.get("output_attentions"):
        _fail("output_attentions=True is not supported: foveal never forms the attention weights")
    if position_bias is not None:
        _fail("position_bias (a per-layer relative position bias) is not supported")
    layer = kwargs.get(LAYER_KEY)
    if layer is not None:
        layer.attended = True
        out = _decode_over_cache(layer, query, attention_mask, scaling, softcap, s_aux)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
        if layer.in_ring_order:  # the mask reads keys by position: put the ring in order
            key, value = layer.keys_in_position_order(key.shape[2])
    # transformers' projections are [B, L, H, D] memory seen as [B, H, L, D]: foveal reads any
    # strides, but unit-stride rows per head run ~10 % faster and the copy is O(L), not O(L^2).
    query, key, value = (t.contiguous() for t in (query, key, value))
    q_length, k_length = query.shape[2], key.shape[2]
    options, bias, runs = _options_and_bias(
        module, attention_mask, q_length, k_length, sliding_window, is_causal, query.dtype
    )
    if softcap:
        options["softcap"] = float(softcap)
    if scaling is not None:
        options["scale"] = float(scaling)
    if runs is None:
        out = _attend(query, key, value, bias, options, s_aux)
    else:
        out = _attend_key_runs(query, key, value, runs, options, s_aux)
    return out.transpose(1, 2).contiguous(), None


def _decode_over_cache(layer, query, mask, scaling, softcap, s_aux) -> Optional[torch.Tensor]:
    """[B, Hq, Lq, Dv] from foveal.decode_attention over a FovealCache layer when the step is a
    decode one it computes exactly (a few new queries, the newest keys, a band mask with no
    padding or, in a full-attention layer, left padding only, no sink logits, no gradient),
    else None."""
    q_length = query.shape[2]
    if s_aux is not None or q_length > DECODE_MAX_QUERIES or not isinstance(mask, FovealMask):
        return None
    if mask.dense is not None or len(mask.shape) != 4:
        return None
    options = {}
    if mask.key_mask is not None:
        # Left padding (each row's real keys run to the newest): decode_attention's key_start.
        # A ring's positions are not the mask's columns: sliding layers take the masked path.
        runs = mask.key_ranges
        if runs is None or layer.is_sliding or any(stop < mask.shape[3] for _, stop in runs):
            return None
        options["key_start"] = [start for start, _ in runs]
    if mask.q_offset != mask.shape[3] - q_length or (q_length > 1 and not mask.causal):
        return None
    if torch.is_grad_enabled() and query.requires_grad:
        return None
    options["causal"] = q_length > 1
    if mask.window_left >= 0:
        options["window_left"] = mask.window_left
    if layer.is_sliding and not 0 <= mask.window_left <= layer.capacity - q_length:
        return None  # the ring no longer holds every key the window reaches (or no window)
    if softcap:
        options["softcap"] = float(softcap)
    if scaling is not None:
        options["scale"] = float(scaling)
    return layer.decode(query, options)


def _attend(query, key, value, bias, options: dict, s_aux) -> torch.Tensor:
    """[B, Hq, Lq, Dv] from foveal.torch.attention; with sink logits, scaled by each row's
    share of the softmax that the sink leaves: sigmoid(lse - s_aux) (differentiable)."""
    return _ftorch.attention(query, key, value, bias=bias, sink_logits=s_aux, **options)


def _attend_key_runs(query, key, value, runs: tuple, options: dict, s_aux) -> torch.Tensor:
    """Attention where row b's real keys are the run runs[b] = (start, stop): one
    variable-length call (foveal's key_start / key_length) with the band options and no bias;
    the key blocks outside each row's run are skipped. Under a causal mask the queries before
    the run see no key and get zeros (as foveal gives a query that sees none)."""
    k_length = key.shape[2]
    starts = [min(start, k_length) for start, _ in runs]
    lengths = [max(0, min(stop, k_length) - start) for start, (_, stop) in zip(starts, runs)]
    ranges = {"key_start": starts, "key_length": lengths}
    return _attend(query, key, value, None, dict(options, **ranges), s_aux)


def register(name: str = NAME) -> str:
    """Registers foveal with transformers' attention and mask interfaces under ``name``
    (default ``"foveal"``) and returns the name, for ``attn_implementation=name``.
    Raises ImportError when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as error:
        raise ImportError(
            "foveal.transformers.register() needs Hugging Face transformers (pip install "
            "transformers)"
        ) from error
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_forward)
    return name
