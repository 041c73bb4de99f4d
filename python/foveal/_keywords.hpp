// python/foveal/_keywords.hpp — the keyword options of a call, read by name. The Python layer
// passes its options through unchanged (None = the default); a value of the wrong type is a
// TypeError and an int outside int64 a ValueError, both naming the function and the option. The
// library checks the values themselves (foveal::Error), once, in C++.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal::python {

namespace py = pybind11;

class Keywords {
 public:
  Keywords(const char* function, const py::kwargs& kwargs) : function_(function), kwargs_(kwargs) {}

  const char* function() const { return function_; }

  // Whether the option is present and not None.
  bool given(const char* name) const;
  // An int (Python int or numpy integer, not bool) in int64; None or absent gives `fallback`.
  std::int64_t integer(const char* name, std::int64_t fallback) const;
  // A required int (a missing one is a mistake of the Python layer: TypeError).
  std::int64_t integer(const char* name) const;
  // A sequence of ints (list, tuple or 1-D integer array); None or absent gives nullopt.
  std::optional<std::vector<std::int64_t>> integers(const char* name) const;
  // A sequence of ints as integers() reads it, as a 1-D view of storage these keywords keep
  // (valid while they live); None or absent gives a null view.
  TensorView<const std::int64_t, 1> index_view(const char* name) const;
  // A real number (int or float); None or absent gives `fallback`.
  double number(const char* name, double fallback) const;
  // bool(value); absent gives `fallback`.
  bool flag(const char* name, bool fallback) const;
  // A str; absent gives `fallback`.
  std::string text(const char* name, const std::string& fallback) const;
  // "num_threads": None or absent is 0 (the global setting), else in [0, kMaxThreads].
  int threads() const;

  // A TypeError for a keyword nothing read (a mistake in the Python layer, never silent).
  void require_all_read() const;

 private:
  py::object get(const char* name) const;

  const char* function_;
  const py::kwargs& kwargs_;
  mutable std::set<std::string> read_;                  // the names asked for
  mutable std::deque<std::vector<std::int64_t>> held_;  // what index_view() points at
};

// scale (None = 1/sqrt(D); a given scale must be finite and > 0), causal, window_left,
// window_right, sink_tokens, softcap, q_offset (None = bottom-right), num_threads, and the key
// ranges key_start and key_length (None = none; views of storage `keywords` keeps).
AttentionOptions attention_options(const Keywords& keywords, bool causal_default = false);

// The options as Python values, None where the default applies (scale 0, q_offset -1,
// num_threads 0): for callers that forward them to another typed interface (torch custom ops).
py::dict options_dict(const AttentionOptions& options);
py::dict options_dict(const SparseKOptions& options);

// The attention options (causal by default) and topk, window, gate ("value", "kv", "none").
SparseKOptions sparsek_options(const Keywords& keywords);

}  // namespace foveal::python
