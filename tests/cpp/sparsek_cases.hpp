// tests/cpp/sparsek_cases.hpp — the SparseK options the SparseK attention tests share: building
// them, their spelling for the float64 reference, and a description for SCOPED_TRACE.
#pragma once

#include <string>

#include "foveal/sparsek/attention.hpp"
#include "harness.hpp"
#include "reference/sparsek_attention_reference.hpp"

namespace foveal::test {

// Causal by default, gate value, no window, no sinks.
inline SparseKOptions sparsek_options(Index topk, Index window = 0, Index sink_tokens = 0,
                                      SparseKGate gate = SparseKGate::value, bool causal = true) {
  SparseKOptions options;
  options.topk = topk;
  options.window = window;
  options.sink_tokens = sink_tokens;
  options.gate = gate;
  options.causal = causal;
  return options;
}

inline reference::SparseKReferenceOptions reference_options(const SparseKOptions& o) {
  reference::SparseKReferenceOptions options;
  options.topk = o.topk;
  options.window = o.window;
  options.sink_tokens = o.sink_tokens;
  options.gate = o.gate == SparseKGate::value ? reference::Gate::value
                 : o.gate == SparseKGate::kv  ? reference::Gate::kv
                                              : reference::Gate::none;
  options.causal = o.causal;
  options.scale = o.scale;
  options.softcap = o.softcap;
  options.q_offset = o.q_offset;
  return options;
}

inline std::string sparsek_options_string(const SparseKOptions& o) {
  return describe("topk=", o.topk, " window=", o.window, " sink_tokens=", o.sink_tokens,
                  " gate=", to_string(o.gate), " causal=", o.causal, " scale=", o.scale,
                  " softcap=", o.softcap, " q_offset=", o.q_offset, " num_threads=", o.num_threads);
}

}  // namespace foveal::test
