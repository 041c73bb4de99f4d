"""foveal.torch.PdeSsm2d against a pure-torch float64 twin (rfft2 · multiplier · irfft2):
forward and every parameter's gradient, the stable parametrisation, torch.compile, thread counts
and rejected inputs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from foveal.torch import PdeSsm2d  # noqa: E402


def twin(layer: PdeSsm2d, x: torch.Tensor) -> torch.Tensor:
    """The layer in plain torch: the group parameters expanded per channel, the symbol
    λ(k) = -kᵀKk + r - i b·k, the multiplier exp(τλ) or (exp(τλ) - 1)/λ, plus the skip."""
    channels_first = x if layer.layout == "channels_first" else x.permute(0, 3, 1, 2)
    height, width = channels_first.shape[-2:]
    rows, columns = (2 * height, 2 * width) if layer.boundary == "zero" else (height, width)
    per = layer.channels // layer.groups

    def channel(value: torch.Tensor) -> torch.Tensor:
        return value.repeat_interleave(per, dim=0)

    l_yy, l_xy, l_xx = (channel(v)[:, None, None] for v in layer.diffusion.unbind(-1))
    b_y, b_x = (channel(v)[:, None, None] for v in layer.velocity.unbind(-1))
    reaction, time = (channel(v)[:, None, None] for v in (layer.reaction, layer.time))
    f_y = torch.arange(rows, dtype=x.dtype)
    k_y = (2 * math.pi / rows * torch.where(f_y <= rows // 2, f_y, f_y - rows))[:, None]
    k_x = (2 * math.pi / columns * torch.arange(columns // 2 + 1, dtype=x.dtype))[None, :]
    quadratic = (l_yy * k_y + l_xy * k_x) ** 2 + (l_xx * k_x) ** 2  # kᵀ L Lᵀ k
    symbol = torch.complex(reaction - quadratic, -(b_y * k_y + b_x * k_x))
    growth = torch.exp(time * symbol)
    multiplier = growth if layer.mode == "initial_value" else (growth - 1) / symbol
    if layer.skip is not None:
        multiplier = multiplier + channel(layer.skip)[:, None, None]
    spectrum = torch.fft.rfft2(channels_first, s=(rows, columns))
    y = torch.fft.irfft2(spectrum * multiplier, s=(rows, columns))[..., :height, :width]
    return y if layer.layout == "channels_first" else y.permute(0, 2, 3, 1)


def make_layer(seed: int = 0, **options) -> PdeSsm2d:
    torch.manual_seed(seed)
    settings = dict(channels=12, groups=4, dtype=torch.float64)
    settings.update(options)
    layer = PdeSsm2d(**settings)
    with torch.no_grad():  # away from the initial values, so that every term matters
        layer.diffusion_factor.add_(0.3 * torch.randn_like(layer.diffusion_factor))
        layer.time_logit.add_(0.5 * torch.randn_like(layer.time_logit))
        if layer.skip is not None:
            layer.skip.add_(0.5 * torch.randn_like(layer.skip))
    return layer


def gradients(layer: PdeSsm2d, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> list:
    return torch.autograd.grad((y * weights).sum(), [x, *layer.parameters()])


@pytest.mark.parametrize("mode", ["initial_value", "forced"])
@pytest.mark.parametrize("boundary", ["periodic", "zero"])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_layer_matches_its_float64_twin_forward_and_gradients(mode, boundary, layout):
    layer = make_layer(mode=mode, boundary=boundary, layout=layout, skip=mode == "forced")
    shape = (2, 9, 10, 12) if layout == "channels_last" else (2, 12, 9, 10)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(shape, dtype=torch.float64)
    y, want = layer(x), twin(layer, x)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-11)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, expected in zip(
        names, gradients(layer, x, y, weights), gradients(layer, x, want, weights)
    ):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10, msg=name)


def test_initialisation_is_the_documented_one_and_stable():
    torch.manual_seed(5)
    layer = PdeSsm2d(64, groups=16)
    factor = layer.diffusion_factor.detach()
    assert factor.shape == (16, 3) and torch.all(factor[:, 1] == 0)
    diagonal = factor[:, [0, 2]]
    assert torch.all((diagonal >= 0.3 - 1e-6) & (diagonal <= 2.0 + 1e-6))
    reaction, time = layer.reaction.detach(), layer.time.detach()
    assert torch.all((reaction > -0.4 - 1e-6) & (reaction < -0.02 + 1e-6))
    torch.testing.assert_close(time, torch.ones(16))
    assert torch.all(layer.skip.detach() == 1)
    # Same seed, same parameters.
    torch.manual_seed(5)
    again = PdeSsm2d(64, groups=16)
    for one, two in zip(layer.parameters(), again.parameters()):
        assert torch.equal(one, two)


def test_any_parameter_values_give_a_stable_block():
    # Whatever an optimiser does to the raw parameters, K stays PSD and r in (-max, 0], so the
    # initial-value multiplier has |exp(τλ)| <= 1: ‖y‖ <= ‖x‖ (periodic, no skip, Parseval).
    layer = make_layer(seed=7, skip=False)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(20 * torch.randn_like(parameter))
        assert torch.all(layer.reaction <= 0) and torch.all(layer.reaction >= -1)
        assert torch.all(layer.time > 0)
        x = torch.randn(3, 16, 16, 12, dtype=torch.float64)
        y = layer(x)
    assert torch.isfinite(y).all()
    per_channel_in = x.square().sum(dim=(0, 1, 2))
    per_channel_out = y.square().sum(dim=(0, 1, 2))
    assert torch.all(per_channel_out <= per_channel_in * (1 + 1e-12))


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_compiled_layer_runs_fullgraph_and_gives_the_eager_bits(layout):
    layer = make_layer(seed=1, layout=layout, boundary="zero")
    shape = (2, 8, 8, 12) if layout == "channels_last" else (2, 12, 8, 8)
    x = torch.randn(shape, dtype=torch.float64)
    eager = layer(x).square().sum()
    eager_grads = torch.autograd.grad(eager, list(layer.parameters()))
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    loss = compiled(x).square().sum()
    assert torch.equal(loss, eager)
    for got, want in zip(torch.autograd.grad(loss, list(layer.parameters())), eager_grads):
        assert torch.equal(got, want)


def test_gradients_are_bitwise_identical_for_one_and_two_threads(at_one_and_two_threads):
    layer = make_layer(seed=2, channels=32, groups=8, dtype=torch.float32)
    x = torch.randn(4, 32, 32, 32, requires_grad=True)

    def step() -> list:
        y = layer(x)
        return [y, *torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])]

    one, two = at_one_and_two_threads(step)
    for name, a, b in zip(["y", "x", *(n for n, _ in layer.named_parameters())], one, two):
        assert torch.equal(a, b), name


def test_rejected_inputs_name_the_argument_and_leave_the_parameters_untouched():
    layer = make_layer()
    before = {name: value.clone() for name, value in layer.state_dict().items()}
    bad_nan = torch.randn(1, 4, 4, 12, dtype=torch.float64)
    bad_nan[0, 1, 2, 3] = math.nan
    cases = [
        (
            ValueError,
            r"shape \[B, H, W, C\] with C = 12",
            torch.randn(1, 4, 4, 5, dtype=torch.float64),
        ),
        (ValueError, r"shape \[B, H, W, C\]", torch.randn(4, 4, 12, dtype=torch.float64)),
        (TypeError, "x must have the parameters' dtype", torch.randn(1, 4, 4, 12)),
        (ValueError, "x must be finite", bad_nan),
        (TypeError, "x must be a torch tensor", 3.0),
    ]
    for error, message, x in cases:
        with pytest.raises(error, match=message):
            layer(x)
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(groups=5), r"groups \(5\) must divide channels \(12\)"),
        (dict(mode="implicit"), "mode must be one of"),
        (dict(boundary="reflect"), "boundary must be one of"),
        (dict(layout="nhwc"), "layout must be one of"),
        (dict(channels=0), "channels must be an int >= 1"),
        (dict(max_reaction=0.0), "max_reaction must be > 0"),
    ],
)
def test_constructor_rejects_bad_options_by_name(options, message):
    settings = dict(channels=12)
    settings.update(options)
    with pytest.raises(ValueError, match=message):
        PdeSsm2d(**settings)
