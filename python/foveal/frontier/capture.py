"""Inputs for foveal.frontier: Q/K/V captured from a transformers model, stored in and read from
``.npz`` files, or made by the planted generator.

The ``.npz`` scheme: for each layer n, ``layer{n}.q`` ``[1, Hq, L, D]``, ``layer{n}.k`` and
``layer{n}.v`` ``[1, Hkv, L, D]``, float32 (as the attention function received them: keys after
the rotary embedding; q already multiplied by the layer's scale times sqrt(D), so that the
default scale 1/sqrt(D) gives the layer's logits). Optional ``layer{n}.kinds``: a string per
query head.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .sweep import Layer

NAME = "foveal_frontier_capture"
_KEY = re.compile(r"^layer(\d+)\.(q|k|v|kinds)$")


def capture(model: Any, inputs: Any) -> dict:
    """Runs ``model`` once on ``inputs`` (a dict of keyword arguments such as ``input_ids``, or
    the input ids tensor) with a recording attention function and returns the ``.npz`` scheme's
    dict: per layer, the query, key and value every attention layer received (batch item 0),
    float32. The model's attention implementation is restored afterwards; the recording
    attention computes the layer on foveal (``foveal.transformers``), so the model's output is
    the one foveal gives. Needs torch and transformers."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .. import transformers as ftransformers

    recorded: dict = {}

    def recording(module, query, key, value, attention_mask, scaling=None, **kwargs):
        layer = getattr(module, "layer_idx", None)
        layer = len(recorded) if layer is None else int(layer)
        if layer in recorded:
            raise ValueError(
                f"foveal.frontier: capture: layer {layer} ran twice; capture one "
                "forward pass (no generate, no cache reuse)"
            )
        dim = query.shape[-1]
        factor = (scaling if scaling is not None else 1.0 / math.sqrt(dim)) * math.sqrt(dim)
        recorded[layer] = tuple(
            np.ascontiguousarray(t[:1].detach().to(torch.float32).cpu().numpy())
            for t in (query * factor, key, value)
        )
        return ftransformers.attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, **kwargs
        )

    AttentionInterface.register(NAME, recording)
    AttentionMaskInterface.register(NAME, ftransformers.mask_forward)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        with torch.no_grad():
            if isinstance(inputs, dict):
                model(**inputs)
            else:
                model(inputs)
    finally:
        model.set_attn_implementation(previous)
    captured = {}
    for layer in sorted(recorded):
        for name, array in zip("qkv", recorded[layer]):
            captured[f"layer{layer}.{name}"] = array
    return captured


def save_npz(path: str | Path, captured: dict) -> None:
    """Writes a capture() dict (or any dict in the scheme) to ``path``."""
    layers_of(captured)  # checked before writing
    np.savez(path, **captured)


def layers_of(arrays: Any) -> list:
    """The Layer list of a dict (or loaded npz) in the ``.npz`` scheme, in layer order;
    ValueError naming the key when the scheme is not followed."""
    found: dict = {}
    for key in arrays:
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"foveal.frontier: npz: key {key!r} is not layer<n>.q, .k, .v or .kinds"
            )
        found.setdefault(int(match.group(1)), {})[match.group(2)] = arrays[key]
    if not found:
        raise ValueError("foveal.frontier: npz: no layer<n>.q / .k / .v arrays found")
    layers = []
    for index in sorted(found):
        parts = found[index]
        missing = [name for name in "qkv" if name not in parts]
        if missing:
            raise ValueError(
                f"foveal.frontier: npz: layer{index} lacks "
                f"{', '.join(f'layer{index}.{m}' for m in missing)}"
            )
        kinds = [str(kind) for kind in parts["kinds"]] if "kinds" in parts else []
        layers.append(Layer(f"layer{index}", parts["q"], parts["k"], parts["v"], kinds))
    return layers


def load_npz(path: str | Path) -> list:
    """The layers stored in an ``.npz`` file of the scheme."""
    with np.load(path, allow_pickle=False) as arrays:
        return layers_of({key: arrays[key] for key in arrays.files})
