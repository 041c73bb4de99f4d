// SPADE split-and-delay (docs/spade.md): schema validation, the delay kernels, the folded
// embedding and the generation state machine.
#include "foveal/embedding/spade.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <utility>

#include "detail/kernels.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

SpadeFeature SpadeFeature::binned(std::string name, Index num_bins, Index shift) {
  check(num_bins >= 1 && num_bins <= std::numeric_limits<Index>::max() - 2,
        "SpadeFeature::binned: num_bins (feature \"", name,
        "\") must be >= 1 and leave room for PAD and MISSING (<= 2**63 - 3), got ", num_bins);
  SpadeFeature feature;
  feature.name = std::move(name);
  feature.kind = SpadeFeatureKind::discrete;
  feature.vocab_size = num_bins + 2;
  feature.pad_id = 0;
  feature.missing_id = num_bins + 1;
  feature.shift = shift;
  return feature;
}

SpadeFeature SpadeFeature::continuous(std::string name, Index shift) {
  SpadeFeature feature;
  feature.name = std::move(name);
  feature.kind = SpadeFeatureKind::continuous;
  feature.shift = shift;
  return feature;
}

SpadeSchema::SpadeSchema(std::vector<SpadeFeature> features) : features_(std::move(features)) {
  constexpr const char* kFunction = "SpadeSchema";
  check(!features_.empty(), kFunction, ": features must not be empty");
  std::set<std::string> names;
  for (std::size_t f = 0; f < features_.size(); ++f) {
    SpadeFeature& feature = features_[f];
    check(names.insert(feature.name).second, kFunction, ": features[", f,
          "].name must be unique, got \"", feature.name, "\" twice");
    if (feature.shift == SpadeFeature::kDefaultShift) feature.shift = static_cast<Index>(f) + 1;
    check(feature.shift >= 1, kFunction, ": features[", f, "].shift (feature \"", feature.name,
          "\") must be >= 1 (leave it unset for the default f + 1), got ", feature.shift);
    if (f > 0) {
      check(feature.shift > features_[f - 1].shift, kFunction, ": features[", f,
            "].shift (feature \"", feature.name, "\") must be > features[", f - 1,
            "].shift = ", features_[f - 1].shift, " (shifts strictly increase), got ",
            feature.shift);
    }
    if (feature.kind == SpadeFeatureKind::discrete) {
      check(feature.vocab_size >= 1, kFunction, ": features[", f, "].vocab_size (feature \"",
            feature.name, "\") must be >= 1, got ", feature.vocab_size);
      check(feature.pad_id >= 0 && feature.pad_id < feature.vocab_size, kFunction, ": features[", f,
            "].pad_id (feature \"", feature.name, "\") must be in [0, ", feature.vocab_size,
            "), got ", feature.pad_id);
      check(feature.missing_id >= 0 && feature.missing_id < feature.vocab_size, kFunction,
            ": features[", f, "].missing_id (feature \"", feature.name, "\") must be in [0, ",
            feature.vocab_size, "), got ", feature.missing_id);
      columns_.push_back(num_discrete());
      discrete_.push_back(static_cast<Index>(f));
    } else {
      columns_.push_back(num_continuous());
      continuous_.push_back(static_cast<Index>(f));
    }
  }
}

namespace {

// ---------------------------------------------------------------------------------------------
// Shared checks.

// How messages name the last extent of ids and values.
constexpr const char* kDiscreteCount = "number of discrete features (Fd)";
constexpr const char* kContinuousCount = "number of continuous features (Fc)";

// A tensor of one kind of feature is given (not null) when the schema has such features.
template <typename T>
void require_given(const char* function, const char* name, const TensorView<T, 3>& view,
                   Index columns, const char* count_name) {
  check(!view.is_null() || columns == 0, function, ": ", name, " must be given: the schema's ",
        count_name, " is ", columns);
}

// A [B, L, C] tensor of one kind of feature: valid, C = its feature count, B and L as given
// (negative: not constrained). A null view is accepted only when C = 0.
template <typename T>
void require_feature_tensor(const char* function, const char* name, const TensorView<T, 3>& view,
                            Index columns, const char* count_name, Index batch, Index steps) {
  require_given(function, name, view, columns, count_name);
  if (view.is_null()) return;
  detail::require_valid_view(function, name, view);
  if (batch >= 0) detail::require_extent(function, name, view, 0, "B", batch);
  if (steps >= 0) detail::require_extent(function, name, view, 1, "the sequence length", steps);
  detail::require_extent(function, name, view, 2, count_name, columns);
}

// The tokens of one call to check: ids [B, L, Fd] and values [B, L, Fc] at positions below
// each sequence's length (lengths null: all L).
struct TokenCheck {
  const SpadeSchema& schema;
  TensorView<const std::int64_t, 3> ids;
  TensorView<const float, 3> values;
  TensorView<const std::int64_t, 1> lengths;
  std::vector<std::uint64_t> vocab_sizes;  // per discrete column

  Index length(Index b, Index steps) const { return lengths.is_null() ? steps : lengths(b); }

  // True when sequence b holds an id outside its vocabulary or a non-finite value; only
  // accumulates a flag, so that it stays cheap.
  bool has_bad_token(Index b) const {
    bool bad = false;
    if (schema.num_discrete() > 0) {
      for (Index i = 0, end = length(b, ids.size(1)); i < end; ++i) {
        const std::int64_t* row = &ids(b, i, 0);
        for (Index column = 0; column < schema.num_discrete(); ++column)
          bad |= static_cast<std::uint64_t>(row[column * ids.stride(2)]) >=
                 vocab_sizes[static_cast<std::size_t>(column)];
      }
    }
    if (schema.num_continuous() > 0) {
      for (Index i = 0, end = length(b, values.size(1)); i < end; ++i) {
        const float* row = &values(b, i, 0);
        for (Index column = 0; column < schema.num_continuous(); ++column)
          bad |= !std::isfinite(row[column * values.stride(2)]);
      }
    }
    return bad;
  }

  // Throws naming the feature and position of the first bad token of sequence b, if any.
  void report_bad_token(const char* function, Index b) const {
    for (Index i = 0, end = length(b, ids.size(1)); i < end; ++i)
      for (Index column = 0; column < schema.num_discrete(); ++column) {
        const SpadeFeature& feature = schema.feature(schema.discrete_features()[column]);
        const std::int64_t id = ids(b, i, column);
        check(id >= 0 && id < feature.vocab_size, function, ": ids[", b, ", ", i, ", ", column,
              "] (feature \"", feature.name, "\", sequence ", b, ", position ", i,
              ") must be in [0, ", feature.vocab_size, "), got ", id);
      }
    for (Index i = 0, end = length(b, values.size(1)); i < end; ++i)
      for (Index column = 0; column < schema.num_continuous(); ++column) {
        const SpadeFeature& feature = schema.feature(schema.continuous_features()[column]);
        const float value = values(b, i, column);
        check(std::isfinite(value), function, ": values[", b, ", ", i, ", ", column,
              "] (feature \"", feature.name, "\", sequence ", b, ", position ", i,
              ") must be finite, got ", value);
      }
  }
};

// Every id of `ids` [B, L, Fd] inside its feature's vocabulary and every value of `values`
// [B, L, Fc] finite, at positions below each sequence's length (lengths null: all L). The
// sequences are scanned in parallel; the first bad one (in order) is reported.
void require_valid_tokens(const char* function, const SpadeSchema& schema,
                          TensorView<const std::int64_t, 3> ids, TensorView<const float, 3> values,
                          TensorView<const std::int64_t, 1> lengths, int num_threads) {
  TokenCheck tokens{schema, ids, values, lengths, {}};
  for (Index f : schema.discrete_features())
    tokens.vocab_sizes.push_back(static_cast<std::uint64_t>(schema.feature(f).vocab_size));
  const Index batch = schema.num_discrete() > 0 ? ids.size(0) : values.size(0);
  std::vector<std::uint8_t> bad(static_cast<std::size_t>(batch), 0);
  parallel_for(batch, num_threads, [&](Index b) { bad[b] = tokens.has_bad_token(b); });
  for (Index b = 0; b < batch; ++b)
    if (bad[b]) tokens.report_bad_token(function, b);
}

// lengths [B]: valid, B entries, each in [0, max_length].
void require_lengths(const char* function, TensorView<const std::int64_t, 1> lengths, Index batch,
                     Index max_length) {
  if (lengths.is_null()) return;
  detail::require_valid_view(function, "lengths", lengths);
  detail::require_extent(function, "lengths", lengths, 0, "B", batch);
  for (Index b = 0; b < batch; ++b)
    check(lengths(b) >= 0 && lengths(b) <= max_length, function, ": lengths[", b,
          "] must be in [0, n = ", max_length, "], got ", lengths(b));
}

// ---------------------------------------------------------------------------------------------
// The delay pattern, one stream at a time.

// What a delayed stream holds where it carries no data.
template <typename T>
struct StreamFill {
  T missing;
  T pad;
};

// Writes steps [0, steps) of one delayed stream of a sequence of `length` tokens:
// source[(t - shift)] at the data steps, `missing` up to step length + max_shift, `pad` after.
template <typename T>
void delay_stream(const T* source, Index source_stride, Index length, Index shift, Index max_shift,
                  StreamFill<T> fill, T* out, Index out_stride, Index steps) {
  const Index data_begin = std::min(shift, steps);
  const Index data_end = std::min(shift + length, steps);
  const Index missing_end = std::min(length + max_shift, steps);
  Index t = 0;
  for (; t < data_begin; ++t) out[t * out_stride] = fill.missing;
  for (; t < data_end; ++t) out[t * out_stride] = source[(t - shift) * source_stride];
  for (; t < missing_end; ++t) out[t * out_stride] = fill.missing;
  for (; t < steps; ++t) out[t * out_stride] = fill.pad;
}

// Writes one stream's validity: 1 at steps first_step + t in [begin, end), else 0, t < steps.
void validity_stream(Index first_step, Index begin, Index end, std::uint8_t* out, Index out_stride,
                     Index steps) {
  const Index data_begin = std::clamp<Index>(begin - first_step, 0, steps);
  const Index data_end = std::clamp<Index>(end - first_step, data_begin, steps);
  Index t = 0;
  for (; t < data_begin; ++t) out[t * out_stride] = 0;
  for (; t < data_end; ++t) out[t * out_stride] = 1;
  for (; t < steps; ++t) out[t * out_stride] = 0;
}

// mask [B, steps, F]: validity of steps first_step .. first_step + steps - 1 of every stream
// (the data steps [s_f, s_f + len)); with include_stop also step s_0 + len of stream 0.
void write_validity(const SpadeSchema& schema, TensorView<const std::int64_t, 1> lengths,
                    Index full_length, Index first_step, bool include_stop,
                    TensorView<std::uint8_t, 3> mask, int num_threads) {
  parallel_for(mask.size(0), num_threads, [&](Index b) {
    const Index length = lengths.is_null() ? full_length : lengths(b);
    for (Index f = 0; f < schema.num_features(); ++f) {
      const Index shift = schema.feature(f).shift;
      const Index end = shift + length + (include_stop && f == 0 ? 1 : 0);
      validity_stream(first_step, shift, end, &mask(b, 0, f), mask.stride(1), mask.size(1));
    }
  });
}

// Delays every column of `source` [B, n, C] into `out` [B, T, C]; column c has the shift and
// fill of schema feature features[c].
template <typename T, typename FillOf>
void delay_columns(const SpadeSchema& schema, const std::vector<Index>& features,
                   TensorView<const T, 3> source, TensorView<const std::int64_t, 1> lengths,
                   TensorView<T, 3> out, FillOf&& fill_of, int num_threads) {
  if (features.empty()) return;
  parallel_for(out.size(0), num_threads, [&](Index b) {
    const Index length = lengths.is_null() ? source.size(1) : lengths(b);
    for (std::size_t column = 0; column < features.size(); ++column) {
      const SpadeFeature& feature = schema.feature(features[column]);
      const Index c = static_cast<Index>(column);
      delay_stream(source.size(1) > 0 ? &source(b, 0, c) : nullptr, source.stride(1), length,
                   feature.shift, schema.max_shift(), fill_of(feature), &out(b, 0, c),
                   out.stride(1), out.size(1));
    }
  });
}

// out[b, i, c, :] = delayed[b, i + shifts[c], c, :] for i < out.shape[1].
template <typename T>
void undelay_rows(const std::vector<Index>& shifts, TensorView<const T, 4> delayed,
                  TensorView<T, 4> out, int num_threads) {
  parallel_for(out.size(0), num_threads, [&](Index b) {
    for (Index c = 0; c < out.size(2); ++c) {
      const T* source = delayed.data() + b * delayed.stride(0) +
                        shifts[static_cast<std::size_t>(c)] * delayed.stride(1) +
                        c * delayed.stride(2);
      T* target = out.data() + b * out.stride(0) + c * out.stride(2);
      for (Index i = 0; i < out.size(1); ++i) {
        for (Index v = 0; v < out.size(3); ++v)
          target[v * out.stride(3)] = source[v * delayed.stride(3)];
        source += delayed.stride(1);
        target += out.stride(1);
      }
    }
  });
}

// A [B, L, C] view as [B, L, C, 1].
template <typename T>
TensorView<T, 4> with_unit_last_dim(const TensorView<T, 3>& view) {
  return TensorView<T, 4>(view.data(), {view.size(0), view.size(1), view.size(2), 1},
                          {view.stride(0), view.stride(1), view.stride(2), 1});
}

// The shifts of the schema features listed in `features`.
std::vector<Index> shifts_of(const SpadeSchema& schema, const std::vector<Index>& features) {
  std::vector<Index> shifts;
  for (Index f : features) shifts.push_back(schema.feature(f).shift);
  return shifts;
}

// Validation of the delayed tensors (ids [B, T, Fd], values [B, T, Fc]) and their undelayed
// counterparts ([B, T - max_shift, *]); the undelayed ones must not overlap the delayed ones.
void require_delay_pairs(const char* function, const SpadeSchema& schema,
                         TensorView<const std::int64_t, 3> delayed_ids,
                         TensorView<const float, 3> delayed_values,
                         TensorView<const std::int64_t, 3> ids, TensorView<const float, 3> values,
                         Index batch, Index tokens_length) {
  const Index steps = tokens_length + schema.max_shift();
  require_feature_tensor(function, "delayed_ids", delayed_ids, schema.num_discrete(),
                         kDiscreteCount, batch, steps);
  require_feature_tensor(function, "ids", ids, schema.num_discrete(), kDiscreteCount, batch,
                         tokens_length);
  require_feature_tensor(function, "delayed_values", delayed_values, schema.num_continuous(),
                         kContinuousCount, batch, steps);
  require_feature_tensor(function, "values", values, schema.num_continuous(), kContinuousCount,
                         batch, tokens_length);
  detail::require_disjoint(function, "ids", ids, "delayed_ids", delayed_ids);
  detail::require_disjoint(function, "ids", ids, "delayed_values", delayed_values);
  detail::require_disjoint(function, "values", values, "delayed_ids", delayed_ids);
  detail::require_disjoint(function, "values", values, "delayed_values", delayed_values);
  detail::require_disjoint(function, "ids", ids, "values", values);
  detail::require_disjoint(function, "delayed_ids", delayed_ids, "delayed_values", delayed_values);
}

// num_threads in [0, kMaxThreads]; returns the thread count to use (0: the global setting).
int resolve_threads(const char* function, int num_threads) {
  detail::require_num_threads(function, num_threads);
  return detail::resolve_num_threads(num_threads);
}

// The threads worth starting for a pass over `elements` tokens: the delay kernels move a few
// bytes per element, so a thread below ~128k elements costs more to wake than it saves (and
// far more on a loaded machine). The split never changes results.
int threads_worth_starting(int threads, Index elements) {
  constexpr Index kElementsPerThread = Index{1} << 17;
  return static_cast<int>(std::clamp<Index>(elements / kElementsPerThread, 1, threads));
}

// The threads worth starting for `products` double multiply-adds of folding or finishing
// gradients: a thread below ~1M costs more to wake than it saves (far more on a loaded
// machine). Each task writes its own outputs, so the split never changes results.
int threads_for_products(int threads, Index products) {
  return threads_worth_starting(threads, products / 8);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Delay and undelay.

void spade_delay(const SpadeSchema& schema, TensorView<const std::int64_t, 3> ids,
                 TensorView<const float, 3> values, TensorView<const std::int64_t, 1> lengths,
                 TensorView<std::int64_t, 3> delayed_ids, TensorView<float, 3> delayed_values,
                 TensorView<std::uint8_t, 3> mask, int num_threads) {
  constexpr const char* kFunction = "spade_delay";
  check(schema.num_features() > 0, kFunction, ": the schema has no features");
  detail::require_valid_view(kFunction, "mask", mask);
  const Index batch = mask.size(0), steps = mask.size(1);
  const Index length = steps - schema.max_shift();
  check(length >= 0, kFunction, ": mask.shape[1] (T) must be >= max shift = ", schema.max_shift(),
        ", got ", steps);
  detail::require_extent(kFunction, "mask", mask, 2, "the number of features (F)",
                         schema.num_features());
  require_delay_pairs(kFunction, schema, delayed_ids, delayed_values, ids, values, batch, length);
  detail::require_disjoint(kFunction, "mask", mask, "ids", ids);
  detail::require_disjoint(kFunction, "mask", mask, "values", values);
  detail::require_disjoint(kFunction, "mask", mask, "delayed_ids", delayed_ids);
  detail::require_disjoint(kFunction, "mask", mask, "delayed_values", delayed_values);
  require_lengths(kFunction, lengths, batch, length);
  const int threads = threads_worth_starting(resolve_threads(kFunction, num_threads), mask.numel());
  require_valid_tokens(kFunction, schema, ids, values, lengths, threads);
  delay_columns<std::int64_t>(
      schema, schema.discrete_features(), ids, lengths, delayed_ids,
      [](const SpadeFeature& feature) {
        return StreamFill<std::int64_t>{feature.missing_id, feature.pad_id};
      },
      threads);
  delay_columns<float>(
      schema, schema.continuous_features(), values, lengths, delayed_values,
      [](const SpadeFeature&) {
        return StreamFill<float>{0.0f, 0.0f};
      },
      threads);
  write_validity(schema, lengths, length, 0, false, mask, threads);
}

void spade_undelay(const SpadeSchema& schema, TensorView<const std::int64_t, 3> delayed_ids,
                   TensorView<const float, 3> delayed_values, TensorView<std::int64_t, 3> ids,
                   TensorView<float, 3> values, int num_threads) {
  constexpr const char* kFunction = "spade_undelay";
  const bool has_ids = schema.num_discrete() > 0;
  const Index batch = has_ids ? delayed_ids.size(0) : delayed_values.size(0);
  const Index steps = has_ids ? delayed_ids.size(1) : delayed_values.size(1);
  const Index length = steps - schema.max_shift();
  require_given(kFunction, "delayed_ids", delayed_ids, schema.num_discrete(), kDiscreteCount);
  require_given(kFunction, "delayed_values", delayed_values, schema.num_continuous(),
                kContinuousCount);
  check(length >= 0, kFunction,
        ": the delayed sequence length (T) must be >= max shift = ", schema.max_shift(), ", got ",
        steps);
  require_delay_pairs(kFunction, schema, delayed_ids, delayed_values, ids, values, batch, length);
  const int threads = threads_worth_starting(resolve_threads(kFunction, num_threads),
                                             batch * length * schema.num_features());
  if (has_ids) {
    undelay_rows<std::int64_t>(shifts_of(schema, schema.discrete_features()),
                               with_unit_last_dim(delayed_ids), with_unit_last_dim(ids), threads);
  }
  if (schema.num_continuous() > 0) {
    undelay_rows<float>(shifts_of(schema, schema.continuous_features()),
                        with_unit_last_dim(delayed_values), with_unit_last_dim(values), threads);
  }
}

namespace {

template <typename T>
void undelay_logits_impl(const SpadeSchema& schema, TensorView<const T, 4> logits,
                         TensorView<T, 4> out, int num_threads) {
  constexpr const char* kFunction = "spade_undelay_logits";
  detail::require_valid_view(kFunction, "logits", logits);
  detail::require_valid_view(kFunction, "out", out);
  const Index length = logits.size(1) - schema.max_shift();
  check(length >= 0, kFunction, ": logits.shape[1] (T) must be >= max shift = ", schema.max_shift(),
        ", got ", logits.size(1));
  detail::require_extent(kFunction, "logits", logits, 2, "the number of features (F)",
                         schema.num_features());
  detail::require_extent(kFunction, "out", out, 0, "logits.shape[0] (B)", logits.size(0));
  detail::require_extent(kFunction, "out", out, 1, "T - max shift", length);
  detail::require_extent(kFunction, "out", out, 2, "the number of features (F)",
                         schema.num_features());
  detail::require_extent(kFunction, "out", out, 3, "logits.shape[3] (V)", logits.size(3));
  detail::require_disjoint(kFunction, "out", out, "logits", logits);
  const int threads = threads_worth_starting(resolve_threads(kFunction, num_threads), out.numel());
  std::vector<Index> all_features(static_cast<std::size_t>(schema.num_features()));
  for (Index f = 0; f < schema.num_features(); ++f) all_features[static_cast<std::size_t>(f)] = f;
  undelay_rows<T>(shifts_of(schema, all_features), logits, out, threads);
}

}  // namespace

void spade_undelay_logits(const SpadeSchema& schema, TensorView<const float, 4> logits,
                          TensorView<float, 4> out, int num_threads) {
  undelay_logits_impl<float>(schema, logits, out, num_threads);
}

void spade_undelay_logits(const SpadeSchema& schema, TensorView<const double, 4> logits,
                          TensorView<double, 4> out, int num_threads) {
  undelay_logits_impl<double>(schema, logits, out, num_threads);
}

void spade_loss_mask(const SpadeSchema& schema, TensorView<const std::int64_t, 1> lengths,
                     TensorView<std::uint8_t, 3> loss_mask, bool include_stop) {
  constexpr const char* kFunction = "spade_loss_mask";
  detail::require_valid_view(kFunction, "loss_mask", loss_mask);
  const Index steps = loss_mask.size(1) + 1;
  const Index length = steps - schema.max_shift();
  check(length >= 0, kFunction,
        ": loss_mask.shape[1] (T - 1) must be >= max shift - 1 = ", schema.max_shift() - 1,
        ", got ", loss_mask.size(1));
  detail::require_extent(kFunction, "loss_mask", loss_mask, 2, "the number of features (F)",
                         schema.num_features());
  require_lengths(kFunction, lengths, loss_mask.size(0), length);
  detail::require_disjoint(kFunction, "loss_mask", loss_mask, "lengths", lengths);
  write_validity(schema, lengths, length, 1, include_stop, loss_mask, get_num_threads());
}

// ---------------------------------------------------------------------------------------------
// The embedding.

namespace {

constexpr const char* kEmbedding = "SpadeEmbedding";

// "features[2].table (feature \"z\")": how messages name a weight of one feature.
std::string weight_name(const SpadeSchema& schema, Index f, const char* member) {
  return "features[" + std::to_string(f) + "]." + member + " (feature \"" + schema.feature(f).name +
         "\")";
}

// One expected extent of a weight: its value, or kAnyExtent (any value >= 1), and its name.
constexpr Index kAnyExtent = -1;
struct Extent {
  const char* name;
  Index value;
};

// `view` is given and valid, with the expected extents; returns its shape.
template <int Rank>
void require_weight(const std::string& name, const TensorView<const float, Rank>& view,
                    const std::array<Extent, Rank>& extents) {
  check(!view.is_null(), kEmbedding, ": ", name, " must be given");
  detail::require_valid_view(kEmbedding, name.c_str(), view);
  for (int dim = 0; dim < Rank; ++dim) {
    const Extent& extent = extents[static_cast<std::size_t>(dim)];
    if (extent.value == kAnyExtent) {
      check(view.size(dim) >= 1, kEmbedding, ": ", name, ".shape[", dim, "] (", extent.name,
            ") must be >= 1, got ", view.size(dim));
    } else {
      detail::require_extent(kEmbedding, name.c_str(), view, dim, extent.name, extent.value);
    }
  }
}

// An optional weight: null, or given and valid with the expected extents.
template <int Rank>
void require_optional_weight(const std::string& name, const TensorView<const float, Rank>& view,
                             const std::array<Extent, Rank>& extents) {
  if (!view.is_null()) require_weight<Rank>(name, view, extents);
}

// The rows of the projection that combine one block of the concatenated input: entry (o, j)
// multiplies input column offset + j into output o. Sum mode is the identity.
struct ProjectionBlock {
  TensorView<const float, 2> weight;  // null in sum mode
  Index offset;

  double operator()(Index o, Index j) const {
    if (weight.is_null()) return o == j ? 1.0 : 0.0;
    return static_cast<double>(weight(o, offset + j));
  }
};

// LayerNorm of `row` in place (biased variance, as torch.nn.LayerNorm).
void layer_norm(std::vector<double>& row, const TensorView<const float, 1>& gamma,
                const TensorView<const float, 1>& beta, double eps) {
  const double count = static_cast<double>(row.size());
  double mean = 0;
  for (double value : row) mean += value;
  mean /= count;
  double variance = 0;
  for (double value : row) variance += (value - mean) * (value - mean);
  const double inverse_std = 1.0 / std::sqrt(variance / count + eps);
  for (std::size_t j = 0; j < row.size(); ++j) {
    const Index index = static_cast<Index>(j);
    row[j] = (row[j] - mean) * inverse_std * gamma(index) + beta(index);
  }
}

// A [B, C] view as [B, 1, C] (a null view stays null).
template <typename T>
TensorView<T, 3> as_single_step(const TensorView<T, 2>& view) {
  if (view.is_null()) return {};
  return TensorView<T, 3>(view.data(), {view.size(0), 1, view.size(1)},
                          {view.stride(0), 0, view.stride(1)});
}

// Every condition value [B, T, C] finite (a null view passes).
void require_finite_condition(const char* function, TensorView<const float, 3> condition) {
  if (condition.is_null()) return;
  for (Index b = 0; b < condition.size(0); ++b)
    for (Index t = 0; t < condition.size(1); ++t)
      for (Index c = 0; c < condition.size(2); ++c)
        if (!std::isfinite(condition(b, t, c)))  // (check's arguments cost even when it passes)
          check(false, function, ": condition[", b, ", ", t, ", ", c, "] (sequence ", b, ", step ",
                t, ") must be finite, got ", condition(b, t, c));
}

// The shapes of valid weights: what the constructor and the backward read.
struct WeightLayout {
  std::vector<Index> widths;        // E_f per feature
  std::vector<Index> hidden_sizes;  // H_f per continuous feature
  Index hidden_total = 0;
  bool concat = true;
  Index d_model = 0;
  Index condition_dim = 0;
};

// Checks `weights` against the schema (every weight given, valid and of matching extents);
// returns their layout.
WeightLayout validate_weights(const SpadeSchema& schema, const SpadeEmbeddingWeights& weights) {
  WeightLayout layout;
  const Index num_features = schema.num_features();
  check(num_features > 0, kEmbedding, ": the schema has no features");
  check(static_cast<Index>(weights.features.size()) == num_features, kEmbedding,
        ": weights.features must hold one entry per schema feature (", num_features, "), got ",
        weights.features.size());
  check(std::isfinite(weights.norm_eps) && weights.norm_eps > 0, kEmbedding,
        ": norm_eps must be finite and > 0, got ", weights.norm_eps);

  // Widths E_f and hidden sizes H_f, each feature's weights checked against them.
  for (Index f = 0; f < num_features; ++f) {
    const SpadeFeature& feature = schema.feature(f);
    const SpadeFeatureWeights& w = weights.features[static_cast<std::size_t>(f)];
    if (feature.kind == SpadeFeatureKind::discrete) {
      require_weight<2>(weight_name(schema, f, "table"), w.table,
                        {{{"vocab_size", feature.vocab_size}, {"E", kAnyExtent}}});
      const Index width = w.table.size(1);
      check(w.norm_weight.is_null() == w.norm_bias.is_null(), kEmbedding, ": ",
            weight_name(schema, f, "norm_weight"),
            " and norm_bias must be given together (LayerNorm) or both left out");
      require_optional_weight<1>(weight_name(schema, f, "norm_weight"), w.norm_weight,
                                 {{{"E", width}}});
      require_optional_weight<1>(weight_name(schema, f, "norm_bias"), w.norm_bias,
                                 {{{"E", width}}});
      layout.widths.push_back(width);
    } else {
      require_weight<2>(weight_name(schema, f, "hidden_weight"), w.hidden_weight,
                        {{{"H", kAnyExtent}, {"1", 1}}});
      const Index hidden = w.hidden_weight.size(0);
      require_weight<1>(weight_name(schema, f, "hidden_bias"), w.hidden_bias, {{{"H", hidden}}});
      require_weight<2>(weight_name(schema, f, "output_weight"), w.output_weight,
                        {{{"E", kAnyExtent}, {"H", hidden}}});
      const Index width = w.output_weight.size(0);
      require_weight<1>(weight_name(schema, f, "output_bias"), w.output_bias, {{{"E", width}}});
      layout.widths.push_back(width);
      layout.hidden_sizes.push_back(hidden);
      layout.hidden_total += hidden;
    }
  }

  Index concat_width = 0;
  for (Index width : layout.widths) concat_width += width;
  layout.concat = weights.combine == SpadeCombine::concat;
  if (layout.concat) {
    check(weights.condition_dim >= 0, kEmbedding, ": condition_dim must be >= 0, got ",
          weights.condition_dim);
    layout.condition_dim = weights.condition_dim;
    require_weight<2>(
        "projection_weight", weights.projection_weight,
        {{{"d_model", kAnyExtent},
          {"sum of feature widths + condition_dim", concat_width + layout.condition_dim}}});
    layout.d_model = weights.projection_weight.size(0);
  } else {
    check(weights.projection_weight.is_null() && weights.projection_bias.is_null(), kEmbedding,
          ": combine=sum adds the feature embeddings without a projection; projection_weight and "
          "projection_bias must be left out");
    check(weights.condition_dim == 0, kEmbedding,
          ": combine=sum takes no condition vectors (they are concatenated), got condition_dim = ",
          weights.condition_dim);
    layout.d_model = layout.widths[0];
    for (Index f = 0; f < num_features; ++f)
      check(layout.widths[static_cast<std::size_t>(f)] == layout.d_model, kEmbedding,
            ": combine=sum needs every feature width equal to d_model = ", layout.d_model, ", but ",
            weight_name(schema, f, "embedding"), " has width ",
            layout.widths[static_cast<std::size_t>(f)]);
  }
  require_optional_weight<1>("projection_bias", weights.projection_bias,
                             {{{"d_model", layout.d_model}}});
  require_optional_weight<1>("pad_vector", weights.pad_vector, {{{"d_model", layout.d_model}}});
  return layout;
}

}  // namespace

SpadeEmbedding::SpadeEmbedding(SpadeSchema schema, const SpadeEmbeddingWeights& weights)
    : schema_(std::move(schema)) {
  const WeightLayout layout = validate_weights(schema_, weights);
  const Index num_features = schema_.num_features();
  const std::vector<Index>& widths = layout.widths;
  const bool concat = layout.concat;
  const Index hidden_total = layout.hidden_total;
  hidden_sizes_ = layout.hidden_sizes;
  d_model_ = layout.d_model;
  condition_dim_ = layout.condition_dim;

  // Fold, in double precision.
  row_stride_ =
      (d_model_ + detail::kSpadeRowFloats - 1) / detail::kSpadeRowFloats * detail::kSpadeRowFloats;
  dense_inputs_ = hidden_total + condition_dim_;
  dense_rows_ = Tensor<float, 2>({dense_inputs_, row_stride_});
  bias_ = Tensor<float, 1>({row_stride_});
  pad_row_ = Tensor<float, 1>({d_model_});
  std::vector<double> bias(static_cast<std::size_t>(d_model_), 0.0);
  if (!weights.projection_bias.is_null())
    for (Index o = 0; o < d_model_; ++o) bias[o] += weights.projection_bias(o);
  if (!weights.pad_vector.is_null())
    for (Index o = 0; o < d_model_; ++o) pad_row_(o) = weights.pad_vector(o);

  const TensorView<const float, 2> projection =
      concat ? weights.projection_weight : TensorView<const float, 2>();
  Index offset = 0;
  Index dense_row = 0;
  for (Index f = 0; f < num_features; ++f) {
    const SpadeFeatureWeights& w = weights.features[static_cast<std::size_t>(f)];
    const Index width = widths[static_cast<std::size_t>(f)];
    const ProjectionBlock block{projection, concat ? offset : 0};
    // projected(o) = sum_j block(o, j) * input(j), into a float row of the folded tensors.
    const auto project = [&](const auto& input, float* out_row) {
      for (Index o = 0; o < d_model_; ++o) {
        double sum = 0;
        for (Index j = 0; j < width; ++j) sum += block(o, j) * input(j);
        out_row[o] = static_cast<float>(sum);
      }
    };
    if (schema_.feature(f).kind == SpadeFeatureKind::discrete) {
      Tensor<float, 2> rows({w.table.size(0), row_stride_});
      const int threads =
          threads_for_products(get_num_threads(), w.table.size(0) * width * d_model_);
      parallel_for(w.table.size(0), threads, [&](Index id) {
        std::vector<double> embedding(static_cast<std::size_t>(width));
        for (Index j = 0; j < width; ++j) embedding[j] = w.table(id, j);
        if (!w.norm_weight.is_null())
          layer_norm(embedding, w.norm_weight, w.norm_bias, weights.norm_eps);
        project([&](Index j) { return embedding[j]; }, &rows(id, 0));
      });
      discrete_rows_.push_back(std::move(rows));
    } else {
      for (Index k = 0; k < w.hidden_weight.size(0); ++k, ++dense_row) {
        project([&](Index j) { return static_cast<double>(w.output_weight(j, k)); },
                &dense_rows_(dense_row, 0));
        hidden_weight_.push_back(w.hidden_weight(k, 0));
        hidden_bias_.push_back(w.hidden_bias(k));
      }
      for (Index o = 0; o < d_model_; ++o)
        for (Index j = 0; j < width; ++j) bias[o] += block(o, j) * w.output_bias(j);
    }
    offset += width;
  }
  for (Index c = 0; c < condition_dim_; ++c, ++dense_row)
    for (Index o = 0; o < d_model_; ++o) dense_rows_(dense_row, o) = projection(o, offset + c);
  for (Index o = 0; o < d_model_; ++o) bias_(o) = static_cast<float>(bias[o]);
}

void SpadeEmbedding::forward(TensorView<const std::int64_t, 3> ids,
                             TensorView<const float, 3> values, TensorView<float, 3> out,
                             TensorView<const float, 3> condition, int num_threads) const {
  constexpr const char* kFunction = "SpadeEmbedding.forward";
  detail::require_valid_view(kFunction, "out", out);
  const Index batch = out.size(0), steps = out.size(1);
  detail::require_extent(kFunction, "out", out, 2, "d_model", d_model_);
  detail::require_unit_inner_stride(kFunction, "out", out);
  require_feature_tensor(kFunction, "ids", ids, schema_.num_discrete(), kDiscreteCount, batch,
                         steps);
  require_feature_tensor(kFunction, "values", values, schema_.num_continuous(), kContinuousCount,
                         batch, steps);
  require_feature_tensor(kFunction, "condition", condition, condition_dim_, "condition_dim", batch,
                         steps);
  detail::require_disjoint(kFunction, "out", out, "ids", ids);
  detail::require_disjoint(kFunction, "out", out, "values", values);
  detail::require_disjoint(kFunction, "out", out, "condition", condition);
  const int threads = resolve_threads(kFunction, num_threads);
  require_valid_tokens(kFunction, schema_, ids, values, {}, threads);
  require_finite_condition(kFunction, condition);

  detail::SpadeEmbeddingPlan plan;
  plan.ids = ids;
  plan.values = values;
  plan.condition = condition;
  plan.out = out;
  std::vector<const float*> tables;
  std::vector<std::int64_t> pad_ids;
  for (Index column = 0; column < schema_.num_discrete(); ++column) {
    tables.push_back(discrete_rows_[static_cast<std::size_t>(column)].data());
    pad_ids.push_back(schema_.feature(schema_.discrete_features()[column]).pad_id);
  }
  plan.tables = tables.data();
  plan.pad_ids = pad_ids.data();
  plan.num_discrete = schema_.num_discrete();
  plan.hidden_sizes = hidden_sizes_.data();
  plan.num_continuous = schema_.num_continuous();
  plan.hidden_weight = hidden_weight_.data();
  plan.hidden_bias = hidden_bias_.data();
  plan.dense_rows = dense_rows_.data();
  plan.bias = bias_.data();
  plan.pad_row = pad_row_.data();
  plan.row_stride = row_stride_;
  plan.d_model = d_model_;
  plan.dense_inputs = dense_inputs_;
  plan.condition_dim = condition_dim_;
  plan.num_threads = threads;
  detail::kernels<float>().spade_embedding(plan);
}

// ---------------------------------------------------------------------------------------------
// The embedding's backward.

namespace {

constexpr const char* kBackward = "spade_embedding_backward";

// A gradient view: null, or valid with its weight's shape (and then its weight is given).
template <int Rank>
void require_gradient(const std::string& name, const TensorView<float, Rank>& gradient,
                      const TensorView<const float, Rank>& weight) {
  if (gradient.is_null()) return;
  check(!weight.is_null(), kBackward, ": gradients.", name, " is given but its weight is not");
  detail::require_valid_view(kBackward, ("gradients." + name).c_str(), gradient);
  for (int dim = 0; dim < Rank; ++dim)
    check(gradient.size(dim) == weight.size(dim), kBackward, ": gradients.", name, ".shape[", dim,
          "] must be ", weight.size(dim), " (the weight's), got ", gradient.size(dim));
}

// The normalized rows of a discrete feature's table (after its LayerNorm, if any), in double,
// with what the LayerNorm's backward needs: the centered-and-scaled rows and 1 / std.
struct NormalizedTable {
  std::vector<double> rows;         // [V, E]: the embedding of each id
  std::vector<double> normalized;   // [V, E]: (x - mean) / std (LayerNorm only)
  std::vector<double> inverse_std;  // [V]
};

NormalizedTable normalize_table(const SpadeFeatureWeights& w, double eps) {
  const Index vocab = w.table.size(0), width = w.table.size(1);
  NormalizedTable table;
  table.rows.resize(static_cast<std::size_t>(vocab * width));
  const bool norm = !w.norm_weight.is_null();
  if (norm) {
    table.normalized.resize(table.rows.size());
    table.inverse_std.resize(static_cast<std::size_t>(vocab));
  }
  for (Index v = 0; v < vocab; ++v) {
    double* row = table.rows.data() + v * width;
    for (Index j = 0; j < width; ++j) row[j] = w.table(v, j);
    if (!norm) continue;
    double mean = 0;
    for (Index j = 0; j < width; ++j) mean += row[j];
    mean /= static_cast<double>(width);
    double variance = 0;
    for (Index j = 0; j < width; ++j) variance += (row[j] - mean) * (row[j] - mean);
    const double inverse_std = 1.0 / std::sqrt(variance / static_cast<double>(width) + eps);
    table.inverse_std[static_cast<std::size_t>(v)] = inverse_std;
    for (Index j = 0; j < width; ++j) {
      const double normalized = (row[j] - mean) * inverse_std;
      table.normalized[static_cast<std::size_t>(v * width + j)] = normalized;
      row[j] = normalized * w.norm_weight(j) + w.norm_bias(j);
    }
  }
  return table;
}

}  // namespace

void spade_embedding_backward(const SpadeSchema& schema, const SpadeEmbeddingWeights& weights,
                              TensorView<const std::int64_t, 3> ids,
                              TensorView<const float, 3> values,
                              TensorView<const float, 3> condition,
                              TensorView<const float, 3> grad_out,
                              const SpadeEmbeddingGradients& gradients, int num_threads) {
  const WeightLayout layout = validate_weights(schema, weights);
  const Index num_features = schema.num_features(), d_model = layout.d_model;
  detail::require_valid_view(kBackward, "grad_out", grad_out);
  detail::require_extent(kBackward, "grad_out", grad_out, 2, "d_model", d_model);
  detail::require_unit_inner_stride(kBackward, "grad_out", grad_out);
  const Index batch = grad_out.size(0), steps = grad_out.size(1);
  require_feature_tensor(kBackward, "ids", ids, schema.num_discrete(), kDiscreteCount, batch,
                         steps);
  require_feature_tensor(kBackward, "values", values, schema.num_continuous(), kContinuousCount,
                         batch, steps);
  require_feature_tensor(kBackward, "condition", condition, layout.condition_dim, "condition_dim",
                         batch, steps);
  check(gradients.features.empty() || static_cast<Index>(gradients.features.size()) == num_features,
        kBackward, ": gradients.features must hold one entry per schema feature (", num_features,
        ") or none, got ", gradients.features.size());
  for (Index f = 0; f < static_cast<Index>(gradients.features.size()); ++f) {
    const SpadeFeatureGradients& g = gradients.features[static_cast<std::size_t>(f)];
    const SpadeFeatureWeights& w = weights.features[static_cast<std::size_t>(f)];
    require_gradient<2>(weight_name(schema, f, "table"), g.table, w.table);
    require_gradient<1>(weight_name(schema, f, "norm_weight"), g.norm_weight, w.norm_weight);
    require_gradient<1>(weight_name(schema, f, "norm_bias"), g.norm_bias, w.norm_bias);
    require_gradient<2>(weight_name(schema, f, "hidden_weight"), g.hidden_weight, w.hidden_weight);
    require_gradient<1>(weight_name(schema, f, "hidden_bias"), g.hidden_bias, w.hidden_bias);
    require_gradient<2>(weight_name(schema, f, "output_weight"), g.output_weight, w.output_weight);
    require_gradient<1>(weight_name(schema, f, "output_bias"), g.output_bias, w.output_bias);
  }
  require_gradient<2>("projection_weight", gradients.projection_weight, weights.projection_weight);
  require_gradient<1>("projection_bias", gradients.projection_bias, weights.projection_bias);
  if (!gradients.condition.is_null()) {
    check(!condition.is_null(), kBackward, ": gradients.condition is given but condition is not");
    detail::require_valid_view(kBackward, "gradients.condition", gradients.condition);
    for (int dim = 0; dim < 3; ++dim)
      check(gradients.condition.size(dim) == condition.size(dim), kBackward,
            ": gradients.condition.shape[", dim, "] must be ", condition.size(dim),
            " (condition's), got ", gradients.condition.size(dim));
    detail::require_disjoint(kBackward, "gradients.condition", gradients.condition, "grad_out",
                             grad_out);
  }
  const int threads = resolve_threads(kBackward, num_threads);
  require_valid_tokens(kBackward, schema, ids, values, {}, threads);
  require_finite_condition(kBackward, condition);

  // The projection's block of each feature (the identity in sum mode) and the folded dense rows:
  // projection times each hidden unit's output column, then the condition columns.
  const Index row_stride =
      (d_model + detail::kSpadeRowFloats - 1) / detail::kSpadeRowFloats * detail::kSpadeRowFloats;
  const TensorView<const float, 2> projection =
      layout.concat ? weights.projection_weight : TensorView<const float, 2>();
  std::vector<Index> offsets;
  Index concat_width = 0;
  for (Index width : layout.widths) {
    offsets.push_back(concat_width);
    concat_width += width;
  }
  const auto block_of = [&](Index f) {
    return ProjectionBlock{projection, layout.concat ? offsets[static_cast<std::size_t>(f)] : 0};
  };
  const Index dense_inputs = layout.hidden_total + layout.condition_dim;
  std::vector<float> dense_rows(static_cast<std::size_t>(dense_inputs * row_stride), 0.0f);
  std::vector<float> hidden_weight, hidden_bias;
  {
    Index dense_row = 0;
    for (Index f : schema.continuous_features()) {
      const SpadeFeatureWeights& w = weights.features[static_cast<std::size_t>(f)];
      const ProjectionBlock block = block_of(f);
      const Index width = layout.widths[static_cast<std::size_t>(f)];
      for (Index k = 0; k < w.hidden_weight.size(0); ++k, ++dense_row) {
        for (Index o = 0; o < d_model; ++o) {
          double sum = 0;
          for (Index j = 0; j < width; ++j) sum += block(o, j) * w.output_weight(j, k);
          dense_rows[static_cast<std::size_t>(dense_row * row_stride + o)] =
              static_cast<float>(sum);
        }
        hidden_weight.push_back(w.hidden_weight(k, 0));
        hidden_bias.push_back(w.hidden_bias(k));
      }
    }
    for (Index c = 0; c < layout.condition_dim; ++c, ++dense_row)
      for (Index o = 0; o < d_model; ++o)
        dense_rows[static_cast<std::size_t>(dense_row * row_stride + o)] =
            projection(o, concat_width + c);
  }

  // The kernel's sums, rows of sum_stride floats.
  const Index sum_stride =
      (d_model + detail::kSpadeSumFloats - 1) / detail::kSpadeSumFloats * detail::kSpadeSumFloats;
  std::vector<std::vector<float>> table_sums;
  std::vector<float*> table_pointers;
  std::vector<std::int64_t> pad_ids;
  for (Index f : schema.discrete_features()) {
    table_sums.emplace_back(static_cast<std::size_t>(schema.feature(f).vocab_size * sum_stride),
                            0.0f);
    table_pointers.push_back(table_sums.back().data());
    pad_ids.push_back(schema.feature(f).pad_id);
  }
  std::vector<float> dense_sums(static_cast<std::size_t>(dense_inputs * sum_stride), 0.0f);
  std::vector<float> grad_sum(static_cast<std::size_t>(sum_stride), 0.0f);
  std::vector<double> hidden_grads(static_cast<std::size_t>(2 * layout.hidden_total), 0.0);
  detail::SpadeEmbeddingBackwardPlan plan;
  plan.ids = ids;
  plan.values = values;
  plan.condition = condition;
  plan.grad_out = grad_out;
  plan.grad_condition = gradients.condition;
  plan.pad_ids = pad_ids.data();
  plan.num_discrete = schema.num_discrete();
  plan.hidden_sizes = layout.hidden_sizes.data();
  plan.num_continuous = schema.num_continuous();
  plan.hidden_weight = hidden_weight.data();
  plan.hidden_bias = hidden_bias.data();
  plan.dense_rows = dense_rows.data();
  plan.row_stride = row_stride;
  plan.sum_stride = sum_stride;
  plan.d_model = d_model;
  plan.dense_inputs = dense_inputs;
  plan.condition_dim = layout.condition_dim;
  plan.table_sums = table_pointers.data();
  plan.dense_sums = dense_sums.data();
  plan.grad_sum = grad_sum.data();
  plan.hidden_grads = hidden_grads.data();
  plan.num_threads = threads;
  if (batch * steps > 0) detail::kernels<float>().spade_embedding_backward(plan);

  // Finish in double. sum_o block(o, j) * rows[o] for the E columns j of feature f.
  const auto back_project = [&](const ProjectionBlock& block, Index width, const float* rows,
                                std::vector<double>& out) {
    out.assign(static_cast<std::size_t>(width), 0.0);
    for (Index o = 0; o < d_model; ++o)
      for (Index j = 0; j < width; ++j) out[static_cast<std::size_t>(j)] += block(o, j) * rows[o];
  };
  const bool want_features = !gradients.features.empty();
  const TensorView<float, 2> grad_projection = gradients.projection_weight;
  if (!gradients.projection_bias.is_null())
    for (Index o = 0; o < d_model; ++o) gradients.projection_bias(o) = grad_sum[o];
  Index dense_row = 0;
  std::vector<double> column;
  for (Index f = 0; f < num_features; ++f) {
    const SpadeFeatureWeights& w = weights.features[static_cast<std::size_t>(f)];
    const ProjectionBlock block = block_of(f);
    const Index width = layout.widths[static_cast<std::size_t>(f)];
    const Index offset = offsets[static_cast<std::size_t>(f)];
    if (schema.feature(f).kind == SpadeFeatureKind::discrete) {
      const float* sums = table_sums[static_cast<std::size_t>(schema.column(f))].data();
      const Index vocab = w.table.size(0);
      const NormalizedTable table = normalize_table(w, weights.norm_eps);
      const int product_threads = threads_for_products(threads, vocab * width * d_model);
      if (!grad_projection.is_null()) {
        parallel_for(d_model, product_threads, [&](Index o) {
          for (Index j = 0; j < width; ++j) {
            double sum = 0;
            for (Index v = 0; v < vocab; ++v)
              sum += static_cast<double>(sums[v * sum_stride + o]) *
                     table.rows[static_cast<std::size_t>(v * width + j)];
            grad_projection(o, offset + j) = static_cast<float>(sum);
          }
        });
      }
      if (!want_features) continue;
      const SpadeFeatureGradients& g = gradients.features[static_cast<std::size_t>(f)];
      // d loss / d embedding, per id, then through the LayerNorm.
      std::vector<double> grad_rows(static_cast<std::size_t>(vocab * width));
      parallel_for(vocab, product_threads, [&](Index v) {
        std::vector<double> row;
        back_project(block, width, sums + v * sum_stride, row);
        std::copy(row.begin(), row.end(), grad_rows.begin() + v * width);
      });
      const bool norm = !w.norm_weight.is_null();
      for (Index j = 0; j < width && norm; ++j) {
        double grad_gamma = 0, grad_beta = 0;
        for (Index v = 0; v < vocab; ++v) {
          const double gy = grad_rows[static_cast<std::size_t>(v * width + j)];
          grad_gamma += gy * table.normalized[static_cast<std::size_t>(v * width + j)];
          grad_beta += gy;
        }
        if (!g.norm_weight.is_null()) g.norm_weight(j) = static_cast<float>(grad_gamma);
        if (!g.norm_bias.is_null()) g.norm_bias(j) = static_cast<float>(grad_beta);
      }
      if (g.table.is_null()) continue;
      for (Index v = 0; v < vocab; ++v) {
        const double* gy = grad_rows.data() + v * width;
        if (!norm) {
          for (Index j = 0; j < width; ++j) g.table(v, j) = static_cast<float>(gy[j]);
          continue;
        }
        // dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = gy * gamma.
        const double* xhat = table.normalized.data() + v * width;
        double mean = 0, mean_x = 0;
        for (Index j = 0; j < width; ++j) {
          const double dxhat = gy[j] * w.norm_weight(j);
          mean += dxhat;
          mean_x += dxhat * xhat[j];
        }
        mean /= static_cast<double>(width);
        mean_x /= static_cast<double>(width);
        const double inverse_std = table.inverse_std[static_cast<std::size_t>(v)];
        for (Index j = 0; j < width; ++j)
          g.table(v, j) = static_cast<float>(inverse_std *
                                             (gy[j] * w.norm_weight(j) - mean - xhat[j] * mean_x));
      }
    } else {
      const Index hidden = w.hidden_weight.size(0);
      const float* sums = dense_sums.data() + dense_row * sum_stride;  // [H, sum_stride]
      if (!grad_projection.is_null()) {
        parallel_for(
            d_model, threads_for_products(threads, hidden * width * d_model), [&](Index o) {
              for (Index j = 0; j < width; ++j) {
                double sum = static_cast<double>(grad_sum[o]) * w.output_bias(j);
                for (Index k = 0; k < hidden; ++k)
                  sum += static_cast<double>(sums[k * sum_stride + o]) * w.output_weight(j, k);
                grad_projection(o, offset + j) = static_cast<float>(sum);
              }
            });
      }
      if (want_features) {
        const SpadeFeatureGradients& g = gradients.features[static_cast<std::size_t>(f)];
        if (!g.output_weight.is_null())
          for (Index k = 0; k < hidden; ++k) {
            back_project(block, width, sums + k * sum_stride, column);
            for (Index j = 0; j < width; ++j)
              g.output_weight(j, k) = static_cast<float>(column[static_cast<std::size_t>(j)]);
          }
        if (!g.output_bias.is_null()) {
          back_project(block, width, grad_sum.data(), column);
          for (Index j = 0; j < width; ++j)
            g.output_bias(j) = static_cast<float>(column[static_cast<std::size_t>(j)]);
        }
        for (Index k = 0; k < hidden; ++k) {
          if (!g.hidden_weight.is_null())
            g.hidden_weight(k, 0) =
                static_cast<float>(hidden_grads[static_cast<std::size_t>(dense_row + k)]);
          if (!g.hidden_bias.is_null())
            g.hidden_bias(k) = static_cast<float>(
                hidden_grads[static_cast<std::size_t>(layout.hidden_total + dense_row + k)]);
        }
      }
      dense_row += hidden;
    }
  }
  if (!grad_projection.is_null())
    for (Index c = 0; c < layout.condition_dim; ++c)
      for (Index o = 0; o < d_model; ++o)
        grad_projection(o, concat_width + c) =
            dense_sums[static_cast<std::size_t>((layout.hidden_total + c) * sum_stride + o)];
}

// ---------------------------------------------------------------------------------------------
// Generation.

SpadeDecoder::SpadeDecoder(SpadeSchema schema, Index batch, Index max_tokens)
    : schema_(std::move(schema)), batch_(batch), max_tokens_(max_tokens) {
  constexpr const char* kFunction = "SpadeDecoder";
  check(schema_.num_features() > 0, kFunction, ": the schema has no features");
  check(schema_.feature(0).kind == SpadeFeatureKind::discrete, kFunction,
        ": the first feature (lowest shift) must be discrete, since its PAD or MISSING id is the "
        "stop token; got continuous feature \"",
        schema_.feature(0).name, "\"");
  check(batch >= 0, kFunction, ": batch must be >= 0, got ", batch);
  check(max_tokens >= 0, kFunction, ": max_tokens must be >= 0, got ", max_tokens);
  ids_ = Tensor<std::int64_t, 3>({batch, max_tokens, schema_.num_discrete()}, "SpadeDecoder ids");
  values_ = Tensor<float, 3>({batch, max_tokens, schema_.num_continuous()}, "SpadeDecoder values");
  lengths_.assign(static_cast<std::size_t>(batch), -1);
  for (Index column = 0; column < schema_.num_discrete(); ++column) {
    const Index pad = schema_.feature(schema_.discrete_features()[column]).pad_id;
    for (Index b = 0; b < batch; ++b)
      for (Index i = 0; i < max_tokens; ++i) ids_(b, i, column) = pad;
  }
}

bool SpadeDecoder::finished(Index b) const {
  const Index length = lengths_[static_cast<std::size_t>(b)];
  return length >= 0 && current_step_ >= length + schema_.max_shift() - 1;
}

bool SpadeDecoder::done() const {
  for (Index b = 0; b < batch_; ++b)
    if (!finished(b)) return false;
  return true;
}

void SpadeDecoder::step(TensorView<const std::int64_t, 2> predicted_ids,
                        TensorView<const float, 2> predicted_values,
                        TensorView<std::int64_t, 2> step_ids, TensorView<float, 2> step_values,
                        TensorView<std::int64_t, 1> completed) {
  constexpr const char* kFunction = "SpadeDecoder.step";
  const Index discrete = schema_.num_discrete(), continuous = schema_.num_continuous();
  require_feature_tensor(kFunction, "predicted_ids", as_single_step(predicted_ids), discrete,
                         kDiscreteCount, batch_, 1);
  require_feature_tensor(kFunction, "predicted_values", as_single_step(predicted_values),
                         continuous, kContinuousCount, batch_, 1);
  require_feature_tensor(kFunction, "step_ids", as_single_step(step_ids), discrete, kDiscreteCount,
                         batch_, 1);
  require_feature_tensor(kFunction, "step_values", as_single_step(step_values), continuous,
                         kContinuousCount, batch_, 1);
  if (!completed.is_null()) {
    detail::require_valid_view(kFunction, "completed", completed);
    detail::require_extent(kFunction, "completed", completed, 0, "B", batch_);
  }
  require_valid_tokens(kFunction, schema_, as_single_step(predicted_ids),
                       as_single_step(predicted_values), {}, 1);

  const Index step = current_step_ + 1;
  const Index max_shift = schema_.max_shift();
  for (Index b = 0; b < batch_; ++b) {
    Index& length = lengths_[static_cast<std::size_t>(b)];
    for (Index f = 0; f < schema_.num_features(); ++f) {
      const SpadeFeature& feature = schema_.feature(f);
      const Index column = schema_.column(f);
      const bool is_discrete = feature.kind == SpadeFeatureKind::discrete;
      const Index token = step - feature.shift;
      bool emits_data = token >= 0 && (length < 0 || token < length);
      if (emits_data && f == 0) {
        const Index id = predicted_ids(b, column);
        if (id == feature.pad_id || id == feature.missing_id || token == max_tokens_) {
          length = token;  // the stop: no token at this position
          emits_data = false;
        }
      }
      if (emits_data) {
        if (is_discrete) {
          ids_(b, token, column) = step_ids(b, column) = predicted_ids(b, column);
        } else {
          values_(b, token, column) = step_values(b, column) = predicted_values(b, column);
        }
        continue;
      }
      // No data: MISSING before the stream starts and until the sequence's last step, PAD after.
      const bool missing = length < 0 || step < length + max_shift;
      if (is_discrete) {
        step_ids(b, column) = missing ? feature.missing_id : feature.pad_id;
      } else {
        step_values(b, column) = 0.0f;
      }
    }
    if (!completed.is_null()) {
      const Index token = step - max_shift;  // the last stream just emitted this token
      completed(b) = token >= 0 && (length < 0 || token < length) ? token : -1;
    }
  }
  current_step_ = step;
}

}  // namespace foveal
