// foveal/embedding/spade/embedding.hpp — SPADE (docs/spade.md): the embedding module: one embedding
// per feature, combined.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"
#include "foveal/embedding/spade/schema.hpp"

namespace foveal {

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

// The gradients of SpadeEmbedding's weights, in the layouts of SpadeFeatureWeights and
// SpadeEmbeddingWeights. Every view that is given is overwritten (not accumulated into); a null
// view is not computed. A gradient may be given only where its weight is.
struct SpadeFeatureGradients {
  TensorView<float, 2> table;          // [V, E]
  TensorView<float, 1> norm_weight;    // [E]
  TensorView<float, 1> norm_bias;      // [E]
  TensorView<float, 2> hidden_weight;  // [H, 1]
  TensorView<float, 1> hidden_bias;    // [H]
  TensorView<float, 2> output_weight;  // [E, H]
  TensorView<float, 1> output_bias;    // [E]
};

struct SpadeEmbeddingGradients {
  std::vector<SpadeFeatureGradients> features;  // one per schema feature, or empty (none)
  TensorView<float, 2> projection_weight;       // [d_model, sum E + condition_dim]
  TensorView<float, 1> projection_bias;         // [d_model]
  TensorView<float, 3> condition;               // [B, T, condition_dim]: d loss / d condition
};

// The backward of SpadeEmbedding(schema, weights).forward(ids, values, out, condition): from
// grad_out = d loss / d out [B, T, d_model] (unit stride in its last dimension), the gradient of
// every weight (the pad vector is a constant: steps whose discrete ids are all PAD give no
// gradient). The sums over steps run in a fixed order: results are bitwise identical for any
// thread count. Validates weights and inputs as the constructor and forward do, and the
// gradients' shapes, before writing anything.
void spade_embedding_backward(const SpadeSchema& schema, const SpadeEmbeddingWeights& weights,
                              TensorView<const std::int64_t, 3> ids,
                              TensorView<const float, 3> values,
                              TensorView<const float, 3> condition,
                              TensorView<const float, 3> grad_out,
                              const SpadeEmbeddingGradients& gradients, int num_threads = 0);

}  // namespace foveal
