"""The package surface: version, threads, the kernel registry, and every rejected input with the
exception type and message it gets (TypeError for types, ValueError for shapes and values)."""

from __future__ import annotations

import re
from pathlib import Path

import foveal
import numpy as np
import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def qkv(dtype=np.float32, batch=2, heads_q=4, heads_kv=2, len_q=5, len_k=7, dim=8, dim_v=6):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((batch, heads_q, len_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, heads_kv, len_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads_kv, len_k, dim_v)).astype(dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Version, threads, registry.


def test_version_matches_version_header():
    header = (REPOSITORY / "include" / "foveal" / "version.hpp").read_text()
    version = re.search(r'#define FOVEAL_VERSION "([^"]+)"', header).group(1)
    assert isinstance(foveal.__version__, str)
    assert foveal.__version__ == version == foveal._core.__version__


def test_set_and_get_num_threads():
    default = foveal.get_num_threads()
    assert isinstance(default, int) and default >= 1
    try:
        foveal.set_num_threads(3)
        assert foveal.get_num_threads() == 3
        foveal.set_num_threads(1)
        assert foveal.get_num_threads() == 1
    finally:
        foveal.set_num_threads(0)
    assert foveal.get_num_threads() == default


def test_set_num_threads_rejects_bad_values():
    with pytest.raises(
        ValueError, match=r"set_num_threads: num_threads must be in \[0, 1024\] .* got -1"
    ):
        foveal.set_num_threads(-1)
    with pytest.raises(TypeError, match="num_threads must be an int, got float"):
        foveal.set_num_threads(2.0)
    assert foveal.get_num_threads() >= 1


def test_kernel_names():
    names = foveal.attention_kernel_names()
    assert isinstance(names, list) and "dense" in names and names == sorted(names)


def test_make_attention_dense_equals_attention():
    q, k, v = qkv(len_q=9, len_k=9)
    kernel = foveal.make_attention("dense", causal=True)
    assert isinstance(kernel, foveal.AttentionKernel)
    assert kernel.name == "dense" and "dense" in repr(kernel)
    assert np.array_equal(kernel(q, k, v), foveal.attention(q, k, v, causal=True))


def test_make_attention_unknown_name_lists_known():
    known = r"unknown kernel 'no_such_kernel'; known kernels: .*'dense'"
    with pytest.raises(ValueError, match=known):
        foveal.make_attention("no_such_kernel")


def test_make_attention_dense_rejects_params():
    with pytest.raises(ValueError, match="kernel 'dense' takes no params, got 'topk'"):
        foveal.make_attention("dense", topk=3)


def test_kernel_rejects_unknown_extras():
    q, k, v = qkv()
    kernel = foveal.make_attention("dense")
    with pytest.raises(ValueError, match="dense: unexpected extra input 'scores'"):
        kernel(q, k, v, scores=np.zeros((2, 2, 7), np.float32))


def test_kernel_rejects_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"window_left must be >= 0 or -1 \(unbounded\), got -3"):
        foveal.make_attention("dense", window_left=-3)(q, k, v)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        foveal.make_attention("dense", scale=-1.0)


# ---------------------------------------------------------------------------------------------
# Rejected tensors.


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_ndim(name):
    tensors = dict(zip("qkv", qkv()))
    tensors[name] = tensors[name][0]
    with pytest.raises(ValueError, match=rf"{name} must have 4 dimensions \[B, .*\], got 3"):
        foveal.attention(tensors["q"], tensors["k"], tensors["v"])


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(
        TypeError,
        match=r"k must have dtype float32 \(the dtype of q\), "
        r"got float64",
    ):
        foveal.attention(q, k.astype(np.float64), v)
    with pytest.raises(
        TypeError,
        match=r"v must have dtype float64 \(the dtype of q\), "
        r"got float32",
    ):
        foveal.attention(q.astype(np.float64), k.astype(np.float64), v)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex64])
def test_non_float_dtype(dtype):
    q, k, v = qkv()
    with pytest.raises(
        TypeError, match=r"q must have dtype float32, float64, bfloat16 or float16, got"
    ):
        foveal.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (dict(k=(3, 2, 7, 8)), r"k.shape\[0\] must equal q.shape\[0\] \(B\) = 2, got 3"),
        (dict(v=(3, 2, 7, 6)), r"v.shape\[0\] must equal q.shape\[0\] \(B\) = 2, got 3"),
        (dict(k=(2, 2, 7, 5)), r"k.shape\[3\] must equal q.shape\[3\] \(D\) = 8, got 5"),
        (dict(v=(2, 1, 7, 6)), r"v.shape\[1\] must equal k.shape\[1\] \(Hkv\) = 2, got 1"),
        (dict(v=(2, 2, 8, 6)), r"v.shape\[2\] must equal k.shape\[2\] \(Lk\) = 7, got 8"),
        (
            dict(k=(2, 3, 7, 8), v=(2, 3, 7, 6)),
            r"q.shape\[1\] \(Hq = 4\) must be a multiple of k.shape\[1\] \(Hkv = 3\)",
        ),
        (dict(q=(2, 4, 5, 0), k=(2, 2, 7, 0)), r"q.shape\[3\] \(D\) must be >= 1, got 0"),
    ],
    ids=["B-k", "B-v", "D", "Hkv", "Lk", "Hq-multiple", "D-zero"],
)
def test_mismatched_shapes(shapes, message):
    tensors = dict(zip("qkv", qkv()))
    for name, shape in shapes.items():
        tensors[name] = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match=message):
        foveal.attention(tensors["q"], tensors["k"], tensors["v"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_unit_innermost_stride(name):
    tensors = dict(zip("qkv", qkv(dim=16, dim_v=12)))
    tensors[name] = np.repeat(tensors[name], 2, axis=-1)[..., ::2]
    with pytest.raises(
        ValueError,
        match=rf"{name} must have stride 1 in its last dimension, "
        r"got stride 2",
    ):
        foveal.attention(tensors["q"], tensors["k"], tensors["v"])


def test_torch_non_unit_innermost_stride(torch):
    q, k, v = (torch.from_numpy(x) for x in qkv(dim=8))
    q_strided = torch.cat([q, q], dim=-1)[..., ::2]
    with pytest.raises(ValueError, match="q must have stride 1 in its last dimension"):
        foveal.attention(q_strided, k, v)


# ---------------------------------------------------------------------------------------------
# Rejected options.


@pytest.mark.parametrize("name", ["window_left", "window_right"])
@pytest.mark.parametrize("value", [-2, -100])
def test_negative_window(name, value):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"{name} must be >= 0 or -1 \(unbounded\), got {value}"):
        foveal.attention(q, k, v, **{name: value})


@pytest.mark.parametrize("name", ["window_left", "window_right", "sink_tokens", "q_offset"])
@pytest.mark.parametrize("value", [2.0, True, "3"])
def test_integer_options_must_be_ints(name, value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"{name} must be an int, got"):
        foveal.attention(q, k, v, **{name: value})


def test_causal_conflicts_with_window_right():
    q, k, v = qkv()
    message = "causal=true means window_right = 0, but window_right = 3"
    with pytest.raises(ValueError, match=message):
        foveal.attention(q, k, v, causal=True, window_right=3)


def test_negative_sink_tokens():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sink_tokens must be >= 0, got -1"):
        foveal.attention(q, k, v, sink_tokens=-1)


@pytest.mark.parametrize("scale", [0, 0.0, -0.5, float("nan"), float("-inf")])
def test_scale_not_positive(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale must be finite and > 0 \(None = 1/sqrt\(D\)\)"):
        foveal.attention(q, k, v, scale=scale)


def test_scale_infinite_or_too_large():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        foveal.attention(q, k, v, scale=float("inf"))
    with pytest.raises(
        ValueError, match="scale = 1e\\+39 with softcap = 0 is out of the range of float32"
    ):
        foveal.attention(q, k, v, scale=1e39)
    with pytest.raises(TypeError, match="scale must be a number, got str"):
        foveal.attention(q, k, v, scale="0.5")


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf")])
def test_softcap_negative_or_not_finite(softcap):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"softcap must be finite and >= 0 \(0 = off\), got"):
        foveal.attention(q, k, v, softcap=softcap)


@pytest.mark.parametrize("q_offset", [-2, -7, 2**62])
def test_q_offset_out_of_range(q_offset):
    q, k, v = qkv(len_k=7)
    with pytest.raises(
        ValueError,
        match=rf"q_offset must be in \[0, {2**60 - 1}\] \(the position of query 0\) or -1 .*, "
        rf"got {q_offset}",
    ):
        foveal.attention(q, k, v, q_offset=q_offset)


def test_q_offset_bounds_are_accepted():
    q, k, v = qkv(len_k=7)
    for q_offset in (0, 7, 8, 10**6, -1):
        foveal.attention(q, k, v, q_offset=q_offset)


def test_negative_num_threads():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"num_threads must be in \[0, 1024\]"):
        foveal.attention(q, k, v, num_threads=-1)


# ---------------------------------------------------------------------------------------------
# Rejected bias and out.


@pytest.mark.parametrize(
    "shape, message",
    [
        ((7,), r"bias must have 2, 3 or 4 dimensions .*got 1"),
        ((1, 2, 4, 5, 7), r"bias must have 2, 3 or 4 dimensions .*got 5"),
        ((5, 8), r"bias.shape\[3\] must equal k.shape\[2\] \(Lk\) = 7, got 8"),
        ((6, 7), r"bias.shape\[2\] must equal q.shape\[2\] \(Lq\) = 5, got 6"),
        ((3, 5, 7), r"bias.shape\[1\] must be 1 or q.shape\[1\] \(Hq\) = 4, got 3"),
        ((3, 4, 5, 7), r"bias.shape\[0\] must be 1 or q.shape\[0\] \(B\) = 2, got 3"),
    ],
    ids=["1d", "5d", "Lk", "Lq", "Hq", "B"],
)
def test_bias_wrong_shape(shape, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        foveal.attention(q, k, v, bias=np.zeros(shape, np.float32))


def test_bias_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(
        TypeError,
        match=r"bias must have dtype float32 \(the dtype of q\) or bool, "
        r"got float64",
    ):
        foveal.attention(q, k, v, bias=np.zeros((5, 7)))
    with pytest.raises(TypeError, match=r"bias must have dtype float32 .* got int64"):
        foveal.attention(q, k, v, bias=np.zeros((5, 7), np.int64))


def test_out_wrong_shape():
    q, k, v = qkv()
    with pytest.raises(
        ValueError, match=r"out.shape\[3\] must equal v.shape\[3\] \(Dv\) = 6, got 8"
    ):
        foveal.attention(q, k, v, out=np.empty((2, 4, 5, 8), np.float32))
    with pytest.raises(ValueError, match="out must have 4 dimensions"):
        foveal.attention(q, k, v, out=np.empty((4, 5, 6), np.float32))


def test_out_wrong_dtype():
    q, k, v = qkv()
    with pytest.raises(
        TypeError,
        match=r"out must have dtype float32 \(the dtype of q\), "
        r"got float64",
    ):
        foveal.attention(q, k, v, out=np.empty((2, 4, 5, 6), np.float64))


def test_out_aliasing_an_input():
    q, k, v = qkv(dim=6, dim_v=6, heads_kv=4, len_k=5)
    with pytest.raises(ValueError, match="out must not overlap q in memory"):
        foveal.attention(q, k, v, out=q)
    with pytest.raises(ValueError, match="out must not overlap v in memory"):
        foveal.attention(q, k, v, out=v)
    with pytest.raises(ValueError, match="out must not overlap q in memory"):
        foveal.attention(q, k, v, out=q[:, :, :, :], return_lse=True)


def test_out_with_lse_is_fine():
    q, k, v = qkv()
    out = np.empty((2, 4, 5, 6), np.float32)
    result, lse = foveal.attention(q, k, v, out=out, return_lse=True)
    assert result is out and lse.shape == (2, 4, 5) and np.all(np.isfinite(lse))


def test_read_only_out():
    q, k, v = qkv()
    out = np.empty((2, 4, 5, 6), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        foveal.attention(q, k, v, out=out)


def test_read_only_inputs_are_fine():
    q, k, v = qkv()
    for x in (q, k, v):
        x.flags.writeable = False
    foveal.attention(q, k, v)


# ---------------------------------------------------------------------------------------------
# Rejected objects.


def test_python_list():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a numpy array, a torch CPU tensor .*got list"):
        foveal.attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match=r"k must be a numpy array, .*got list"):
        foveal.attention(q, k.tolist(), v)
    with pytest.raises(TypeError, match=r"out must be a numpy array, .*got list"):
        foveal.attention(q, k, v, out=[])


def test_torch_requires_grad(torch):
    q, k, v = (torch.from_numpy(x) for x in qkv())
    with pytest.raises(
        ValueError,
        match=r"q requires grad; foveal.attention computes the forward "
        r"pass only",
    ):
        foveal.attention(q.requires_grad_(), k, v)
    with pytest.raises(ValueError, match="bias requires grad"):
        foveal.attention(q.detach(), k, v, bias=torch.zeros(5, 7, requires_grad=True))
    # Under torch.no_grad() nothing is recorded: such tensors are plain inputs.
    expected = foveal.attention(q.detach(), k, v)
    with torch.no_grad():
        out = foveal.attention(q, k, v)
    assert torch.equal(out, expected) and not out.requires_grad


def test_torch_dtype_mismatch_and_int(torch):
    q, k, v = (torch.from_numpy(x) for x in qkv())
    with pytest.raises(
        TypeError,
        match=r"k must have dtype float32 \(the dtype of q\), "
        r"got float64",
    ):
        foveal.attention(q, k.double(), v)
    with pytest.raises(
        TypeError, match="q must have dtype float32, float64, bfloat16 or float16, got int64"
    ):
        foveal.attention(q.long(), k.long(), v.long())


def test_torch_out_wrong_shape(torch):
    q, k, v = (torch.from_numpy(x) for x in qkv())
    with pytest.raises(
        ValueError, match=r"out.shape\[3\] must equal v.shape\[3\] \(Dv\) = 6, got 7"
    ):
        foveal.attention(q, k, v, out=torch.empty(2, 4, 5, 7))
