"""Prefill through Hugging Face transformers: attn_implementation="foveal" against "sdpa".

A random-init decoder (2 layers, hidden 512, 8 query heads and 2 kv heads of 64, MLP 1024,
vocab 1000, float32) runs one forward over a prompt with each implementation, end to end
(embeddings, RoPE, MLPs, masks and the LM head included), on one thread unless told otherwise.
Cases: Llama at L tokens (full causal), Mistral at L tokens with a 256 window, and a batch of 4
left-padded prompts of 1024 tokens (a quarter of each row padding, staggered). Each case first
checks that both implementations give the same logits on the unpadded tokens, then times them
alternately and reports the best of the repeats, with the seconds its attention layers took
(the attention functions timed from transformers' side, masks excluded).

The "generate" case (--cases generate) continues an L-token prompt by greedy generation on the
Llama model: sdpa over a DynamicCache, foveal over a DynamicCache and foveal over a
foveal.transformers.FovealCache. Decode tokens/s is (N - 1) new tokens over the time
generate(max_new_tokens=N) takes beyond generate(max_new_tokens=1) (the prefill and the first
token), best of the repeats; all three must give the same tokens. "generate-padded" does the
same for the batch of 4 left-padded prompts of --padded-length tokens.

    python bench/transformers_cases.py                 # L = 8192, 1 thread
    python bench/transformers_cases.py --length 2048 --threads 2 --repeats 3
    python bench/transformers_cases.py --cases generate --new-tokens 64
    python bench/transformers_cases.py --cases generate-padded --padded-length 2048
"""

from __future__ import annotations

import argparse
import json
import time

import foveal
import foveal.transformers
import torch
import transformers

VOCAB, HIDDEN, MLP = 1000, 512, 1024
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def _model(config_name: str, length: int, **extra):
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        pad_token_id=0, max_position_embeddings=max(length, 2048), **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


_attention_seconds = [0.0]


def _timed(function):
    """function, adding the seconds it runs to _attention_seconds."""

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        _attention_seconds[0] += time.perf_counter() - start
        return result

    return timed


def _time_attention() -> None:
    """Re-registers sdpa and foveal behind timers: each case reports its attention layers."""
    interface = transformers.AttentionInterface
    for name in ("sdpa", "foveal"):
        interface.register(name, _timed(interface._global_mapping[name]))


def _forward(model, implementation: str, ids, mask):
    model.set_attn_implementation(implementation)
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=0).logits


def _case(name: str, model, ids, mask, repeats: int) -> dict:
    real = mask.bool()
    difference = (
        (_forward(model, "foveal", ids, mask)[real] - _forward(model, "sdpa", ids, mask)[real])
        .abs()
        .max()
        .item()
    )
    best = {"sdpa": (float("inf"), 0.0), "foveal": (float("inf"), 0.0)}
    for _ in range(repeats):
        for implementation in best:
            _attention_seconds[0] = 0.0
            start = time.perf_counter()
            _forward(model, implementation, ids, mask)
            run = (time.perf_counter() - start, _attention_seconds[0])
            best[implementation] = min(best[implementation], run)
    (sdpa, sdpa_attention), (ours, our_attention) = best["sdpa"], best["foveal"]
    return dict(
        case=name,
        batch=ids.shape[0],
        length=ids.shape[1],
        sdpa_ms=round(sdpa * 1e3, 1),
        foveal_ms=round(ours * 1e3, 1),
        speedup=round(sdpa / ours, 2),
        sdpa_attention_ms=round(sdpa_attention * 1e3, 1),
        foveal_attention_ms=round(our_attention * 1e3, 1),
        attention_speedup=round(sdpa_attention / our_attention, 2),
        max_logit_difference=difference,
    )


def _generate(model, implementation: str, cache: str, ids, new_tokens: int, mask=None) -> tuple:
    """(seconds, tokens) of a greedy generate of new_tokens tokens after ids (mask: the 2-D
    padding mask, None for none)."""
    model.set_attn_implementation(implementation)
    extra = {}
    if cache == "foveal":
        extra["cache"] = foveal.transformers.FovealCache(
            model.config, ids.shape[0], ids.shape[1] + new_tokens
        )
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids) if mask is None else mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
    return time.perf_counter() - start, tokens


def _left_padded(length: int, generator) -> tuple:
    """(ids, mask) of 4 prompts of `length` tokens whose rows are 0, 1/12, 2/12 and 3/12
    left padding."""
    ids = torch.randint(3, VOCAB, (4, length), generator=generator)
    mask = torch.ones_like(ids)
    for row in range(4):
        mask[row, : row * length // 12] = 0
    return ids, mask


def _generate_case(
    length: int, new_tokens: int, repeats: int, generator, padded: bool = False
) -> dict:
    model = _model("LlamaConfig", length + new_tokens)
    if padded:
        ids, mask = _left_padded(length, generator)
    else:
        ids, mask = torch.randint(3, VOCAB, (1, length), generator=generator), None
    setups = {"sdpa": ("sdpa", "dynamic"), "foveal": ("foveal", "dynamic")}
    setups["foveal_cache"] = ("foveal", "foveal")
    rate, prefill, tokens = {name: 0.0 for name in setups}, {}, {}
    for _ in range(repeats):
        for name, (implementation, cache) in setups.items():
            first, _ = _generate(model, implementation, cache, ids, 1, mask)
            seconds, tokens[name] = _generate(model, implementation, cache, ids, new_tokens, mask)
            rate[name] = max(rate[name], (new_tokens - 1) / (seconds - first))
            prefill[name] = min(prefill.get(name, float("inf")), first)
    same = all(torch.equal(tokens[name], tokens["sdpa"]) for name in setups)
    case = "llama, greedy generate" + (", batch 4 left-padded" if padded else "")
    result = dict(case=case, length=length, new_tokens=new_tokens)
    for name in setups:
        result[f"{name}_prefill_ms"] = round(prefill[name] * 1e3, 1)
        result[f"{name}_tokens_per_s"] = round(rate[name], 1)
    result["speedup_foveal_cache"] = round(rate["foveal_cache"] / rate["sdpa"], 2)
    result["speedup_foveal_dynamic"] = round(rate["foveal"] / rate["sdpa"], 2)
    result["same_tokens"] = same
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--padded-length", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--cases", default="llama,mistral,padded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    foveal.set_num_threads(args.threads)
    foveal.transformers.register()
    _time_attention()
    generator = torch.Generator().manual_seed(1)
    results = []
    cases = args.cases.split(",")
    for name in cases:
        if name in ("generate", "generate-padded"):
            padded = name == "generate-padded"
            length = args.padded_length if padded else args.length
            result = _generate_case(length, args.new_tokens, args.repeats, generator, padded)
            result["threads"] = args.threads
            results.append(result)
            print(json.dumps(result), flush=True)
            continue
        if name == "padded":
            length = args.padded_length
            ids, mask = _left_padded(length, generator)
            model = _model("LlamaConfig", length)
            case = "llama, left-padded batch"
        else:
            length = args.length
            ids = torch.randint(3, VOCAB, (1, length), generator=generator)
            mask = torch.ones_like(ids)
            if name == "llama":
                model, case = _model("LlamaConfig", length), "llama"
            else:
                model = _model("MistralConfig", length, sliding_window=256)
                case = "mistral, window 256"
        result = _case(case, model, ids, mask, args.repeats)
        result["threads"] = args.threads
        results.append(result)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
