"""foveal.transformers.FovealCache: a transformers Cache over preallocated foveal KVCaches.

The tiny random-init decoders of test_transformers.py generate greedily with
attn_implementation="foveal" over a FovealCache, against transformers' own attention (sdpa, or
eager where sdpa refuses the model) over a DynamicCache: the same tokens, per-step scores within
1e-4 in float32, decode steps run as foveal.decode_attention over the cache (the sliding layers'
rings wrap: 23 + 12 tokens pass the window of 8); in bfloat16, the tokens of foveal over a
DynamicCache. Skipped without transformers.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import foveal.transformers as ftransformers  # noqa: E402
from test_transformers import TOL, _batch, _model  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "gemma2"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert ftransformers.register() == "foveal"


@pytest.fixture
def decode_calls(monkeypatch):
    """Counts the steps that ran foveal.decode_attention over a FovealCache layer."""
    calls = []
    decode = ftransformers.FovealCacheLayer.decode

    def counted(layer, query, options):
        calls.append(query.shape[2])
        return decode(layer, query, options)

    monkeypatch.setattr(ftransformers.FovealCacheLayer, "decode", counted)
    return calls


def _foveal_cache(model, batch: int, length: int = 64, **kwargs):
    model.set_attn_implementation("foveal")
    return ftransformers.FovealCache(model.config, batch, length, **kwargs)


def _generate(model, ids, mask, cache=None, new_tokens: int = NEW_TOKENS):
    extra = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )
    return out.sequences, torch.stack(out.scores)


def _reference(model, reference: str, ids, mask, new_tokens: int = NEW_TOKENS):
    model.set_attn_implementation(reference)
    return _generate(model, ids, mask, new_tokens=new_tokens)


def _assert_same(got, expected, what: str, tolerance: float = TOL):
    (tokens, scores), (expected_tokens, expected_scores) = got, expected
    assert torch.equal(tokens, expected_tokens), f"{what}: greedy tokens differ"
    finite = torch.isfinite(expected_scores)  # min_new_tokens sets the eos score to -inf
    assert torch.equal(torch.isfinite(scores), finite)
    error = (scores[finite].float() - expected_scores[finite].float()).abs().max().item()
    assert error <= tolerance, f"{what}: max score difference {error}"


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_over_foveal_cache_matches_reference(family, padding, decode_calls):
    model, reference = _model(family)
    ids, mask = _batch(padding)
    expected = _reference(model, reference, ids, mask)
    got = _generate(model, ids, mask, _foveal_cache(model, ids.shape[0]))
    _assert_same(got, expected, f"{family}, {padding} padding")
    layers = model.config.num_hidden_layers
    # Every step after the prefill decodes over the cache, every layer (left padding too: each
    # row's first real key is decode_attention's key_start).
    if padding == "none" or family == "llama":
        assert decode_calls == [1] * (NEW_TOKENS - 1) * layers


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_bfloat16_model_generates_as_over_a_dynamic_cache(family):
    # A bfloat16 cache decodes in float32 and rounds: the tokens of foveal over a DynamicCache.
    # (Against bfloat16 sdpa, the tiny Llama's greedy path parts at a near tie of two logits.)
    model, _ = _model(family)
    model = model.to(torch.bfloat16)
    try:
        ids, mask = _batch("none")
        expected = _reference(model, "foveal", ids, mask)
        cache = _foveal_cache(model, ids.shape[0], dtype=torch.bfloat16)
        _assert_same(_generate(model, ids, mask, cache), expected, f"{family}, bfloat16", 0.02)
    finally:
        model.to(torch.float32)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_prefill_in_chunks_equals_one_prefill(family):
    # A second multi-token step over a wrapped ring sees the retained window, in order.
    model, _ = _model(family)
    ids, _ = _batch("none")
    cache = _foveal_cache(model, ids.shape[0])
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :13], cache=cache).logits
        second = model(input_ids=ids[:, 13:], cache=cache).logits
    error = (torch.cat([first, second], dim=1) - whole).abs().max().item()
    assert error <= TOL, f"{family}: chunked prefill differs by {error}"
    assert cache.get_seq_length() == ids.shape[1]


def test_cache_is_reused_and_reset():
    model, reference = _model("mistral")
    ids, mask = _batch("none")
    expected = _reference(model, reference, ids, mask)
    cache = _foveal_cache(model, ids.shape[0])
    # Continue a generation over the cache it left: the same tokens as one longer generation.
    half, _ = _generate(model, ids, mask, cache, new_tokens=NEW_TOKENS // 2)
    rest, _ = _generate(model, half, torch.ones_like(half), cache, new_tokens=NEW_TOKENS // 2)
    assert torch.equal(rest, expected[0])
    cache.reset()
    assert cache.get_seq_length() == 0
    _assert_same(_generate(model, ids, mask, cache), expected, "after reset")
    cache.reset()  # a new batch size after a reset
    _generate(model, ids[:1], mask[:1], cache, new_tokens=2)


def test_capacity_overflow_raises():
    model, _ = _model("llama")
    ids, mask = _batch("none")
    cache = _foveal_cache(model, ids.shape[0], length=ids.shape[1] + 3)
    with pytest.raises(ValueError, match="exceed max_cache_len=26"):
        _generate(model, ids, mask, cache)
    assert cache.get_seq_length() == 26  # the rejected step wrote nothing
    cache.reset()
    _generate(model, ids, mask, cache, new_tokens=3)
    with pytest.raises(ValueError, match="max_batch_size=1"):
        _generate(model, ids, mask, _foveal_cache(model, 1))


def test_misuse_and_unsupported_features_raise_by_name():
    model, _ = _model("llama")
    ids, mask = _batch("none")
    cache = ftransformers.FovealCache(model.config, 3, 64)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="needs attn_implementation='foveal'"):
        _generate(model, ids, mask, cache)
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        _foveal_cache(model, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"the cache holds torch\.float16"):
        _generate(model, ids, mask, _foveal_cache(model, 3, dtype=torch.float16))
    states = torch.zeros(3, 2, 1, 16)
    with pytest.raises(NotImplementedError, match=r"kwargs to Cache\.update"):
        _foveal_cache(model, 3).update(states, states, 0)
    with pytest.raises(NotImplementedError, match="beam search"), torch.no_grad():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=3,
            num_beams=2,
            cache=_foveal_cache(model, 6),
            pad_token_id=0,
        )
