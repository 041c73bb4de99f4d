"""foveal.nn.VectorQuantize and ResidualVQ against a float64 pure-torch twin (docs/vq.md,
"Training modules"): outputs, gradients, codebook updates, dead-code restart, diagnostics,
thread-count invariance, torch.compile and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from foveal import vq  # noqa: E402
from foveal.nn import ResidualVQ, VectorQuantize  # noqa: E402


class TwinVQ:
    """The VectorQuantize of docs/vq.md in float64 torch ops, written from the formulas: the
    nearest code by the full distance matrix, the EMA update with Laplace smoothing, the
    restart of codes whose usage EMA fell below the threshold (on the rows the module draws:
    the same seeded permutation), the straight-through output and the commitment loss."""

    def __init__(self, module: VectorQuantize) -> None:
        self.codebook = module.codebook.double().clone()
        self.cluster_size = module.cluster_size.clone()
        self.code_sums = module.code_sums.clone()
        self.step = int(module.step)
        self.m = module

    def forward(self, x: torch.Tensor, training: bool = True):
        m = self.m
        rows = x.reshape(-1, m.dim)
        if m.cosine:
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        distances = torch.cdist(rows.detach(), self.codebook) ** 2
        indices = distances.argmin(dim=1)
        codes = self.codebook[indices]
        quantized = rows + (codes - rows).detach()
        loss = ((rows - codes) ** 2).mean() * m.commitment_weight
        if training:
            self.update(rows.detach(), indices)
        return quantized.reshape(x.shape), indices.reshape(x.shape[:-1]), loss, codes

    def update(self, rows: torch.Tensor, indices: torch.Tensor) -> None:
        m, g = self.m, self.m.decay
        counts = torch.zeros(m.codebook_size, dtype=torch.float64)
        sums = torch.zeros(m.codebook_size, m.dim, dtype=torch.float64)
        for n, k in enumerate(indices.tolist()):
            counts[k] += 1
            sums[k] += rows[n]
        self.cluster_size = g * self.cluster_size + (1 - g) * counts
        self.code_sums = g * self.code_sums + (1 - g) * sums
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + m.epsilon) / (total + m.codebook_size * m.epsilon) * total
        self.codebook = self.code_sums / smoothed[:, None]
        if m.cosine:
            self.codebook = self.codebook / self.codebook.norm(dim=1, keepdim=True)
        dead = [k for k in range(m.codebook_size) if self.cluster_size[k] < m.threshold_dead]
        if dead:
            generator = torch.Generator().manual_seed(m.seed * 1_000_003 + self.step)
            chosen = torch.randperm(len(rows), generator=generator)[: len(dead)]
            for k, n in zip(dead, chosen.tolist()):
                self.codebook[k] = rows[n]
                self.cluster_size[k] = max(1.0, m.threshold_dead)
                self.code_sums[k] = self.cluster_size[k] * rows[n]
        self.step += 1


def batches(count: int, rows: int, dim: int, seed: int = 0):
    """Clustered rows: 8 centers plus noise, so that some codes stay unused."""
    generator = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(8, dim, generator=generator)
    for _ in range(count):
        labels = torch.randint(8, (rows,), generator=generator)
        yield centers[labels] + 0.3 * torch.randn(rows, dim, generator=generator)


def run_step(module, x):
    """One forward + backward of a loss that depends on every output; the input's gradient."""
    x = x.clone().requires_grad_()
    quantized, indices, loss = module(x)
    weights = torch.linspace(-1, 1, quantized.numel()).reshape(quantized.shape)
    ((quantized * weights).sum() + loss.sum()).backward()
    return quantized.detach(), indices, loss.detach(), x.grad


@pytest.mark.parametrize("cosine", [False, True])
def test_training_steps_match_the_float64_twin(cosine):
    module = VectorQuantize(
        6, 16, decay=0.6, commitment_weight=0.25, kmeans_init=False, threshold_dead=0.3,
        cosine=cosine, seed=5,
    )  # fmt: skip
    twin = TwinVQ(module)
    restarted = 0
    for x in batches(6, 300, 6):
        quantized, indices, loss, grad = run_step(module, x)
        x64 = x.double().requires_grad_()
        t_quantized, t_indices, t_loss, _ = twin.forward(x64)
        weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
        ((t_quantized * weights).sum() + t_loss).backward()
        assert torch.equal(indices, t_indices)
        assert torch.allclose(quantized.double(), t_quantized.detach(), atol=1e-5)
        assert math.isclose(loss.item(), t_loss.item(), rel_tol=1e-5)
        assert torch.allclose(grad.double(), x64.grad, atol=1e-6)
        assert torch.allclose(module.codebook.double(), twin.codebook, atol=1e-5)
        assert torch.allclose(module.cluster_size, twin.cluster_size, rtol=1e-12)
        assert torch.allclose(module.code_sums, twin.code_sums, atol=1e-5)
        restarted += int((module.cluster_size == 1.0).sum()) if module.step > 1 else 0
    assert int(module.step) == 6
    assert restarted > 0, "the data must make some codes die and restart"


def test_residual_vq_matches_stacked_twins():
    module = ResidualVQ(3, 5, 12, decay=0.7, kmeans_init=False, threshold_dead=0.2, seed=2)
    twins = [TwinVQ(layer) for layer in module.layers]
    for x in batches(4, 200, 5, seed=1):
        quantized, indices, losses, grad = run_step(module, x)
        x64 = x.double().requires_grad_()
        residual, total, t_losses = x64, 0, []
        for s, twin in enumerate(twins):
            _, t_indices, t_loss, codes = twin.forward(residual)
            assert torch.equal(indices[:, s], t_indices)
            residual = residual - codes
            total = total + codes
            t_losses.append(t_loss)
        t_quantized = x64 + (total - x64).detach()
        weights = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
        ((t_quantized * weights).sum() + sum(t_losses)).backward()
        assert indices.shape == (200, 3) and losses.shape == (3,)
        assert torch.allclose(quantized.double(), t_quantized.detach(), atol=1e-5)
        assert torch.allclose(losses.double(), torch.stack(t_losses).detach(), rtol=1e-5)
        assert torch.allclose(grad.double(), x64.grad, atol=1e-6)
    # The quantized output is the sum of the chosen codes, as foveal.vq.ResidualVQ decodes.
    module.eval()
    x = next(batches(1, 100, 5, seed=9))
    quantized, indices, _ = module(x)
    decoded = sum(layer.codebook[indices[:, s]] for s, layer in enumerate(module.layers))
    assert torch.allclose(quantized, decoded, atol=1e-5)


def test_kmeans_init_is_foveals_kmeans_on_the_first_batch():
    x = next(batches(1, 500, 4, seed=3))
    module = VectorQuantize(4, 8, kmeans_iters=7, seed=11)
    assert not bool(module.initted)
    module(x)
    expected = vq.VectorQuantizer.from_data(x, 8, lloyd_iterations=7, seed=11)
    # The codebook after the first step is the k-means codebook moved by one EMA update.
    twin = TwinVQ(module)
    twin.codebook = torch.from_numpy(expected.codebook).double()
    twin.cluster_size = torch.ones(8, dtype=torch.float64)
    twin.code_sums = twin.codebook.clone()
    twin.step = 0
    twin.forward(x.double())
    assert bool(module.initted)
    assert torch.allclose(module.codebook.double(), twin.codebook, atol=1e-5)
    # Later batches do not re-initialize: only the EMA update moves the codebook.
    module(x + 3)
    twin.forward((x + 3).double())
    assert torch.allclose(module.codebook.double(), twin.codebook, atol=1e-5)


def test_eval_mode_changes_nothing_but_the_usage():
    module = VectorQuantize(4, 8, seed=1)
    module(next(batches(1, 300, 4)))
    module.eval()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = next(batches(1, 300, 4, seed=7))
    quantized, indices, loss = module(x)
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    counts = torch.bincount(indices, minlength=8)
    assert torch.equal(module.last_counts, counts)
    assert torch.equal(quantized, module.codebook[indices])
    assert loss.item() == pytest.approx(((x - quantized) ** 2).mean().item(), rel=1e-6)


def test_diagnostics_follow_their_formulas():
    module = VectorQuantize(5, 32, kmeans_init=False, threshold_dead=0.5, decay=0.5)
    for x in batches(3, 200, 5):
        module(x)
    counts = module.last_counts.double()
    p = counts[counts > 0] / counts.sum()
    assert module.perplexity == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    assert module.codes_used == int((counts > 0).sum())
    assert module.num_dead_codes == int((module.cluster_size < 0.5).sum())
    sigma = torch.linalg.svdvals(module.codebook.double())
    q = sigma / sigma.sum()
    assert module.effective_rank == pytest.approx(math.exp(-(q * q.log()).sum().item()), rel=1e-6)
    rvq = ResidualVQ(2, 5, 8)
    rvq(next(batches(1, 100, 5)))
    assert rvq.perplexity == [layer.perplexity for layer in rvq.layers]
    assert len(rvq.codes_used) == len(rvq.num_dead_codes) == len(rvq.effective_rank) == 2


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def compiled(module):
    torch._dynamo.reset()  # a fresh compilation under the current thread count
    return torch.compile(module, fullgraph=True)


@pytest.mark.parametrize("make", [
    lambda threads: VectorQuantize(32, 256, threshold_dead=0.5, num_threads=threads),
    lambda threads: VectorQuantize(32, 256, cosine=True, kmeans_init=False, num_threads=threads),
    lambda threads: ResidualVQ(2, 32, 128, threshold_dead=0.5, num_threads=threads),
    "compiled",
])  # fmt: skip
def test_bitwise_identical_for_one_and_two_threads(make):
    results = {}
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            if make == "compiled":
                module = VectorQuantize(32, 256, threshold_dead=0.5, num_threads=threads)
                step_module = compiled(module)
            else:
                module = step_module = make(threads)
            outputs = [run_step(step_module, x) for x in batches(3, 6000, 32)]
            results[threads] = (outputs, snapshot(module))
    finally:
        torch.set_num_threads(saved)
    (one, state_one), (two, state_two) = results[1], results[2]
    for step_one, step_two in zip(one, two):
        for a, b in zip(step_one, step_two):
            assert torch.equal(a, b)
    for key in state_one:
        assert torch.equal(state_one[key], state_two[key]), key


@pytest.mark.parametrize("make", [
    lambda: VectorQuantize(8, 16, threshold_dead=0.5, decay=0.8),
    lambda: ResidualVQ(2, 8, 16, threshold_dead=0.5, decay=0.8),
])  # fmt: skip
def test_torch_compile_fullgraph_matches_eager(make):
    eager, compiled_module = make(), make()
    compiled = torch.compile(compiled_module, fullgraph=True)
    for x in batches(3, 256, 8):
        e_quantized, e_indices, e_loss, e_grad = run_step(eager, x)
        c_quantized, c_indices, c_loss, c_grad = run_step(compiled, x)
        assert torch.equal(e_indices, c_indices)
        assert torch.allclose(e_quantized, c_quantized, atol=1e-6)
        assert torch.allclose(e_loss, c_loss, rtol=1e-5)
        assert torch.allclose(e_grad, c_grad, atol=1e-6)
    e_state, c_state = eager.state_dict(), compiled_module.state_dict()
    for key in e_state:
        assert torch.allclose(e_state[key].double(), c_state[key].double(), atol=1e-5), key


@pytest.mark.parametrize("make", [
    lambda: VectorQuantize(4, 8),
    lambda: VectorQuantize(4, 8, kmeans_init=False, threshold_dead=5.0),
    lambda: ResidualVQ(2, 4, 8),
])  # fmt: skip
def test_bad_input_raises_and_changes_nothing(make):
    module = make()
    module(next(batches(1, 50, 4)))
    state = snapshot(module)
    nan = torch.ones(20, 4)
    nan[7, 2] = float("nan")
    cases = [
        ([[1.0, 2.0, 3.0, 4.0]], TypeError, "x must be a torch.Tensor"),
        (torch.ones(20, 4, dtype=torch.float64), TypeError, "x.dtype must be torch.float32"),
        (torch.ones(20, 3), ValueError, r"x must have shape \[\.\.\., 4\] \(dim\), got \[20, 3\]"),
        (torch.ones(4, 0, 4), ValueError, "x must have at least one row"),
        (nan, ValueError, "x.* must be finite, got nan"),
    ]
    for x, error, message in cases:
        with pytest.raises(error, match=message):
            module(x)
        for key, value in module.state_dict().items():
            assert torch.equal(value, state[key]), (key, message)
    fresh = make()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="must be finite"):
        fresh(nan)  # before the k-means init: it must not run
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("arguments, error, message", [
    (dict(dim=0), ValueError, "dim must be >= 1, got 0"),
    (dict(codebook_size=2.5), TypeError, "codebook_size must be an int"),
    (dict(decay=1.0), ValueError, r"decay must be in \(0.0, 1.0\), got 1.0"),
    (dict(commitment_weight=-1), ValueError, "commitment_weight must be in"),
    (dict(threshold_dead=float("nan")), ValueError, "threshold_dead must be in"),
    (dict(epsilon=0), ValueError, "epsilon must be in"),
    (dict(kmeans_iters=-1), ValueError, "kmeans_iters must be >= 0"),
    (dict(num_threads=0), ValueError, "num_threads must be >= 1"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
])  # fmt: skip
def test_bad_arguments_name_the_argument(arguments, error, message):
    options = dict(dim=4, codebook_size=8)
    options.update(arguments)
    with pytest.raises(error, match=message):
        VectorQuantize(**options)
    with pytest.raises(error, match=message):
        ResidualVQ(2, **options)
    with pytest.raises(ValueError, match="num_quantizers must be >= 1, got 0"):
        ResidualVQ(0, 4, 8)


def test_state_dict_round_trip_and_shapes():
    module = VectorQuantize(4, 8, threshold_dead=0.5)
    x = torch.randn(2, 3, 50, 4, generator=torch.Generator().manual_seed(0))
    quantized, indices, loss = module(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3, 50) and loss.shape == ()
    copy = VectorQuantize(4, 8, threshold_dead=0.5)
    copy.load_state_dict(module.state_dict())
    module.eval()
    copy.eval()
    assert torch.equal(module(x)[0], copy(x)[0])
    rvq = ResidualVQ(3, 4, 8)
    quantized, indices, losses = rvq(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3, 50, 3) and losses.shape == (3,)
    assert np.all(indices.numpy() < 8)


def test_foveal_torch_reexports_the_modules():
    import foveal.torch

    assert foveal.torch.VectorQuantize is VectorQuantize
    assert foveal.torch.ResidualVQ is ResidualVQ


def test_strided_input_gives_the_contiguous_result():
    wide = torch.randn(3, 40, 8, generator=torch.Generator().manual_seed(4), requires_grad=True)
    strided = wide[..., ::2]  # inner stride 2: reshape keeps it a view
    assert strided.reshape(-1, 4).stride(1) == 2
    one, two = VectorQuantize(4, 8, seed=3), VectorQuantize(4, 8, seed=3)
    dense = strided.detach().contiguous().requires_grad_()
    outputs = [one(strided), two(dense)]
    for quantized, _, loss in outputs:
        (quantized.sum() + loss).backward()
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
    assert torch.equal(wide.grad[..., ::2], dense.grad)
    assert torch.equal(one.codebook, two.codebook)
