// foveal/embedding/spade/training.hpp — SPADE (docs/spade.md): training helpers: next-step pairs of
// a delayed tensor and the loss mask.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"
#include "foveal/embedding/spade/schema.hpp"

namespace foveal {

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

}  // namespace foveal
