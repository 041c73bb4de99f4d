// foveal/embedding/spade.hpp — SPADE split-and-delay embeddings (OPERATORS.md §6): the feature
// schema, delay / undelay, the embedding module, training helpers and the generation state
// machine.
//
// A token has F features in schema order. Discrete features travel as int64 ids in one
// tensor `ids [B, *, Fd]`, continuous ones as float values in `values [B, *, Fc]`, each in
// schema order (Fd + Fc = F); per-stream masks and logits cover all F features.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"

namespace foveal {

enum class SpadeFeatureKind { discrete, continuous };

// One feature of a token: its kind, for discrete features the vocabulary and its PAD and
// MISSING ids, and its delay `shift` (>= 1; kDefaultShift = the default, feature index + 1).
struct SpadeFeature {
  // The shift that SpadeSchema replaces by f + 1. Every other value below 1, 0 included, is
  // rejected.
  static constexpr Index kDefaultShift = std::numeric_limits<Index>::min();

  std::string name;
  SpadeFeatureKind kind = SpadeFeatureKind::discrete;
  Index vocab_size = 0;  // discrete only
  Index pad_id = 0;      // discrete only
  Index missing_id = 0;  // discrete only
  Index shift = kDefaultShift;

  // A binned feature: vocabulary num_bins + 2, PAD = 0, bins 1..num_bins, MISSING = num_bins + 1.
  static SpadeFeature binned(std::string name, Index num_bins, Index shift = kDefaultShift);
  // A continuous feature (MISSING and PAD are the value 0).
  static SpadeFeature continuous(std::string name, Index shift = kDefaultShift);
};

// The ordered features of a token. Construction validates them (non-empty, unique names,
// discrete ids inside the vocabulary, shifts >= 1 and strictly increasing) and fills default
// shifts.
class SpadeSchema {
 public:
  SpadeSchema() = default;
  explicit SpadeSchema(std::vector<SpadeFeature> features);

  const std::vector<SpadeFeature>& features() const { return features_; }
  const SpadeFeature& feature(Index f) const { return features_[static_cast<std::size_t>(f)]; }
  Index num_features() const { return static_cast<Index>(features_.size()); }
  Index num_discrete() const { return static_cast<Index>(discrete_.size()); }
  Index num_continuous() const { return static_cast<Index>(continuous_.size()); }
  // Schema indices of the discrete / continuous features, in order (ids / values columns).
  const std::vector<Index>& discrete_features() const { return discrete_; }
  const std::vector<Index>& continuous_features() const { return continuous_; }
  // The column of feature f in ids (discrete) or values (continuous).
  Index column(Index f) const { return columns_[static_cast<std::size_t>(f)]; }
  // The largest shift: the delayed sequence of n tokens has n + max_shift() steps.
  Index max_shift() const { return features_.empty() ? 0 : features_.back().shift; }

 private:
  std::vector<SpadeFeature> features_;
  std::vector<Index> discrete_, continuous_, columns_;
};

// ids: [B, n, Fd]  values: [B, n, Fc] (may be null when Fc = 0)  lengths: [B] (null: all n)
//   ->  delayed_ids: [B, T, Fd]  delayed_values: [B, T, Fc]  mask: [B, T, F],  T = n + max shift
// Applies the delay pattern: delayed[t, f] = token[t - s_f, f] for s_f <= t < s_f + len,
// MISSING (continuous: 0) at the other steps t < len + max shift, PAD (continuous: 0) beyond;
// mask is 1 exactly at the data steps. Tokens at positions >= len are not read. Validates
// everything (ids in the vocabulary, finite values, 0 <= len <= n) before writing.
void spade_delay(const SpadeSchema& schema, TensorView<const std::int64_t, 3> ids,
                 TensorView<const float, 3> values, TensorView<const std::int64_t, 1> lengths,
                 TensorView<std::int64_t, 3> delayed_ids, TensorView<float, 3> delayed_values,
                 TensorView<std::uint8_t, 3> mask, int num_threads = 0);

// delayed_ids: [B, T, Fd]  delayed_values: [B, T, Fc]  ->  ids: [B, n, Fd]  values: [B, n, Fc]
// with n = T - max shift: the inverse of spade_delay, token[i, f] = delayed[i + s_f, f]
// (positions past a sequence's length get what its delayed stream holds there: MISSING, or PAD
// from step len + max shift on; continuous 0).
void spade_undelay(const SpadeSchema& schema, TensorView<const std::int64_t, 3> delayed_ids,
                   TensorView<const float, 3> delayed_values, TensorView<std::int64_t, 3> ids,
                   TensorView<float, 3> values, int num_threads = 0);

// logits: [B, T, F, V]  ->  out: [B, n, F, V], n = T - max shift: per-step predictions put back
// in token order, out[i, f, :] = logits[i + s_f, f, :].
void spade_undelay_logits(const SpadeSchema& schema, TensorView<const float, 4> logits,
                          TensorView<float, 4> out, int num_threads = 0);
void spade_undelay_logits(const SpadeSchema& schema, TensorView<const double, 4> logits,
                          TensorView<double, 4> out, int num_threads = 0);

// ---------------------------------------------------------------------------------------------
// Training.

// The next-step pairs of a delayed tensor: the model reads steps 0..T-2 and predicts 1..T-1.
template <typename T>
struct SpadeNextStep {
  TensorView<T, 3> inputs;   // [B, T - 1, C], steps 0..T-2
  TensorView<T, 3> targets;  // [B, T - 1, C], steps 1..T-1
};

// delayed: [B, T, C] with T >= 1  ->  {inputs, targets}: views of the same memory, no copy.
template <typename T>
SpadeNextStep<T> spade_next_step(TensorView<T, 3> delayed) {
  check(delayed.size(1) >= 1, "spade_next_step: delayed.shape[1] (T) must be >= 1, got ",
        delayed.size(1));
  const typename TensorView<T, 3>::Shape shape = {delayed.size(0), delayed.size(1) - 1,
                                                  delayed.size(2)};
  return {TensorView<T, 3>(delayed.data(), shape, delayed.strides()),
          TensorView<T, 3>(delayed.data() + delayed.stride(1), shape, delayed.strides())};
}

// lengths: [B]  ->  loss_mask: [B, T - 1, F] (T - 1 = loss_mask.shape[1]): the validity of the
// target step, loss_mask[b, t, f] = mask[b, t + 1, f] of spade_delay. With include_stop, the
// first stream's step after its last token (the stop the generator must learn) counts too.
void spade_loss_mask(const SpadeSchema& schema, TensorView<const std::int64_t, 1> lengths,
                     TensorView<std::uint8_t, 3> loss_mask, bool include_stop = false);

// ---------------------------------------------------------------------------------------------
// The embedding module.

enum class SpadeCombine { concat, sum };

// The trained weights of one feature, in PyTorch's layouts (Linear: [out, in]).
struct SpadeFeatureWeights {
  // Discrete: nn.Embedding and an optional LayerNorm over its output.
  TensorView<const float, 2> table;        // [V, E]
  TensorView<const float, 1> norm_weight;  // [E] or null (no LayerNorm)
  TensorView<const float, 1> norm_bias;    // [E] or null (no LayerNorm)
  // Continuous: Linear(1, H) - SiLU - Linear(H, E).
  TensorView<const float, 2> hidden_weight;  // [H, 1]
  TensorView<const float, 1> hidden_bias;    // [H]
  TensorView<const float, 2> output_weight;  // [E, H]
  TensorView<const float, 1> output_bias;    // [E]
};

struct SpadeEmbeddingWeights {
  std::vector<SpadeFeatureWeights> features;  // one per schema feature, in order
  // concat: out = projection(cat(e_0, .., e_{F-1}, condition)); sum: out = e_0 + .. + e_{F-1}
  // (every E = d_model, no projection, no condition).
  SpadeCombine combine = SpadeCombine::concat;
  TensorView<const float, 2> projection_weight;  // concat: [d_model, sum E + condition_dim]
  TensorView<const float, 1> projection_bias;    // [d_model] or null
  Index condition_dim = 0;                       // concat only
  double norm_eps = 1e-5;                        // LayerNorm epsilon
  TensorView<const float, 1> pad_vector;         // [d_model]: output at PAD steps; null = zeros
};

// The SPADE input embedding with weights copied in at construction. Construction validates the
// weights and folds everything linear into per-feature tables: a discrete feature's table
// (after its LayerNorm, which depends on the id alone) times its slice of the projection
// becomes a [V, d_model] table, and a continuous feature's second Linear is folded into the
// projection, so forward is a sum of gathered rows plus H multiply-adds of d_model per
// continuous feature. The folding runs in double precision.
class SpadeEmbedding {
 public:
  SpadeEmbedding(SpadeSchema schema, const SpadeEmbeddingWeights& weights);

  const SpadeSchema& schema() const { return schema_; }
  Index d_model() const { return d_model_; }
  Index condition_dim() const { return condition_dim_; }

  // ids: [B, T, Fd]  values: [B, T, Fc] (null when Fc = 0)  condition: [B, T, C] (null when
  // C = 0; a stride of 0 over T shares one vector per sequence)  ->  out: [B, T, d_model]
  // A step whose discrete ids are all PAD gets the pad vector. Validates every id and value
  // before writing out; out needs unit stride in its last dimension. Results are bitwise
  // identical for any thread count.
  void forward(TensorView<const std::int64_t, 3> ids, TensorView<const float, 3> values,
               TensorView<float, 3> out, TensorView<const float, 3> condition = {},
               int num_threads = 0) const;

 private:
  SpadeSchema schema_;
  Index d_model_ = 0;
  Index row_stride_ = 0;  // d_model rounded up to whole vectors
  Index condition_dim_ = 0;
  Index dense_inputs_ = 0;  // sum of H over continuous features + condition_dim
  std::vector<Tensor<float, 2>> discrete_rows_;     // per discrete feature: [V, row_stride]
  Tensor<float, 2> dense_rows_;                     // [dense_inputs, row_stride]
  Tensor<float, 1> bias_;                           // [row_stride]
  Tensor<float, 1> pad_row_;                        // [d_model]
  std::vector<Index> hidden_sizes_;                 // per continuous feature
  std::vector<float> hidden_weight_, hidden_bias_;  // all continuous features, concatenated
};

// ---------------------------------------------------------------------------------------------
// Generation.

// The bookkeeping of generating B sequences step by step. The model reads the steps emitted so
// far (step 0 is all MISSING) and predicts every stream's value for the next step; step()
// forces MISSING before a stream starts, ends a sequence when the first stream predicts its
// PAD or MISSING id (the stop) or reaches max_tokens, lets the later streams emit the steps
// they still owe, then emits MISSING / PAD exactly as spade_delay lays a sequence out. It
// writes each stream's value into its token at once, so a token is complete (and reported)
// the step its last stream emits it. The first feature must be discrete (it carries the stop).
class SpadeDecoder {
 public:
  SpadeDecoder(SpadeSchema schema, Index batch, Index max_tokens);

  // predicted_ids: [B, Fd]  predicted_values: [B, Fc] (null when Fc = 0)  ->  step_ids: [B, Fd]
  // step_values: [B, Fc]: the next step to feed back to the model, and completed: [B] (may be
  // null), the index of the token each sequence completed at this step or -1. Validates the
  // predictions (ids in the vocabulary, finite values) before changing any state.
  void step(TensorView<const std::int64_t, 2> predicted_ids,
            TensorView<const float, 2> predicted_values, TensorView<std::int64_t, 2> step_ids,
            TensorView<float, 2> step_values, TensorView<std::int64_t, 1> completed = {});

  const SpadeSchema& schema() const { return schema_; }
  Index batch() const { return batch_; }
  Index max_tokens() const { return max_tokens_; }
  // Index of the last step emitted (0 before the first call: the start step).
  Index current_step() const { return current_step_; }
  // The number of tokens of sequence b once its first stream has stopped, else -1.
  Index length(Index b) const { return lengths_[static_cast<std::size_t>(b)]; }
  // True once every stream of sequence b has emitted all its tokens.
  bool finished(Index b) const;
  // True once every sequence is finished.
  bool done() const;
  // The tokens so far, undelayed: ids [B, max_tokens, Fd] and values [B, max_tokens, Fc];
  // PAD / 0 where no value has arrived.
  TensorView<const std::int64_t, 3> ids() const { return ids_.view(); }
  TensorView<const float, 3> values() const { return values_.view(); }

 private:
  SpadeSchema schema_;
  Index batch_ = 0;
  Index max_tokens_ = 0;
  Index current_step_ = 0;
  std::vector<Index> lengths_;
  Tensor<std::int64_t, 3> ids_;
  Tensor<float, 3> values_;
};

}  // namespace foveal
