"""foveal.pde_ssm and foveal.torch.pde_ssm against a torch.fft implementation of docs/pde_ssm.md
(rfft2 · multiplier · irfft2, written here), torch.autograd.gradcheck, layouts and bad input."""

from __future__ import annotations

import math
from typing import Any

import foveal
import numpy as np
import pytest
from foveal import pde_ssm as pde

MODES = ["initial_value", "forced"]
BOUNDARIES = ["periodic", "zero"]
TOLERANCE = {np.dtype(np.float32): 3e-6, np.dtype(np.float64): 1e-12}


def signed_frequencies(torch: Any, n: int) -> Any:
    """0..n/2, then -(n/2 - 1)..-1 (the Nyquist bin of an even n counts as positive)."""
    f = torch.arange(n, dtype=torch.float64)
    return torch.where(f <= n // 2, f, f - n)


def torch_multiplier(torch: Any, params: dict, channels: int, shape: tuple, mode: str, form: str):
    """m(k) + D for every channel on the half spectrum of an Ht x Wt grid: [C, Ht, Wt/2+1]."""

    def per_channel(p: Any) -> Any:
        p = p if p.dim() > 0 else p.reshape(1)
        return p.repeat_interleave(channels // p.shape[0], dim=0)

    rows, columns = shape
    first, second, third = per_channel(params["diffusion"]).unbind(-1)
    if form == "raw":
        k_yy, k_xy, k_xx = first, second, third
    else:
        k_yy, k_xy, k_xx = first * first, first * second, second * second + third * third
    b_y, b_x = per_channel(params["velocity"]).unbind(-1)
    reaction, time = per_channel(params["reaction"]), per_channel(params["time"])
    k_y = (2 * math.pi * signed_frequencies(torch, rows) / rows)[None, :, None]
    k_x = (2 * math.pi * torch.arange(columns // 2 + 1, dtype=torch.float64) / columns)[None, None]
    k_yy, k_xy, k_xx, b_y, b_x, reaction, time = (
        v[:, None, None].to(torch.float64) for v in (k_yy, k_xy, k_xx, b_y, b_x, reaction, time)
    )
    real = -(k_yy * k_y**2 + 2 * k_xy * k_y * k_x + k_xx * k_x**2) + reaction
    z = time * torch.complex(real, -(b_y * k_y + b_x * k_x))
    if mode == "initial_value":
        m = torch.exp(z)
    else:
        small = z.abs() < 1e-6
        safe = torch.where(small, torch.ones_like(z), z)
        m = time * torch.where(small, 1 + z / 2, (torch.exp(safe) - 1) / safe)
    if params.get("skip") is not None:
        m = m + per_channel(params["skip"])[:, None, None].to(torch.float64)
    return m


def torch_pde_ssm(torch: Any, x: Any, params: dict, mode: str, boundary: str, form: str) -> Any:
    """x: [B, H, W, C]  ->  irfft2(multiplier * rfft2(x)) on H x W or (zero) 2H x 2W, cropped."""
    _, height, width, channels = x.shape
    shape = (2 * height, 2 * width) if boundary == "zero" else (height, width)
    m = torch_multiplier(torch, params, channels, shape, mode, form)
    grid = x.permute(0, 3, 1, 2)
    spectrum = torch.fft.rfft2(grid, s=shape)
    y = torch.fft.irfft2(spectrum * m.to(spectrum.dtype), s=shape)[..., :height, :width]
    return y.permute(0, 2, 3, 1).to(x.dtype)


def random_params(rng: np.random.Generator, channels: int, groups: dict, dtype: Any) -> dict:
    """Parameters of the given group counts (skip absent when its count is 0)."""
    params = dict(
        diffusion=rng.normal(0, 0.7, (groups["diffusion"], 3)),
        velocity=rng.normal(0, 1.5, (groups["velocity"], 2)),
        reaction=rng.uniform(-0.5, 0.2, groups["reaction"]),
        time=rng.uniform(0.2, 1.5, groups["time"]),
        skip=rng.normal(0, 1, groups["skip"]) if groups["skip"] else None,
    )
    return {k: None if v is None else v.astype(dtype) for k, v in params.items()}


def as_torch(torch: Any, params: dict, requires_grad: bool = False) -> dict:
    return {
        k: None if v is None else torch.tensor(v, requires_grad=requires_grad)
        for k, v in params.items()
    }


def positional(params: dict) -> tuple:
    return tuple(params[k] for k in ("diffusion", "velocity", "reaction", "time", "skip"))


GROUPS = dict(diffusion=2, velocity=6, reaction=1, time=3, skip=6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_matches_torch_fft(torch, rng, dtype, mode, boundary, layout):
    shape = (2, 7, 12, 6)
    x = rng.standard_normal(shape).astype(dtype)
    params = random_params(rng, 6, GROUPS, dtype)
    expected = torch_pde_ssm(
        torch,
        torch.tensor(x, dtype=torch.float64),
        as_torch(torch, params),
        mode,
        boundary,
        "cholesky",
    ).numpy()
    given = x if layout == "channels_last" else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    y = pde.pde_ssm(given, *positional(params), mode=mode, boundary=boundary, layout=layout)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == given.shape
    if layout == "channels_first":
        y = y.transpose(0, 2, 3, 1)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(y, expected, rtol=0, atol=TOLERANCE[np.dtype(dtype)] * scale)


@pytest.mark.parametrize("form", ["cholesky", "raw"])
def test_torch_in_torch_out_and_raw_diffusion(torch, rng, form):
    x = torch.randn(3, 5, 9, 4, dtype=torch.float64)
    params = random_params(rng, 4, dict(diffusion=4, velocity=1, reaction=4, time=1, skip=0), "f8")
    if form == "raw":  # K = L Lᵀ, given raw
        l_yy, l_xy, l_xx = params["diffusion"].T
        params["diffusion"] = np.stack([l_yy**2, l_yy * l_xy, l_xy**2 + l_xx**2], axis=1)
    y = pde.pde_ssm(x, *positional(params), diffusion_form=form, boundary="zero")
    assert isinstance(y, torch.Tensor)
    expected = torch_pde_ssm(torch, x, as_torch(torch, params), "initial_value", "zero", form)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


def test_module_caches_its_multiplier_and_matches_the_function(rng):
    params = random_params(rng, 6, GROUPS, np.float32)
    block = pde.PdeSsm(7, 12, 6, *positional(params), mode="forced", boundary="zero")
    assert block.transform_shape == (14, 24) and block.dtype == np.float32
    assert (block.height, block.width, block.channels) == (7, 12, 6)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 7, 12, 6)).astype(np.float32)
        out = np.full_like(x, -7)
        assert block(x, out=out) is out
        expected = pde.pde_ssm(x, *positional(params), mode="forced", boundary="zero")
        np.testing.assert_array_equal(out, expected)


def test_scalar_parameters_and_strided_input(rng):
    x = rng.standard_normal((2, 6, 16, 5))[:, :, ::2]  # a non-contiguous W axis
    y = pde.pde_ssm(x, [0.5, 0.1, 0.4], [1.0, 0.0], -0.1, 0.7, num_threads=2)
    expected = pde.pde_ssm(np.ascontiguousarray(x), [[0.5, 0.1, 0.4]], [[1.0, 0.0]], [-0.1], [0.7])
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gradcheck(torch, rng, mode, boundary):
    from foveal import torch as ftorch

    params = as_torch(
        torch,
        random_params(rng, 4, dict(diffusion=2, velocity=4, reaction=1, time=2, skip=4), "f8"),
        True,
    )
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)  # [B, C, H, W]

    def block(x, *parameters):
        return ftorch.pde_ssm(
            x, *parameters, mode=mode, boundary=boundary, layout="channels_first", num_threads=1
        )

    assert torch.autograd.gradcheck(block, (x, *positional(params)), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_backward_matches_torch_autograd(torch, rng, mode, boundary):
    from foveal import torch as ftorch

    params = random_params(rng, 6, GROUPS, np.float64)
    ours, theirs = as_torch(torch, params, True), as_torch(torch, params, True)
    x = torch.randn(2, 7, 8, 6, dtype=torch.float64)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights = torch.randn(2, 7, 8, 6, dtype=torch.float64)
    (
        ftorch.pde_ssm(x_ours, *positional(ours), mode=mode, boundary=boundary) * weights
    ).sum().backward()
    (torch_pde_ssm(torch, x_theirs, theirs, mode, boundary, "cholesky") * weights).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-12)
    for name in ours:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, rtol=1e-9, atol=1e-11)


def test_backward_function_returns_only_what_is_asked(rng):
    params = random_params(rng, 6, GROUPS, np.float32)
    x = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
    g = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
    full = pde.pde_ssm_backward(x, g, *positional(params), boundary="zero")
    assert full.x.shape == x.shape and full.diffusion.shape == (2, 3) and full.skip.shape == (6,)
    block = pde.PdeSsm(4, 4, 6, *positional(params), boundary="zero")
    only_x = block.backward(None, g, parameter_grads=False)
    assert only_x.diffusion is None and only_x.time is None
    np.testing.assert_array_equal(only_x.x, full.x)
    only_parameters = block.backward(x, g, input_grad=False)
    assert only_parameters.x is None
    np.testing.assert_array_equal(only_parameters.velocity, full.velocity)


def test_training_reduces_a_loss(torch):
    """Adam fits a student block to a teacher's outputs: the autograd path trains."""
    from foveal import torch as ftorch

    torch.manual_seed(0)
    x = torch.randn(4, 10, 10, 2)
    with torch.no_grad():
        teacher = (torch.tensor([[0.8, 0.1, 0.5]]), torch.tensor([[0.4, -0.3]]))
        target = ftorch.pde_ssm(x, *teacher, torch.tensor([-0.1]), torch.tensor([0.8]))
    diffusion = torch.full((1, 3), 0.3, requires_grad=True)
    velocity = torch.zeros(1, 2, requires_grad=True)
    reaction = torch.zeros(1, requires_grad=True)
    time = torch.ones(1, requires_grad=True)
    optimizer = torch.optim.Adam([diffusion, velocity, reaction, time], lr=0.05)
    losses = []
    for _ in range(80):
        optimizer.zero_grad()
        y = ftorch.pde_ssm(x, diffusion, velocity, reaction, time, num_threads=1)
        loss = ((y - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# --------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and what was expected; outputs untouched.

GOOD = dict(diffusion=[[1.0, 0.0, 1.0]], velocity=[[0.5, 0.5]], reaction=[0.0], time=[1.0])


@pytest.mark.parametrize(
    "change, options, pieces",
    [
        (dict(time=[0.0]), {}, ["time[0]", "must be > 0", "got 0"]),
        (dict(time=[-2.0]), {}, ["time[0]", "must be > 0"]),
        (dict(diffusion=[[1.0, 2.0, 1.0]]), dict(diffusion_form="raw"), ["positive semi-definite"]),
        (dict(velocity=[[0.5, float("nan")]]), {}, ["velocity[0, 1]", "must be finite"]),
        (dict(reaction=[float("inf")]), {}, ["reaction[0]", "must be finite"]),
        (dict(time=[1.0] * 4), {}, ["time.shape[0]", "C = 6 or a divisor of it", "got 4"]),
        (dict(velocity=[[0.0, 0.0]] * 12), {}, ["velocity.shape[0]", "got 12"]),
        (dict(diffusion=[[1.0, 0.0]]), {}, ["diffusion.shape[1] must be 3, got 2"]),
        ({}, dict(mode="steady"), ['mode must be "initial_value" or "forced"', "steady"]),
        ({}, dict(boundary="reflect"), ['boundary must be "periodic" or "zero"', "reflect"]),
        ({}, dict(diffusion_form="full"), ['diffusion_form must be "cholesky" or "raw"']),
        ({}, dict(layout="nhwc"), ['layout must be "channels_last"', "nhwc"]),
    ],
)
def test_rejects_bad_input(rng, change, options, pieces):
    x = rng.standard_normal((2, 4, 5, 6))
    out = np.full_like(x, -7.0)
    params = dict(GOOD, **change)
    with pytest.raises(ValueError) as error:
        pde.pde_ssm(x, **params, out=out, **options)
    for piece in pieces:
        assert piece in str(error.value)
    assert (out == -7.0).all()


def test_rejects_empty_grids_wrong_types_and_shapes(rng):
    with pytest.raises(ValueError, match=r"height \(H\) must be >= 1, got 0"):
        pde.pde_ssm(np.zeros((2, 0, 5, 6)), **GOOD)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        pde.pde_ssm(np.zeros((4, 5, 6)), **GOOD)
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        pde.pde_ssm(np.zeros((1, 4, 5, 6), dtype=np.int32), **GOOD)
    with pytest.raises(TypeError, match="time must have dtype float64"):
        pde.pde_ssm(np.zeros((1, 4, 5, 6)), **dict(GOOD, time=np.ones(1, np.float32)))
    block = pde.PdeSsm(4, 5, 6, **GOOD, dtype=np.float64)
    with pytest.raises(ValueError, match=r"x.shape\[2\] must equal W = 5, got 6"):
        block(np.zeros((1, 4, 6, 6)))
    with pytest.raises(TypeError, match="the block's"):
        block(np.zeros((1, 4, 5, 6), dtype=np.float32))


def test_module_is_exported():
    assert foveal.pde_ssm.pde_ssm is pde.pde_ssm
    assert foveal.pde_ssm.PdeSsm is pde.PdeSsm
