"""foveal.vq against float64 numpy references and torch.cdist (docs/vq.md)."""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from foveal import vq


def reference_assign(x: np.ndarray, codebook: np.ndarray, cosine: bool = False):
    """float64 argmin of the squared distances, the lowest index on ties."""
    x = x.astype(np.float64)
    codebook = codebook.astype(np.float64)
    if cosine:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
        codebook = codebook / np.maximum(np.linalg.norm(codebook, axis=1, keepdims=True), 1e-300)
    distances = ((x[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1), distances


def check_against_reference(x, codebook, indices, sq_distances, cosine=False, tolerance=1e-4):
    ref_indices, distances = reference_assign(x, codebook, cosine)
    best = distances[np.arange(len(x)), ref_indices]
    chosen = distances[np.arange(len(x)), np.asarray(indices)]
    # Where distances tie within rounding another index is as good: compare distances.
    np.testing.assert_array_less(chosen - best, tolerance * (1 + best))
    np.testing.assert_allclose(np.asarray(sq_distances), best, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1), (7, 13, 5), (97, 37, 64), (300, 7, 3), (257, 509, 17)]
)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_matches_float64_reference(rng, shape, metric, dtype):
    n, k, dim = shape
    x = rng.standard_normal((n, dim)).astype(dtype)
    codebook = rng.standard_normal((k, dim)).astype(dtype)
    indices, sq_distances = vq.assign(x, codebook, metric=metric)
    assert indices.dtype == np.int64 and sq_distances.dtype == dtype
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    check_against_reference(x, codebook, indices, sq_distances, metric == "cosine", tolerance)


def test_assign_agrees_with_torch_cdist_argmin(torch):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4000, 64, generator=generator)
    codebook = torch.randn(1000, 64, generator=generator)
    indices, sq_distances = vq.assign(x, codebook)
    assert isinstance(indices, torch.Tensor) and indices.dtype == torch.int64
    distances = torch.cdist(x.double(), codebook.double())
    expected = distances.argmin(1)
    differ = indices != expected
    rows = torch.arange(len(x))
    # Indices agree except where the float64 distances tie within float32 rounding.
    assert differ.double().mean() < 1e-3
    gap = distances[rows, indices] ** 2 - distances[rows, expected] ** 2
    assert float(gap.max()) < 1e-3
    assert torch.allclose(
        sq_distances.double(), distances[rows, expected] ** 2, rtol=1e-4, atol=1e-3
    )


def test_ties_go_to_the_lowest_index():
    codebook = np.array([[1, 0], [-1, 0], [1, 0], [-1, 0]], np.float32)
    x = np.array([[1, 0], [-1, 0], [0, 0], [0, 3]], np.float32)
    for metric in ("l2", "cosine"):
        indices, _ = vq.assign(x, codebook, metric=metric)
        assert indices.tolist() == [0, 1, 0, 0]


def test_assign_is_bitwise_identical_for_one_two_three_threads(rng):
    x = rng.standard_normal((1500, 33)).astype(np.float32)
    codebook = rng.standard_normal((301, 33)).astype(np.float32)
    results = [vq.assign(x, codebook, num_threads=threads) for threads in (1, 2, 3)]
    for indices, sq_distances in results[1:]:
        np.testing.assert_array_equal(indices, results[0].indices)
        assert sq_distances.tobytes() == results[0].sq_distances.tobytes()


def test_perplexity_and_effective_rank_match_formulas(rng):
    counts = np.array([3, 1, 0, 7, 2], np.int64)
    p = counts[counts > 0] / counts.sum()
    assert vq.perplexity(counts) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    matrix = rng.standard_normal((50, 8)).astype(np.float32)
    sigma = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    q = sigma / sigma.sum()
    assert vq.effective_rank(matrix) == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-6)
    rank_two = (rng.standard_normal((50, 2)) @ rng.standard_normal((2, 8))).astype(np.float32)
    assert vq.effective_rank(rank_two) <= 2 + 1e-4


def test_ema_update_follows_the_formulas(rng):
    k, dim, decay, epsilon = 6, 4, 0.8, 1e-3
    codebook = rng.standard_normal((k, dim)).astype(np.float32)
    quantizer = vq.VectorQuantizer(codebook, decay=decay, epsilon=epsilon)
    x = rng.standard_normal((200, dim)).astype(np.float32)
    indices = quantizer.update(x)
    ref_indices, _ = reference_assign(x, codebook)
    np.testing.assert_array_equal(indices, ref_indices)
    counts = np.bincount(indices, minlength=k)
    sums = np.zeros((k, dim))
    np.add.at(sums, indices, x.astype(np.float64))
    size = decay * 1.0 + (1 - decay) * counts
    code_sums = decay * codebook.astype(np.float64) + (1 - decay) * sums
    smoothed = (size + epsilon) / (size.sum() + k * epsilon) * size.sum()
    np.testing.assert_allclose(quantizer.cluster_size(), size, rtol=1e-12)
    np.testing.assert_allclose(
        quantizer.codebook, code_sums / smoothed[:, None], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(quantizer.usage_counts(), counts)
    assert quantizer.perplexity() == pytest.approx(vq.perplexity(counts))


def test_kmeans_and_dead_code_restart_fix_collapse(rng):
    centers = rng.standard_normal((16, 8)) * 10 + 50  # far from a N(0, 1) init
    x = (centers[rng.integers(0, 16, 4000)] + rng.standard_normal((4000, 8)) * 0.3).astype(
        np.float32
    )
    collapsed = vq.VectorQuantizer(
        rng.standard_normal((32, 8)).astype(np.float32), decay=0.5, dead_threshold=0.5
    )
    for _ in range(4):
        collapsed.update(x)
    assert (collapsed.usage_counts() > 0).sum() <= 4
    assert collapsed.num_dead_codes() >= 28
    replaced = collapsed.restart_dead_codes(x, seed=1)
    assert replaced >= 28
    assert collapsed.num_dead_codes() == 0
    fitted = vq.VectorQuantizer.from_data(x, 32, lloyd_iterations=5, seed=0)
    fitted.update(x, update_codebook=False)
    assert (fitted.usage_counts() > 0).sum() >= 16
    assert fitted.perplexity() > 12


def test_residual_vq_encode_decode(rng):
    x = rng.standard_normal((500, 8)).astype(np.float32)
    rvq = vq.ResidualVQ(3, 16, 8)
    rvq.init_kmeans(x, lloyd_iterations=4, seed=2)
    codes, quantized = rvq.encode(x)
    assert codes.shape == (500, 3) and codes.dtype == np.int64
    np.testing.assert_array_equal(rvq.decode(codes), quantized)
    residual = x.copy()
    errors = []
    for s in range(3):
        stage = rvq.stage(s)
        ref_indices, _ = reference_assign(residual, stage.codebook)
        np.testing.assert_array_equal(codes[:, s], ref_indices)
        residual = residual - stage.codebook[codes[:, s]]
        errors.append(float((residual.astype(np.float64) ** 2).sum()))
    assert errors[0] > errors[1] > errors[2]
    rvq.update(x)
    assert rvq.stage(0).usage_counts().sum() == 500


def test_bad_input_raises_with_messages():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"codebook.shape\[0\] \(K\) must be >= 1, got 0"):
        vq.assign(x, np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match=r"x.shape\[1\] must equal codebook.shape\[1\] \(D\) = 2"):
        vq.assign(x, np.ones((5, 2), np.float32))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x\[2, 1\] must be finite, got nan"):
        vq.assign(bad, np.ones((5, 3), np.float32))
    with pytest.raises(TypeError, match="codebook must have dtype float32"):
        vq.assign(x, np.ones((5, 3), np.float64))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64, got int64"):
        vq.assign(np.ones((4, 3), np.int64), np.ones((5, 3), np.int64))
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine'"):
        vq.assign(x, x, metric="dot")
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"decay must be in \(0, 1\)"):
            vq.VectorQuantizer(x, decay=decay)
    with pytest.raises(ValueError, match=r"dead_threshold must be finite and >= 0 \(.*\), got -1"):
        vq.VectorQuantizer(x, dead_threshold=-1)
    quantizer = vq.VectorQuantizer(x)
    with pytest.raises(ValueError, match=r"x.shape\[1\] must equal dim \(D\) = 3"):
        quantizer.update(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"must be finite"):
        quantizer.update(bad)
    assert quantizer.usage_counts().sum() == 0
    np.testing.assert_array_equal(quantizer.codebook, x)
    with pytest.raises(ValueError, match=r"codes\[0, 1\] must be in \[0, 4\), got 9"):
        vq.ResidualVQ(2, 4, 3).decode(np.array([[0, 9]], np.int64))


def test_exported():
    assert foveal.vq.assign is vq.assign
