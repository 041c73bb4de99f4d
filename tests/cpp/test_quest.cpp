// tests/cpp/test_quest.cpp — KVCache page bounds and foveal::quest_decode_attention against
// float64 references: the bounds equal the min / max of each page's stored keys (rounded
// outward to bfloat16 but for float64 caches) after appends, ring wraps, truncates and resets;
// the page selection (local pages, then the largest bound of q.k) and the attention over the
// kept pages and the sinks match plain loops; a planted key far back is found; budget 1 is
// decode_attention; the same bits for any thread count; errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "harness.hpp"
#include "reference/attention_reference.hpp"
#include "reference/page_bound_reference.hpp"

namespace foveal::test {
namespace {

constexpr double kInf = kInfinity;

struct QuestCase {
  Index batch = 2, heads_q = 4, heads_kv = 2, dim = 16, dim_v = 12, capacity = 400;
  Index page = 16;
  KVCacheOptions cache_options;
  std::uint64_t seed = 1;
};

// A cache and everything appended to it, position-major per sequence: keys[b][(pos * Hkv + h) * D].
template <typename T>
struct Recorded {
  KVCache<T> cache;
  std::vector<std::vector<double>> keys, values;
  QuestCase c;

  explicit Recorded(const QuestCase& qc)
      : cache(qc.batch, qc.heads_kv, qc.capacity, qc.dim, qc.dim_v, qc.cache_options),
        keys(static_cast<std::size_t>(qc.batch)),
        values(static_cast<std::size_t>(qc.batch)),
        c(qc) {}

  // Appends `counts[b]` random steps (n = the largest) to each sequence.
  void append(RandomSource& random, const std::vector<Index>& counts) {
    const Index n = *std::max_element(counts.begin(), counts.end());
    const auto k = round_to<float>(random.normal(c.batch * c.heads_kv * n * c.dim));
    const auto v = round_to<float>(random.normal(c.batch * c.heads_kv * n * c.dim_v));
    std::vector<T> k_t(k.begin(), k.end()), v_t(v.begin(), v.end());
    cache.append(TensorView<const T, 4>(k_t.data(), {c.batch, c.heads_kv, n, c.dim}),
                 TensorView<const T, 4>(v_t.data(), {c.batch, c.heads_kv, n, c.dim_v}), counts);
    for (Index b = 0; b < c.batch; ++b)
      for (Index step = 0; step < counts[static_cast<std::size_t>(b)]; ++step)
        for (Index h = 0; h < c.heads_kv; ++h) {
          for (Index d = 0; d < c.dim; ++d)
            keys[b].push_back(k[((b * c.heads_kv + h) * n + step) * c.dim + d]);
          for (Index d = 0; d < c.dim_v; ++d)
            values[b].push_back(v[((b * c.heads_kv + h) * n + step) * c.dim_v + d]);
        }
  }

  void truncate(Index length) {
    cache.truncate(length);
    for (Index b = 0; b < c.batch; ++b) {
      const Index keep = std::min<Index>(length, cache.length(b));
      keys[b].resize(static_cast<std::size_t>(keep * c.heads_kv * c.dim));
      values[b].resize(static_cast<std::size_t>(keep * c.heads_kv * c.dim_v));
    }
  }

  double key(Index b, Index position, Index h, Index d) const {
    return keys[b][static_cast<std::size_t>((position * c.heads_kv + h) * c.dim + d)];
  }
  double value(Index b, Index position, Index h, Index d) const {
    return values[b][static_cast<std::size_t>((position * c.heads_kv + h) * c.dim_v + d)];
  }
  // The position stored in `row` of sequence b, or -1.
  Index position_of_row(Index b, Index row) const {
    const KVCacheLayout layout = cache.layout(b);
    for (int s = 0; s < layout.count; ++s) {
      const KVCacheSpan& span = layout.spans[s];
      if (row >= span.row && row < span.row + span.count) return row - span.row + span.position;
    }
    return -1;
  }
};

// Every page bound equals the min / max over the page's stored rows (+inf / -inf for none),
// rounded outward to bfloat16 unless T is double.
template <typename T>
void expect_bounds_exact(const Recorded<T>& r) {
  const auto bounds = r.cache.page_bounds();
  ASSERT_EQ(bounds.size(2), r.cache.pages());
  for (Index b = 0; b < r.c.batch; ++b)
    for (Index h = 0; h < r.c.heads_kv; ++h)
      for (Index page = 0; page < r.cache.pages(); ++page)
        for (Index d = 0; d < r.c.dim; ++d) {
          double low = kInf, high = -kInf;
          for (Index row = page * r.c.page; row < std::min(r.c.capacity, (page + 1) * r.c.page);
               ++row) {
            const Index position = r.position_of_row(b, row);
            if (position < 0) continue;
            low = std::min(low, r.key(b, position, h, d));
            high = std::max(high, r.key(b, position, h, d));
          }
          ASSERT_EQ(reference::bound_value(bounds(b, h, page, 0, d)),
                    reference::stored_bound<T>(low, false))
              << "b=" << b << " h=" << h << " page=" << page << " d=" << d;
          ASSERT_EQ(reference::bound_value(bounds(b, h, page, 1, d)),
                    reference::stored_bound<T>(high, true))
              << "b=" << b << " h=" << h << " page=" << page << " d=" << d;
        }
}

// The reference: quest's selection in float64 and attention over the kept pages and sinks.
template <typename T>
void quest_reference(const Recorded<T>& r, const std::vector<double>& q, Index len_q,
                     const AttentionOptions& o, const QuestOptions& quest, std::vector<double>& out,
                     std::vector<double>& lse) {
  const QuestCase& c = r.c;
  const Index group = c.heads_q / c.heads_kv;
  const reference::ReferenceOptions ro{
      o.scale, o.causal, o.window_left, o.window_right, o.sink_tokens, o.softcap, -1, {}, {}};
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(c.dim));
  out.assign(static_cast<std::size_t>(c.batch * c.heads_q * len_q * c.dim_v), 0.0);
  lse.assign(static_cast<std::size_t>(c.batch * c.heads_q * len_q), -kInf);
  for (Index b = 0; b < c.batch; ++b) {
    const Index length = r.cache.length(b);
    // Sinks end and band, as the visibility rule of decode gives them.
    const Index lo = length - len_q, hi = length - 1;
    Index sinks_end = o.sink_tokens;
    if (o.causal || o.window_right >= 0)
      sinks_end = std::clamp<Index>(hi + (o.causal ? 0 : o.window_right) + 1, 0, o.sink_tokens);
    sinks_end = std::min(sinks_end, length);
    for (Index h = 0; h < c.heads_kv; ++h) {
      // Candidate pages: a stored row whose position some query sees in its window, past sinks.
      std::vector<Index> candidates;
      std::vector<bool> forced;
      for (Index page = 0; page < r.cache.pages(); ++page) {
        bool candidate = false, local = false;
        for (Index row = page * c.page; row < std::min(c.capacity, (page + 1) * c.page); ++row) {
          const Index position = r.position_of_row(b, row);
          if (position < sinks_end) continue;  // also -1: not stored
          bool seen = false;
          reference::ReferenceOptions band = ro;
          band.sink_tokens = 0;
          for (Index p = lo; p <= hi; ++p)
            seen = seen || reference::reference_sees(band, p, position);
          if (!seen) continue;
          candidate = true;
          local = local || position >= length - quest.local_pages * c.page;
        }
        if (candidate) {
          candidates.push_back(page);
          forced.push_back(local);
        }
      }
      const auto count = static_cast<Index>(candidates.size());
      Index n_forced = 0;
      for (const bool f : forced) n_forced += f;
      const Index keep =
          std::min(count, std::max(static_cast<Index>(std::ceil(quest.budget * count)), n_forced));
      std::vector<Index> kept;
      std::vector<std::pair<double, Index>> ranked;
      for (std::size_t i = 0; i < candidates.size(); ++i) {
        if (forced[i]) {
          kept.push_back(candidates[i]);
          continue;
        }
        double best = -kInf;
        const Index page = candidates[i];
        for (Index g = 0; g < group; ++g)
          for (Index qi = 0; qi < len_q; ++qi) {
            double bound = 0;
            for (Index d = 0; d < c.dim; ++d) {
              double low = kInf, high = -kInf;
              for (Index row = page * c.page; row < std::min(c.capacity, (page + 1) * c.page);
                   ++row) {
                const Index position = r.position_of_row(b, row);
                if (position < 0) continue;
                low = std::min(low, r.key(b, position, h, d));
                high = std::max(high, r.key(b, position, h, d));
              }
              const double x = q[static_cast<std::size_t>(
                  (((b * c.heads_q + h * group + g) * len_q) + qi) * c.dim + d)];
              bound += std::max(x * reference::stored_bound<T>(low, false),
                                x * reference::stored_bound<T>(high, true));
            }
            best = std::max(best, bound);
          }
        ranked.push_back({-best, page});
      }
      std::sort(ranked.begin(), ranked.end());
      for (Index i = 0; i < keep - n_forced; ++i)
        kept.push_back(ranked[static_cast<std::size_t>(i)].second);
      // Attention.
      for (Index g = 0; g < group; ++g)
        for (Index qi = 0; qi < len_q; ++qi) {
          const Index head = h * group + g;
          const Index position = lo + qi;
          const double* q_row =
              &q[static_cast<std::size_t>(((b * c.heads_q + head) * len_q + qi) * c.dim)];
          std::vector<double> logits;
          std::vector<Index> keys;
          for (Index j = 0; j < length; ++j) {
            if (!reference::reference_sees(ro, position, j)) continue;
            const Index row = r.cache.row_of(j);
            const bool in_page = std::find(kept.begin(), kept.end(), row / c.page) != kept.end() &&
                                 r.position_of_row(b, row) == j;
            if (!(j < sinks_end || in_page)) continue;
            double dot = 0;
            for (Index d = 0; d < c.dim; ++d) dot += q_row[d] * r.key(b, j, h, d);
            double logit = scale * dot;
            if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
            logits.push_back(logit);
            keys.push_back(j);
          }
          if (logits.empty()) continue;
          const double top = *std::max_element(logits.begin(), logits.end());
          double sum = 0;
          for (const double l : logits) sum += std::exp(l - top);
          const Index row_index = (b * c.heads_q + head) * len_q + qi;
          for (std::size_t i = 0; i < keys.size(); ++i)
            for (Index d = 0; d < c.dim_v; ++d)
              out[static_cast<std::size_t>(row_index * c.dim_v + d)] +=
                  std::exp(logits[i] - top) / sum * r.value(b, keys[i], h, d);
          lse[static_cast<std::size_t>(row_index)] = top + std::log(sum);
        }
    }
  }
}

template <typename T>
struct QuestRun {
  std::vector<double> out, lse;
};

template <typename T>
QuestRun<T> run_quest(const Recorded<T>& r, const std::vector<double>& q, Index len_q,
                      const AttentionOptions& o, const QuestOptions& quest) {
  const QuestCase& c = r.c;
  std::vector<T> q_t(q.begin(), q.end());
  std::vector<T> out(static_cast<std::size_t>(c.batch * c.heads_q * len_q * c.dim_v));
  std::vector<T> lse(static_cast<std::size_t>(c.batch * c.heads_q * len_q));
  quest_decode_attention(TensorView<const T, 4>(q_t.data(), {c.batch, c.heads_q, len_q, c.dim}),
                         r.cache, o, quest,
                         TensorView<T, 4>(out.data(), {c.batch, c.heads_q, len_q, c.dim_v}),
                         TensorView<T, 3>(lse.data(), {c.batch, c.heads_q, len_q}));
  return {std::vector<double>(out.begin(), out.end()), std::vector<double>(lse.begin(), lse.end())};
}

template <typename T>
void expect_quest_matches(const Recorded<T>& r, Index len_q, const AttentionOptions& o,
                          const QuestOptions& quest, std::uint64_t seed) {
  SCOPED_TRACE(describe("len_q=", len_q, " budget=", quest.budget, " local_pages=",
                        quest.local_pages, " causal=", o.causal, " window_left=", o.window_left,
                        " sinks=", o.sink_tokens, " softcap=", o.softcap));
  RandomSource random(seed);
  const auto q = round_to<float>(random.normal(r.c.batch * r.c.heads_q * len_q * r.c.dim));
  std::vector<double> want_out, want_lse;
  quest_reference(r, q, len_q, o, quest, want_out, want_lse);
  const QuestRun<T> got = run_quest(r, q, len_q, o, quest);
  const double tolerance = std::is_same_v<T, float> ? 2e-5 : 1e-10;
  EXPECT_TRUE(matches_reference(got.out, want_out, tolerance)) << "out";
  EXPECT_TRUE(matches_reference(got.lse, want_lse, tolerance)) << "lse";
}

template <typename T>
class Quest : public ::testing::Test {};
TYPED_TEST_SUITE(Quest, ElementTypes, ElementTypeNames);

TYPED_TEST(Quest, BoundsFollowAppendsTruncatesAndResets) {
  QuestCase c;
  c.cache_options.page_bounds = c.page = 16;
  Recorded<TypeParam> r(c);
  RandomSource random(10);
  expect_bounds_exact(r);
  r.append(random, {37, 5});
  expect_bounds_exact(r);
  r.append(random, {1, 60});
  expect_bounds_exact(r);
  r.truncate(20);
  expect_bounds_exact(r);
  r.append(random, {100, 3});
  expect_bounds_exact(r);
  r.cache.reset();
  for (auto& k : r.keys) k.clear();
  for (auto& v : r.values) v.clear();
  r.append(random, {7, 7});
  expect_bounds_exact(r);
}

TYPED_TEST(Quest, BoundsFollowARingBufferThatWraps) {
  QuestCase c;
  c.capacity = 100;
  c.page = 12;  // pages straddle the sinks and the wrap point
  c.cache_options = {true, 5, 12};
  Recorded<TypeParam> r(c);
  RandomSource random(11);
  for (int step = 0; step < 30; ++step) {
    r.append(random, {random.integer(0, 9), random.integer(0, 9)});
    expect_bounds_exact(r);
  }
  r.append(random, {250, 1});  // more than the ring holds in one call
  expect_bounds_exact(r);
  r.truncate(r.cache.length(0) - 3);
  expect_bounds_exact(r);
}

TYPED_TEST(Quest, MatchesReferenceOverOptionsAndBudgets) {
  QuestCase c;
  c.cache_options.page_bounds = c.page = 16;
  c.capacity = 700;
  Recorded<TypeParam> r(c);
  RandomSource random(20);
  r.append(random, {613, 389});
  std::uint64_t seed = 100;
  for (const double budget : {1.0 / 16, 0.2, 1.0})
    for (const Index local : {Index{0}, Index{1}, Index{3}})
      for (const Index len_q : {Index{1}, Index{3}}) {
        AttentionOptions o;
        o.causal = true;
        expect_quest_matches(r, len_q, o, {budget, local}, seed++);
        o.sink_tokens = 20;
        o.window_left = 300;
        o.softcap = 5;
        expect_quest_matches(r, len_q, o, {budget, local}, seed++);
      }
}

// The page scorer's shapes: a group's rows (heads x Lq) from one to more than one reduction
// holds (16 float lanes at AVX-512: 32 rows), row counts that leave reduction slots empty
// (5, 36), and D with a tail past the last full vector (20).
TYPED_TEST(Quest, MatchesReferenceForWideGroupsAndDimensionTails) {
  const std::vector<std::pair<Index, Index>> shapes = {{1, 1}, {5, 1}, {16, 2}, {12, 3}};
  std::uint64_t seed = 400;
  for (const auto& [group, len_q] : shapes) {
    QuestCase c;
    c.heads_kv = 2;
    c.heads_q = 2 * group;
    c.dim = 20;
    c.dim_v = 9;
    c.capacity = 500;
    c.cache_options.page_bounds = c.page = 16;
    Recorded<TypeParam> r(c);
    RandomSource random(seed++);
    r.append(random, {470, 301});
    AttentionOptions o;
    o.causal = true;
    for (const double budget : {1.0 / 16, 0.3})
      expect_quest_matches(r, len_q, o, {budget, 1}, seed++);
  }
}

TYPED_TEST(Quest, MatchesReferenceOverARingBuffer) {
  QuestCase c;
  c.capacity = 300;
  c.page = 32;
  c.cache_options = {true, 4, 32};
  Recorded<TypeParam> r(c);
  RandomSource random(30);
  r.append(random, {700, 250});
  AttentionOptions o;
  o.causal = true;
  o.window_left = 250;
  o.sink_tokens = 4;
  expect_quest_matches(r, 1, o, {0.25, 1}, 300);
  expect_quest_matches(r, 2, o, {0.5, 2}, 301);
}

TYPED_TEST(Quest, FindsAPlantedKeyFarBack) {
  // One key at position 40 matches the query strongly: its page is kept at budget 1/16 and the
  // output is close to dense decode's.
  using T = TypeParam;
  QuestCase c;
  c.batch = 1;
  c.heads_q = 4;
  c.heads_kv = 1;
  c.dim = c.dim_v = 32;
  c.capacity = 2048;
  c.cache_options.page_bounds = c.page = 16;
  Recorded<T> r(c);
  RandomSource random(40);
  r.append(random, {2048});
  std::vector<double> q = round_to<float>(random.normal(c.heads_q * c.dim));
  // Overwrite key 40 (through a fresh cache built from the record).
  std::vector<T> keys(static_cast<std::size_t>(2048 * c.dim)), values(keys.size());
  for (Index j = 0; j < 2048; ++j)
    for (Index d = 0; d < c.dim; ++d) {
      keys[static_cast<std::size_t>(j * c.dim + d)] = static_cast<T>(r.key(0, j, 0, d));
      values[static_cast<std::size_t>(j * c.dim + d)] = static_cast<T>(r.value(0, j, 0, d));
    }
  for (Index d = 0; d < c.dim; ++d)
    keys[static_cast<std::size_t>(40 * c.dim + d)] = static_cast<T>(3.0 * q[d]);
  KVCache<T> cache(TensorView<T, 4>(keys.data(), {1, 1, 2048, c.dim}),
                   TensorView<T, 4>(values.data(), {1, 1, 2048, c.dim}), {false, 0, 16}, {2048});
  std::vector<T> q_t(q.begin(), q.end()), out(static_cast<std::size_t>(c.heads_q * c.dim)),
      dense(out.size());
  std::vector<T> lse(4), dense_lse(4);
  const TensorView<const T, 4> q_view(q_t.data(), {1, c.heads_q, 1, c.dim});
  AttentionOptions o;
  quest_decode_attention(q_view, cache, o, {1.0 / 16, 1},
                         TensorView<T, 4>(out.data(), {1, c.heads_q, 1, c.dim}),
                         TensorView<T, 3>(lse.data(), {1, c.heads_q, 1}));
  decode_attention(q_view, cache, o, TensorView<T, 4>(dense.data(), {1, c.heads_q, 1, c.dim}),
                   TensorView<T, 3>(dense_lse.data(), {1, c.heads_q, 1}));
  // Head 0 carries the planted match: most of its mass is kept.
  EXPECT_GT(std::exp(static_cast<double>(lse[0] - dense_lse[0])), 0.9);
}

TYPED_TEST(Quest, SameBitsForAnyThreadCount) {
  QuestCase c;
  c.cache_options.page_bounds = c.page = 16;
  c.capacity = 900;
  Recorded<TypeParam> r(c);
  RandomSource random(50);
  r.append(random, {900, 777});
  const auto q = round_to<float>(random.normal(c.batch * c.heads_q * 2 * c.dim));
  std::vector<QuestRun<TypeParam>> runs;
  for (const int threads : {1, 2, 3}) {
    AttentionOptions o;
    o.causal = true;
    o.num_threads = threads;
    runs.push_back(run_quest(r, q, 2, o, {0.1, 1}));
  }
  for (std::size_t i = 1; i < runs.size(); ++i) {
    EXPECT_TRUE(bitwise_equal(runs[i].out, runs[0].out));
    EXPECT_TRUE(bitwise_equal(runs[i].lse, runs[0].lse));
  }
}

// Regression (fuzz_sparse): over storage with no heads (no bounds to keep) the capacity may be
// huge; the cache visited every page of it (refresh when wrapping: 2^63 pages) and every
// dropped position (truncate), and computed ceil(capacity / page) and length + capacity with
// overflowing adds. Now no work depends on that capacity.
TEST(QuestRegressions, NoWorkDependsOnTheCapacityOfStorageWithNoHeads) {
  const Index capacity = std::numeric_limits<Index>::max();
  float key = 0, value = 0;
  const TensorView<float, 4> keys(&key, {1, 0, capacity, 4}, {0, 0, 0, 1});
  const TensorView<float, 4> values(&value, {1, 0, capacity, 4}, {0, 0, 0, 1});
  for (const Index page : {Index{1}, Index{16}}) {
    KVCacheOptions options;
    options.page_bounds = page;
    KVCache<float> cache(keys, values, options, {Index{1} << 40});
    EXPECT_EQ(cache.pages(), capacity / page + (page > 1));
    EXPECT_EQ(cache.page_bounds().size(2), cache.pages());
    EXPECT_EQ(cache.page_bounds().numel(), 0);
    cache.truncate(1);
    EXPECT_EQ(cache.length(0), 1);
    cache.refresh_page_bounds();
  }
}

// Regression (fuzz_sparse review): local_pages * page_size overflowed (local_pages <= 2^40,
// page_size <= 2^30). 2^40 local pages of 2^24 rows wrapped to 0 local rows, so no page was
// kept as local and Quest dropped a page that every local page must keep: budget 1/16 of 2
// candidate pages kept only the better-bounded one.
TEST(QuestRegressions, HugeLocalPagesKeepEveryPage) {
  const Index page = Index{1} << 24;
  KVCacheOptions options;
  options.page_bounds = page;
  KVCache<float> cache(1, 1, page + 1, 1, 1, options);
  // Page 0: 2^24 keys -8 with value 0; page 1: one key 8 with value 1.
  const float low = -8, zero = 0, high = 8, one = 1;
  const auto rows = [](const float& x, Index n) {
    return TensorView<const float, 4>(&x, {1, 1, n, 1}, {0, 0, 0, 1});
  };
  cache.append(rows(low, page), rows(zero, page));
  cache.append(rows(high, 1), rows(one, 1));
  const float q = 1;
  const TensorView<const float, 4> q_view(&q, {1, 1, 1, 1});
  AttentionOptions attention;
  attention.scale = 1;
  float quest_out = -1, dense_out = -1;
  quest_decode_attention(q_view, cache, attention, {1.0 / 16, Index{1} << 40},
                         TensorView<float, 4>(&quest_out, {1, 1, 1, 1}));
  decode_attention(q_view, cache, attention, TensorView<float, 4>(&dense_out, {1, 1, 1, 1}));
  // The mass of page 1 is e^8 against 2^24 e^-8 (about 1.9 times it) on page 0.
  EXPECT_NEAR(dense_out, 1 / (1 + std::ldexp(std::exp(-16.0), 24)), 1e-4);
  EXPECT_NEAR(quest_out, dense_out, 1e-3);  // (before the fix: 1, page 1 alone)
}

TEST(QuestErrors, BadArgumentsAreRejectedBeforeOutIsTouched) {
  KVCache<float> plain(1, 1, 64, 8, 8);
  KVCache<float> paged(1, 1, 64, 8, 8, {false, 0, 16});
  std::vector<float> kv(64 * 8, 1.0f);
  plain.append(TensorView<const float, 4>(kv.data(), {1, 1, 64, 8}),
               TensorView<const float, 4>(kv.data(), {1, 1, 64, 8}));
  paged.append(TensorView<const float, 4>(kv.data(), {1, 1, 64, 8}),
               TensorView<const float, 4>(kv.data(), {1, 1, 64, 8}));
  std::vector<float> q(8, 1.0f), out(8, 7.0f);
  const TensorView<const float, 4> q_view(q.data(), {1, 1, 1, 8});
  const TensorView<float, 4> out_view(out.data(), {1, 1, 1, 8});
  const auto expect_rejected = [&](const auto& call, const char* needle) {
    try {
      call();
      ADD_FAILURE() << "accepted: " << needle;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos) << error.what();
    }
    for (const float x : out) ASSERT_EQ(x, 7.0f) << needle;
  };
  expect_rejected([&] { quest_decode_attention(q_view, plain, {}, {}, out_view); }, "page bounds");
  expect_rejected([&] { quest_decode_attention(q_view, paged, {}, {0.0, 1}, out_view); }, "budget");
  expect_rejected([&] { quest_decode_attention(q_view, paged, {}, {1.5, 1}, out_view); }, "budget");
  expect_rejected(
      [&] {
        quest_decode_attention(q_view, paged, {}, {0.5, -1}, out_view);
      },
      "local_pages");
  AttentionOptions offset;
  offset.q_offset = 3;
  expect_rejected([&] { quest_decode_attention(q_view, paged, offset, {}, out_view); }, "q_offset");
  EXPECT_THROW(KVCache<float>(1, 1, 64, 8, 8, {false, 0, -1}), Error);
}

}  // namespace
}  // namespace foveal::test
