"""foveal.torch.SpadeEmbedding (the trainable SPADE embedding, C++ forward and backward) against
a pure-torch float64 twin: forward and every gradient, torch.compile, thread counts, delay and
the loss mask on torch tensors, and rejected inputs."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
from foveal import spade  # noqa: E402
from foveal.torch import SpadeEmbedding  # noqa: E402
from torch.nn import functional  # noqa: E402


def shower_schema() -> spade.Schema:
    return spade.Schema(
        [
            spade.Feature.binned("z", 30),
            spade.Feature.binned("x", 30),
            spade.Feature.binned("y", 30),
            spade.Feature.continuous("E"),
        ]
    )


def mixed_schema() -> spade.Schema:
    """Continuous features between discrete ones, explicit shifts, a PAD id that is not 0."""
    return spade.Schema(
        [
            spade.Feature("kind", "discrete", vocab_size=7, pad_id=3, missing_id=0, shift=1),
            spade.Feature.continuous("energy", shift=2),
            spade.Feature.binned("r", 12, shift=4),
            spade.Feature.continuous("time", shift=5),
        ]
    )


def twin(module: SpadeEmbedding, ids, values, condition=None) -> torch.Tensor:
    """The module in plain torch, float64: per feature an embedding lookup (+ LayerNorm) or the
    Linear-SiLU-Linear MLP, concatenated with the condition and projected (or summed); zeros at
    steps whose discrete ids are all PAD."""
    schema = module.schema
    discrete = [f.name for f in schema.discrete]
    continuous = [f.name for f in schema.continuous]
    parts = []
    for feature in schema.features:
        layer = module.features[feature.name]
        if feature.discrete:
            e = functional.embedding(
                ids[..., discrete.index(feature.name)], layer.table.weight.double()
            )
            if layer.norm is not None:
                norm = layer.norm
                e = functional.layer_norm(
                    e, (e.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps
                )
        else:
            first, _, second = layer.mlp
            x = values[..., continuous.index(feature.name)].double()[..., None]
            h = functional.silu(functional.linear(x, first.weight.double(), first.bias.double()))
            e = functional.linear(h, second.weight.double(), second.bias.double())
        parts.append(e)
    if module.combine == "sum":
        out = sum(parts)
    else:
        if condition is not None:
            parts.append(condition.double())
        projection = module.projection
        bias = None if projection.bias is None else projection.bias.double()
        out = functional.linear(torch.cat(parts, -1), projection.weight.double(), bias)
    if schema.discrete:
        pad_ids = torch.tensor([f.pad_id for f in schema.discrete])
        pad = (ids == pad_ids).all(-1)
        out = torch.where(pad[..., None], torch.zeros((), dtype=out.dtype), out)
    return out


def make_module(schema: spade.Schema, seed: int = 0, **options) -> SpadeEmbedding:
    torch.manual_seed(seed)
    module = SpadeEmbedding(schema, **{"d_model": 37, **options})
    with torch.no_grad():  # LayerNorm away from (1, 0), so that its gradients matter
        for layer in module.features.values():
            if getattr(layer, "norm", None) is not None:
                layer.norm.weight.add_(0.3 * torch.randn_like(layer.norm.weight))
                layer.norm.bias.add_(0.3 * torch.randn_like(layer.norm.bias))
    return module


def random_batch(module: SpadeEmbedding, batch: int, n: int, seed: int) -> tuple:
    """Delayed tokens of random sequences with random lengths (so PAD and MISSING steps occur)."""
    generator = torch.Generator().manual_seed(seed)
    schema = module.schema
    ids = torch.stack(
        [torch.randint(0, f.vocab_size, (batch, n), generator=generator) for f in schema.discrete],
        dim=-1,
    )
    pads = torch.tensor([f.pad_id for f in schema.discrete])
    ids = torch.where(
        ids == pads, (pads + 1) % torch.tensor([f.vocab_size for f in schema.discrete]), ids
    )
    values = torch.randn(batch, n, len(schema.continuous), generator=generator)
    lengths = torch.randint(1, n + 1, (batch,), generator=generator)
    lengths[0] = n
    return module.delay(ids, values, lengths)


def gradients(module, ids, values, condition, weights) -> list:
    out = module(ids, values, condition)
    inputs = [*module.parameters()] + ([condition] if condition is not None else [])
    return [out, *torch.autograd.grad((out * weights).sum(), inputs)]


@pytest.mark.parametrize(
    "schema_of, options",
    [
        (shower_schema, dict()),
        (shower_schema, dict(layer_norm=True, condition_dim=3)),
        (mixed_schema, dict(layer_norm=True, embedding_dim=5, hidden=7, d_model=1)),
        (mixed_schema, dict(combine="sum", d_model=13, bias=False)),
        (shower_schema, dict(bias=False, d_model=64, condition_dim=1)),
    ],
)
def test_forward_and_every_gradient_match_the_float64_twin(schema_of, options):
    module = make_module(schema_of(), **options)
    ids, values, _ = random_batch(module, batch=3, n=11, seed=1)
    condition = None
    if module.condition_dim:
        condition = torch.randn(*ids.shape[:2], module.condition_dim, requires_grad=True)
    weights = torch.randn(*ids.shape[:2], module.d_model)
    got = gradients(module, ids, values, condition, weights)
    twin_out = twin(module, ids, values, condition)
    inputs = [*module.parameters()] + ([condition] if condition is not None else [])
    want = [twin_out, *torch.autograd.grad((twin_out * weights.double()).sum(), inputs)]
    names = ["out", *(n for n, _ in module.named_parameters()), "condition"]
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        scale = max(b.abs().max().item(), 1.0)
        # float32 sums over a few dozen steps; the SiLU's polynomial exp (rel. error 1.2e-7).
        assert (a.double() - b).abs().max().item() <= 2e-6 * scale, name


def test_pad_steps_are_zero_and_give_no_gradient():
    module = make_module(shower_schema())
    ids = torch.zeros(1, 2, 3, dtype=torch.int64)  # every discrete id PAD
    values = torch.tensor([[[1.5], [-2.0]]])
    out = module(ids, values)
    assert torch.equal(out, torch.zeros(1, 2, 37))
    for grad in torch.autograd.grad(out.sum(), list(module.parameters())):
        assert not grad.any()


def test_compiled_module_runs_fullgraph_and_gives_the_eager_bits():
    module = make_module(shower_schema(), layer_norm=True, condition_dim=2)
    ids, values, _ = random_batch(module, batch=2, n=9, seed=3)
    condition = torch.randn(*ids.shape[:2], 2, requires_grad=True)
    eager = module(ids, values, condition).square().sum()
    eager_grads = torch.autograd.grad(eager, [*module.parameters(), condition])
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, values, condition).square().sum()
    assert torch.equal(loss, eager)
    for got, want in zip(torch.autograd.grad(loss, [*module.parameters(), condition]), eager_grads):
        assert torch.equal(got, want)


def test_gradients_are_bitwise_identical_for_one_and_two_threads(at_one_and_two_threads):
    module = make_module(shower_schema(), layer_norm=True, condition_dim=3, d_model=96)
    ids, values, _ = random_batch(module, batch=8, n=200, seed=4)
    condition = torch.randn(*ids.shape[:2], 3, requires_grad=True)
    weights = torch.randn(*ids.shape[:2], 96)

    def step() -> list:
        return gradients(module, ids, values, condition, weights)

    one, two = at_one_and_two_threads(step)
    names = ["out", *(n for n, _ in module.named_parameters()), "condition"]
    for name, a, b in zip(names, one, two):
        assert torch.equal(a, b), name


def test_delay_undelay_and_loss_mask_work_on_torch_tensors():
    module = make_module(shower_schema())
    ids = torch.randint(1, 31, (2, 6, 3))
    values = torch.rand(2, 6, 1)
    lengths = torch.tensor([6, 4])
    delayed_ids, delayed_values, mask = module.delay(ids, values, lengths)
    assert all(isinstance(t, torch.Tensor) for t in (delayed_ids, delayed_values, mask))
    assert delayed_ids.shape == (2, 10, 3) and mask.shape == (2, 10, 4)
    back_ids, back_values = module.undelay(delayed_ids, delayed_values)
    assert torch.equal(back_ids[0], ids[0]) and torch.equal(back_values[0], values[0])
    assert torch.equal(back_ids[1, :4], ids[1, :4])
    assert torch.equal(module.loss_mask(lengths, 10), mask[:, 1:])
    # The module embeds what delay produced.
    assert module(delayed_ids, delayed_values).shape == (2, 10, 37)


def test_rejected_inputs_name_the_argument_and_leave_the_parameters_untouched():
    module = make_module(shower_schema(), condition_dim=2)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    ids, values, _ = random_batch(module, batch=2, n=5, seed=5)
    condition = torch.randn(*ids.shape[:2], 2)
    bad_ids = ids.clone()
    bad_ids[1, 3, 2] = 40
    nan = values.clone()
    nan[0, 2, 0] = math.nan
    inf = condition.clone()
    inf[1, 1, 0] = math.inf
    two_columns = values.repeat(1, 1, 2)
    position = r"\(feature \"y\", sequence 1, position 3\)"
    cases = [
        (ValueError, r"ids must have shape \[B, T, Fd\] with Fd = 3", (ids[..., :2], values)),
        (ValueError, r"values must have shape \[B, T, Fc\] with Fc = 1", (ids, two_columns)),
        (ValueError, r"values must have the same \[B, T\] as ids", (ids, values[:, 1:])),
        (ValueError, r"condition must have shape \[B, T, C\]", (ids, values, condition[..., :1])),
        (ValueError, r"condition \[B, T, 2\] must be given", (ids, values, None)),
        (ValueError, r"ids\[1, 3, 2\] " + position + r" must be in \[0, 32\), got 40", (bad_ids,)),
        (ValueError, r"values\[0, 2, 0\] \(feature \"E\", sequence 0, position 2\)", (ids, nan)),
        (ValueError, r"condition\[1, 1, 0\] \(sequence 1, step 1\) must be finite", (ids,)),
        (TypeError, "ids must be torch.int64", (ids.int(), values)),
        (TypeError, "values must be torch.float32", (ids, values.double())),
        (TypeError, "ids must be a torch tensor", (ids.numpy(), values)),
        (TypeError, "values must be given", (ids, None)),
    ]  # fmt: skip
    for error, message, arguments in cases:
        if len(arguments) == 1:  # ids alone: values, then condition (inf for the condition case)
            arguments = (*arguments, values, inf if "condition" in message else condition)
        elif len(arguments) == 2:
            arguments = (*arguments, condition)
        with pytest.raises(error, match=message):
            module(*arguments)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(d_model=0), "d_model must be an int >= 1"),
        (dict(embedding_dim=0), r"embedding_dim\['z'\] must be an int >= 1"),
        (dict(combine="mean"), "combine must be one of"),
        (dict(combine="sum", condition_dim=2), "combine='sum' takes no condition"),
        (dict(condition_dim=-1), "condition_dim must be an int >= 0"),
    ],
)
def test_constructor_rejects_bad_options_by_name(options, message):
    settings = dict(d_model=16)
    settings.update(options)
    with pytest.raises(ValueError, match=message):
        SpadeEmbedding(shower_schema(), **settings)


def test_state_dict_loads_into_the_folded_inference_embedding():
    module = make_module(shower_schema(), layer_norm=True)
    ids, values, _ = random_batch(module, batch=2, n=7, seed=6)
    folded = spade.SpadeEmbedding.from_torch(module.schema, module)
    assert torch.equal(folded(ids, values), module(ids, values).detach())
