// tests/reference/spade_reference.hpp — the executable spec of SPADE (docs/spade.md).
//
// Plain float64 loops over the formulas, one feature of one token at a time, no folding:
//   delayed[t, f] = token[t - s_f, f] for s_f <= t < s_f + len ; MISSING (continuous 0) at the
//   other steps t < len + max s ; PAD (continuous 0) beyond ; mask = 1 exactly at data steps.
//   embedding: e_f = LayerNorm?(table_f[id]) or Linear(H, E)(SiLU(Linear(1, H)(x))) ;
//   out = W cat(e_0 .. e_{F-1}, condition) + b (concat) or sum_f e_f (sum) ; PAD steps (all
//   discrete ids PAD) give the pad vector.
// Tokens of all features travel together as doubles, [B, L, F] row-major, in schema order.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace foveal::reference {

struct SpadeReferenceFeature {
  bool discrete = true;
  std::int64_t vocab_size = 0, pad_id = 0, missing_id = 0, shift = 1;
  // Discrete: table [V, E], LayerNorm weight and bias [E] (empty: none).
  std::vector<double> table, norm_weight, norm_bias;
  // Continuous: hidden_weight [H] (Linear(1, H)), hidden_bias [H], output_weight [E, H],
  // output_bias [E].
  std::vector<double> hidden_weight, hidden_bias, output_weight, output_bias;
  std::int64_t width = 0;   // E
  std::int64_t hidden = 0;  // H

  double missing_value() const { return discrete ? static_cast<double>(missing_id) : 0.0; }
  double pad_value() const { return discrete ? static_cast<double>(pad_id) : 0.0; }
};

// tokens [B, n, F] -> delayed [B, T, F] and mask [B, T, F], T = n + max shift.
inline void spade_delay_reference(const std::vector<SpadeReferenceFeature>& features,
                                  std::int64_t batch, std::int64_t n,
                                  const std::vector<std::int64_t>& lengths,
                                  const std::vector<double>& tokens, std::vector<double>& delayed,
                                  std::vector<double>& mask) {
  const std::int64_t num_features = static_cast<std::int64_t>(features.size());
  const std::int64_t max_shift = features.back().shift;
  const std::int64_t steps = n + max_shift;
  delayed.assign(batch * steps * num_features, 0.0);
  mask.assign(batch * steps * num_features, 0.0);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < steps; ++t)
      for (std::int64_t f = 0; f < num_features; ++f) {
        const SpadeReferenceFeature& feature = features[f];
        const std::int64_t at = (b * steps + t) * num_features + f;
        const std::int64_t source = t - feature.shift;
        if (source >= 0 && source < lengths[b]) {
          delayed[at] = tokens[(b * n + source) * num_features + f];
          mask[at] = 1.0;
        } else if (t < lengths[b] + max_shift) {
          delayed[at] = feature.missing_value();
        } else {
          delayed[at] = feature.pad_value();
        }
      }
}

inline double silu_reference(double z) { return z / (1.0 + std::exp(-z)); }

struct SpadeReferenceModel {
  std::vector<SpadeReferenceFeature> features;
  bool sum = false;
  std::int64_t d_model = 0, condition_dim = 0;
  std::vector<double> projection_weight;  // [d_model, sum E + C] (concat)
  std::vector<double> projection_bias;    // [d_model] or empty
  std::vector<double> pad_vector;         // [d_model] or empty (zeros)
  double norm_eps = 1e-5;
};

// The embedding e_f of one feature of one token.
inline std::vector<double> spade_feature_embedding_reference(const SpadeReferenceFeature& feature,
                                                             double token, double eps) {
  std::vector<double> embedding(feature.width, 0.0);
  if (feature.discrete) {
    const std::int64_t id = static_cast<std::int64_t>(token);
    for (std::int64_t j = 0; j < feature.width; ++j)
      embedding[j] = feature.table[id * feature.width + j];
    if (!feature.norm_weight.empty()) {
      double mean = 0, variance = 0;
      for (double value : embedding) mean += value;
      mean /= feature.width;
      for (double value : embedding) variance += (value - mean) * (value - mean);
      variance /= feature.width;
      for (std::int64_t j = 0; j < feature.width; ++j)
        embedding[j] = (embedding[j] - mean) / std::sqrt(variance + eps) * feature.norm_weight[j] +
                       feature.norm_bias[j];
    }
    return embedding;
  }
  std::vector<double> hidden(feature.hidden);
  for (std::int64_t k = 0; k < feature.hidden; ++k)
    hidden[k] = silu_reference(feature.hidden_weight[k] * token + feature.hidden_bias[k]);
  for (std::int64_t j = 0; j < feature.width; ++j) {
    double sum = feature.output_bias[j];
    for (std::int64_t k = 0; k < feature.hidden; ++k)
      sum += feature.output_weight[j * feature.hidden + k] * hidden[k];
    embedding[j] = sum;
  }
  return embedding;
}

// tokens [B, T, F], condition [B, T, C] (empty when C = 0) -> out [B, T, d_model].
inline void spade_embedding_reference(const SpadeReferenceModel& model, std::int64_t batch,
                                      std::int64_t steps, const std::vector<double>& tokens,
                                      const std::vector<double>& condition,
                                      std::vector<double>& out) {
  const std::int64_t num_features = static_cast<std::int64_t>(model.features.size());
  const std::int64_t d = model.d_model;
  out.assign(batch * steps * d, 0.0);
  for (std::int64_t row = 0; row < batch * steps; ++row) {
    double* out_row = &out[row * d];
    // A PAD step: every discrete feature PAD (and there is at least one).
    bool any_discrete = false, every_pad = true;
    for (std::int64_t f = 0; f < num_features; ++f) {
      const SpadeReferenceFeature& feature = model.features[f];
      if (!feature.discrete) continue;
      any_discrete = true;
      every_pad &= tokens[row * num_features + f] == static_cast<double>(feature.pad_id);
    }
    if (any_discrete && every_pad) {
      for (std::int64_t o = 0; o < d; ++o)
        out_row[o] = model.pad_vector.empty() ? 0.0 : model.pad_vector[o];
      continue;
    }
    std::vector<double> inputs;
    for (std::int64_t f = 0; f < num_features; ++f) {
      const auto embedding = spade_feature_embedding_reference(
          model.features[f], tokens[row * num_features + f], model.norm_eps);
      inputs.insert(inputs.end(), embedding.begin(), embedding.end());
    }
    if (model.sum) {
      for (std::int64_t f = 0; f < num_features; ++f)
        for (std::int64_t o = 0; o < d; ++o) out_row[o] += inputs[f * d + o];
      continue;
    }
    for (std::int64_t c = 0; c < model.condition_dim; ++c)
      inputs.push_back(condition[row * model.condition_dim + c]);
    const std::int64_t width = static_cast<std::int64_t>(inputs.size());
    for (std::int64_t o = 0; o < d; ++o) {
      double sum = model.projection_bias.empty() ? 0.0 : model.projection_bias[o];
      for (std::int64_t k = 0; k < width; ++k)
        sum += model.projection_weight[o * width + k] * inputs[k];
      out_row[o] = sum;
    }
  }
}

// The gradients of every weight of a SpadeReferenceModel (layouts as its weights) and of the
// condition [B, T, C].
struct SpadeReferenceFeatureGradients {
  std::vector<double> table, norm_weight, norm_bias;
  std::vector<double> hidden_weight, hidden_bias, output_weight, output_bias;
};
struct SpadeReferenceGradients {
  std::vector<SpadeReferenceFeatureGradients> features;
  std::vector<double> projection_weight, projection_bias, condition;
};

// The backward of spade_embedding_reference, step by step by the chain rule (no folding):
// grad_out [B, T, d_model] -> the gradients. PAD steps give none.
inline SpadeReferenceGradients spade_embedding_backward_reference(
    const SpadeReferenceModel& model, std::int64_t batch, std::int64_t steps,
    const std::vector<double>& tokens, const std::vector<double>& condition,
    const std::vector<double>& grad_out) {
  const std::int64_t num_features = static_cast<std::int64_t>(model.features.size());
  const std::int64_t d = model.d_model, C = model.condition_dim;
  SpadeReferenceGradients grads;
  std::int64_t width_total = 0;
  for (const SpadeReferenceFeature& feature : model.features) {
    SpadeReferenceFeatureGradients g;
    if (feature.discrete) {
      g.table.assign(feature.vocab_size * feature.width, 0.0);
      g.norm_weight.assign(feature.norm_weight.size(), 0.0);
      g.norm_bias.assign(feature.norm_bias.size(), 0.0);
    } else {
      g.hidden_weight.assign(feature.hidden, 0.0);
      g.hidden_bias.assign(feature.hidden, 0.0);
      g.output_weight.assign(feature.width * feature.hidden, 0.0);
      g.output_bias.assign(feature.width, 0.0);
    }
    grads.features.push_back(g);
    width_total += feature.width;
  }
  const std::int64_t inputs_width = width_total + C;
  if (!model.sum) {
    grads.projection_weight.assign(d * inputs_width, 0.0);
    grads.projection_bias.assign(d, 0.0);
  }
  grads.condition.assign(batch * steps * C, 0.0);
  for (std::int64_t row = 0; row < batch * steps; ++row) {
    bool any_discrete = false, every_pad = true;
    for (std::int64_t f = 0; f < num_features; ++f) {
      if (!model.features[f].discrete) continue;
      any_discrete = true;
      every_pad &= tokens[row * num_features + f] == static_cast<double>(model.features[f].pad_id);
    }
    if (any_discrete && every_pad) continue;
    const double* g = &grad_out[row * d];
    // d loss / d (concatenated inputs).
    std::vector<double> inputs;
    for (std::int64_t f = 0; f < num_features; ++f) {
      const auto embedding = spade_feature_embedding_reference(
          model.features[f], tokens[row * num_features + f], model.norm_eps);
      inputs.insert(inputs.end(), embedding.begin(), embedding.end());
    }
    for (std::int64_t c = 0; c < C; ++c) inputs.push_back(condition[row * C + c]);
    std::vector<double> grad_inputs(inputs.size(), 0.0);
    if (model.sum) {
      for (std::int64_t f = 0; f < num_features; ++f)
        for (std::int64_t o = 0; o < d; ++o) grad_inputs[f * d + o] = g[o];
    } else {
      for (std::int64_t o = 0; o < d; ++o) {
        grads.projection_bias[o] += g[o];
        for (std::int64_t k = 0; k < inputs_width; ++k) {
          grads.projection_weight[o * inputs_width + k] += g[o] * inputs[k];
          grad_inputs[k] += model.projection_weight[o * inputs_width + k] * g[o];
        }
      }
    }
    for (std::int64_t c = 0; c < C; ++c)
      grads.condition[row * C + c] = grad_inputs[width_total + c];
    std::int64_t offset = 0;
    for (std::int64_t f = 0; f < num_features; ++f) {
      const SpadeReferenceFeature& feature = model.features[f];
      SpadeReferenceFeatureGradients& fg = grads.features[f];
      const double token = tokens[row * num_features + f];
      const double* ge = &grad_inputs[offset];
      const std::int64_t E = feature.width;
      if (feature.discrete) {
        const std::int64_t id = static_cast<std::int64_t>(token);
        double* table_grad = &fg.table[id * E];
        if (feature.norm_weight.empty()) {
          for (std::int64_t j = 0; j < E; ++j) table_grad[j] += ge[j];
        } else {
          const double* x = &feature.table[id * E];
          double mean = 0, variance = 0;
          for (std::int64_t j = 0; j < E; ++j) mean += x[j];
          mean /= E;
          for (std::int64_t j = 0; j < E; ++j) variance += (x[j] - mean) * (x[j] - mean);
          const double inverse_std = 1.0 / std::sqrt(variance / E + model.norm_eps);
          // y = xhat * gamma + beta; dx = d/dx of sum_j dxhat_j * (x_j - mean) * inverse_std.
          std::vector<double> xhat(E), dxhat(E);
          for (std::int64_t j = 0; j < E; ++j) {
            xhat[j] = (x[j] - mean) * inverse_std;
            dxhat[j] = ge[j] * feature.norm_weight[j];
            fg.norm_weight[j] += ge[j] * xhat[j];
            fg.norm_bias[j] += ge[j];
          }
          // Direct Jacobian: d xhat_i / d x_j = inverse_std (delta_ij - 1/E - xhat_i xhat_j / E).
          for (std::int64_t j = 0; j < E; ++j) {
            double sum = 0;
            for (std::int64_t i = 0; i < E; ++i)
              sum +=
                  dxhat[i] * inverse_std * ((i == j ? 1.0 : 0.0) - 1.0 / E - xhat[i] * xhat[j] / E);
            table_grad[j] += sum;
          }
        }
      } else {
        for (std::int64_t k = 0; k < feature.hidden; ++k) {
          const double z = feature.hidden_weight[k] * token + feature.hidden_bias[k];
          const double sigmoid = 1.0 / (1.0 + std::exp(-z));
          double grad_hidden = 0;
          for (std::int64_t j = 0; j < E; ++j) {
            fg.output_weight[j * feature.hidden + k] += ge[j] * z * sigmoid;
            grad_hidden += feature.output_weight[j * feature.hidden + k] * ge[j];
          }
          const double grad_z = grad_hidden * sigmoid * (1.0 + z * (1.0 - sigmoid));
          fg.hidden_weight[k] += grad_z * token;
          fg.hidden_bias[k] += grad_z;
        }
        for (std::int64_t j = 0; j < E; ++j) fg.output_bias[j] += ge[j];
      }
      offset += E;
    }
  }
  return grads;
}

}  // namespace foveal::reference
