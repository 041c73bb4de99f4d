"""foveal's attention ops under torch.compile(fullgraph=True): traced as single custom ops (no
graph breaks), forward and backward giving the bits of eager mode."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import foveal.torch as foveal_torch  # noqa: E402


class TinyBlock(torch.nn.Module):
    """Projections around foveal attention: enough of a model to train."""

    def __init__(self, dim: int, heads: int, kind: str) -> None:
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        if kind == "sparsek":  # the scores u come from a trained linear scorer
            self.scorer = torch.nn.Linear(dim, heads, dtype=torch.float64)
        if kind == "sink-logits":  # gpt-oss's learned sinks: a gradient through lse
            self.sinks = torch.nn.Parameter(torch.randn(heads, dtype=torch.float64))
        self.proj = torch.nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kind == "sliding-window":
            out = foveal_torch.sliding_window_attention(
                q, k, v, window_left=5, causal=True, sink_tokens=2
            )
        elif self.kind == "sparsek":
            u = self.scorer(x).transpose(1, 2)
            out = foveal_torch.sparsek_attention(q, k, v, u, 4, window=3, sink_tokens=1)
        elif self.kind == "sink-logits":
            out = foveal_torch.attention(q, k, v, causal=True, sink_logits=self.sinks)
        else:
            out = foveal_torch.attention(q, k, v, causal=True, softcap=10.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


@pytest.mark.parametrize("kind", ["dense", "sliding-window", "sparsek", "sink-logits"])
def test_compiled_model_runs_without_graph_breaks_and_matches_eager(kind):
    torch.manual_seed(0)
    model = TinyBlock(32, 4, kind)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    eager_loss = model(x).square().sum()
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    # aot_eager traces forward and backward through the fake implementations and the registered
    # autograd; fullgraph=True fails on any graph break.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(x).square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.equal(loss, eager_loss)
    for got, want in zip(grads, eager_grads):
        assert torch.equal(got, want)


def test_the_ops_are_registered_with_torch():
    assert hasattr(torch.ops.foveal, "attention")
    assert hasattr(torch.ops.foveal, "attention_backward")
    q = torch.randn(1, 2, 5, 8)
    out, lse = torch.ops.foveal.attention(
        q, q, q, None, None, None, False, None, True, -1, -1, 0, 0.0, None, None
    )
    assert out.shape == (1, 2, 5, 8) and lse.shape == (1, 2, 5)


def test_opcheck_of_the_attention_op():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.library.opcheck(
        torch.ops.foveal.attention.default,
        (q, k, v, None, None, None, False, None, True, -1, -1, 0, 0.0, None, None),
    )
    # Variable-length: key ranges as int64 tensors (inputs without gradients).
    q, k, v = (torch.randn(3, 2, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    starts, lengths = torch.tensor([0, 2, 7]), torch.tensor([7, 3, 0])
    torch.library.opcheck(
        torch.ops.foveal.attention.default,
        (q, k, v, None, starts, lengths, False, None, True, -1, -1, 1, 0.0, None, None),
    )


def test_the_sparsek_projection_op_compiles_and_passes_opcheck():
    """foveal::sparsek (the SPARSEK projection) with its registered backward."""
    z = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.foveal.sparsek.default, (z, 4, None))

    def f(z):
        return (foveal_torch.sparsek(z, 4) * torch.arange(11.0, dtype=torch.float64)).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (eager,) = torch.autograd.grad(f(z), z)
    (traced,) = torch.autograd.grad(compiled(z), z)
    assert torch.equal(eager, traced)


def test_the_pde_ssm_op_compiles_reuses_its_block_and_passes_opcheck():
    """foveal::pde_ssm with its registered backward: traced without graph breaks, the bits of
    eager mode, and the backward reuses the block the forward built while the graph lives."""
    import foveal.torch as ft

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    params = [
        (0.5 + 0.2 * torch.rand(4, 3, dtype=torch.float64, generator=gen)).requires_grad_(),
        torch.randn(2, 2, dtype=torch.float64, generator=gen).requires_grad_(),
        (-0.1 * torch.rand(4, dtype=torch.float64, generator=gen)).requires_grad_(),
        (0.5 + torch.rand(1, dtype=torch.float64, generator=gen)).requires_grad_(),
        torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(),
    ]
    inputs = [x, *params]

    def f(x, *params):
        return ft.pde_ssm(x, *params, mode="forced", boundary="zero").square().sum()

    eager = torch.autograd.grad(f(*inputs), inputs)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    traced = torch.autograd.grad(compiled(*inputs), inputs)
    for got, want in zip(traced, eager):
        assert torch.equal(got, want)
    assert not ft._BLOCKS, "blocks outlived their graphs"
    y = ft.pde_ssm(x, *params)
    assert len(ft._BLOCKS) == 1
    del y
    assert not ft._BLOCKS
    # The handle output differs call by call, so opcheck's output comparison under AOT is left
    # out (the compiled run above covers AOT).
    options = ("initial_value", "periodic", "cholesky", "channels_last", None)
    torch.library.opcheck(
        torch.ops.foveal.pde_ssm.default,
        (x, *params, *options),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
