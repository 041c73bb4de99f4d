"""foveal behind Hugging Face transformers' attention and mask interfaces.

Tiny random-init decoders (2 layers, hidden 64, GQA 4:2 heads) of the common families run with
attn_implementation="foveal" and with transformers' own sdpa (eager where sdpa refuses the
model: Gemma2's softcap, gpt-oss's sinks): logits agree to 1e-4 in float32 on unpadded, right-
and left-padded batches, and greedy generation over a DynamicCache and a StaticCache gives the
same tokens (and per-step scores). Skipped when transformers is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import foveal.transformers as ftransformers  # noqa: E402
from transformers import masking_utils  # noqa: E402

TOL = 1e-4
VOCAB = 96
WINDOW = 8  # sliding windows shorter than the prompts, so they matter

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": ("LlamaConfig", {}, "sdpa"),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, "sdpa"),
    "qwen2": (
        "Qwen2Config",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
            "layer_types": ["full_attention", "sliding_attention"],
        },
        "sdpa",
    ),
    "gemma2": (
        "Gemma2Config",
        {
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 20,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "eager",
    ),
    "gpt_oss": (
        "GptOssConfig",
        {
            "sliding_window": WINDOW,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        "eager",
    ),
}

_MODELS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def registered():
    assert ftransformers.register() == "foveal"


def _model(family: str):
    if family not in _MODELS:
        config_name, extra, reference = FAMILIES[family]
        config = getattr(transformers, config_name)(**COMMON, **extra)
        torch.manual_seed(1234)
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=reference, dtype=torch.float32
        )
        model.eval()
        _MODELS[family] = (model, reference)
    return _MODELS[family]


def _batch(padding: str):
    """Three prompts of 23, 17 and 11 tokens, padded to 23 on the given side ("holes": left
    padding and two masked tokens inside the first prompt, so no row is one run of keys)."""
    generator = torch.Generator().manual_seed(7)
    lengths = (23, 17, 11)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (length,), generator=generator)
        span = slice(0, length) if padding == "right" else slice(max(lengths) - length, None)
        if padding == "none":
            tokens = torch.randint(3, VOCAB, (max(lengths),), generator=generator)
            span = slice(None)
        ids[row, span] = tokens
        mask[row, span] = 1
    if padding == "holes":
        mask[0, 5:7] = 0
    return ids, mask


def _logits(model, implementation: str, ids, mask):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_reference(family, padding):
    model, reference = _model(family)
    ids, mask = _batch(padding)
    expected = _logits(model, reference, ids, mask)
    got = _logits(model, "foveal", ids, mask)
    real = mask.bool()  # padding rows attend to nothing real: their logits are not compared
    error = (got[real] - expected[real]).abs().max().item()
    assert error <= TOL, f"{family}, {padding} padding: max |foveal - {reference}| = {error}"
    assert torch.isfinite(got).all()


def _generate(model, implementation: str, cache: str, ids, mask):
    model.set_attn_implementation(implementation)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **extra,
        )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_matches_reference(family, cache):
    model, reference = _model(family)
    ids, mask = _batch("left")  # batched generation pads on the left
    expected, expected_scores = _generate(model, reference, cache, ids, mask)
    got, scores = _generate(model, "foveal", cache, ids, mask)
    assert torch.equal(got, expected), f"{family}, {cache} cache: greedy tokens differ"
    # 23 + 12 tokens run past the window of 8: the sliding caches evict and roll.
    finite = torch.isfinite(expected_scores)  # min_new_tokens sets the eos score to -inf
    assert torch.equal(torch.isfinite(scores), finite)
    error = (scores[finite] - expected_scores[finite]).abs().max().item()
    assert error <= TOL, f"{family}, {cache} cache: max score difference {error}"


def test_left_padding_generates_as_each_prompt_alone():
    # The padding mask reaches the kernel: a left-padded prompt continues as it would unpadded.
    model, _ = _model("mistral")
    ids, mask = _batch("left")
    batched, _ = _generate(model, "foveal", "dynamic", ids, mask)
    for row in range(ids.shape[0]):
        alone_ids = ids[row : row + 1, mask[row].bool()]
        alone, _ = _generate(model, "foveal", "dynamic", alone_ids, torch.ones_like(alone_ids))
        assert torch.equal(batched[row, -12:], alone[0, -12:]), f"prompt {row}"


def _both(mask_function, padding=None, q_offset=4, kv_offset=0):
    """(foveal's mask, transformers' sdpa boolean mask) for 2 rows, 5 queries and 9 keys."""
    sizes = dict(batch_size=2, q_length=5, kv_length=9, kv_offset=kv_offset)
    sizes.update(mask_function=mask_function, attention_mask=padding)
    ours = ftransformers.mask_forward(q_offset=q_offset, **sizes)
    theirs = masking_utils.sdpa_mask(q_offset=int(q_offset), allow_is_causal_skip=False, **sizes)
    return ours, theirs


def _as_dense(mask: ftransformers.FovealMask, q_length: int, kv_length: int):
    """The boolean matrix a FovealMask stands for, from its fields."""
    i = torch.arange(q_length)[:, None] + mask.q_offset
    j = torch.arange(kv_length)[None, :]
    seen = torch.ones(q_length, kv_length, dtype=torch.bool)
    if mask.causal:
        seen &= j <= i
    if mask.window_left >= 0:
        seen &= j >= i - mask.window_left
    seen = seen[None, None].expand(2, 1, -1, -1)
    if mask.key_mask is not None:
        seen = seen & mask.key_mask[:, None, None, :]
    return seen


@pytest.mark.parametrize(
    "pattern",
    ["causal", "sliding", "bidirectional"],
)
@pytest.mark.parametrize("kv_offset", [0, 3])
def test_plain_patterns_become_band_options(pattern, kv_offset):
    function = {
        "causal": masking_utils.causal_mask_function,
        "sliding": masking_utils.sliding_window_causal_mask_function(4),
        "bidirectional": masking_utils.bidirectional_mask_function,
    }[pattern]
    padding = torch.ones(2, 12, dtype=torch.bool)
    padding[1, :5] = False  # left padding of the second row, at absolute positions 0-4
    q_offset = torch.tensor(7)  # as a static cache passes it
    mask, expected = _both(function, padding, kv_offset=kv_offset, q_offset=q_offset)
    assert mask.dense is None  # no [Lq, Lk] matrix: foveal skips the blocks outside the band
    assert torch.equal(_as_dense(mask, 5, 9), expected)
    assert mask.shape == (2, 1, 5, 9)
    assert mask.key_ranges == ((0, 9), (5 - kv_offset, 9))  # each row's keys are one run
    padding[0, 7] = False  # a hole: the padding becomes a boolean bias
    mask, expected = _both(function, padding, kv_offset=kv_offset, q_offset=q_offset)
    assert mask.key_ranges is None and mask.key_mask is not None
    assert torch.equal(_as_dense(mask, 5, 9), expected)
    assert _both(function, torch.ones(2, 12, dtype=torch.bool))[0].key_mask is None


def test_other_patterns_are_materialized():
    def even_keys(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx % 2 == 0

    function = masking_utils.and_masks(masking_utils.causal_mask_function, even_keys)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[0, 0] = False
    mask, expected = _both(function, padding)
    assert mask.dense is not None
    assert torch.equal(mask.dense, expected)


def _attention_inputs(requires_grad=False):
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 6, 16, generator=generator, requires_grad=requires_grad)
    k, v = (torch.randn(1, 2, 6, 16, generator=generator) for _ in range(2))
    return q, k, v


class _Module(torch.nn.Module):
    is_causal = True


def test_missing_mask_is_top_left_causal():
    q, k, v = _attention_inputs()
    k8, v8 = (torch.cat([t, torch.randn(1, 2, 2, 16)], dim=2) for t in (k, v))  # 2 keys to spare
    out, weights = ftransformers.attention_forward(_Module(), q, k8, v8, None, scaling=0.25)
    assert weights is None and out.shape == (1, 6, 4, 16)
    keys = k.repeat_interleave(2, dim=1)
    values = v.repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, is_causal=True, scale=0.25
    )
    assert (out - expected.transpose(1, 2)).abs().max().item() <= 1e-5


def _sink_reference(q, k, v, sinks):
    """Causal GQA attention whose softmax holds one more logit per head (no value)."""
    logits = q @ k.repeat_interleave(2, dim=1).transpose(2, 3) / 4.0
    logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    logits = torch.cat([logits, sinks.reshape(1, 4, 1, 1).expand(1, 4, 6, 1)], dim=-1)
    weights = logits.softmax(dim=-1)[..., :-1]
    return weights @ v.repeat_interleave(2, dim=1)


def test_sink_logits_are_exact_without_gradients():
    q, k, v = _attention_inputs()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    mask = ftransformers.FovealMask(causal=True, q_offset=0)
    with torch.no_grad():
        out, _ = ftransformers.attention_forward(_Module(), q, k, v, mask, s_aux=sinks)
    expected = _sink_reference(q, k, v, sinks)
    assert (out - expected.transpose(1, 2)).abs().max().item() <= 1e-5


def test_sink_logits_train_like_the_reference():
    # gpt-oss's sinks are parameters: every gradient (q, k, v and s_aux) against autograd
    # through the float64 reference.
    q, k, v = (t.double() for t in _attention_inputs())
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    weights = torch.randn(
        1, 6, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    mask = ftransformers.FovealMask(causal=True, q_offset=0)
    grads = []
    for function in ("foveal", "reference"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        if function == "foveal":
            out, _ = ftransformers.attention_forward(_Module(), *inputs[:3], mask, s_aux=inputs[3])
        else:
            out = _sink_reference(*inputs).transpose(1, 2)
        (out * weights).sum().backward()
        grads.append([t.grad for t in inputs])
    for name, got, expected in zip(("q", "k", "v", "s_aux"), *grads):
        assert (got - expected).abs().max().item() <= 1e-12, name


def test_unsupported_features_raise_by_name():
    q, k, v = _attention_inputs(requires_grad=True)
    mask = ftransformers.FovealMask(causal=True)
    module = _Module()
    with pytest.raises(NotImplementedError, match="dropout"):
        ftransformers.attention_forward(module, q, k, v, mask, dropout=0.1)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ftransformers.attention_forward(module, q, k, v, mask, output_attentions=True)
    with pytest.raises(NotImplementedError, match="position_bias"):
        ftransformers.attention_forward(module, q, k, v, mask, position_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="covers 4 keys"):
        ftransformers.attention_forward(module, q, k, v, torch.ones(1, 1, 6, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        ftransformers.attention_forward(module, q, k, v, torch.ones(6, 6))


def test_training_dropout_in_a_model_raises():
    config = transformers.LlamaConfig(**COMMON, attention_dropout=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="foveal")
    model.train()
    ids = torch.randint(3, VOCAB, (1, 8))
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=ids)


@pytest.mark.parametrize("padding", ["left", "holes"])
def test_gradients_flow_through_foveal(padding):
    model, _ = _model("llama")
    ids, mask = _batch(padding)
    grads = {}
    for implementation in ("sdpa", "foveal"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits[mask.bool()].square().mean().backward()
        weight = model.model.layers[0].self_attn.q_proj.weight
        grads[implementation] = weight.grad.clone()
    model.zero_grad()
    scale = grads["sdpa"].abs().max().item()
    assert (grads["foveal"] - grads["sdpa"]).abs().max().item() <= TOL * max(scale, 1.0)


def test_gpt_oss_sinks_train_through_foveal():
    # gpt-oss's learned sink logits get the gradient eager attention gives them, and so does
    # every projection upstream of the lse they read.
    model, reference = _model("gpt_oss")
    ids, mask = _batch("left")
    grads = {}
    for implementation in (reference, "foveal"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).logits[mask.bool()].square().mean().backward()
        attention = model.model.layers[1].self_attn
        grads[implementation] = (attention.sinks.grad.clone(), attention.k_proj.weight.grad.clone())
    model.zero_grad()
    for name, got, want in zip(("sinks", "k_proj"), grads["foveal"], grads[reference]):
        scale = want.abs().max().item()  # ~1e-4 in this tiny model: the bound is relative
        assert scale > 0, name
        assert (got - want).abs().max().item() <= TOL * scale, name


def test_foveal_imports_without_transformers():
    # transformers is optional: hide it, and foveal (foveal.transformers too) still imports;
    # only register() needs it, and says so.
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "import foveal, foveal.torch, foveal.transformers\n"
        "try:\n    foveal.transformers.register()\n"
        "except ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "needs Hugging Face transformers" in result.stdout


@pytest.mark.parametrize("causal", [True, False])
def test_key_runs_match_the_dense_mask(causal):
    # Rows over their own run of keys (one whole, one left-padded past the first queries, one
    # right-padded, one with no key) against the same mask as a [B, 1, Lq, Lk] boolean bias.
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(4, 4, 6, 16, generator=generator)
    k, v = (torch.randn(4, 2, 10, 16, generator=generator) for _ in range(2))
    key_mask = torch.zeros(4, 10, dtype=torch.bool)
    key_mask[0], key_mask[1, 7:], key_mask[2, :5] = True, True, True
    runs = ((0, 10), (7, 10), (0, 5), (0, 0))
    window = 2 if causal else -1
    mask = ftransformers.FovealMask(causal, window, 4, key_mask, runs, None, (4, 1, 6, 10))
    got, _ = ftransformers.attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    i = torch.arange(6)[:, None] + 4
    j = torch.arange(10)[None, :]
    band = (j <= i) & (j >= i - window) if causal else torch.ones(6, 10, dtype=torch.bool)
    dense = band[None, None] & key_mask[:, None, None, :]
    expected, _ = ftransformers.attention_forward(_Module(), q, k, v, dense, scaling=0.3)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    assert (got - expected).abs().max().item() <= 1e-6
