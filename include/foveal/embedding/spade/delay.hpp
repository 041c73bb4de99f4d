// foveal/embedding/spade/delay.hpp — SPADE (docs/spade.md): the delay pattern and its inverse (ids,
// values, logits).
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"
#include "foveal/embedding/spade/schema.hpp"

namespace foveal {

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

}  // namespace foveal
