// tests/cpp/test_decode.cpp — foveal::decode_attention over a KV cache against the float64
// reference.
//
// q: [B, Hq, Lq, D]  cache: B sequences of Hkv heads (D, Dv)  ->  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]
// Query i of sequence b sits at position length_b - Lq + i and sees the keys the options allow
// among positions [0, length_b). The reference reads the test's own record of everything
// appended, never the cache's storage, so a ring buffer that keeps the wrong rows shows. Keys
// are split into chunks of kDecodeChunkKeys = 1024 positions: lengths straddle those
// boundaries. Every test runs for float and double; every case prints its seed, shapes,
// lengths and options on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/dense.hpp"
#include "harness.hpp"
#include "reference/decode_reference.hpp"

namespace foveal::test {
namespace {

// The tolerances are kTolerance, those of foveal::attention: decode runs the same engine per
// chunk of keys and merges the chunks' states in order, which adds a handful of roundings per
// output (a weight, a product, a sum per chunk, at most 3 chunks here) to the few hundred ulps
// of the engine. float: 2e-5 keeps a margin of more than 10x over what a correct fp32
// computation reaches on these sizes, while one key wrongly in or out (an O(1 / keys) change,
// at least 3e-4 at 3000 keys with outputs of size ~0.02 and above) misses by an order of
// magnitude. double: 1e-10 catches any step done in fp32.

// What the sweeps draw from, besides kHeadDims: cache lengths around the 1024-key chunks, query
// lengths of a decode step or a few drafts, and every GQA ratio up to 8.
constexpr Index kLengths[] = {1, 2, 127, 128, 129, 1023, 1024, 1025, 3000};
constexpr Index kQueryLengths[] = {1, 2, 3, 4, 5, 8};
constexpr Index kEveryGroupRatio[] = {1, 2, 3, 4, 5, 6, 7, 8};

// ---------------------------------------------------------------------------------------------
// One decode problem: shapes, the length of every sequence and the seed of its data.

struct DecodeProblem {
  Index heads_q = 1, heads_kv = 1, len_q = 1, dim = 1, dim_v = 1;
  std::vector<Index> lengths = {1};  // one per sequence
  std::uint64_t seed = 1;

  Index batch() const { return static_cast<Index>(lengths.size()); }
  Index max_length() const { return *std::max_element(lengths.begin(), lengths.end()); }
  Shape<4> q_shape() const { return {batch(), heads_q, len_q, dim}; }
  Shape<4> out_shape() const { return {batch(), heads_q, len_q, dim_v}; }
  Shape<3> lse_shape() const { return {batch(), heads_q, len_q}; }
  // Multiply-adds of the reference when every key is visible: what a case costs at most.
  double work() const {
    double keys = 0;
    for (Index length : lengths) keys += static_cast<double>(length);
    return keys * static_cast<double>(heads_q * len_q * (dim + dim_v));
  }
};

DecodeProblem make_problem(Index heads_q, Index heads_kv, Index len_q, Index dim, Index dim_v,
                           std::vector<Index> lengths, std::uint64_t seed) {
  return DecodeProblem{heads_q, heads_kv, len_q, dim, dim_v, std::move(lengths), seed};
}

std::string problem_string(const DecodeProblem& p) {
  std::string lengths;
  for (Index length : p.lengths) lengths += test::describe(lengths.empty() ? "" : ", ", length);
  return test::describe("seed=", p.seed, " q=", test::shape_string(p.q_shape()),
                        " Hkv=", p.heads_kv, " Dv=", p.dim_v, " lengths=[", lengths, "]");
}

// ---------------------------------------------------------------------------------------------
// A cache and the record of everything appended to it.

template <typename T>
class RecordedCache {
 public:
  RecordedCache(KVCache<T> cache, std::uint64_t seed)
      : cache_(std::move(cache)),
        random_(seed),
        records_(static_cast<std::size_t>(cache_.batch())) {}

  const KVCache<T>& cache() const { return cache_; }
  const std::vector<reference::SequenceRecord>& records() const { return records_; }

  // Appends n random steps (N(0, 1), rounded to float), the first counts[b] of them to
  // sequence b; all n to every sequence when counts is empty.
  void append(Index n, const std::vector<Index>& counts = {}) {
    const Index batch = cache_.batch(), heads_kv = cache_.heads_kv();
    const Index dim = cache_.dim(), dim_v = cache_.dim_v();
    const std::vector<double> k_values =
        test::round_to<float>(random_.normal(static_cast<std::size_t>(batch * heads_kv * n * dim)));
    const std::vector<double> v_values = test::round_to<float>(
        random_.normal(static_cast<std::size_t>(batch * heads_kv * n * dim_v)));
    Tensor<T, 4> k({batch, heads_kv, n, dim});
    Tensor<T, 4> v({batch, heads_kv, n, dim_v});
    test::scatter(k_values, k.view());
    test::scatter(v_values, v.view());
    if (counts.empty()) {
      cache_.append(k.view(), v.view());
    } else {
      cache_.append(k.view(), v.view(), counts);
    }
    for (Index b = 0; b < batch; ++b) {
      reference::SequenceRecord& record = records_[static_cast<std::size_t>(b)];
      const Index count = counts.empty() ? n : counts[static_cast<std::size_t>(b)];
      for (Index step = 0; step < count; ++step)
        for (Index h = 0; h < heads_kv; ++h) {
          for (Index d = 0; d < dim; ++d) record.k.push_back(k(b, h, step, d));
          for (Index d = 0; d < dim_v; ++d) record.v.push_back(v(b, h, step, d));
        }
      record.length += count;
    }
  }

  // Grows sequence b to lengths[b] with ragged appends of random sizes.
  void grow_to(const std::vector<Index>& lengths) {
    for (;;) {
      Index missing = 0;
      for (Index b = 0; b < cache_.batch(); ++b)
        missing = std::max(missing, lengths[static_cast<std::size_t>(b)] - cache_.length(b));
      if (missing == 0) return;
      const Index n =
          std::min(missing, random_.pick({Index{1}, Index{7}, Index{64}, Index{500}, Index{1500}}));
      std::vector<Index> counts;
      for (Index b = 0; b < cache_.batch(); ++b)
        counts.push_back(
            std::clamp<Index>(lengths[static_cast<std::size_t>(b)] - cache_.length(b), 0, n));
      append(n, counts);
    }
  }

  // Rolls sequence b back to `length` (rejected drafts).
  void truncate(Index b, Index length) {
    cache_.truncate(b, length);
    reference::SequenceRecord& record = records_[static_cast<std::size_t>(b)];
    record.length = length;
    record.k.resize(static_cast<std::size_t>(length * cache_.heads_kv() * cache_.dim()));
    record.v.resize(static_cast<std::size_t>(length * cache_.heads_kv() * cache_.dim_v()));
  }

 private:
  KVCache<T> cache_;
  test::RandomSource random_;
  std::vector<reference::SequenceRecord> records_;
};

// A cache of capacity max length (no ring) grown to the problem's lengths.
template <typename T>
RecordedCache<T> filled_cache(const DecodeProblem& p) {
  RecordedCache<T> recorded(KVCache<T>(p.batch(), p.heads_kv, p.max_length(), p.dim, p.dim_v),
                            p.seed + 1);
  recorded.grow_to(p.lengths);
  return recorded;
}

// ---------------------------------------------------------------------------------------------
// The call under test and the reference.

std::vector<double> random_queries(const DecodeProblem& p) {
  test::RandomSource random(p.seed);
  return test::round_to<float>(random.normal(test::shape_numel<4>(p.q_shape())));
}

// The float64 reference over `records` for the queries q.
Outputs reference_outputs(const DecodeProblem& p, const std::vector<double>& q,
                          const std::vector<reference::SequenceRecord>& records,
                          const AttentionOptions& o) {
  const reference::DecodeShape shape{p.heads_q, p.heads_kv, p.len_q, p.dim, p.dim_v};
  Outputs result;
  reference::decode_reference(shape, q, records, reference_options(o), result.out, result.lse);
  return result;
}

// Runs decode_attention<T> with q, out and lse placed as `layouts` (padding holds NaN); returns
// out and, when `with_lse`, lse. Fails the test if anything outside out or lse changed.
template <typename T>
Outputs run_decode(const DecodeProblem& p, const std::vector<double>& q_values,
                   const KVCache<T>& cache, const AttentionOptions& o, const Layouts& layouts = {},
                   bool with_lse = true) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(q_values, p.q_shape(), layouts.q, nan);
  const StridedBuffer<T, 4> out(p.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(p.lse_shape(), layouts.lse, nan);
  decode_attention(q.const_view(), cache, o, out.view(),
                   with_lse ? lse.view() : TensorView<T, 3>());
  EXPECT_TRUE(out.outside_untouched()) << "decode_attention wrote outside out";
  EXPECT_TRUE(lse.outside_untouched()) << "decode_attention wrote outside lse";
  Outputs result;
  result.out = test::gather(out.view());
  if (with_lse) result.lse = test::gather(lse.view());
  return result;
}

// decode_attention<T> over `recorded` agrees with the reference over its record.
template <typename T>
void expect_decode_matches_reference(const DecodeProblem& p, const RecordedCache<T>& recorded,
                                     const AttentionOptions& o) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const std::vector<double> q = random_queries(p);
  const Outputs want = reference_outputs(p, q, recorded.records(), o);
  const Outputs got = run_decode<T>(p, q, recorded.cache(), o);
  EXPECT_TRUE(test::matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
}

template <typename T>
void expect_decode_matches_reference(const DecodeProblem& p, const AttentionOptions& o) {
  expect_decode_matches_reference<T>(p, filled_cache<T>(p), o);
}

template <typename T>
class DecodeAttention : public ::testing::Test {};
TYPED_TEST_SUITE(DecodeAttention, ElementTypes, ElementTypeNames);

// ---------------------------------------------------------------------------------------------
// Agreement with the reference.

TYPED_TEST(DecodeAttention, MatchesReferenceOnRandomRaggedBatches) {
  for (std::uint64_t seed = 1000; seed < 1030; ++seed) {
    test::RandomSource random(seed + 7);  // apart from the streams of the data
    DecodeProblem p;
    do {
      p.seed = seed;
      p.lengths.assign(static_cast<std::size_t>(random.integer(1, 3)), 0);
      for (Index& length : p.lengths) length = random.pick(kLengths);
      const Index shortest = *std::min_element(p.lengths.begin(), p.lengths.end());
      do {
        p.len_q = random.pick(kQueryLengths);
      } while (p.len_q > shortest);
      p.heads_kv = random.integer(1, 4);
      p.heads_q = p.heads_kv * random.pick(kEveryGroupRatio);
      p.dim = random.pick(kHeadDims);
      p.dim_v = random.chance(0.5) ? p.dim : random.pick(kHeadDims);
    } while (p.work() > 4e6);
    AttentionOptions options;
    options.causal = random.chance(0.5);
    options.window_left =
        random.pick({Index{-1}, Index{-1}, Index{0}, Index{5}, Index{127}, Index{1000}});
    if (!options.causal) options.window_right = random.pick({Index{-1}, Index{0}, Index{3}});
    options.sink_tokens = random.pick({Index{0}, Index{0}, Index{1}, Index{4}});
    options.softcap = random.pick({0.0f, 0.0f, 5.0f});
    options.scale = random.pick({0.0f, 0.0f, 0.3f});
    expect_decode_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(DecodeAttention, MatchesReferenceAroundEveryChunkBoundary) {
  // Two sequences one token apart, so that one ends just before a multiple of 1024 keys and
  // the other on it or just after.
  for (Index length : kLengths)
    for (bool causal : {false, true}) {
      const Index other = length == 1 ? 2 : length - 1;
      const DecodeProblem p = make_problem(4, 2, std::min<Index>(3, std::min(length, other)), 16, 8,
                                           {length, other}, 2000 + length);
      AttentionOptions options;
      options.causal = causal;
      expect_decode_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(DecodeAttention, CausalVerificationOfDraftsMatchesReference) {
  // Lq > 1 drafted tokens verified at once: query i sees the keys up to its own position.
  for (Index len_q : {2, 3, 4, 5, 8}) {
    const DecodeProblem p = make_problem(6, 2, len_q, 31, 31, {1030, 9, 1024}, 3000 + len_q);
    const RecordedCache<TypeParam> recorded = filled_cache<TypeParam>(p);
    AttentionOptions options;
    options.causal = true;
    expect_decode_matches_reference<TypeParam>(p, recorded, options);
    options.window_left = 100;
    options.sink_tokens = 2;
    expect_decode_matches_reference<TypeParam>(p, recorded, options);
  }
}

TYPED_TEST(DecodeAttention, WindowsAndSinksMatchReference) {
  const DecodeProblem p = make_problem(4, 1, 3, 16, 24, {3000, 1025, 130}, 4000);
  const RecordedCache<TypeParam> recorded = filled_cache<TypeParam>(p);
  for (Index window : {Index{0}, Index{1}, Index{5}, Index{127}, Index{128}, Index{1000},
                       Index{1500}, std::numeric_limits<Index>::max()})
    for (Index sinks : {0, 1, 4})
      for (bool causal : {true, false}) {
        AttentionOptions options;
        options.causal = causal;
        options.window_left = window;
        options.window_right = causal ? -1 : 2;
        options.sink_tokens = sinks;
        expect_decode_matches_reference<TypeParam>(p, recorded, options);
      }
}

// Left-padded sequences (key_start): each sequence's keys from its first real position on,
// with sinks counted from there, over ragged lengths and both sides of the chunk boundaries.
TYPED_TEST(DecodeAttention, LeftPaddedSequencesMatchReference) {
  for (const Index len_q : {Index{1}, Index{3}, Index{70}}) {
    const DecodeProblem p = make_problem(4, 2, len_q, 16, 24, {3000, 1025, 130, 600}, 4100 + len_q);
    const RecordedCache<TypeParam> recorded = filled_cache<TypeParam>(p);
    const std::vector<std::int64_t> starts = {1000, 0, 130 - len_q + 1, 599};
    for (Index window : {Index{-1}, Index{0}, Index{5}, Index{300}})
      for (Index sinks : {0, 2}) {
        AttentionOptions options;
        options.causal = true;
        options.window_left = window;
        options.sink_tokens = sinks;
        options.key_start = TensorView<const std::int64_t, 1>(starts.data(), {4});
        expect_decode_matches_reference<TypeParam>(p, recorded, options);
      }
  }
}

TYPED_TEST(DecodeAttention, SoftcapAndScaleMatchReference) {
  const DecodeProblem p = make_problem(8, 2, 2, 64, 64, {2048, 1100}, 5000);
  const RecordedCache<TypeParam> recorded = filled_cache<TypeParam>(p);
  for (float softcap : {0.5f, 5.0f, 30.0f})
    for (float scale : {0.0f, 1.5f}) {
      AttentionOptions options;
      options.softcap = softcap;
      options.scale = scale;
      options.causal = true;
      expect_decode_matches_reference<TypeParam>(p, recorded, options);
    }
}

TYPED_TEST(DecodeAttention, EveryHeadDimPairMatchesReference) {
  for (Index dim : kHeadDims)
    for (Index dim_v : {Index{1}, Index{31}, Index{128}}) {
      AttentionOptions options;
      options.causal = true;
      expect_decode_matches_reference<TypeParam>(
          make_problem(2, 1, 2, dim, dim_v, {1025, 70}, 6000 + dim * 1000 + dim_v), options);
    }
}

TYPED_TEST(DecodeAttention, ManyQueryRowsPerKvHeadMatchReference) {
  // Lq * (Hq / Hkv) above one 64-row tile: the heads are not split over key chunks.
  struct Case {
    Index heads_q, heads_kv, len_q;
  };
  for (const Case& c : {Case{9, 1, 8}, Case{16, 2, 5}, Case{16, 2, 4}, Case{8, 1, 8}}) {
    AttentionOptions options;
    options.causal = true;
    const DecodeProblem p =
        make_problem(c.heads_q, c.heads_kv, c.len_q, 16, 8, {1025, 300}, 7000 + c.heads_q);
    expect_decode_matches_reference<TypeParam>(p, options);
    options.window_left = 200;
    options.sink_tokens = 3;
    expect_decode_matches_reference<TypeParam>(p, options);
  }
}

// ---------------------------------------------------------------------------------------------
// Ring buffers: wrapped positions, sinks pinned.

// Decodes `steps` single steps over a ring: after each appended step the queries are the newest
// p.len_q tokens; every `check_every` steps (and after the first) the output must match the
// reference over everything ever appended.
template <typename T>
void expect_ring_decoding_matches_reference(RecordedCache<T>& recorded, DecodeProblem p,
                                            const AttentionOptions& options, Index steps,
                                            Index check_every) {
  for (Index step = 1; step <= steps; ++step) {
    recorded.append(1);
    if (step % check_every != 0 && step != 1) continue;
    p.lengths = recorded.cache().lengths();
    p.seed += 1;
    expect_decode_matches_reference<T>(p, recorded, options);
    if (::testing::Test::HasFailure()) return;
  }
}

KVCacheOptions ring_options(Index sink_tokens) {
  KVCacheOptions options;
  options.ring = true;
  options.sink_tokens = sink_tokens;
  return options;
}

TYPED_TEST(DecodeAttention, RingBufferOverThousandsOfSingleSteps) {
  // Capacity 260 with 4 pinned sinks keeps 256 other tokens: enough for a causal window of
  // 255 keys before the query. Two sequences, started from prompts longer and shorter than
  // the ring, decode 3000 steps.
  using T = TypeParam;
  RecordedCache<T> recorded(KVCache<T>(2, 2, 260, 16, 8, ring_options(4)), 8000);
  recorded.append(300, {300, 37});
  expect_ring_decoding_matches_reference(recorded, make_problem(4, 2, 1, 16, 8, {}, 8001),
                                         causal_window(255, 4), 3000, 250);
}

TYPED_TEST(DecodeAttention, RingBufferLongerThanAChunk) {
  // 1297 non-sink rows: the stored runs of positions cross the 1024-key chunk boundaries and
  // wrap inside a chunk. Lq = 2, causal window of 1200, 3 sinks.
  using T = TypeParam;
  RecordedCache<T> recorded(KVCache<T>(1, 1, 1300, 8, 8, ring_options(3)), 8100);
  recorded.append(1000);
  expect_ring_decoding_matches_reference(recorded, make_problem(2, 1, 2, 8, 8, {}, 8101),
                                         causal_window(1200, 3), 4000, 400);
}

TYPED_TEST(DecodeAttention, RingBufferWithManyQueryRowsPerKvHead) {
  // Lq = 5 and 16 query heads per kv head: 80 rows, one tile per head over every stored key.
  using T = TypeParam;
  RecordedCache<T> recorded(KVCache<T>(2, 1, 200, 16, 8, ring_options(2)), 8200);
  recorded.append(60, {60, 5});
  expect_ring_decoding_matches_reference(recorded, make_problem(16, 1, 5, 16, 8, {}, 8201),
                                         causal_window(150, 2), 1500, 300);
}

TYPED_TEST(DecodeAttention, RingBufferVerifyingDraftsWithRollback) {
  // Speculative decoding over a ring: append 3 drafted tokens, verify them with Lq = 3
  // (causal, window 120, 2 sinks), keep a random number of them and roll the rest back. The
  // ring keeps 128 non-sink tokens, enough for the window plus the rolled-back drafts.
  using T = TypeParam;
  RecordedCache<T> recorded(KVCache<T>(2, 1, 130, 8, 5, ring_options(2)), 9000);
  recorded.append(10, {10, 4});
  DecodeProblem p = make_problem(3, 1, 3, 8, 5, {}, 9001);
  const AttentionOptions options = causal_window(120, 2);
  test::RandomSource random(9002);
  for (int round = 1; round <= 1200; ++round) {
    recorded.append(3);
    if (round % 150 == 0 || round == 1) {
      p.lengths = recorded.cache().lengths();
      p.seed = 9001 + static_cast<std::uint64_t>(round);
      expect_decode_matches_reference<T>(p, recorded, options);
      if (::testing::Test::HasFailure()) return;
    }
    for (Index b = 0; b < 2; ++b)
      recorded.truncate(b, recorded.cache().length(b) - random.integer(0, 2));
  }
}

// ---------------------------------------------------------------------------------------------
// The same result as dense attention; the same bits for any thread count, layout or lse.

TYPED_TEST(DecodeAttention, EqualsDenseAttentionOverTheSameKeys) {
  // foveal::attention on contiguous copies of each sequence's keys, with its default
  // bottom-right q_offset, computes the same function; the chunked merge only adds rounding.
  using T = TypeParam;
  const DecodeProblem p = make_problem(6, 2, 3, 31, 24, {1025, 3000, 7}, 10000);
  const RecordedCache<T> recorded = filled_cache<T>(p);
  const std::vector<double> q = random_queries(p);
  std::vector<AttentionOptions> cases(4);
  cases[1].causal = true;
  cases[2].causal = true;
  cases[2].window_left = 700;
  cases[2].sink_tokens = 4;
  cases[3].window_left = 5;
  cases[3].window_right = 1;
  cases[3].softcap = 3;
  for (const AttentionOptions& options : cases) {
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Outputs got = run_decode<T>(p, q, recorded.cache(), options);
    const Index rows = p.heads_q * p.len_q;
    for (Index b = 0; b < p.batch(); ++b) {
      SCOPED_TRACE(test::describe("sequence ", b));
      const reference::SequenceRecord& record = recorded.records()[static_cast<std::size_t>(b)];
      // The record is [length, Hkv, D]: seen as [1, Hkv, length, D] through its strides.
      std::vector<T> k(record.k.begin(), record.k.end()), v(record.v.begin(), record.v.end());
      const TensorView<const T, 4> k_view(k.data(), {1, p.heads_kv, record.length, p.dim},
                                          {0, p.dim, p.heads_kv * p.dim, 1});
      const TensorView<const T, 4> v_view(v.data(), {1, p.heads_kv, record.length, p.dim_v},
                                          {0, p.dim_v, p.heads_kv * p.dim_v, 1});
      std::vector<T> q_b(q.begin() + b * rows * p.dim, q.begin() + (b + 1) * rows * p.dim);
      Tensor<T, 4> out({1, p.heads_q, p.len_q, p.dim_v});
      Tensor<T, 3> lse({1, p.heads_q, p.len_q});
      attention(TensorView<const T, 4>(q_b.data(), {1, p.heads_q, p.len_q, p.dim}), k_view, v_view,
                out.view(), options, lse.view());
      const std::vector<double> got_out(got.out.begin() + b * rows * p.dim_v,
                                        got.out.begin() + (b + 1) * rows * p.dim_v);
      const std::vector<double> got_lse(got.lse.begin() + b * rows,
                                        got.lse.begin() + (b + 1) * rows);
      EXPECT_TRUE(test::matches_reference(got_out, test::gather(out.view()), kTolerance<T>))
          << "out";
      EXPECT_TRUE(test::matches_reference(got_lse, test::gather(lse.view()), kTolerance<T>))
          << "lse";
    }
  }
}

TYPED_TEST(DecodeAttention, IdenticalBitsForOneTwoThreeAndFiveThreads) {
  using T = TypeParam;
  // Split over key chunks (4 rows per kv head), and whole tiles (72 rows per kv head).
  for (const DecodeProblem& p : {make_problem(8, 2, 2, 16, 16, {3000, 1025, 64}, 11000),
                                 make_problem(9, 1, 8, 16, 16, {1100, 900}, 11001)}) {
    const RecordedCache<T> recorded = filled_cache<T>(p);
    const std::vector<double> q = random_queries(p);
    AttentionOptions options;
    options.causal = true;
    options.sink_tokens = 2;
    options.num_threads = 1;
    const Outputs single = run_decode<T>(p, q, recorded.cache(), options);
    for (int threads : {2, 3, 5}) {
      options.num_threads = threads;
      SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
      expect_identical(run_decode<T>(p, q, recorded.cache(), options), single);
    }
  }
}

TYPED_TEST(DecodeAttention, IdenticalBitsForAnyGlobalThreadCount) {
  using T = TypeParam;
  const test::DefaultThreadsOnExit restore_default;
  const DecodeProblem p = make_problem(4, 2, 1, 32, 32, {2500, 1024}, 11500);
  const RecordedCache<T> recorded = filled_cache<T>(p);
  const std::vector<double> q = random_queries(p);
  set_num_threads(1);
  const Outputs single = run_decode<T>(p, q, recorded.cache(), AttentionOptions{});
  for (int threads : {2, 3}) {
    SCOPED_TRACE(test::describe("set_num_threads(", threads, ")"));
    set_num_threads(threads);
    expect_identical(run_decode<T>(p, q, recorded.cache(), AttentionOptions{}), single);
  }
}

TYPED_TEST(DecodeAttention, LseOutputDoesNotChangeOut) {
  using T = TypeParam;
  for (const DecodeProblem& p : {make_problem(4, 2, 2, 16, 8, {1500, 3}, 12000),
                                 make_problem(16, 1, 5, 16, 8, {200, 90}, 12001)}) {
    SCOPED_TRACE(problem_string(p));
    const RecordedCache<T> recorded = filled_cache<T>(p);
    const std::vector<double> q = random_queries(p);
    AttentionOptions options;
    options.causal = true;
    const Outputs with_lse = run_decode<T>(p, q, recorded.cache(), options, {}, true);
    const Outputs without_lse = run_decode<T>(p, q, recorded.cache(), options, {}, false);
    EXPECT_TRUE(test::bitwise_equal(without_lse.out, with_lse.out));
  }
}

TYPED_TEST(DecodeAttention, StridedQueriesOutputsAndCacheStorageGiveIdenticalBits) {
  // q as [B, Lq, Hq, D] memory, padded out, reversed lse; and the same steps appended to a
  // cache over padded caller memory.
  using T = TypeParam;
  const DecodeProblem p = make_problem(6, 3, 3, 19, 21, {1300, 40}, 13000);
  const RecordedCache<T> owned = filled_cache<T>(p);
  const Shape<4> keys_shape = {p.batch(), p.heads_kv, p.max_length(), p.dim};
  const Shape<4> values_shape = {p.batch(), p.heads_kv, p.max_length(), p.dim_v};
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> keys(keys_shape, Layout::kPadded, nan);
  const StridedBuffer<T, 4> values(values_shape, Layout::kSwapped12, nan);
  RecordedCache<T> wrapped(KVCache<T>(keys.view(), values.view()), p.seed + 1);
  wrapped.grow_to(p.lengths);  // the same seed: the same steps in the same pieces
  const std::vector<double> q = random_queries(p);
  const AttentionOptions options = causal_window(1100, 1);
  const Outputs contiguous = run_decode<T>(p, q, owned.cache(), options);
  Layouts layouts;
  layouts.q = Layout::kSwapped12;
  layouts.out = Layout::kPadded;
  layouts.lse = Layout::kReversed;
  expect_identical(run_decode<T>(p, q, owned.cache(), options, layouts), contiguous);
  expect_identical(run_decode<T>(p, q, wrapped.cache(), options), contiguous);
}

#ifdef _OPENMP
TYPED_TEST(DecodeAttention, CallsFromInsideAnOpenMPParallelRegionGiveTheBitsOfSerialCalls) {
  // Calls from a server's own threads, each decoding a request. One chunk of one kv head: a
  // single task, which runs on the calling thread.
  using T = TypeParam;
  const DecodeProblem p = make_problem(4, 1, 1, 64, 64, {1000}, 16000);
  const RecordedCache<T> recorded = filled_cache<T>(p);
  const std::vector<double> q_values = random_queries(p);
  const std::vector<T> q(q_values.begin(), q_values.end());
  const TensorView<const T, 4> q_view(q.data(), p.q_shape());
  expect_parallel_region_calls_give_serial_bits([&](int num_threads) {
    AttentionOptions options;
    options.num_threads = num_threads;
    exit_with_calls_differing_inside_a_parallel_region<T>(
        p.out_shape(), [&](const TensorView<T, 4>& out) {
          decode_attention(q_view, recorded.cache(), options, out);
        });
  });
}
#endif

TYPED_TEST(DecodeAttention, EmptyQueriesAreAccepted) {
  using T = TypeParam;
  const DecodeProblem p = make_problem(4, 2, 0, 8, 8, {5, 0}, 14000);
  const RecordedCache<T> recorded = filled_cache<T>(p);
  Tensor<T, 4> q(p.q_shape()), out(p.out_shape());
  EXPECT_NO_THROW(decode_attention(q.view(), recorded.cache(), AttentionOptions{}, out.view()));
}

// ---------------------------------------------------------------------------------------------
// Rejected input: a foveal::Error naming what was wrong, thrown before out or lse is touched.

// Cache: B = 2, Hkv = 2, capacity 16, D = 3, Dv = 6, lengths 5 and 2. q: Hq = 4, Lq = 2.
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kCapacity = 16, kLenQ = 2, kDim = 3,
                kDimV = 6;

template <typename T>
class DecodeErrors : public ::testing::Test {
 protected:
  // Buffers are twice the size the valid shapes need, so larger shapes stay inside them.
  DecodeErrors()
      : recorded(KVCache<T>(kBatch, kHeadsKv, kCapacity, kDim, kDimV), 15000),
        q_storage_(2 * kBatch * kHeadsQ * kLenQ * kDim, T(0.5)),
        out_storage_(2 * kBatch * kHeadsQ * kLenQ * kDimV, T(kSentinel)),
        lse_storage_(2 * kBatch * kHeadsQ * kLenQ, T(kSentinel)) {
    recorded.grow_to({5, 2});
    q = TensorView<const T, 4>(q_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim});
    out = TensorView<T, 4>(out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
    lse = TensorView<T, 3>(lse_storage_.data(), {kBatch, kHeadsQ, kLenQ});
  }

  void call(const KVCache<T>& cache) const { decode_attention(q, cache, options, out, lse); }
  void call() const { call(recorded.cache()); }

  // Sets q, out and lse to [batch, heads_q, len_q, dim] queries and matching outputs.
  void reshape(Index batch, Index heads_q, Index len_q, Index dim, Index dim_v = kDimV) {
    q = TensorView<const T, 4>(q_storage_.data(), {batch, heads_q, len_q, dim});
    out = TensorView<T, 4>(out_storage_.data(), {batch, heads_q, len_q, dim_v});
    lse = TensorView<T, 3>(lse_storage_.data(), {batch, heads_q, len_q});
  }

  // call(cache) throws foveal::Error naming every piece, and out and lse keep their sentinel.
  void expect_rejected(const KVCache<T>& cache, std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(test::throws_error_with([&] { call(cache); }, pieces));
    EXPECT_TRUE(holds_sentinel(out_storage_)) << "out was written before the error";
    EXPECT_TRUE(holds_sentinel(lse_storage_)) << "lse was written before the error";
  }
  void expect_rejected(std::initializer_list<std::string> pieces) {
    expect_rejected(recorded.cache(), pieces);
  }

  // A ring of capacity 8 with 2 sinks (6 other rows) holding 20 tokens in one sequence: it
  // keeps positions 0, 1 and 14 .. 19.
  static RecordedCache<T> wrapped_ring() {
    KVCacheOptions options;
    options.ring = true;
    options.sink_tokens = 2;
    RecordedCache<T> ring(KVCache<T>(1, kHeadsKv, 8, kDim, kDimV, options), 15100);
    ring.append(20);
    return ring;
  }

  RecordedCache<T> recorded;
  std::vector<T> q_storage_, out_storage_, lse_storage_;
  TensorView<const T, 4> q;
  TensorView<T, 4> out;
  TensorView<T, 3> lse;
  AttentionOptions options;
};

TYPED_TEST_SUITE(DecodeErrors, ElementTypes, ElementTypeNames);

TYPED_TEST(DecodeErrors, ValidCallIsAccepted) {
  EXPECT_NO_THROW(this->call());
  EXPECT_FALSE(holds_sentinel(this->out_storage_));
}

// Left padding: key_start per sequence, inside its length; the ends are the cache's lengths.
TYPED_TEST(DecodeErrors, KeyRangesAreCheckedAgainstTheSequences) {
  const std::int64_t too_far[2] = {0, 3};  // the lengths are 5 and 2
  this->options.key_start = TensorView<const std::int64_t, 1>(too_far, {2});
  this->expect_rejected(
      {"decode_attention: key_start[1] must be in [0, the sequence's length = 2], got 3"});
  const std::int64_t fine[2] = {4, 2};
  this->options.key_start = TensorView<const std::int64_t, 1>(fine, {1});
  this->expect_rejected({"key_start.shape[0] must equal q.shape[0] (B) = 2", "got 1"});
  this->options.key_start = TensorView<const std::int64_t, 1>(fine, {2});
  EXPECT_NO_THROW(this->call());
  this->options.key_length = TensorView<const std::int64_t, 1>(fine, {2});
  std::fill(this->out_storage_.begin(), this->out_storage_.end(), TypeParam(kSentinel));
  std::fill(this->lse_storage_.begin(), this->lse_storage_.end(), TypeParam(kSentinel));
  this->expect_rejected({"key_length must be null (each sequence's keys end at its length"});
}

TYPED_TEST(DecodeErrors, MoreQueriesThanASequenceHoldsAreRejected) {
  this->reshape(kBatch, kHeadsQ, 3, kDim);
  this->expect_rejected({"foveal: decode_attention: sequence 1 holds 2 tokens but Lq = 3",
                         "Lq must be <= every length"});
}

TYPED_TEST(DecodeErrors, QueryBatchMustMatchTheCache) {
  this->reshape(kBatch + 1, kHeadsQ, kLenQ, kDim);
  this->expect_rejected(
      {"foveal: decode_attention: ", "q.shape[0] must equal cache.batch() (B) = 2, got 3"});
}

TYPED_TEST(DecodeErrors, QueryHeadDimMustMatchTheCache) {
  this->reshape(kBatch, kHeadsQ, kLenQ, kDim + 1);
  this->expect_rejected(
      {"foveal: decode_attention: ", "q.shape[3] must equal cache.dim() (D) = 3, got 4"});
}

TYPED_TEST(DecodeErrors, QueryHeadsMustBeAMultipleOfTheCacheHeads) {
  this->reshape(kBatch, 3, kLenQ, kDim);
  this->expect_rejected(
      {"decode_attention: ", "q.shape[1] (Hq = 3)", "multiple of cache.heads_kv() (Hkv = 2)"});
}

TYPED_TEST(DecodeErrors, OutOfTheWrongShapeIsRejected) {
  using T = TypeParam;
  this->out = TensorView<T, 4>(this->out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV - 1});
  this->expect_rejected(
      {"decode_attention: ", "out.shape[3] must equal cache.dim_v() (Dv) = 6, got 5"});
  this->out = TensorView<T, 4>(this->out_storage_.data(), {kBatch, kHeadsQ, 1, kDimV});
  this->expect_rejected(
      {"decode_attention: ", "out.shape[2] must equal q.shape[2] (Lq) = 2", "got 1"});
  this->out = TensorView<T, 4>(this->out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
  this->lse = TensorView<T, 3>(this->lse_storage_.data(), {1, kHeadsQ, kLenQ});
  this->expect_rejected(
      {"decode_attention: ", "lse.shape[0] must equal q.shape[0] (B) = 2", "got 1"});
}

TYPED_TEST(DecodeErrors, ExplicitQueryOffsetIsRejected) {
  for (Index q_offset : {0, 3, 5}) {  // 3 is where the queries of sequence 0 actually sit
    this->options.q_offset = q_offset;
    this->expect_rejected(
        {"foveal: decode_attention: q_offset must be -1", test::describe("got ", q_offset)});
  }
}

TYPED_TEST(DecodeErrors, WindowBelowMinusOneIsRejected) {
  this->options.window_left = -2;
  this->expect_rejected(
      {"foveal: decode_attention: window_left must be >= 0 or -1 (unbounded), got -2"});
}

TYPED_TEST(DecodeErrors, NegativeThreadCountIsRejected) {
  this->options.num_threads = -1;
  this->expect_rejected(
      {"foveal: decode_attention: num_threads must be in [0, 1024] (0 = the global setting), got "
       "-1"});
}

TYPED_TEST(DecodeErrors, WindowLargerThanTheRingKeepsIsRejected) {
  // Lq = 1 at position 19: window 5 needs 14 .. 19 (held); window 6 needs 13, unbounded
  // needs 2.
  const RecordedCache<TypeParam> ring = this->wrapped_ring();
  this->reshape(1, kHeadsQ, 1, kDim);
  this->options.causal = true;
  this->options.window_left = 5;
  EXPECT_NO_THROW(this->call(ring.cache()));
  std::fill(this->out_storage_.begin(), this->out_storage_.end(), TypeParam(kSentinel));
  std::fill(this->lse_storage_.begin(), this->lse_storage_.end(), TypeParam(kSentinel));
  this->options.window_left = 6;
  this->expect_rejected(ring.cache(),
                        {"foveal: decode_attention: the queries of sequence 0 see position 13",
                         "which the ring buffer (capacity 8, 2 sinks) no longer holds",
                         "it keeps positions from 14 on"});
  this->options.window_left = -1;
  this->expect_rejected(ring.cache(), {"see position 2", "no longer holds"});
}

TYPED_TEST(DecodeErrors, MoreSinksThanTheRingPinsAreRejected) {
  // The ring pins positions 0 and 1; sink_tokens = 3 asks for position 2, long overwritten.
  const RecordedCache<TypeParam> ring = this->wrapped_ring();
  this->reshape(1, kHeadsQ, 1, kDim);
  this->options.causal = true;
  this->options.window_left = 5;
  this->options.sink_tokens = 2;
  EXPECT_NO_THROW(this->call(ring.cache()));
  std::fill(this->out_storage_.begin(), this->out_storage_.end(), TypeParam(kSentinel));
  std::fill(this->lse_storage_.begin(), this->lse_storage_.end(), TypeParam(kSentinel));
  this->options.sink_tokens = 3;
  this->expect_rejected(ring.cache(),
                        {"foveal: decode_attention: the queries of sequence 0 see position 2",
                         "which the ring buffer (capacity 8, 2 sinks) no longer holds"});
}

TYPED_TEST(DecodeErrors, OutOverlappingTheCacheStorageIsRejected) {
  using T = TypeParam;
  // A cache over caller memory, and out pointing into its keys.
  std::vector<T> keys_memory(static_cast<std::size_t>(kBatch * kHeadsKv * kCapacity * kDim), T(0));
  std::vector<T> values_memory(static_cast<std::size_t>(kBatch * kHeadsKv * kCapacity * kDimV),
                               T(0));
  RecordedCache<T> wrapped(
      KVCache<T>(TensorView<T, 4>(keys_memory.data(), {kBatch, kHeadsKv, kCapacity, kDim}),
                 TensorView<T, 4>(values_memory.data(), {kBatch, kHeadsKv, kCapacity, kDimV})),
      15200);
  wrapped.grow_to({5, 2});
  this->out = TensorView<T, 4>(keys_memory.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
  const std::vector<double> keys_before = test::gather(wrapped.cache().keys());
  EXPECT_TRUE(test::throws_error_with(
      [&] { this->call(wrapped.cache()); },
      {"foveal: decode_attention: out must not overlap the cache's keys in memory"}));
  EXPECT_TRUE(test::bitwise_equal(test::gather(wrapped.cache().keys()), keys_before));
  EXPECT_TRUE(holds_sentinel(this->lse_storage_));
}

}  // namespace
}  // namespace foveal::test
