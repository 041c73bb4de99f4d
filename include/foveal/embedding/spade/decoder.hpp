// foveal/embedding/spade/decoder.hpp — SPADE (docs/spade.md): the generation state machine.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "foveal/core/tensor.hpp"
#include "foveal/embedding/spade/schema.hpp"

namespace foveal {

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
