"""foveal.sparsek and foveal.torch.sparsek against a torch sort-and-scan implementation."""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from foveal import sparsek as sk

torch = pytest.importorskip("torch")
import foveal.torch as ftorch  # noqa: E402


def sort_sparsek(z: "torch.Tensor", k: int) -> "torch.Tensor":
    """SPARSEK per row by sorting all 2n breakpoints (float64): f(tau) = sum clip(z - tau, 0, 1)
    is linear between consecutive breakpoints; find the segment where f crosses k."""
    z = z.double()
    n = z.shape[-1]
    if k >= n:
        return torch.ones_like(z)
    points = torch.cat([z, z - 1], dim=-1)
    slopes = torch.cat([torch.ones_like(z), -torch.ones_like(z)], dim=-1)
    points, order = points.sort(dim=-1, descending=True)
    slopes = slopes.gather(-1, order)
    # slope of f on the segment just below breakpoint j, and f at each breakpoint.
    slope_below = slopes.cumsum(-1)
    widths = points[..., :-1] - points[..., 1:]
    f_at = torch.cat(
        [torch.zeros_like(z[..., :1]), (slope_below[..., :-1] * widths).cumsum(-1)], -1
    )
    first = (f_at >= k).double().argmax(-1, keepdim=True)  # first breakpoint with f >= k
    above = first - 1
    f_above = f_at.gather(-1, above)
    tau = points.gather(-1, above) - (k - f_above) / slope_below.gather(-1, above)
    return (z - tau).clamp(0, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 257, 1000])
def test_matches_torch_sort(dtype, n):
    rng = np.random.default_rng(n)
    z = (rng.standard_normal((3, 2, n)) * 2).astype(dtype)
    for k in sorted({1, 2, max(1, n // 2), max(1, n - 1), n, n + 3}):
        p, tau = sk.sparsek(z, k, return_tau=True)
        assert p.shape == z.shape and p.dtype == z.dtype and tau.shape == z.shape[:-1]
        expected = sort_sparsek(torch.from_numpy(z), k).numpy()
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(p, expected, atol=tolerance, err_msg=f"k={k}")
        np.testing.assert_allclose(
            p.sum(-1, dtype=np.float64), min(k, n), atol=4 * n * np.finfo(dtype).eps
        )
        if k >= n:
            assert np.all(np.isneginf(tau))


def test_torch_in_torch_out_and_out_argument():
    z = torch.randn(4, 50)
    p = sk.sparsek(z, 5)
    assert isinstance(p, torch.Tensor) and p.dtype == torch.float32
    out = torch.empty(4, 50)
    assert sk.sparsek(z, 5, out=out) is out
    assert torch.equal(out, p)


def test_gradcheck_float64():
    z = (torch.randn(3, 12, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ftorch.sparsek(x, 4), (z,), eps=1e-7, atol=1e-6)


def test_backward_matches_torch_autograd_of_sort_version():
    z = (torch.randn(5, 40, dtype=torch.float64) * 2).requires_grad_()
    g = torch.randn(5, 40, dtype=torch.float64)
    (ftorch.sparsek(z, 7) * g).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    (sort_sparsek(z_ref, 7) * g).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-10, rtol=1e-10)


def test_thread_counts_bitwise_equal():
    z = np.random.default_rng(1).standard_normal((33, 999)).astype(np.float32)
    results = [sk.sparsek(z, 40, num_threads=t) for t in (1, 2, 3)]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_bad_input():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="foveal: sparsek: k must be >= 1, got 0"):
        sk.sparsek(z, 0)
    z[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"z\[1, 2\] must be finite, got nan"):
        sk.sparsek(z, 1)
    with pytest.raises(TypeError, match="float32 or float64"):
        sk.sparsek(np.zeros((2, 3), np.int32), 1)
    with pytest.raises(ValueError, match="grad_p must have the shape of p"):
        sk.sparsek_backward(np.zeros((2, 3)), np.zeros((3, 2)))
    assert foveal.sparsek is sk


def test_one_dimensional_row_and_strided_out():
    z = np.array([5.0, 0.0, 0.0, 0.0, -10.0])
    p, tau = sk.sparsek(z, 2, return_tau=True)
    assert tau.shape == () and np.isclose(tau, -1 / 3)
    np.testing.assert_allclose(p, [1, 1 / 3, 1 / 3, 1 / 3, 0], atol=1e-15)
    out = np.zeros((3, 2, 4)).transpose(1, 0, 2)  # [2, 3, 4] whose rows do not flatten to a view
    with pytest.raises(ValueError, match="flatten without a copy"):
        sk.sparsek(np.zeros((2, 3, 4)), 1, out=out)
