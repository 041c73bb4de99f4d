// foveal/attention/merge.hpp — combining partial attention states by their log-sum-exp.
#pragma once

#include "foveal/core/tensor.hpp"

namespace foveal {

// out_a, out_b: [B, H, L, Dv]  lse_a, lse_b: [B, H, L]  ->  out: [B, H, L, Dv], lse (optional)
// Merges two attention states computed over disjoint sets of keys into the state over their
// union (docs/decode.md): with m = max(lse_a, lse_b), w_a = e^(lse_a - m), w_b = e^(lse_b - m),
// out = (w_a out_a + w_b out_b) / (w_a + w_b) and lse = m + log(w_a + w_b). A state with
// lse = -inf (no keys) has weight 0; two such states merge to out = 0, lse = -inf. Chunked
// prefill, split-KV decode and attention split across devices or machines combine their pieces
// with it. out may be out_a or out_b and lse may be lse_a or lse_b (the same view: in place);
// any other overlap is rejected. Every lse must be finite or -inf. Any strides; the last
// dimension of the outputs and states must be unit stride. num_threads 0 = global setting.
// Throws foveal::Error on any invalid argument before writing anything.
void merge_states(TensorView<const float, 4> out_a, TensorView<const float, 3> lse_a,
                  TensorView<const float, 4> out_b, TensorView<const float, 3> lse_b,
                  TensorView<float, 4> out, TensorView<float, 3> lse = {}, int num_threads = 0);
void merge_states(TensorView<const double, 4> out_a, TensorView<const double, 3> lse_a,
                  TensorView<const double, 4> out_b, TensorView<const double, 3> lse_b,
                  TensorView<double, 4> out, TensorView<double, 3> lse = {}, int num_threads = 0);

}  // namespace foveal
