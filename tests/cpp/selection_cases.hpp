// tests/cpp/selection_cases.hpp — what the tests of the sparse selections (block_sparse,
// token_topk) share: typed copies of the inputs, a selection's lists as vectors, and the
// comparison of a selection with its float64 reference.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/token_topk.hpp"
#include "reference/block_sparse_reference.hpp"

namespace foveal::test {

// The lengths of the random problems of the selection tests: 1, primes, non-multiples of the
// block sizes and tiles.
constexpr Index kSelectionLengths[] = {1, 2, 17, 63, 64, 65, 129, 200, 257};

// Random attention options for a sparse prefill (causal or not, windows, sinks, softcap,
// q_offset) and the options every selection method shares (block_size, budget, threshold).
template <typename Sparse>
AttentionOptions random_prefill_options(RandomSource& random, const Problem& p, Sparse& sparse) {
  AttentionOptions o;
  o.causal = random.chance(0.7);
  if (random.chance(0.3)) o.window_left = random.pick({Index{0}, Index{20}, Index{100}});
  if (!o.causal && random.chance(0.3)) o.window_right = random.pick({Index{0}, Index{40}});
  o.sink_tokens = random.pick({Index{0}, Index{0}, Index{1}, Index{4}, Index{70}});
  o.softcap = random.pick({0.0, 0.0, 5.0});
  o.q_offset = random.chance(0.6) ? -1 : random.integer(0, p.len_k + 3);
  sparse.block_size = random.pick({Index{16}, Index{23}, Index{32}, Index{64}, Index{100}});
  sparse.budget = random.pick({1.0 / 16, 0.2, 0.5, 1.0});
  sparse.threshold = random.pick({0.0, 0.0, 0.5, 0.95});
  return o;
}

// A CSR selection's lists as vectors.
inline std::vector<std::vector<std::int64_t>> lists_of(const std::vector<std::int64_t>& offsets,
                                                       const std::vector<std::int64_t>& items) {
  std::vector<std::vector<std::int64_t>> lists;
  for (std::size_t i = 0; i + 1 < offsets.size(); ++i)
    lists.emplace_back(items.begin() + offsets[i], items.begin() + offsets[i + 1]);
  return lists;
}

// T copies of the inputs, contiguous.
template <typename T>
struct TypedInputs {
  std::vector<T> q, k, v;
  explicit TypedInputs(const Inputs& in)
      : q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()), v(in.v.begin(), in.v.end()) {}
  TensorView<const T, 4> qv(const Problem& p) const { return {q.data(), p.q_shape()}; }
  TensorView<const T, 4> kv(const Problem& p) const { return {k.data(), p.k_shape()}; }
  TensorView<const T, 4> vv(const Problem& p) const { return {v.data(), p.v_shape()}; }
};

// The selection agrees with the reference: the same count per list and the same items, except
// that an item may stand in for another whose reference mass is within `slack` (relative to the
// lowest kept mass, plus `slack` absolute) of it: the float estimate of two nearly tied items may
// order them either way.
inline void expect_selection_matches(const std::vector<std::vector<std::int64_t>>& lists,
                                     const std::vector<reference::ReferenceList>& want,
                                     double slack) {
  ASSERT_EQ(lists.size(), want.size());
  for (std::size_t i = 0; i < lists.size(); ++i) {
    const auto& have = lists[i];
    const auto& ref = want[i];
    ASSERT_TRUE(std::is_sorted(have.begin(), have.end())) << "list " << i;
    EXPECT_LE(static_cast<std::int64_t>(have.size()), ref.keep) << "list " << i;
    if (have == ref.kept) continue;
    ASSERT_EQ(have.size(), ref.kept.size()) << "list " << i;
    double lowest_kept = 1e300;
    for (const std::int64_t c : ref.kept) lowest_kept = std::min(lowest_kept, ref.mass[c]);
    for (const std::int64_t c : have) {
      if (std::find(ref.kept.begin(), ref.kept.end(), c) == ref.kept.end()) {
        EXPECT_GE(ref.mass[c], lowest_kept * (1 - slack) - slack)
            << "list " << i << " kept item " << c;
      }
    }
  }
}

// An output buffer filled with kSentinel, and the check that a call is rejected with an error
// naming `needle` before it touches the buffer.
struct UntouchedOut {
  std::vector<float> values;
  TensorView<float, 4> view;

  explicit UntouchedOut(const Problem& p)
      : values(static_cast<std::size_t>(shape_numel<4>(p.out_shape())),
               static_cast<float>(kSentinel)),
        view(values.data(), p.out_shape()) {}

  template <typename Call>
  void expect_rejected(const Call& call, const char* needle) const {
    try {
      call();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
    }
    for (const float x : values) ASSERT_EQ(x, static_cast<float>(kSentinel)) << needle;
  }
};

// token_topk_attention<T> over a given selection (made by token_topk_select or
// vertical_slash_select), as an entry of run_entry.
struct AttendTokenSelection {
  const TokenSelection* selection;
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    token_topk_attention(q, k, v, out, options, *selection, lse);
  }
};

// `select_and_attend`, a one-call entry of run_entry whose budget keeps every candidate, is
// foveal::attention with the same options (causal with sinks, and not) on problems of
// option_problems(300, 300, seed).
template <typename T, typename Entry>
void expect_keeping_everything_is_dense(const Entry& select_and_attend, std::uint64_t seed) {
  for (const Problem& p : option_problems(300, 300, seed))
    for (const bool causal : {true, false}) {
      AttentionOptions o;
      o.causal = causal;
      o.sink_tokens = causal ? 2 : 0;
      SCOPED_TRACE(describe(problem_string(p), " causal=", causal));
      const Inputs in = random_inputs(p);
      const Outputs dense = run_attention<T>(p, in, o);
      const Outputs got = run_entry<T>(select_and_attend, p, in, o);
      EXPECT_TRUE(matches_reference(got.out, dense.out, kTolerance<T>));
      EXPECT_TRUE(matches_reference(got.lse, dense.lse, kTolerance<T>));
    }
}

// A copy of `value` changed by change(copy).
template <typename Value, typename Change>
Value changed(const Value& value, Change&& change) {
  Value copy = value;
  change(copy);
  return copy;
}

}  // namespace foveal::test
