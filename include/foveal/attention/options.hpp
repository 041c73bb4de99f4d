// foveal/attention/options.hpp — the options every attention variant shares.
#pragma once

#include <cstdint>

#include "foveal/core/tensor.hpp"

namespace foveal {

// Which keys a query sees, how logits are formed, and how many threads run the call.
// Query i sits at position q_offset + i and sees key j when
//   pos(i) - window_left <= j <= pos(i) + window_right   (a bound is dropped when it is -1)
// or when j < sink_tokens and j <= pos(i) + window_right: sinks widen the window to the left,
// never past its right edge, so causal always wins (no causal query sees a later key, sinks
// included). A query that sees no key gets output 0 and lse = -inf.
//
// Variable-length batches (attention, sliding_window_attention, sparsek_attention and their
// backwards, and key_start alone in decode_attention, where it marks each sequence's first real
// position in a left-padded cache; the other entry points reject them): batch row b's keys are the
// rows [key_start[b], key_start[b] + key_length[b]) of k and v, and the rows outside are padding
// that no query of row b sees (left padding, right padding, or both). A null key_start means 0 for
// every row, a null length every row from the start to Lk. Positions stay absolute (key row j is
// at position j, query i at q_offset + i), so a row's result is what its own keys give under
// the same options, except that the sinks are the first sink_tokens keys of the row's range.
// The key blocks outside a row's range are never visited.
struct AttentionOptions {
  double scale = 0;                // logit scale; 0 -> 1/sqrt(D)
  bool causal = false;             // same as window_right = 0
  std::int64_t window_left = -1;   // -1: unbounded
  std::int64_t window_right = -1;  // -1: unbounded
  std::int64_t sink_tokens = 0;    // the first keys widen the window (attention sinks)
  double softcap = 0;              // 0: off; else logits = softcap * tanh(logits / softcap)
  std::int64_t q_offset = -1;      // absolute position of query 0; -1 -> Lk - Lq (bottom-right)
  int num_threads = 0;             // 0 -> the global setting (foveal::set_num_threads)
  TensorView<const std::int64_t, 1> key_start;   // [B] first key row of each batch row, or null
  TensorView<const std::int64_t, 1> key_length;  // [B] keys of each batch row, or null
};

}  // namespace foveal
