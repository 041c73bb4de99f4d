"""foveal.torch.SparseKAttention and DenseAttention against pure-torch float64 twins: forward,
gradients of every parameter (the scorer's included), the decode cache, torch.compile, thread
counts and rejected inputs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from foveal.torch import DenseAttention, SparseKAttention  # noqa: E402

CONFIG = dict(d_model=24, num_heads=4, num_kv_heads=2)


def rotary(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, H, L, D]: the pairs (x_i, x_{i + D/2}) of position t, read as the complex number
    x_i + i x_{i + D/2}, multiplied by exp(i t base^(-2i/D))."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half], x[..., half:])
    angles = torch.arange(x.shape[-2], dtype=torch.float64)[:, None] * base ** (
        -2.0 * torch.arange(half, dtype=torch.float64) / x.shape[-1]
    )
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((turned.real, turned.imag), dim=-1)


def twin_gates(u: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """u [n] (float64) -> (selected bool [n], gates [n]): the topk largest scores (ties: lower
    index) with the SPARSEK gates clip(u - tau, 0, 1), tau differentiable in u."""
    n = u.shape[0]
    if n <= topk:
        return torch.ones(n, dtype=torch.bool), torch.ones_like(u)
    scores = u.detach()
    order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
    selected = torch.zeros(n, dtype=torch.bool)
    selected[order[:topk]] = True
    # tau solves sum clip(u - tau, 0, 1) = topk: bisection for the sets, then the closed form on
    # the fractional set F (so the gradient flows as the projection's): tau = (sum_F u - (k -
    # |ones|)) / |F|.
    detached = u.detach()
    low, high = float(detached.min()) - 1.0, float(detached.max())
    for _ in range(200):
        middle = 0.5 * (low + high)
        total = float((detached - middle).clamp(0, 1).sum())
        low, high = (middle, high) if total > topk else (low, middle)
    tau = 0.5 * (low + high)
    ones = detached >= tau + 1
    fractional = (detached > tau) & ~ones
    tau = (u[fractional].sum() - (topk - int(ones.sum()))) / int(fractional.sum())
    return selected, (u - tau).clamp(0, 1)


def twin_heads(layer: torch.nn.Module, x: torch.Tensor) -> tuple:
    """q [B, Hq, L, D], k and v [B, Hkv, L, D]: the layer's projections, split into heads, with
    the rotary embedding of :func:`rotary` on q and k."""
    batch, length, _ = x.shape
    q = layer.q_proj(x).view(batch, length, layer.num_heads, -1).transpose(1, 2)
    k = layer.k_proj(x).view(batch, length, layer.num_kv_heads, -1).transpose(1, 2)
    v = layer.v_proj(x).view(batch, length, layer.num_kv_heads, -1).transpose(1, 2)
    if layer.rotary:
        q, k = rotary(q, layer.rotary_base), rotary(k, layer.rotary_base)
    return q, k, v


def twin_sparsek(layer: SparseKAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer written in plain torch ops: projections, rotary, scorer, then SparseK attention
    one query at a time (float64)."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = twin_heads(layer, x)
    u = torch.einsum("hd,bld->bhl", layer.score_weight, x)
    sinks, window, group = layer.sink_tokens, layer.window, heads // kv_heads
    rows = []
    for b in range(batch):
        for h in range(heads):
            hk = h // group
            head_rows = []
            for p in range(length):
                gate = torch.zeros(length, dtype=x.dtype)
                visible = torch.zeros(length, dtype=torch.bool)
                visible[: min(sinks, p + 1)] = True
                visible[max(p - window + 1, 0) : p + 1] = True
                gate = gate + visible.to(x.dtype)
                pool_end = p - window + 1
                if pool_end > sinks:
                    chosen, pool_gates = twin_gates(u[b, hk, sinks:pool_end], layer.topk)
                    index = torch.arange(sinks, pool_end)[chosen]
                    visible[index] = True
                    gate = gate.index_put((index,), pool_gates[chosen])
                if layer.gate == "none":
                    gate = visible.to(x.dtype)
                logits = (k[b, hk] @ q[b, h, p]) / math.sqrt(dim)
                if layer.gate == "kv":
                    logits = logits * gate
                weights = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=0)
                head_rows.append((weights * gate) @ v[b, hk])
            rows.append(torch.stack(head_rows))
    out = torch.stack(rows).view(batch, heads, length, dim)
    return layer.o_proj(out.transpose(1, 2).reshape(batch, length, layer.d_model))


def twin_dense(layer: DenseAttention, x: torch.Tensor) -> torch.Tensor:
    """Causal (optionally windowed) softmax attention with a mask, in plain torch."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = twin_heads(layer, x)
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    position = torch.arange(length)
    mask = position[None, :] <= position[:, None] if layer.causal else torch.ones(length, length)
    mask = mask.bool()
    if layer.window:
        mask &= position[None, :] > position[:, None] - layer.window
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
    out = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1) @ v
    return layer.o_proj(out.transpose(1, 2).reshape(batch, length, layer.d_model))


def make_layer(seed: int = 0, **options) -> SparseKAttention:
    torch.manual_seed(seed)
    settings = dict(CONFIG, topk=5, window=3, sink_tokens=1, dtype=torch.float64)
    settings.update(options)
    return SparseKAttention(**settings)


def gradients(module: torch.nn.Module, loss: torch.Tensor) -> list:
    """d loss / d parameter for every parameter (zeros for one the loss does not reach: the
    scorer under gate "none", whose gradient foveal gives as zeros)."""
    parameters = list(module.parameters())
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


@pytest.mark.parametrize(
    "options",
    [
        dict(gate="value"),
        dict(gate="kv"),
        dict(gate="none"),
        dict(gate="value", window=0, sink_tokens=0, topk=7),
        dict(gate="value", window=6, sink_tokens=3, topk=4, rotary=False),
    ],
)
def test_sparsek_layer_matches_its_float64_twin_forward_and_gradients(options):
    layer = make_layer(**options)
    x = torch.randn(2, 29, CONFIG["d_model"], dtype=torch.float64)
    weights = torch.randn(2, 29, CONFIG["d_model"], dtype=torch.float64)
    y = layer(x)
    want = twin_sparsek(layer, x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    got_grads = gradients(layer, (y * weights).sum())
    want_grads = gradients(layer, (want * weights).sum())
    names = [name for name, _ in layer.named_parameters()]
    for name, got, expected in zip(names, got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, msg=name)
    scorer = dict(zip(names, got_grads))["score_weight"]
    if options["gate"] != "none":  # the scorer trains through the gates
        assert scorer.abs().max() > 1e-6


def test_dense_twin_shares_the_weights_and_matches_masked_softmax():
    layer = make_layer(topk=64, window=0, sink_tokens=0, gate="none")
    dense = DenseAttention.from_sparsek(layer)
    x = torch.randn(2, 33, CONFIG["d_model"], dtype=torch.float64)
    # topk beyond the length, no window or sinks, hard gates: SparseK is causal dense attention.
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(dense(x), twin_dense(dense, x), rtol=1e-10, atol=1e-12)
    bidirectional = DenseAttention(**CONFIG, causal=False, dtype=torch.float64)
    torch.testing.assert_close(
        bidirectional(x), twin_dense(bidirectional, x), rtol=1e-10, atol=1e-12
    )
    windowed = DenseAttention.from_sparsek(layer, window=4)
    torch.testing.assert_close(windowed(x), twin_dense(windowed, x), rtol=1e-10, atol=1e-12)
    windowed_grads = gradients(windowed, windowed(x).square().sum())
    twin_grads = gradients(windowed, twin_dense(windowed, x).square().sum())
    for got, want in zip(windowed_grads, twin_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_cache_gives_the_rows_of_forward(dtype):
    layer = make_layer(seed=3, topk=6, window=4, sink_tokens=2, dtype=dtype)
    x = torch.randn(2, 70, CONFIG["d_model"], dtype=dtype)
    with torch.no_grad():
        want = layer(x)
    cache = layer.new_cache(2)
    got = torch.cat(
        [layer.decode(x[:, :20], cache)]
        + [layer.decode(x[:, t : t + 1], cache) for t in range(20, 70)],
        dim=1,
    )
    assert cache.length == 70 and cache.stored_rows <= cache.capacity == 12
    tolerance = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_16_bit_layer_trains_and_decodes_as_the_float32_layer(half):
    # The same weights in 16 bits: forward and every parameter's gradient within the dtype's
    # rounding of the float32 layer's (16-bit gradients from the float32 backward of the widened
    # values), and the 16-bit decode cache gives the 16-bit forward's rows.
    options = dict(seed=4, topk=6, window=4, sink_tokens=2)
    single = make_layer(dtype=torch.float32, **options)
    layer = make_layer(dtype=half, **options)
    layer.load_state_dict({name: p.to(half) for name, p in single.state_dict().items()})
    single.load_state_dict({name: p.float() for name, p in layer.state_dict().items()})
    x = torch.randn(2, 45, CONFIG["d_model"]).to(half)
    weights = torch.randn(2, 45, CONFIG["d_model"])
    y = layer(x)
    want = single(x.float())
    assert y.dtype == half
    tolerance = 1e-2 if half == torch.bfloat16 else 2e-3
    scale = want.abs().max()
    assert ((y.float() - want).abs().max() / scale).item() <= tolerance
    got_grads = gradients(layer, (y.float() * weights).sum())
    want_grads = gradients(single, (want * weights).sum())
    names = [name for name, _ in layer.named_parameters()]
    for name, got, expected in zip(names, got_grads, want_grads):
        assert got.dtype == half, name
        error = (got.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-6)
        assert error.item() <= 2 * tolerance, name
    cache = layer.new_cache(2)
    rows = [layer.decode(x[:, :30], cache)] + [
        layer.decode(x[:, t : t + 1], cache) for t in range(30, 45)
    ]
    got = torch.cat(rows, dim=1)
    assert got.dtype == half
    with torch.no_grad():
        forward = layer(x)
    scale = forward.float().abs().max()
    assert ((got.float() - forward.float()).abs().max() / scale).item() <= tolerance


def test_decode_rejects_a_cache_that_does_not_match():
    layer = make_layer()
    other = make_layer(topk=9).new_cache(1)
    with pytest.raises(ValueError, match="cache"):
        layer.decode(torch.randn(1, 1, CONFIG["d_model"], dtype=torch.float64), other)
    with pytest.raises(TypeError, match="cache"):
        layer.decode(torch.randn(1, 1, CONFIG["d_model"], dtype=torch.float64), object())
    assert other.length == 0


@pytest.mark.parametrize("kind", ["sparsek", "dense", "window"])
def test_compiled_layers_run_fullgraph_and_give_the_eager_bits(kind):
    layer = make_layer(seed=1)
    if kind != "sparsek":
        layer = DenseAttention.from_sparsek(layer, window=5 if kind == "window" else 0)
    x = torch.randn(2, 31, CONFIG["d_model"], dtype=torch.float64)
    eager = layer(x).square().sum()
    eager_grads = gradients(layer, eager)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    loss = compiled(x).square().sum()
    assert torch.equal(loss, eager)
    for got, want in zip(gradients(layer, loss), eager_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["sparsek", "dense"])
def test_gradients_are_bitwise_identical_for_one_and_two_threads(kind, at_one_and_two_threads):
    layer = make_layer(seed=2, topk=16, window=8, sink_tokens=1, dtype=torch.float32)
    if kind == "dense":
        layer = DenseAttention.from_sparsek(layer)
    x = torch.randn(3, 700, CONFIG["d_model"])  # 2100 rows: several chunks of the weight grads

    def step() -> list:
        y = layer(x)
        return [y, *gradients(layer, y.square().sum())]

    one, two = at_one_and_two_threads(step)
    for name, a, b in zip(["y", *(n for n, _ in layer.named_parameters())], one, two):
        assert torch.equal(a, b), name


def test_rejected_inputs_name_the_argument_and_leave_the_parameters_untouched():
    layer = make_layer()
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    d_model = CONFIG["d_model"]
    bad_nan = torch.randn(1, 5, d_model, dtype=torch.float64)
    bad_nan[0, 2, 1] = math.nan
    cases = [
        (ValueError, r"x must have shape \[B, L, 24\]", torch.randn(1, 5, 7, dtype=torch.float64)),
        (ValueError, r"x must have shape", torch.randn(5, d_model, dtype=torch.float64)),
        (TypeError, "x must have the parameters' dtype", torch.randn(1, 5, d_model)),
        (ValueError, "x must be finite", bad_nan),
        (TypeError, "x must be a torch tensor", [[0.0] * d_model]),
    ]
    for error, message, x in cases:
        with pytest.raises(error, match=message):
            layer(x)
        with pytest.raises(error, match=message):
            layer.decode(x, layer.new_cache(1))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(d_model=25), ValueError, "d_model .25. must be a multiple of num_heads"),
        (dict(num_kv_heads=3), ValueError, "num_heads .4. must be a multiple of num_kv_heads"),
        (dict(topk=0), ValueError, "topk must be >= 1"),
        (dict(window=-1), ValueError, "window must be >= 0"),
        (dict(topk=2.5), TypeError, "topk must be an int"),
        (dict(gate="soft"), ValueError, "gate must be one of"),
        (dict(d_model=20, num_heads=4, num_kv_heads=2), ValueError, "even head_dim"),
    ],
)
def test_constructor_rejects_bad_options_by_name(options, error, message):
    settings = dict(CONFIG, topk=4)
    settings.update(options)
    with pytest.raises(error, match=message):
        SparseKAttention(**settings)
