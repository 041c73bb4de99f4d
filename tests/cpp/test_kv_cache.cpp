// tests/cpp/test_kv_cache.cpp — foveal::KVCache: storage, appends, the ring buffer, rollback.
//
// keys: [B, Hkv, capacity, D]  values: [B, Hkv, capacity, Dv]; one length per sequence.
// Every test compares the cache with a model built from the header's rules alone: the data
// appended to each sequence by position and, for each storage row, the position last written
// there (ring mode: position p < sink_tokens in row p, else in row
// sink_tokens + (p - sink_tokens) % (capacity - sink_tokens)). A position is held when it was
// appended, is below the length and its row still holds it. Every test runs for float and
// double; every case prints its seed and sizes on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "harness.hpp"

namespace foveal::test {
namespace {

struct CacheShape {
  Index batch = 1, heads_kv = 1, capacity = 1, dim = 1, dim_v = 1;
  KVCacheOptions options;

  Shape<4> keys_shape() const { return {batch, heads_kv, capacity, dim}; }
  Shape<4> values_shape() const { return {batch, heads_kv, capacity, dim_v}; }
};

CacheShape make_shape(Index batch, Index heads_kv, Index capacity, Index dim, Index dim_v,
                      bool ring = false, Index sink_tokens = 0) {
  return CacheShape{batch, heads_kv, capacity, dim, dim_v, KVCacheOptions{ring, sink_tokens}};
}

std::string shape_string(const CacheShape& s) {
  return test::describe("B=", s.batch, " Hkv=", s.heads_kv, " capacity=", s.capacity, " D=", s.dim,
                        " Dv=", s.dim_v, " ring=", s.options.ring,
                        " sink_tokens=", s.options.sink_tokens);
}

// ---------------------------------------------------------------------------------------------
// The model.

// What one sequence must hold, from the documented rules.
struct SequenceModel {
  Index length = 0;
  std::vector<std::vector<double>> k, v;  // by position: [Hkv * D] and [Hkv * Dv]
  std::vector<Index> row_position;        // per storage row: the position it holds, or -1
};

class CacheModel {
 public:
  explicit CacheModel(const CacheShape& shape)
      : shape_(shape), sequences_(static_cast<std::size_t>(shape.batch)) {
    for (SequenceModel& sequence : sequences_)
      sequence.row_position.assign(static_cast<std::size_t>(shape.capacity), -1);
  }

  const CacheShape& shape() const { return shape_; }
  const SequenceModel& sequence(Index b) const { return sequences_[static_cast<std::size_t>(b)]; }

  // The header's row formula.
  Index row(Index position) const {
    const Index sinks = shape_.options.sink_tokens;
    if (!shape_.options.ring || position < sinks) return position;
    return sinks + (position - sinks) % (shape_.capacity - sinks);
  }

  bool holds(Index b, Index position) const {
    const SequenceModel& s = sequence(b);
    if (position < 0 || position >= s.length) return false;
    return s.row_position[static_cast<std::size_t>(row(position))] == position;
  }

  // Sequence b grows by `count` steps; k_rows[step] is [Hkv * D], v_rows[step] [Hkv * Dv].
  void append(Index b, const std::vector<std::vector<double>>& k_rows,
              const std::vector<std::vector<double>>& v_rows, Index count) {
    SequenceModel& s = sequences_[static_cast<std::size_t>(b)];
    for (Index step = 0; step < count; ++step) {
      const Index position = s.length + step;
      s.row_position[static_cast<std::size_t>(row(position))] = position;
      s.k.push_back(k_rows[static_cast<std::size_t>(step)]);
      s.v.push_back(v_rows[static_cast<std::size_t>(step)]);
    }
    s.length += count;
  }

  void truncate(Index b, Index length) {
    SequenceModel& s = sequences_[static_cast<std::size_t>(b)];
    if (length >= s.length) return;
    s.length = length;
    s.k.resize(static_cast<std::size_t>(length));
    s.v.resize(static_cast<std::size_t>(length));
    for (Index& position : s.row_position)
      if (position >= length) position = -1;
  }

  void reset() {
    for (Index b = 0; b < shape_.batch; ++b) truncate(b, 0);
  }

 private:
  CacheShape shape_;
  std::vector<SequenceModel> sequences_;
};

// Appends `n` random steps to both (the first counts[b] of them to sequence b; all n when
// counts is empty, through the uniform overload). Values are rounded to float. k and v are
// placed in memory as `layout` says, with every element `inner_stride` apart in their last
// dimension when that is not 1.
template <typename T>
void append_random(KVCache<T>& cache, CacheModel& model, test::RandomSource& random, Index n,
                   const std::vector<Index>& counts = {}, Layout layout = Layout::kContiguous,
                   Index inner_stride = 1) {
  const CacheShape& s = model.shape();
  const Shape<4> k_shape = {s.batch, s.heads_kv, n, s.dim};
  const Shape<4> v_shape = {s.batch, s.heads_kv, n, s.dim_v};
  const std::vector<double> k_values =
      test::round_to<float>(random.normal(test::shape_numel<4>(k_shape)));
  const std::vector<double> v_values =
      test::round_to<float>(random.normal(test::shape_numel<4>(v_shape)));
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> k_buffer(k_values, k_shape, layout, nan);
  const StridedBuffer<T, 4> v_buffer(v_values, v_shape, layout, nan);
  TensorView<const T, 4> k = k_buffer.const_view(), v = v_buffer.const_view();
  // Row-major strides times inner_stride: the last dimension is not contiguous.
  std::vector<T> k_spread, v_spread;
  if (inner_stride != 1) {
    const auto spread = [inner_stride](const std::vector<double>& values, const Shape<4>& shape,
                                       std::vector<T>& memory) {
      memory.assign(values.size() * static_cast<std::size_t>(inner_stride), T(0));
      const TensorView<T, 4> contiguous(memory.data(), shape);
      Shape<4> strides = contiguous.strides();
      for (Index& stride : strides) stride *= inner_stride;
      const TensorView<T, 4> view(memory.data(), shape, strides);
      test::scatter(values, view);
      return TensorView<const T, 4>(view);
    };
    k = spread(k_values, k_shape, k_spread);
    v = spread(v_values, v_shape, v_spread);
  }
  if (counts.empty()) {
    cache.append(k, v);
  } else {
    cache.append(k, v, counts);
  }
  // The model gets the steps of each sequence as [Hkv * D] and [Hkv * Dv] rows.
  for (Index b = 0; b < s.batch; ++b) {
    std::vector<std::vector<double>> k_rows(static_cast<std::size_t>(n)),
        v_rows(static_cast<std::size_t>(n));
    for (Index step = 0; step < n; ++step)
      for (Index h = 0; h < s.heads_kv; ++h) {
        for (Index d = 0; d < s.dim; ++d)
          k_rows[static_cast<std::size_t>(step)].push_back(
              k_values[static_cast<std::size_t>(((b * s.heads_kv + h) * n + step) * s.dim + d)]);
        for (Index d = 0; d < s.dim_v; ++d)
          v_rows[static_cast<std::size_t>(step)].push_back(
              v_values[static_cast<std::size_t>(((b * s.heads_kv + h) * n + step) * s.dim_v + d)]);
      }
    model.append(b, k_rows, v_rows, counts.empty() ? n : counts[static_cast<std::size_t>(b)]);
  }
}

// The cache agrees with the model: lengths, holds, row_of, first_retained, layout, and the
// stored rows of every held position, bit for bit.
template <typename T>
void expect_cache_matches(const KVCache<T>& cache, const CacheModel& model) {
  const CacheShape& s = model.shape();
  const Index sinks = s.options.sink_tokens;
  ASSERT_EQ(cache.batch(), s.batch);
  ASSERT_EQ(cache.heads_kv(), s.heads_kv);
  ASSERT_EQ(cache.capacity(), s.capacity);
  ASSERT_EQ(cache.dim(), s.dim);
  ASSERT_EQ(cache.dim_v(), s.dim_v);
  EXPECT_EQ(cache.ring(), s.options.ring);
  EXPECT_EQ(cache.sink_tokens(), sinks);
  ASSERT_EQ(cache.lengths().size(), static_cast<std::size_t>(s.batch));
  for (Index position = 0; position < 3 * s.capacity + 5; ++position)
    ASSERT_EQ(cache.row_of(position), model.row(position)) << "row_of(" << position << ")";
  for (Index b = 0; b < s.batch; ++b) {
    SCOPED_TRACE(test::describe("sequence ", b));
    const SequenceModel& sequence = model.sequence(b);
    ASSERT_EQ(cache.length(b), sequence.length);
    ASSERT_EQ(cache.lengths()[static_cast<std::size_t>(b)], sequence.length);

    // holds() and first_retained(): the held non-sink positions are exactly
    // [max(first_retained, sink_tokens), length).
    const Index first_retained = cache.first_retained(b);
    if (!s.options.ring) {
      EXPECT_EQ(first_retained, sinks);
    }
    EXPECT_FALSE(cache.holds(b, -1));
    for (Index position = 0; position < sequence.length + 3; ++position) {
      ASSERT_EQ(cache.holds(b, position), model.holds(b, position)) << "position " << position;
      if (position >= sinks && position < sequence.length) {
        ASSERT_EQ(model.holds(b, position), position >= first_retained)
            << "position " << position << ", first_retained " << first_retained;
      }
    }

    // layout(): spans in increasing position order covering exactly the held positions, each
    // a run of consecutive rows that row_of agrees with.
    const KVCacheLayout layout = cache.layout(b);
    ASSERT_GE(layout.count, 0);
    ASSERT_LE(layout.count, 3);
    std::vector<Index> listed;
    for (int i = 0; i < layout.count; ++i) {
      const KVCacheSpan& span = layout.spans[i];
      EXPECT_GT(span.count, 0) << "span " << i;
      for (Index t = 0; t < span.count; ++t) {
        listed.push_back(span.position + t);
        ASSERT_EQ(span.row + t, model.row(span.position + t)) << "span " << i << " step " << t;
      }
    }
    std::vector<Index> held;
    for (Index position = 0; position < sequence.length; ++position)
      if (model.holds(b, position)) held.push_back(position);
    EXPECT_EQ(listed, held) << "the layout's positions";
    if (!s.options.ring) {
      EXPECT_EQ(layout.count, sequence.length > 0 ? 1 : 0);
    }

    // The stored rows of every held position.
    std::vector<double> stored_keys, want_keys, stored_values, want_values;
    for (Index position : held) {
      const Index row = model.row(position);
      const std::vector<double>& k_row = sequence.k[static_cast<std::size_t>(position)];
      const std::vector<double>& v_row = sequence.v[static_cast<std::size_t>(position)];
      for (Index h = 0; h < s.heads_kv; ++h) {
        for (Index d = 0; d < s.dim; ++d) {
          stored_keys.push_back(cache.keys()(b, h, row, d));
          want_keys.push_back(static_cast<T>(k_row[static_cast<std::size_t>(h * s.dim + d)]));
        }
        for (Index d = 0; d < s.dim_v; ++d) {
          stored_values.push_back(cache.values()(b, h, row, d));
          want_values.push_back(static_cast<T>(v_row[static_cast<std::size_t>(h * s.dim_v + d)]));
        }
      }
    }
    EXPECT_TRUE(test::bitwise_equal(stored_keys, want_keys)) << "keys";
    EXPECT_TRUE(test::bitwise_equal(stored_values, want_values)) << "values";
  }
}

// A cache of shape `s` and its model, changed in lockstep: every append puts the same random
// steps into both, every truncate or reset cuts both.
template <typename T>
struct CacheInLockstep {
  CacheInLockstep(const CacheShape& s, std::uint64_t seed)
      : cache(s.batch, s.heads_kv, s.capacity, s.dim, s.dim_v, s.options), model(s), random(seed) {}

  // append_random(cache, model, random, ...).
  void append(Index n, const std::vector<Index>& counts = {}, Layout layout = Layout::kContiguous,
              Index inner_stride = 1) {
    append_random(cache, model, random, n, counts, layout, inner_stride);
  }
  void truncate(Index b, Index length) {
    cache.truncate(b, length);
    model.truncate(b, length);
  }
  void truncate(Index length) {
    cache.truncate(length);
    for (Index b = 0; b < model.shape().batch; ++b) model.truncate(b, length);
  }
  void reset() {
    cache.reset();
    model.reset();
  }
  // The cache agrees with the model (expect_cache_matches).
  void expect_matches() const { expect_cache_matches(cache, model); }

  KVCache<T> cache;
  CacheModel model;
  test::RandomSource random;
};

template <typename T>
class KVCacheTest : public ::testing::Test {};

TYPED_TEST_SUITE(KVCacheTest, ElementTypes, ElementTypeNames);

// ---------------------------------------------------------------------------------------------
// Construction.

TYPED_TEST(KVCacheTest, OwnedCacheStartsEmptyZeroedAndAligned) {
  using T = TypeParam;
  for (const CacheShape& s : {make_shape(3, 2, 37, 5, 7), make_shape(1, 1, 1, 1, 0),
                              make_shape(2, 3, 16, 64, 64, true, 4)}) {
    SCOPED_TRACE(shape_string(s));
    const KVCache<T> cache(s.batch, s.heads_kv, s.capacity, s.dim, s.dim_v, s.options);
    expect_cache_matches(cache, CacheModel(s));
    EXPECT_EQ(cache.keys().shape(), s.keys_shape());
    EXPECT_EQ(cache.values().shape(), s.values_shape());
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(cache.keys().data()) % 64, 0u);
    if (cache.values().numel() > 0) {
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(cache.values().data()) % 64, 0u);
    }
    for (double value : test::gather(cache.keys())) ASSERT_EQ(value, 0.0);
    for (double value : test::gather(cache.values())) ASSERT_EQ(value, 0.0);
    for (Index b = 0; b < s.batch; ++b) {
      EXPECT_EQ(cache.first_retained(b), s.options.sink_tokens);
      EXPECT_EQ(cache.layout(b).count, 0);
    }
  }
}

TYPED_TEST(KVCacheTest, EmptyBatchIsAccepted) {
  using T = TypeParam;
  KVCache<T> cache(0, 2, 8, 4, 4);
  EXPECT_TRUE(cache.lengths().empty());
  Tensor<T, 4> k({0, 2, 3, 4}), v({0, 2, 3, 4});
  EXPECT_NO_THROW(cache.append(k.view(), v.view()));
}

TYPED_TEST(KVCacheTest, WrappingCacheWritesIntoCallerMemory) {
  // Padded rows, [B, capacity, Hkv, D] memory seen as [B, Hkv, capacity, D], and a reversed
  // capacity dimension; the padding (NaN) must stay untouched.
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (Layout layout : {Layout::kPadded, Layout::kSwapped12, Layout::kReversed})
    for (const CacheShape& s : {make_shape(2, 3, 11, 5, 4), make_shape(3, 2, 9, 7, 3, true, 2)}) {
      SCOPED_TRACE(test::describe(shape_string(s), " layout: ", test::layout_name(layout)));
      StridedBuffer<T, 4> keys(s.keys_shape(), layout, nan);
      StridedBuffer<T, 4> values(s.values_shape(), layout, nan);
      const std::vector<double> keys_before = test::gather(keys.view());
      KVCache<T> cache(keys.view(), values.view(), s.options);
      EXPECT_EQ(cache.keys().data(), keys.view().data());
      EXPECT_EQ(cache.keys().strides(), keys.view().strides());
      EXPECT_EQ(cache.values().data(), values.view().data());
      EXPECT_TRUE(test::bitwise_equal(test::gather(keys.view()), keys_before))
          << "construction wrote to the caller's memory";
      CacheModel model(s);
      expect_cache_matches(cache, model);
      test::RandomSource random(100 + static_cast<std::uint64_t>(layout));
      for (Index n : {1, 4, 1, 6, 2, 3}) {
        if (!s.options.ring && cache.length(0) + n > s.capacity) break;
        append_random(cache, model, random, n);
        expect_cache_matches(cache, model);
      }
      EXPECT_TRUE(keys.outside_untouched()) << "wrote outside the keys view";
      EXPECT_TRUE(values.outside_untouched()) << "wrote outside the values view";
    }
}

TYPED_TEST(KVCacheTest, WrappingStorageWithLengthsAdoptsItsTokens) {
  // Storage filled by one cache and adopted by another with its lengths: same lengths, same
  // retained positions and layout, and the same rows for every held position.
  using T = TypeParam;
  for (const CacheShape& s : {make_shape(2, 2, 16, 3, 5), make_shape(2, 2, 16, 3, 5, true, 3)}) {
    SCOPED_TRACE(shape_string(s));
    KVCache<T> filled(s.batch, s.heads_kv, s.capacity, s.dim, s.dim_v, s.options);
    CacheModel model(s);
    test::RandomSource random(170);
    for (Index n : {5, 3, 7}) append_random(filled, model, random, n);
    Tensor<T, 4> keys(s.keys_shape()), values(s.values_shape());
    std::copy(filled.keys().data(), filled.keys().data() + keys.numel(), keys.data());
    std::copy(filled.values().data(), filled.values().data() + values.numel(), values.data());
    const KVCache<T> adopted(keys.view(), values.view(), s.options, filled.lengths());
    EXPECT_EQ(adopted.lengths(), filled.lengths());
    for (Index b = 0; b < s.batch; ++b) {
      EXPECT_EQ(adopted.first_retained(b), filled.first_retained(b));
      for (Index position = 0; position < filled.length(b); ++position)
        EXPECT_EQ(adopted.holds(b, position), filled.holds(b, position));
    }
    expect_cache_matches(adopted, model);
  }
}

// ---------------------------------------------------------------------------------------------
// Appending.

TYPED_TEST(KVCacheTest, AppendOneStepAtATime) {
  const CacheShape s = make_shape(3, 2, 37, 5, 3);
  SCOPED_TRACE(shape_string(s));
  CacheInLockstep<TypeParam> tracked(s, 200);
  for (Index step = 0; step < s.capacity; ++step) {
    tracked.append(1);
    tracked.expect_matches();
  }
}

TYPED_TEST(KVCacheTest, AppendManyStepsAtOnce) {
  const CacheShape s = make_shape(2, 3, 129, 16, 31);
  SCOPED_TRACE(shape_string(s));
  CacheInLockstep<TypeParam> tracked(s, 300);
  for (Index n : {7, 0, 64, 1, 13, 44}) {  // exactly fills the capacity
    tracked.append(n);
    tracked.expect_matches();
  }
}

TYPED_TEST(KVCacheTest, AppendReadsStepsOfAnyLayout) {
  // [B, n, Hkv, D] memory, padded rows, a reversed step dimension, and a last dimension with
  // stride 2: append only reads k and v, so any strides are fine.
  for (bool ring : {false, true}) {
    const CacheShape s = make_shape(2, 3, 40, 5, 4, ring, 1);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 350 + ring);
    for (Layout layout : {Layout::kSwapped12, Layout::kPadded, Layout::kReversed}) {
      SCOPED_TRACE(test::layout_name(layout));
      tracked.append(6, {}, layout);
      tracked.expect_matches();
      tracked.append(1, {1, 0}, layout);
      tracked.expect_matches();
    }
    tracked.append(5, {5, 2}, Layout::kContiguous, 2);
    tracked.expect_matches();
  }
}

TYPED_TEST(KVCacheTest, RaggedAppendGrowsEachSequenceByItsCount) {
  const CacheShape s = make_shape(3, 2, 64, 3, 5);
  SCOPED_TRACE(shape_string(s));
  CacheInLockstep<TypeParam> tracked(s, 400);
  const std::vector<std::vector<Index>> rounds = {{0, 5, 5}, {3, 0, 1}, {7, 7, 0}, {1, 2, 3}};
  for (const std::vector<Index>& counts : rounds) {
    tracked.append(7, counts);
    tracked.expect_matches();
  }
  EXPECT_EQ(tracked.cache.lengths(), (std::vector<Index>{11, 14, 9}));
}

// ---------------------------------------------------------------------------------------------
// The ring buffer.

TYPED_TEST(KVCacheTest, RowOfFollowsTheDocumentedFormula) {
  using T = TypeParam;
  const KVCache<T> plain(1, 1, 10, 2, 2);
  for (Index position = 0; position < 40; ++position) EXPECT_EQ(plain.row_of(position), position);
  for (Index sinks : {0, 1, 3, 9}) {
    KVCacheOptions options;
    options.ring = true;
    options.sink_tokens = sinks;
    const KVCache<T> ring(1, 1, 10, 2, 2, options);
    for (Index position = 0; position < 40; ++position)
      EXPECT_EQ(ring.row_of(position),
                position < sinks ? position : sinks + (position - sinks) % (10 - sinks))
          << "sinks=" << sinks << " position=" << position;
  }
}

TYPED_TEST(KVCacheTest, RingKeepsTheSinksAndTheNewestTokensStepByStep) {
  for (Index sinks : {0, 1, 3}) {
    const CacheShape s = make_shape(2, 2, 20, 3, 4, true, sinks);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 500 + static_cast<std::uint64_t>(sinks));
    for (Index step = 0; step < 150; ++step) {
      tracked.append(1);
      tracked.expect_matches();
      if (::testing::Test::HasFatalFailure()) return;
    }
    EXPECT_EQ(tracked.cache.first_retained(0), 150 - (20 - sinks));
  }
}

TYPED_TEST(KVCacheTest, RingKeepsTheNewestTokensOverRaggedAppendsOfAnySize) {
  // Appends of 0 up to more than twice the capacity in one call, different per sequence.
  for (Index sinks : {0, 2, 5}) {
    const CacheShape s = make_shape(3, 2, 13, 5, 3, true, sinks);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 600 + static_cast<std::uint64_t>(sinks));
    for (int round = 0; round < 40; ++round) {
      const Index n =
          tracked.random.pick({Index{1}, Index{3}, Index{12}, Index{13}, Index{14}, Index{29}});
      std::vector<Index> counts;
      for (Index b = 0; b < s.batch; ++b) counts.push_back(tracked.random.integer(0, n));
      tracked.append(n, counts);
      tracked.expect_matches();
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

TYPED_TEST(KVCacheTest, OneAppendLongerThanTheRingKeepsItsNewestSteps) {
  // From empty, from inside the sinks and from a wrapped state: one call of 3 * capacity + 2
  // steps leaves the sinks and the last capacity - sinks steps.
  for (Index sinks : {0, 1, 4}) {
    for (Index before : {0, 2, 23}) {
      const CacheShape s = make_shape(2, 3, 10, 4, 6, true, sinks);
      SCOPED_TRACE(test::describe(shape_string(s), " steps before: ", before));
      CacheInLockstep<TypeParam> tracked(s, 700 + static_cast<std::uint64_t>(sinks * 100 + before));
      if (before > 0) tracked.append(before);
      tracked.append(3 * s.capacity + 2);
      tracked.expect_matches();
      EXPECT_EQ(tracked.cache.first_retained(0),
                before + 3 * s.capacity + 2 - (s.capacity - sinks));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Rollback and reset.

TYPED_TEST(KVCacheTest, TruncateEverySequenceThenAppendAgain) {
  // Sequences shorter than the new length keep theirs; in a ring, cutting below the oldest
  // retained position leaves only the sinks before the cut.
  for (bool ring : {false, true}) {
    const CacheShape s = make_shape(3, 2, 16, 3, 5, ring, 2);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 800 + ring);
    tracked.append(12, {12, 4, 9});
    for (Index length : {10, 10, 5, 1, 0}) {
      SCOPED_TRACE(test::describe("truncate(", length, ")"));
      tracked.truncate(length);
      tracked.expect_matches();
      tracked.append(4, {4, 1, 3});
      tracked.expect_matches();
      if (ring) {  // wrap around, then cut again
        tracked.append(20, {20, 7, 15});
        tracked.expect_matches();
        tracked.truncate(length + 17);
        tracked.expect_matches();
      }
    }
  }
}

TYPED_TEST(KVCacheTest, TruncateOneSequenceThenAppendAgain) {
  for (bool ring : {false, true}) {
    const CacheShape s = make_shape(2, 2, 12, 4, 3, ring, 3);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 900 + ring);
    tracked.append(10);
    // Speculative decoding: 3 drafted steps, 1 accepted, on sequence 1 only.
    tracked.append(3, {0, 2});
    tracked.truncate(1, 11);
    tracked.expect_matches();
    // Cut to the current length (no change), into the sinks, and to 0.
    for (Index length : {11, 2, 0}) {
      SCOPED_TRACE(test::describe("truncate(1, ", length, ")"));
      tracked.truncate(1, length);
      tracked.expect_matches();
      tracked.append(1, {0, 1});
      tracked.expect_matches();
      tracked.truncate(1, length);
    }
    if (ring) {
      // Wrapped: a cut inside the retained positions keeps the rest; a cut below them leaves
      // only the sinks; appending afterwards refills the rows in order.
      tracked.append(30, {1, 30});
      for (Index length : {27, 20, 8}) {
        SCOPED_TRACE(test::describe("wrapped, truncate(1, ", length, ")"));
        tracked.truncate(1, length);
        tracked.expect_matches();
        tracked.append(5, {0, 5});
        tracked.expect_matches();
        tracked.append(14, {0, 14});
        tracked.expect_matches();
      }
    }
  }
}

TYPED_TEST(KVCacheTest, RandomHistoriesMatchTheModel) {
  // Appends (uniform and ragged), truncations and resets in random order.
  for (std::uint64_t seed = 1000; seed < 1012; ++seed) {
    test::RandomSource random(seed);
    const bool ring = random.chance(0.5);
    const Index capacity = random.pick({Index{1}, Index{2}, Index{7}, Index{13}, Index{64}});
    const Index sinks = random.integer(0, ring ? capacity - 1 : capacity);
    const CacheShape s = make_shape(random.integer(1, 3), random.integer(1, 3), capacity,
                                    random.pick({Index{1}, Index{3}, Index{16}}),
                                    random.pick({Index{0}, Index{1}, Index{5}}), ring, sinks);
    SCOPED_TRACE(test::describe("seed=", seed, " ", shape_string(s)));
    KVCache<TypeParam> cache(s.batch, s.heads_kv, s.capacity, s.dim, s.dim_v, s.options);
    CacheModel model(s);
    for (int operation = 0; operation < 60; ++operation) {
      const int kind = static_cast<int>(random.integer(0, 9));
      if (kind < 6) {
        Index room = ring ? 3 * capacity : capacity;
        if (!ring)
          for (Index b = 0; b < s.batch; ++b) room = std::min(room, capacity - cache.length(b));
        const Index n = random.integer(0, room);
        std::vector<Index> counts;
        if (random.chance(0.5))
          for (Index b = 0; b < s.batch; ++b) counts.push_back(random.integer(0, n));
        append_random(cache, model, random, n, counts);
      } else if (kind < 8) {
        const Index b = random.integer(0, s.batch - 1);
        const Index length = random.integer(0, cache.length(b));
        cache.truncate(b, length);
        model.truncate(b, length);
      } else if (kind < 9) {
        const Index length = random.integer(0, capacity + 2);
        cache.truncate(length);
        for (Index b = 0; b < s.batch; ++b) model.truncate(b, length);
      } else {
        cache.reset();
        model.reset();
      }
      expect_cache_matches(cache, model);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

TYPED_TEST(KVCacheTest, ResetEmptiesEverySequenceAndKeepsTheStorage) {
  for (bool ring : {false, true}) {
    const CacheShape s = make_shape(2, 2, 9, 3, 3, ring, 1);
    SCOPED_TRACE(shape_string(s));
    CacheInLockstep<TypeParam> tracked(s, 1100 + ring);
    tracked.append(ring ? 9 : 7, {ring ? 9 : 7, 3});
    if (ring) tracked.append(9);
    const std::vector<double> keys = test::gather(tracked.cache.keys());
    const std::vector<double> values = test::gather(tracked.cache.values());
    tracked.reset();
    tracked.expect_matches();
    EXPECT_EQ(tracked.cache.first_retained(0), 1);
    EXPECT_TRUE(test::bitwise_equal(test::gather(tracked.cache.keys()), keys));
    EXPECT_TRUE(test::bitwise_equal(test::gather(tracked.cache.values()), values));
    tracked.append(9);
    tracked.expect_matches();
  }
}

// ---------------------------------------------------------------------------------------------
// Rejected calls: a foveal::Error naming what was wrong, and the cache unchanged (lengths,
// first_retained and every stored bit).

// B = 2, Hkv = 3, capacity = 8, D = 4, Dv = 5: every extent distinct where the messages must
// tell them apart. Sequence 0 holds 5 tokens, sequence 1 holds 3.
constexpr Index kBatch = 2, kHeadsKv = 3, kCapacity = 8, kDim = 4, kDimV = 5;

template <typename T>
class KVCacheErrors : public ::testing::Test {
 protected:
  KVCacheErrors() : cache(kBatch, kHeadsKv, kCapacity, kDim, kDimV), model(shape()) {
    test::RandomSource random(1200);
    append_random(cache, model, random, 5, {5, 3});
  }

  static CacheShape shape() { return make_shape(kBatch, kHeadsKv, kCapacity, kDim, kDimV); }

  struct Snapshot {
    std::vector<Index> lengths, first_retained;
    std::vector<double> keys, values;
  };

  static Snapshot snapshot(const KVCache<T>& of) {
    Snapshot result;
    result.lengths = of.lengths();
    for (Index b = 0; b < of.batch(); ++b) result.first_retained.push_back(of.first_retained(b));
    result.keys = test::gather(of.keys());
    result.values = test::gather(of.values());
    return result;
  }

  // `rejected_call` throws foveal::Error naming every piece and leaves `of` as it was.
  template <typename Call>
  static void expect_rejected(const KVCache<T>& of, Call&& rejected_call,
                              std::initializer_list<std::string> pieces) {
    const Snapshot before = snapshot(of);
    EXPECT_TRUE(test::throws_error_with(rejected_call, pieces));
    const Snapshot after = snapshot(of);
    EXPECT_EQ(after.lengths, before.lengths) << "lengths changed";
    EXPECT_EQ(after.first_retained, before.first_retained) << "first_retained changed";
    EXPECT_TRUE(test::bitwise_equal(after.keys, before.keys)) << "keys changed";
    EXPECT_TRUE(test::bitwise_equal(after.values, before.values)) << "values changed";
  }

  // An append of k: [kb, kh, n, kd] and v: [vb, vh, vn, vd] (filled with 1) is rejected.
  void expect_append_rejected(const Shape<4>& k_shape, const Shape<4>& v_shape,
                              std::initializer_list<std::string> pieces,
                              const std::vector<Index>& counts = {}) {
    Tensor<T, 4> k(k_shape), v(v_shape);
    for (Index i = 0; i < k.numel(); ++i) k.data()[i] = T(1);
    for (Index i = 0; i < v.numel(); ++i) v.data()[i] = T(1);
    expect_rejected(
        cache,
        [&] {
          if (counts.empty()) {
            cache.append(k.view(), v.view());
          } else {
            cache.append(k.view(), v.view(), counts);
          }
        },
        pieces);
  }

  KVCache<T> cache;
  CacheModel model;
};

TYPED_TEST_SUITE(KVCacheErrors, ElementTypes, ElementTypeNames);

TYPED_TEST(KVCacheErrors, ValidAppendIsAccepted) {
  Tensor<TypeParam, 4> k({kBatch, kHeadsKv, 3, kDim}), v({kBatch, kHeadsKv, 3, kDimV});
  EXPECT_NO_THROW(this->cache.append(k.view(), v.view()));
  EXPECT_EQ(this->cache.lengths(), (std::vector<Index>{8, 6}));
}

TYPED_TEST(KVCacheErrors, AppendPastTheCapacityIsRejected) {
  this->expect_append_rejected(
      {kBatch, kHeadsKv, 4, kDim}, {kBatch, kHeadsKv, 4, kDimV},
      {"foveal: KVCache::append: sequence 0 holds 5 tokens",
       "appending 4 would exceed the capacity of 8", "(not a ring buffer)"});
}

TYPED_TEST(KVCacheErrors, RaggedAppendWhereOneSequenceOverflowsIsRejected) {
  // Sequence 0 (5 + 1 tokens) would fit; sequence 1 (3 + 6) would not: neither grows.
  this->expect_append_rejected(
      {kBatch, kHeadsKv, 6, kDim}, {kBatch, kHeadsKv, 6, kDimV},
      {"KVCache::append: sequence 1 holds 3 tokens", "appending 6 would exceed the capacity of 8"},
      {1, 6});
}

TYPED_TEST(KVCacheErrors, KeysOfTheWrongShapeAreRejected) {
  this->expect_append_rejected({kBatch + 1, kHeadsKv, 1, kDim}, {kBatch, kHeadsKv, 1, kDimV},
                               {"KVCache::append: ",
                                "k.shape[0] must equal the cache's batch (B) "
                                "= 2, got 3"});
  this->expect_append_rejected({kBatch, kHeadsKv - 1, 1, kDim}, {kBatch, kHeadsKv, 1, kDimV},
                               {"k.shape[1] must equal the cache's heads_kv (Hkv) = 3, got 2"});
  this->expect_append_rejected({kBatch, kHeadsKv, 1, kDim + 1}, {kBatch, kHeadsKv, 1, kDimV},
                               {"k.shape[3] must equal the cache's dim (D) = 4, got 5"});
}

TYPED_TEST(KVCacheErrors, ValuesOfTheWrongShapeAreRejected) {
  this->expect_append_rejected({kBatch, kHeadsKv, 2, kDim}, {kBatch - 1, kHeadsKv, 2, kDimV},
                               {"KVCache::append: ",
                                "v.shape[0] must equal the cache's batch (B) "
                                "= 2, got 1"});
  this->expect_append_rejected({kBatch, kHeadsKv, 2, kDim}, {kBatch, kHeadsKv + 1, 2, kDimV},
                               {"v.shape[1] must equal the cache's heads_kv (Hkv) = 3, got 4"});
  this->expect_append_rejected({kBatch, kHeadsKv, 2, kDim}, {kBatch, kHeadsKv, 3, kDimV},
                               {"v.shape[2] must equal k.shape[2] (n) = 2, got 3"});
  this->expect_append_rejected({kBatch, kHeadsKv, 2, kDim}, {kBatch, kHeadsKv, 2, kDimV - 1},
                               {"v.shape[3] must equal the cache's dim_v (Dv) = 5, got 4"});
}

TYPED_TEST(KVCacheErrors, CountsOfTheWrongSizeAreRejected) {
  const Shape<4> k_shape = {kBatch, kHeadsKv, 2, kDim}, v_shape = {kBatch, kHeadsKv, 2, kDimV};
  this->expect_append_rejected(
      k_shape, v_shape, {"KVCache::append: counts must have one entry per sequence (2)", "got 1"},
      {1});
  this->expect_append_rejected(k_shape, v_shape,
                               {"counts must have one entry per sequence (2)", "got 3"}, {1, 1, 1});
}

TYPED_TEST(KVCacheErrors, CountsOutsideZeroToNAreRejected) {
  const Shape<4> k_shape = {kBatch, kHeadsKv, 2, kDim}, v_shape = {kBatch, kHeadsKv, 2, kDimV};
  this->expect_append_rejected(
      k_shape, v_shape, {"KVCache::append: counts[0] must be in [0, n = 2], got -1"}, {-1, 0});
  this->expect_append_rejected(k_shape, v_shape, {"counts[1] must be in [0, n = 2], got 3"},
                               {0, 3});
}

TYPED_TEST(KVCacheErrors, AppendOverlappingTheCacheStorageIsRejected) {
  using T = TypeParam;
  KVCache<T>& cache = this->cache;
  // The first row of every head of the cache's own storage, as k or as v.
  const TensorView<const T, 4> own_keys(cache.keys().data(), {kBatch, kHeadsKv, 1, kDim},
                                        cache.keys().strides());
  const TensorView<const T, 4> own_values(cache.values().data(), {kBatch, kHeadsKv, 1, kDimV},
                                          cache.values().strides());
  Tensor<T, 4> k({kBatch, kHeadsKv, 1, kDim}), v({kBatch, kHeadsKv, 1, kDimV});
  this->expect_rejected(cache, [&] { cache.append(own_keys, v.view()); },
                        {"KVCache::append: the cache's keys must not overlap k in memory"});
  this->expect_rejected(cache, [&] { cache.append(k.view(), own_values); },
                        {"KVCache::append: the cache's values must not overlap v in memory"});
  // The keys storage passed as values (k fresh, v the cache's keys reinterpreted as [.., Dv]).
  const TensorView<const T, 4> keys_as_values(cache.keys().data(), {kBatch, kHeadsKv, 1, kDimV},
                                              cache.keys().strides());
  this->expect_rejected(cache, [&] { cache.append(k.view(), keys_as_values); },
                        {"KVCache::append: the cache's keys must not overlap v in memory"});
}

TYPED_TEST(KVCacheErrors, AppendOverlappingAWrappedCacheStorageIsRejected) {
  using T = TypeParam;
  // Caller memory holding the cache's keys in its first half and something else after: k may
  // come from the second half, not from the first.
  const Index keys_size = kBatch * kHeadsKv * kCapacity * kDim;
  std::vector<T> keys_memory(2 * static_cast<std::size_t>(keys_size), T(0));
  std::vector<T> values_memory(static_cast<std::size_t>(kBatch * kHeadsKv * kCapacity * kDimV));
  KVCache<T> cache(TensorView<T, 4>(keys_memory.data(), {kBatch, kHeadsKv, kCapacity, kDim}),
                   TensorView<T, 4>(values_memory.data(), {kBatch, kHeadsKv, kCapacity, kDimV}));
  Tensor<T, 4> v({kBatch, kHeadsKv, 1, kDimV});
  const TensorView<const T, 4> after(keys_memory.data() + keys_size, {kBatch, kHeadsKv, 1, kDim});
  EXPECT_NO_THROW(cache.append(after, v.view()));
  const TensorView<const T, 4> straddling(keys_memory.data() + keys_size - kDim,
                                          {kBatch, kHeadsKv, 1, kDim});
  this->expect_rejected(cache, [&] { cache.append(straddling, v.view()); },
                        {"KVCache::append: the cache's keys must not overlap k in memory"});
}

TYPED_TEST(KVCacheErrors, TruncateBeyondTheLengthIsRejected) {
  KVCache<TypeParam>& cache = this->cache;
  this->expect_rejected(
      cache, [&] { cache.truncate(0, 6); },
      {"foveal: KVCache::truncate: length of sequence 0 must be in [0, 5], got 6"});
  this->expect_rejected(cache, [&] { cache.truncate(1, -1); },
                        {"KVCache::truncate: length of sequence 1 must be in [0, 3], got -1"});
  this->expect_rejected(cache, [&] { cache.truncate(-1); },
                        {"KVCache::truncate: length must be >= 0, got -1"});
}

TYPED_TEST(KVCacheErrors, SequenceOutOfRangeIsRejected) {
  KVCache<TypeParam>& cache = this->cache;
  for (Index sequence : {Index{-1}, kBatch, Index{100}}) {
    SCOPED_TRACE(test::describe("sequence ", sequence));
    const std::string got = test::describe("sequence must be in [0, 2), got ", sequence);
    this->expect_rejected(cache, [&] { (void)cache.length(sequence); }, {"KVCache::length: ", got});
    this->expect_rejected(cache, [&] { (void)cache.first_retained(sequence); },
                          {"KVCache::first_retained: ", got});
    this->expect_rejected(cache, [&] { cache.truncate(sequence, 0); },
                          {"KVCache::truncate: ", got});
    this->expect_rejected(cache, [&] { (void)cache.holds(sequence, 0); }, {"KVCache::", got});
    this->expect_rejected(cache, [&] { (void)cache.layout(sequence); }, {"KVCache::", got});
  }
}

TYPED_TEST(KVCacheErrors, SinkTokensOutsideTheCapacityAreRejected) {
  using T = TypeParam;
  for (Index sinks : {Index{-1}, kCapacity + 1}) {
    KVCacheOptions options;
    options.sink_tokens = sinks;
    const std::string got = test::describe("got ", sinks);
    EXPECT_TRUE(test::throws_error_with(
        [&] { const KVCache<T> rejected(kBatch, kHeadsKv, kCapacity, kDim, kDimV, options); },
        {"foveal: KVCache: sink_tokens must be in [0, capacity = 8]", got}));
    Tensor<T, 4> keys({kBatch, kHeadsKv, kCapacity, kDim}),
        values({kBatch, kHeadsKv, kCapacity, kDimV});
    EXPECT_TRUE(test::throws_error_with(
        [&] { const KVCache<T> rejected(keys.view(), values.view(), options); },
        {"KVCache: sink_tokens must be in [0, capacity = 8]", got}));
  }
}

TYPED_TEST(KVCacheErrors, RingNeedsRoomBesidesTheSinks) {
  using T = TypeParam;
  KVCacheOptions options;
  options.sink_tokens = kCapacity;
  EXPECT_NO_THROW(const KVCache<T> accepted(kBatch, kHeadsKv, kCapacity, kDim, kDimV, options));
  options.ring = true;
  EXPECT_TRUE(test::throws_error_with(
      [&] { const KVCache<T> rejected(kBatch, kHeadsKv, kCapacity, kDim, kDimV, options); },
      {"foveal: KVCache: a ring buffer needs capacity > sink_tokens",
       "capacity = 8 and sink_tokens = 8"}));
}

TYPED_TEST(KVCacheErrors, NegativeSizesAreRejected) {
  using T = TypeParam;
  struct Sizes {
    Index batch, heads_kv, capacity, dim, dim_v;
    const char* piece;
  };
  for (const Sizes& sizes :
       {Sizes{-1, 3, 8, 4, 5, "batch = -1"}, Sizes{2, -1, 8, 4, 5, "heads_kv = -1"},
        Sizes{2, 3, -1, 4, 5, "capacity = -1"}, Sizes{2, 3, 8, 0, 5, "dim = 0"},
        Sizes{2, 3, 8, 4, -1, "dim_v = -1"}})
    EXPECT_TRUE(test::throws_error_with(
        [&] {
          const KVCache<T> rejected(sizes.batch, sizes.heads_kv, sizes.capacity, sizes.dim,
                                    sizes.dim_v);
        },
        {"foveal: KVCache: sizes must be >= 0 (D >= 1)", sizes.piece}));
}

TYPED_TEST(KVCacheErrors, AdoptedLengthsMustFitTheStorage) {
  Tensor<TypeParam, 4> keys({2, 1, 4, 3}), values({2, 1, 4, 3});
  EXPECT_TRUE(test::throws_error_with(
      [&] { KVCache<TypeParam>(keys.view(), values.view(), {}, {1}); },
      {"KVCache: lengths must be empty or have one entry per sequence (2), got 1"}));
  EXPECT_TRUE(test::throws_error_with(
      [&] {
        KVCache<TypeParam>(keys.view(), values.view(), {}, {1, 5});
      },
      {"KVCache: lengths[1] must be >= 0 and <= capacity = 4, got 5"}));
  EXPECT_TRUE(test::throws_error_with(
      [&] {
        KVCache<TypeParam>(keys.view(), values.view(), {true, 1}, {-1, 0});
      },
      {"KVCache: lengths[0] must be >= 0, got -1"}));
  const KVCache<TypeParam> ring(keys.view(), values.view(), {true, 1}, {9, 2});
  EXPECT_EQ(ring.first_retained(0), 9 - 3);
}

TYPED_TEST(KVCacheErrors, WrappedStorageMustFitTogether) {
  using T = TypeParam;
  std::vector<T> keys_memory(2 * kBatch * kHeadsKv * kCapacity * kDim);
  std::vector<T> values_memory(2 * kBatch * kHeadsKv * kCapacity * kDimV);
  const TensorView<T, 4> keys(keys_memory.data(), {kBatch, kHeadsKv, kCapacity, kDim});
  const TensorView<T, 4> values(values_memory.data(), {kBatch, kHeadsKv, kCapacity, kDimV});
  const auto expect_wrap_rejected = [](const TensorView<T, 4>& k, const TensorView<T, 4>& v,
                                       std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(test::throws_error_with([&] { const KVCache<T> rejected(k, v); }, pieces));
  };
  expect_wrap_rejected(TensorView<T, 4>(keys_memory.data(), {kBatch, kHeadsKv, -1, kDim}), values,
                       {"foveal: KVCache: keys.shape[2] must be >= 0, got -1"});
  expect_wrap_rejected(
      keys, TensorView<T, 4>(values_memory.data(), {kBatch, kHeadsKv, kCapacity - 1, kDimV}),
      {"KVCache: values.shape[2] must equal keys.shape[2] (capacity) = 8, got 7"});
  expect_wrap_rejected(keys, TensorView<T, 4>(values_memory.data(), {kBatch, 1, kCapacity, kDimV}),
                       {"KVCache: values.shape[1] must equal keys.shape[1] (Hkv) = 3, got 1"});
  expect_wrap_rejected(TensorView<T, 4>(keys_memory.data(), {kBatch, kHeadsKv, kCapacity, 0}),
                       values, {"KVCache: keys.shape[3] (D) must be >= 1, got 0"});
  Shape<4> strided = keys.strides();  // every stride doubled: distinct elements, inner stride 2
  for (Index& stride : strided) stride *= 2;
  expect_wrap_rejected(TensorView<T, 4>(keys_memory.data(), keys.shape(), strided), values,
                       {"KVCache: keys must have stride 1 in its last dimension", "got stride 2"});
  expect_wrap_rejected(
      keys, TensorView<T, 4>(keys_memory.data() + 1, {kBatch, kHeadsKv, kCapacity, kDimV}),
      {"KVCache: keys must not overlap values in memory"});
}

}  // namespace
}  // namespace foveal::test
