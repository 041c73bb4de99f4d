"""foveal.spade against a PyTorch SPADE embedding written here and a numpy delay reference.

The PyTorch module is what a user trains (nn.Embedding, LayerNorm, Linear, SiLU); foveal loads
its state_dict and must agree to float32 tolerance: |foveal - torch| <= 2e-5 * max(1, max|torch|)
(foveal folds the linear layers in float64, so it differs from torch by float32 rounding only).
"""

from __future__ import annotations

from typing import Any

import foveal
import numpy as np
import pytest
from conftest import SEED
from foveal import spade

TOLERANCE = 2e-5


def shower_schema() -> spade.Schema:
    """The calorimeter example of docs/spade.md: z, x, y bins and an energy."""
    return spade.Schema(
        [
            spade.Feature.binned("z", 30),
            spade.Feature.binned("x", 30),
            spade.Feature.binned("y", 30),
            spade.Feature.continuous("energy"),
        ]
    )


def random_tokens(rng: np.random.Generator, schema: spade.Schema, batch: int, length: int):
    """ids [B, n, Fd] over the bins (never PAD or MISSING) and values [B, n, Fc]."""
    ids = np.stack(
        [rng.integers(1, f.vocab_size - 1, (batch, length)) for f in schema.discrete], axis=-1
    ).astype(np.int64)
    values = rng.exponential(1.0, (batch, length, len(schema.continuous))).astype(np.float32)
    return ids, values


def delay_reference(schema: spade.Schema, ids, values, lengths):
    """The delay of docs/spade.md in plain numpy loops: (delayed ids, values, mask)."""
    batch, length = ids.shape[:2]
    steps = length + schema.max_shift
    delayed_ids = np.zeros((batch, steps, len(schema.discrete)), np.int64)
    delayed_values = np.zeros((batch, steps, len(schema.continuous)), np.float32)
    mask = np.zeros((batch, steps, len(schema.features)), bool)
    for b in range(batch):
        for f, feature in enumerate(schema.features):
            column = [g.name for g in (schema.discrete if feature.discrete else schema.continuous)]
            c = column.index(feature.name)
            for t in range(steps):
                i = t - feature.shift
                if 0 <= i < lengths[b]:
                    value = ids[b, i, c] if feature.discrete else values[b, i, c]
                    mask[b, t, f] = True
                elif t < lengths[b] + schema.max_shift:
                    value = feature.missing_id if feature.discrete else 0.0
                else:
                    value = feature.pad_id if feature.discrete else 0.0
                (delayed_ids if feature.discrete else delayed_values)[b, t, c] = value
    return delayed_ids, delayed_values, mask


def make_torch_module(torch: Any, schema, *, layer_norm, combine, condition_dim, d_model):
    """A PyTorch SPADE embedding with the state_dict names foveal.spade loads."""
    nn = torch.nn
    width = {"concat": 24, "sum": d_model}[combine]

    class Feature(nn.Module):
        def __init__(self, feature):
            super().__init__()
            if feature.discrete:
                self.table = nn.Embedding(feature.vocab_size, width)
                if layer_norm:
                    self.norm = nn.LayerNorm(width)
                    nn.init.normal_(self.norm.weight, 1.0, 0.3)
                    nn.init.normal_(self.norm.bias, 0.0, 0.3)
            else:
                self.mlp = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, width))

        def forward(self, x):
            if hasattr(self, "table"):
                e = self.table(x)
                return self.norm(e) if hasattr(self, "norm") else e
            return self.mlp(x)

    class SpadeEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.ModuleDict({f.name: Feature(f) for f in schema.features})
            if combine == "concat":
                inputs = width * len(schema.features) + condition_dim
                self.projection = nn.Linear(inputs, d_model)

        def forward(self, ids, values, condition=None):
            parts, discrete, continuous = [], 0, 0
            for feature in schema.features:
                module = self.features[feature.name]
                if feature.discrete:
                    parts.append(module(ids[..., discrete]))
                    discrete += 1
                else:
                    parts.append(module(values[..., continuous : continuous + 1]))
                    continuous += 1
            if combine == "sum":
                out = torch.stack(parts).sum(0)
            else:
                if condition is not None:
                    parts.append(condition)
                out = self.projection(torch.cat(parts, dim=-1))
            pads = torch.tensor([f.pad_id for f in schema.discrete])
            is_pad = (ids == pads).all(dim=-1, keepdim=True)
            return torch.where(is_pad, torch.zeros(()), out)

    torch.manual_seed(SEED)
    return SpadeEmbedding().eval()


def assert_same_tokens(got: tuple, expected: tuple, lengths) -> None:
    """(ids, values) equal to the expected ones at every position inside each sequence."""
    for got_part, expected_part in zip(got, expected):
        for b, length in enumerate(lengths):
            np.testing.assert_array_equal(got_part[b, :length], expected_part[b, :length])


def assert_close(actual: Any, expected: Any) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    size = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=0, atol=TOLERANCE * size
    )


# --------------------------------------------------------------------------------------------
# Schema.


def test_schema_defaults_and_binned_layout():
    schema = shower_schema()
    assert schema.shifts == (1, 2, 3, 4)
    assert schema.max_shift == 4
    assert schema.delayed_length(10) == 14
    z = schema.features[0]
    assert (z.vocab_size, z.pad_id, z.missing_id) == (32, 0, 31)
    assert [f.name for f in schema.continuous] == ["energy"]


def test_schema_rejects_bad_shifts():
    with pytest.raises(
        ValueError, match=r'features\[1\]\.shift \(feature "x"\) must be > .* got 2'
    ):
        spade.Schema([spade.Feature.binned("z", 4, shift=2), spade.Feature.binned("x", 4, shift=2)])
    with pytest.raises(ValueError, match=r'\(feature "z"\) must be >= 1 .* got -2'):
        spade.Schema([spade.Feature.binned("z", 4, shift=-2)])
    with pytest.raises(ValueError, match="must be 'discrete' or 'continuous'"):
        spade.Schema([spade.Feature("z", "binary")])


# --------------------------------------------------------------------------------------------
# Delay and undelay.


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 7), (5, 13), (2, 0)])
def test_delay_matches_reference_and_undelay_inverts_it(rng, batch, length):
    schema = shower_schema()
    ids, values = random_tokens(rng, schema, batch, length)
    lengths = rng.integers(0, length + 1, batch)
    delayed_ids, delayed_values, mask = foveal.spade.delay(schema, ids, values, lengths)
    expected = delay_reference(schema, ids, values, lengths)
    np.testing.assert_array_equal(delayed_ids, expected[0])
    np.testing.assert_array_equal(delayed_values, expected[1])
    np.testing.assert_array_equal(mask, expected[2])
    assert mask.dtype == bool and not mask[:, 0].any()
    assert_same_tokens(spade.undelay(schema, delayed_ids, delayed_values), (ids, values), lengths)


def test_delay_keeps_torch_tensors_torch(rng, torch):
    schema = shower_schema()
    ids, values = random_tokens(rng, schema, 2, 5)
    delayed_ids, delayed_values, mask = spade.delay(
        schema, torch.from_numpy(ids), torch.from_numpy(values)
    )
    assert isinstance(delayed_ids, torch.Tensor) and mask.dtype == torch.bool
    assert delayed_values.dtype == torch.float32
    np.testing.assert_array_equal(delayed_ids.numpy(), spade.delay(schema, ids, values)[0])


def test_undelay_logits_puts_predictions_back_in_token_order(rng):
    schema = shower_schema()
    logits = rng.standard_normal((2, 9, 4, 5)).astype(np.float32)
    out = spade.undelay_logits(schema, logits)
    assert out.shape == (2, 5, 4, 5)
    for f, shift in enumerate(schema.shifts):
        np.testing.assert_array_equal(out[:, :, f], logits[:, shift : shift + 5, f])


def test_training_helpers(rng):
    schema = shower_schema()
    ids, values = random_tokens(rng, schema, 3, 6)
    lengths = [6, 2, 0]
    delayed_ids, delayed_values, mask = spade.delay(schema, ids, values, lengths)
    pairs = spade.next_step(delayed_ids, delayed_values, mask)
    np.testing.assert_array_equal(pairs.input_ids, delayed_ids[:, :-1])
    np.testing.assert_array_equal(pairs.target_values, delayed_values[:, 1:])
    np.testing.assert_array_equal(spade.loss_mask(schema, lengths, 10), pairs.loss_mask)
    with_stop = spade.loss_mask(schema, lengths, 10, include_stop=True)
    difference = np.argwhere(with_stop != pairs.loss_mask)
    # The first stream's stop step (shift 1 + length), as a target index (step - 1).
    np.testing.assert_array_equal(difference, [[0, 6, 0], [1, 2, 0], [2, 0, 0]])


# --------------------------------------------------------------------------------------------
# The embedding against PyTorch.


@pytest.mark.parametrize(
    "layer_norm, combine, condition_dim",
    [(False, "concat", 0), (True, "concat", 0), (True, "concat", 3), (False, "sum", 0)],
)
def test_embedding_matches_torch(rng, torch, layer_norm, combine, condition_dim):
    schema = shower_schema()
    d_model = 40
    module = make_torch_module(
        torch,
        schema,
        layer_norm=layer_norm,
        combine=combine,
        condition_dim=condition_dim,
        d_model=d_model,
    )
    embedding = spade.SpadeEmbedding.from_torch(
        schema, module, combine=combine, condition_dim=condition_dim
    )
    assert embedding.d_model == d_model
    ids, values = random_tokens(rng, schema, 3, 11)
    delayed_ids, delayed_values, _ = spade.delay(schema, ids, values, [11, 4, 7])
    condition = torch.randn(3, condition_dim) if condition_dim else None
    got = embedding(
        torch.from_numpy(delayed_ids), torch.from_numpy(delayed_values), condition=condition
    )
    with torch.no_grad():
        steps = delayed_ids.shape[1]
        expanded = None if condition is None else condition[:, None].expand(-1, steps, -1)
        expected = module(torch.from_numpy(delayed_ids), torch.from_numpy(delayed_values), expanded)
    assert isinstance(got, torch.Tensor) and got.shape == (3, steps, d_model)
    assert_close(got.numpy(), expected.numpy())
    assert (got[1, 4 + 4 :] == 0).all(), "PAD steps give the zero vector"


def test_embedding_is_identical_for_one_and_two_threads(rng, torch):
    schema = shower_schema()
    module = make_torch_module(
        torch, schema, layer_norm=False, combine="concat", condition_dim=0, d_model=64
    )
    embedding = spade.SpadeEmbedding.from_state_dict(schema, module.state_dict())
    delayed_ids, delayed_values, _ = spade.delay(schema, *random_tokens(rng, schema, 4, 50))
    one = embedding(delayed_ids, delayed_values, num_threads=1)
    two = embedding(delayed_ids, delayed_values, num_threads=2)
    assert isinstance(one, np.ndarray)
    np.testing.assert_array_equal(one, two)


# --------------------------------------------------------------------------------------------
# Generation.


def test_decoder_replays_sequences(rng):
    schema = shower_schema()
    batch, length = 6, 9
    ids, values = random_tokens(rng, schema, batch, length)
    lengths = rng.integers(0, length + 1, batch)
    delayed_ids, delayed_values, _ = spade.delay(schema, ids, values, lengths)
    decoder = spade.Decoder(schema, batch, max_tokens=length)
    first_ids, first_values = decoder.first_step()
    np.testing.assert_array_equal(first_ids, delayed_ids[:, 0])
    np.testing.assert_array_equal(first_values, delayed_values[:, 0])
    completed_tokens = [[] for _ in range(batch)]
    step = 0
    while not decoder.done:
        step += 1
        # The "model" predicts the true next step (PAD past the end of the delayed batch).
        inside = step < delayed_ids.shape[1]
        predicted_ids = delayed_ids[:, step] if inside else np.zeros((batch, 3), np.int64)
        predicted_values = delayed_values[:, step] if inside else np.zeros((batch, 1), np.float32)
        step_ids, step_values, completed = decoder.step(predicted_ids, predicted_values)
        np.testing.assert_array_equal(step_ids, predicted_ids)
        np.testing.assert_array_equal(step_values, predicted_values)
        for b in np.flatnonzero(completed >= 0):
            completed_tokens[b].append(int(completed[b]))
    assert decoder.lengths == list(lengths)
    assert completed_tokens == [list(range(n)) for n in lengths]
    assert_same_tokens(decoder.tokens(), (ids, values), lengths)


# --------------------------------------------------------------------------------------------
# Rejected input.


def test_bad_tokens_raise_value_error_naming_feature_and_position(rng, torch):
    schema = shower_schema()
    ids, values = random_tokens(rng, schema, 2, 5)
    bad_ids = ids.copy()
    bad_ids[1, 3, 2] = 32
    with pytest.raises(ValueError, match=r'feature "y", sequence 1, position 3\) .* got 32'):
        spade.delay(schema, bad_ids, values)
    bad_values = values.copy()
    bad_values[0, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r'feature "energy", sequence 0, position 2\) .* got nan'):
        spade.delay(schema, ids, bad_values)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be in \[0, n = 5\], got 6"):
        spade.delay(schema, ids, values, [5, 6])
    with pytest.raises(ValueError, match=r"ids.shape\[2\] must equal number of discrete features"):
        spade.delay(schema, ids[..., :2], values)
    with pytest.raises(TypeError, match="ids must have dtype int64, got int32"):
        spade.delay(schema, ids.astype(np.int32), values)
    with pytest.raises(TypeError, match="values must have dtype float32, got float64"):
        spade.delay(schema, ids, values.astype(np.float64))

    module = make_torch_module(
        torch, schema, layer_norm=True, combine="concat", condition_dim=0, d_model=16
    )
    embedding = spade.SpadeEmbedding.from_torch(schema, module)
    delayed_ids, delayed_values, _ = spade.delay(schema, ids, values)
    delayed_ids[0, 4, 1] = -1
    out = np.full((2, 9, 16), 7.0, np.float32)
    with pytest.raises(ValueError, match=r'feature "x", sequence 0, position 4\) .* got -1'):
        embedding(delayed_ids, delayed_values, out=out)
    assert (out == 7.0).all(), "out was written before the error"


def test_bad_weights_raise(torch):
    schema = shower_schema()
    module = make_torch_module(
        torch, schema, layer_norm=False, combine="concat", condition_dim=0, d_model=16
    )
    state = dict(module.state_dict())
    state["features.x.table.weight"] = state["features.x.table.weight"][:31]
    with pytest.raises(
        ValueError, match=r'table \(feature "x"\)\.shape\[0\] must equal vocab_size'
    ):
        spade.SpadeEmbedding.from_state_dict(schema, state)
    state = dict(module.state_dict())
    state["projection.weight"] = state["projection.weight"].double()
    with pytest.raises(TypeError, match="projection_weight must have dtype float32"):
        spade.SpadeEmbedding.from_state_dict(schema, state)
    with pytest.raises(ValueError, match="features must hold the weights of feature 'energy'"):
        spade.SpadeEmbedding(schema, {"z": {}, "x": {}, "y": {}})


def test_missing_parts_and_lengths_are_checked_once_in_cpp(rng, torch):
    schema = shower_schema()
    ids, values = random_tokens(rng, schema, 2, 5)
    with pytest.raises(ValueError, match=r"ids must be given: .* \(Fd\) is 3"):
        spade.delay(schema, None, values)
    with pytest.raises(ValueError, match=r"delayed_values must be given: .* \(Fc\) is 1"):
        spade.undelay(schema, spade.delay(schema, ids, values)[0], None)
    with pytest.raises(ValueError, match=r'num_bins \(feature "q"\) must be >= 1 .* got 0'):
        spade.Feature.binned("q", 0)
    with pytest.raises(ValueError, match=r'num_bins \(feature "q"\) .* got 9223372036854775807'):
        spade.Feature.binned("q", 2**63 - 1)
    with pytest.raises(TypeError, match="lengths must be a sequence of ints, got ndarray"):
        spade.delay(schema, ids, values, np.array([[5, 3]]))
    with pytest.raises(TypeError, match="num_steps must be an int, got str"):
        spade.loss_mask(schema, [3, 4], "9")
    expected = spade.delay(schema, ids, values, [5, 3])
    for lengths in (np.array([5, 3], np.int32), torch.tensor([5, 3])):
        for got, want in zip(spade.delay(schema, ids, values, lengths), expected):
            np.testing.assert_array_equal(got, want)
    mask = spade.loss_mask(schema, torch.tensor([3, 4]), 9)
    assert isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), spade.loss_mask(schema, [3, 4], 9))
