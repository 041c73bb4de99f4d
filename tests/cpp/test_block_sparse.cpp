// tests/cpp/test_block_sparse.cpp — foveal::block_sparse_select and block_sparse_attention
// against the float64 references (tests/reference/block_sparse_reference.hpp: the selection;
// attention_reference with a block mask: the attention), and the promises of the header:
// causality and windows bound the selection, sinks stay visible, the same bits for any thread
// count, 16-bit storage equals float32 rounded, bad arguments rejected before out is touched.
// Shapes include 1, primes and non-multiples of the block sizes and of the engine's tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/block_sparse.hpp"
#include "foveal/attention/dense.hpp"
#include "harness.hpp"
#include "reference/block_sparse_reference.hpp"
#include "selection_cases.hpp"

namespace foveal::test {
namespace {

reference::BlockSparseReferenceOptions reference_sparse(const BlockSparseOptions& s) {
  return {s.budget, s.threshold, s.block_size, s.local_blocks};
}

std::string sparse_string(const BlockSparseOptions& s) {
  return describe("budget=", s.budget, " threshold=", s.threshold, " block_size=", s.block_size,
                  " local_blocks=", s.local_blocks);
}

// block_sparse_attention<T> over a given selection, as an entry of run_entry.
struct AttendSelection {
  const BlockSelection* selection;
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    block_sparse_attention(q, k, v, out, options, *selection, lse);
  }
};

// The float64 reference of block-sparse attention over `lists`.
Outputs reference_over(const Problem& p, const Inputs& in, const AttentionOptions& o,
                       std::int64_t block_size,
                       const std::vector<std::vector<std::int64_t>>& lists) {
  const reference::AttentionShape shape = shape_of(p);
  const reference::ReferenceOptions options = reference_options(o);
  const std::vector<double> bias = reference::block_sparse_bias(shape, options, block_size, lists);
  Outputs result;
  reference::attention_reference(shape, in.q, in.k, in.v, options, result.out, result.lse, bias,
                                 p.batch, p.heads_q);
  return result;
}

// Selects with T, checks the selection against the reference, attends over it with T (strided
// layouts too) and checks out and lse against the reference over the same selection.
template <typename T>
void expect_block_sparse_matches(const Problem& p, const AttentionOptions& o,
                                 const BlockSparseOptions& sparse) {
  SCOPED_TRACE(
      describe(problem_string(p), "\n  ", options_string(o), "\n  ", sparse_string(sparse)));
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  const BlockSelection selection = block_sparse_select(typed.qv(p), typed.kv(p), o, sparse);
  EXPECT_EQ(selection.block_size, sparse.block_size);
  expect_selection_matches(
      lists_of(selection.offsets, selection.blocks),
      reference::block_sparse_select_reference(shape_of(p), in.q, in.k, reference_options(o),
                                               reference_sparse(sparse)),
      std::is_same_v<T, float> ? 1e-5 : 1e-12);
  const Outputs want =
      reference_over(p, in, o, sparse.block_size, lists_of(selection.offsets, selection.blocks));
  for (const Layout layout : {Layout::kContiguous, Layout::kPadded}) {
    const Outputs got = run_entry<T>(AttendSelection{&selection}, p, in, o, Layouts::all(layout));
    EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<T>))
        << "out " << layout_name(layout);
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<T>))
        << "lse " << layout_name(layout);
  }
}

template <typename T>
class BlockSparse : public ::testing::Test {};
TYPED_TEST_SUITE(BlockSparse, ElementTypes, ElementTypeNames);

TYPED_TEST(BlockSparse, MatchesReferenceOnRandomShapesOptionsAndBudgets) {
  for (std::uint64_t seed = 100; seed < 160; ++seed) {
    RandomSource random(seed + 11);
    const Problem p = random_problem(seed, 2e6, kSelectionLengths, 5);
    BlockSparseOptions sparse;
    const AttentionOptions o = random_prefill_options(random, p, sparse);
    sparse.local_blocks = random.pick({Index{0}, Index{1}, Index{1}, Index{3}});
    expect_block_sparse_matches<TypeParam>(p, o, sparse);
  }
}

TYPED_TEST(BlockSparse, EveryGroupRatioAndLongerSequences) {
  for (Index ratio : kGroupRatios) {
    AttentionOptions o;
    o.causal = true;
    o.sink_tokens = 3;
    BlockSparseOptions sparse;
    sparse.block_size = 32;
    sparse.budget = 0.25;
    expect_block_sparse_matches<TypeParam>(
        make_problem(1, 2 * ratio, 2, 300, 300, 16, 8, 200 + ratio), o, sparse);
  }
}

TYPED_TEST(BlockSparse, KeepingEveryBlockIsDenseAttention) {
  // Budget 1 keeps every candidate: the call is foveal::attention with the same options.
  for (const Problem& p : option_problems(300, 300, 200))
    for (const bool causal : {true, false}) {
      AttentionOptions o;
      o.causal = causal;
      o.sink_tokens = causal ? 2 : 0;
      BlockSparseOptions sparse;
      sparse.budget = 1;
      sparse.block_size = 48;
      SCOPED_TRACE(describe(problem_string(p), " causal=", causal));
      const Inputs in = random_inputs(p);
      const Outputs dense = run_attention<TypeParam>(p, in, o);
      const TypedInputs<TypeParam> typed(in);
      const BlockSelection selection = block_sparse_select(typed.qv(p), typed.kv(p), o, sparse);
      const Outputs got = run_entry<TypeParam>(AttendSelection{&selection}, p, in, o);
      EXPECT_TRUE(matches_reference(got.out, dense.out, kTolerance<TypeParam>));
      EXPECT_TRUE(matches_reference(got.lse, dense.lse, kTolerance<TypeParam>));
    }
}

TYPED_TEST(BlockSparse, CausalityAndWindowsBoundAHandMadeSelection) {
  // A selection that keeps every key block for every query block (future ones too): the
  // causal / window rule still decides, so the result is dense attention with those options.
  const Problem p = make_problem(1, 4, 2, 200, 200, 16, 16, 400);
  for (const Index window : {Index{-1}, Index{37}}) {
    AttentionOptions o;
    o.causal = true;
    o.window_left = window;
    o.sink_tokens = 5;
    BlockSelection all;
    all.block_size = 32;
    all.batch = 1;
    all.heads_kv = 2;
    all.first_query_block = 0;
    all.query_blocks = 7;
    all.key_blocks = 7;
    all.offsets.push_back(0);
    for (Index list = 0; list < 14; ++list) {
      for (Index block = 0; block < 7; ++block) all.blocks.push_back(block);
      all.offsets.push_back(static_cast<std::int64_t>(all.blocks.size()));
    }
    const Inputs in = random_inputs(p);
    const Outputs got = run_entry<TypeParam>(AttendSelection{&all}, p, in, o);
    const Outputs want = reference_outputs(p, in, o);
    EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<TypeParam>)) << window;
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<TypeParam>)) << window;
  }
}

TYPED_TEST(BlockSparse, FindsAPlantedFarBlock) {
  // Keys 64..95 share a direction that the queries of the last block point at strongly; with a
  // budget of one block besides the local one, that block is the one kept.
  using T = TypeParam;
  const Problem p = make_problem(1, 2, 1, 512, 512, 32, 32, 500);
  Inputs in = random_inputs(p);
  for (Index j = 64; j < 96; ++j) in.k[j * p.dim + 0] += 6.0;
  for (Index h = 0; h < 2; ++h)
    for (Index i = 480; i < 512; ++i) in.q[(h * p.len_q + i) * p.dim + 0] += 6.0;
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  BlockSparseOptions sparse;
  sparse.block_size = 32;
  sparse.budget = 2.0 / 16.0;  // ceil(0.125 * 16) = 2 of the last block's 16 candidates
  const BlockSelection selection = block_sparse_select(typed.qv(p), typed.kv(p), o, sparse);
  std::int64_t count = 0;
  const std::int64_t* kept = selection.kept(0, 0, 15, &count);
  ASSERT_EQ(count, 2);
  EXPECT_EQ(kept[0], 2);   // the planted block
  EXPECT_EQ(kept[1], 15);  // the local block
}

TYPED_TEST(BlockSparse, ThresholdKeepsFewerBlocksOnAConcentratedEstimate) {
  using T = TypeParam;
  const Problem p = make_problem(1, 1, 1, 256, 256, 16, 16, 600);
  Inputs in = random_inputs(p);
  for (Index j = 0; j < 16; ++j) in.k[j * p.dim + 1] += 12.0;  // block 0 dominates everyone
  for (Index i = 0; i < 256; ++i) in.q[i * p.dim + 1] += 3.0;
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  BlockSparseOptions sparse;
  sparse.block_size = 16;
  sparse.budget = 0.5;
  sparse.local_blocks = 0;
  const BlockSelection fixed = block_sparse_select(typed.qv(p), typed.kv(p), o, sparse);
  sparse.threshold = 0.9;
  const BlockSelection adaptive = block_sparse_select(typed.qv(p), typed.kv(p), o, sparse);
  EXPECT_LT(adaptive.blocks.size() * 4, fixed.blocks.size());
  std::int64_t count = 0;
  const std::int64_t* kept = adaptive.kept(0, 0, 15, &count);
  ASSERT_GE(count, 1);
  EXPECT_EQ(kept[0], 0);
}

TYPED_TEST(BlockSparse, SameBitsForAnyThreadCount) {
  using T = TypeParam;
  const Problem p = make_problem(2, 8, 2, 333, 333, 32, 24, 700);
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  o.sink_tokens = 4;
  BlockSparseOptions sparse;
  sparse.block_size = 40;
  sparse.budget = 0.3;
  sparse.threshold = 0.8;
  std::vector<Outputs> results;
  std::vector<BlockSelection> selections;
  for (const int threads : {1, 2, 3}) {
    o.num_threads = threads;
    selections.push_back(block_sparse_select(typed.qv(p), typed.kv(p), o, sparse));
    results.push_back(run_entry<T>(AttendSelection{&selections.back()}, p, in, o));
  }
  for (std::size_t i = 1; i < results.size(); ++i) {
    EXPECT_EQ(selections[i].blocks, selections[0].blocks);
    EXPECT_EQ(selections[i].offsets, selections[0].offsets);
    expect_identical(results[i], results[0]);
  }
}

TEST(BlockSparseHalf, SixteenBitStorageIsTheFloatResultRounded) {
  const Problem p = make_problem(1, 4, 2, 150, 150, 32, 32, 800);
  Inputs in = random_inputs(p);
  for (std::vector<double>* values : {&in.q, &in.k, &in.v})
    for (double& x : *values) x = to_float(to_bfloat16(static_cast<float>(x)));
  const TypedInputs<float> wide(in);
  AttentionOptions o;
  o.causal = true;
  BlockSparseOptions sparse;
  sparse.block_size = 32;
  sparse.budget = 0.4;
  const BlockSelection selection = block_sparse_select(wide.qv(p), wide.kv(p), o, sparse);
  std::vector<float> out(static_cast<std::size_t>(shape_numel<4>(p.out_shape())));
  block_sparse_attention(wide.qv(p), wide.kv(p), wide.vv(p),
                         TensorView<float, 4>(out.data(), p.out_shape()), o, selection);
  std::vector<bfloat16> q16, k16, v16;
  for (const double x : in.q) q16.push_back(to_bfloat16(static_cast<float>(x)));
  for (const double x : in.k) k16.push_back(to_bfloat16(static_cast<float>(x)));
  for (const double x : in.v) v16.push_back(to_bfloat16(static_cast<float>(x)));
  const TensorView<const bfloat16, 4> q(q16.data(), p.q_shape()), k(k16.data(), p.k_shape()),
      v(v16.data(), p.v_shape());
  const BlockSelection selection16 = block_sparse_select(q, k, o, sparse);
  EXPECT_EQ(selection16.blocks, selection.blocks);
  std::vector<bfloat16> out16(out.size());
  block_sparse_attention(q, k, v, TensorView<bfloat16, 4>(out16.data(), p.out_shape()), o,
                         selection);
  if (amx_tiles_in_use()) {
    std::vector<double> got, want;
    for (std::size_t i = 0; i < out.size(); ++i) {
      got.push_back(to_float(out16[i]));
      want.push_back(out[i]);
    }
    EXPECT_TRUE(matches_reference(got, want, 4e-3));
    return;
  }
  for (std::size_t i = 0; i < out.size(); ++i)
    ASSERT_EQ(to_float(out16[i]), to_float(to_bfloat16(out[i]))) << i;
}

// Regressions (fuzz_sparse and the Python fuzz suite). Calls without query rows: with no kv heads
// either the kernel divided Hq by Hkv = 0 (SIGFPE); over keys of a huge Lk (an empty view) it
// allocated Lk entries. Extents of empty views near 2^63: ceil(Lk / block_size) and
// q_offset + Lq overflowed.
TEST(BlockSparseRegressions, CallsWithoutQueryRowsDoNoWork) {
  std::vector<float> cell(8, 0.0f);
  const auto view = [&](std::array<Index, 4> shape) {
    return TensorView<float, 4>(cell.data(), shape, {0, 0, 0, 1});
  };
  AttentionOptions o;
  o.causal = true;
  o.q_offset = 4;
  BlockSparseOptions sparse;
  sparse.block_size = 41;
  // No kv heads (and so no query heads).
  const TensorView<const float, 4> q = view({2, 0, 46, 6}), k = view({2, 0, 85, 6});
  const TensorView<const float, 4> v = view({2, 0, 85, 7});
  block_sparse_attention(q, k, v, view({2, 0, 46, 7}), o, sparse);
  const BlockSelection none = block_sparse_select(q, k, o, sparse);
  EXPECT_EQ(none.offsets, std::vector<std::int64_t>{0});
  block_sparse_attention(q, k, v, view({2, 0, 46, 7}), o, none);
  // No batch, keys of a huge Lk.
  const Index huge = Index{1} << 62;
  const TensorView<const float, 4> q0 = view({0, 1, 4, 6}), k0 = view({0, 1, huge, 6});
  const TensorView<const float, 4> v0 = view({0, 1, huge, 7});
  block_sparse_attention(q0, k0, v0, view({0, 1, 4, 7}), o, sparse);
  const BlockSelection empty = block_sparse_select(q0, k0, o, sparse);
  EXPECT_EQ(empty.key_blocks, huge / 41 + 1);
  block_sparse_attention(q0, k0, v0, view({0, 1, 4, 7}), o, empty);
  // Lk = 2^63 - 1: its key blocks are counted without overflow.
  const Index most = std::numeric_limits<Index>::max();
  sparse.block_size = 16;
  EXPECT_EQ(block_sparse_select(q0, view({0, 1, most, 6}), o, sparse).key_blocks, most / 16 + 1);
  // A last query position past 2^63 - 1 is rejected.
  o.q_offset = most / 8;
  EXPECT_THROW(block_sparse_select(view({0, 1, most, 6}), k0, o, sparse), Error);
}

// Regression (fuzz_sparse, ASan): block_sparse_select pooled rows of q and k as contiguous
// vectors but accepted views whose last dimension is strided, reading the wrong elements or
// past the buffer (a stride-0 row of a view ending at its buffer's last element).
TEST(BlockSparseRegressions, SelectRejectsRowsThatAreNotContiguous) {
  std::vector<float> data(2 * 40 * 8, 0.5f);
  const TensorView<const float, 4> rows(data.data(), {1, 1, 40, 8});
  const TensorView<const float, 4> strided(data.data(), {1, 1, 40, 8}, {640, 640, 16, 2});
  BlockSparseOptions sparse;
  sparse.block_size = 16;
  EXPECT_NO_THROW(block_sparse_select(rows, rows, {}, sparse));
  EXPECT_THROW(block_sparse_select(strided, rows, {}, sparse), Error);
  EXPECT_THROW(block_sparse_select(rows, strided, {}, sparse), Error);
}

// Regression (fuzz_sparse): BlockSelection::kept of an edited selection (offsets cut short, or
// pointing past blocks) returned a list outside blocks; now foveal::Error.
TEST(BlockSparseRegressions, KeptOfABrokenSelectionIsAnError) {
  BlockSelection selection;
  selection.block_size = 16;
  selection.batch = selection.heads_kv = selection.query_blocks = 1;
  selection.key_blocks = 2;
  selection.offsets = {0, 2};
  selection.blocks = {0, 1};
  std::int64_t count = -1;
  EXPECT_EQ(selection.kept(0, 0, 0, &count), selection.blocks.data());
  EXPECT_EQ(count, 2);
  BlockSelection cut = selection;
  cut.offsets.pop_back();
  EXPECT_THROW(cut.kept(0, 0, 0, &count), Error);
  BlockSelection past = selection;
  past.offsets[1] = 3;
  EXPECT_THROW(past.kept(0, 0, 0, &count), Error);
  BlockSelection shifted = selection;
  shifted.first_query_block = std::numeric_limits<std::int64_t>::min();
  EXPECT_THROW(shifted.kept(0, 0, 5, &count), Error);
}

TEST(BlockSparseErrors, BadOptionsAndSelectionsAreRejectedBeforeOutIsTouched) {
  const Problem p = make_problem(1, 2, 1, 100, 100, 8, 8, 900);
  const Inputs in = random_inputs(p);
  const TypedInputs<float> typed(in);
  AttentionOptions o;
  o.causal = true;
  BlockSparseOptions good;
  good.block_size = 32;
  good.budget = 0.5;  // the last query block keeps 2 of its 4 candidates
  const BlockSelection selection = block_sparse_select(typed.qv(p), typed.kv(p), o, good);
  const UntouchedOut out(p);
  const auto& out_view = out.view;
  const auto expect_rejected = [&](const auto& call, const char* needle) {
    out.expect_rejected(call, needle);
  };
  const auto with = [&](auto change) { return changed(good, change); };
  for (const auto& [sparse, needle] :
       {std::pair{with([](auto& s) { s.budget = 0; }), "budget"},
        std::pair{with([](auto& s) { s.budget = 1.5; }), "budget"},
        std::pair{with([](auto& s) { s.budget = std::nan(""); }), "budget"},
        std::pair{with([](auto& s) { s.threshold = -0.1; }), "threshold"},
        std::pair{with([](auto& s) { s.threshold = 2; }), "threshold"},
        std::pair{with([](auto& s) { s.block_size = 8; }), "block_size"},
        std::pair{with([](auto& s) { s.block_size = 5000; }), "block_size"},
        std::pair{with([](auto& s) { s.local_blocks = -1; }), "local_blocks"}}) {
    expect_rejected([&] { block_sparse_select(typed.qv(p), typed.kv(p), o, sparse); }, needle);
    expect_rejected(
        [&] { block_sparse_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, sparse); },
        needle);
  }
  const auto edited = [&](auto change) { return changed(selection, change); };
  for (const auto& [bad, needle] :
       {std::pair{edited([](auto& s) { s.block_size = 64; }), "query_blocks"},
        std::pair{edited([](auto& s) { s.batch = 2; }), "batch"},
        std::pair{edited([](auto& s) { s.heads_kv = 2; }), "heads_kv"},
        std::pair{edited([](auto& s) { s.offsets.pop_back(); }), "offsets"},
        std::pair{edited([](auto& s) { s.blocks.push_back(0); }), "offsets"},
        std::pair{edited([](auto& s) { s.blocks[0] = 99; }), "not a key block"},
        std::pair{edited([](auto& s) {
                    std::size_t list = 0;
                    while (s.offsets[list + 1] - s.offsets[list] < 2) ++list;
                    s.blocks[s.offsets[list] + 1] = s.blocks[s.offsets[list]];
                  }),
                  "strictly increasing"},
        std::pair{edited([](auto& s) { s.offsets[1] = s.offsets[2] + 1; }), "must not decrease"}}) {
    expect_rejected(
        [&] { block_sparse_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, bad); },
        needle);
  }
  // A selection made for another query offset.
  AttentionOptions shifted = o;
  shifted.q_offset = 40;
  expect_rejected(
      [&] {
        block_sparse_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, shifted, selection);
      },
      "first_query_block");
  // The attention's own checks come first in the one-call form.
  o.window_left = -5;
  expect_rejected(
      [&] { block_sparse_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, good); },
      "window_left");
}

}  // namespace
}  // namespace foveal::test
