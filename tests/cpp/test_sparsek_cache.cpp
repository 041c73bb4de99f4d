// tests/cpp/test_sparsek_cache.cpp — foveal::SparseKCache, constant-memory SparseK decode.
//
// The contract: after appending tokens 0 .. p, attend() is row p of foveal::sparsek_attention
// run once over the whole sequence. Every decode step of long runs is compared with that
// prefill (itself checked against float64 references by test_sparsek_attention), a few hundred
// steps with a float64 loop reference written here from docs/sparsek.md, and the cache's own
// promises: appending n tokens at once equals n appends, storage that never moves or grows,
// bitwise identical results for any thread count, rejected calls that change nothing. Every
// case prints its seed and configuration on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "cpp/harness.hpp"
#include "foveal/core/build_info.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/sparsek/attention.hpp"
#include "foveal/sparsek/cache.hpp"
#include "reference/sparsek_reference.hpp"

namespace foveal::test {
namespace {

constexpr SparseKGate kGates[] = {SparseKGate::value, SparseKGate::kv, SparseKGate::none};

// How the scores u of a run are drawn.
enum class Scores {
  spread,  // N(0, 1.5²) plus a slope of 0.002 per position: steady evictions, fractional gates
  ties,    // the same rounded to multiples of 0.5: many equal scores (ties: lower index wins)
};

// A whole sequence: q [B, Hq, L, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], u [B, Hkv, L].
template <typename T>
struct Sequence {
  Index batch = 1, heads_kv = 1, heads_q = 1, length = 1, dim = 1, dim_v = 1;
  std::vector<T> q, k, v, u;

  // Steps [begin, begin + n) as views of the whole buffers.
  TensorView<const T, 4> q_steps(Index begin, Index n) const {
    return steps(q, heads_q, dim, begin, n);
  }
  TensorView<const T, 4> k_steps(Index begin, Index n) const {
    return steps(k, heads_kv, dim, begin, n);
  }
  TensorView<const T, 4> v_steps(Index begin, Index n) const {
    return steps(v, heads_kv, dim_v, begin, n);
  }
  TensorView<const T, 3> u_steps(Index begin, Index n) const {
    return TensorView<const T, 3>(u.data() + begin, {batch, heads_kv, n},
                                  {heads_kv * length, length, 1});
  }

 private:
  TensorView<const T, 4> steps(const std::vector<T>& x, Index heads, Index width, Index begin,
                               Index n) const {
    return TensorView<const T, 4>(x.data() + begin * width, {batch, heads, n, width},
                                  {heads * length * width, length * width, width, 1});
  }
};

template <typename T>
Sequence<T> make_sequence(std::uint64_t seed, Index batch, Index heads_kv, Index heads_q,
                          Index length, Index dim, Index dim_v, Scores scores) {
  RandomSource random(seed);
  Sequence<T> s;
  s.batch = batch;
  s.heads_kv = heads_kv;
  s.heads_q = heads_q;
  s.length = length;
  s.dim = dim;
  s.dim_v = dim_v;
  const auto count = [](Index a, Index b, Index c, Index d) {
    return static_cast<std::size_t>(a * b * c * d);
  };
  s.q = convert<T>(random.normal(count(batch, heads_q, length, dim)));
  s.k = convert<T>(random.normal(count(batch, heads_kv, length, dim)));
  s.v = convert<T>(random.normal(count(batch, heads_kv, length, dim_v)));
  std::vector<double> u = random.normal(count(batch, heads_kv, length, 1), 0, 1.5);
  for (std::size_t i = 0; i < u.size(); ++i) {
    u[i] += 0.002 * static_cast<double>(static_cast<Index>(i) % length);
    if (scores == Scores::ties) u[i] = std::round(2 * u[i]) / 2;
  }
  s.u = convert<T>(u);
  return s;
}

SparseKOptions make_options(Index topk, Index window, Index sinks, SparseKGate gate,
                            int num_threads = 1) {
  SparseKOptions options;
  options.topk = topk;
  options.window = window;
  options.sink_tokens = sinks;
  options.gate = gate;
  options.num_threads = num_threads;
  return options;
}

std::string describe_options(const SparseKOptions& o) {
  return describe("topk=", o.topk, " window=", o.window, " sinks=", o.sink_tokens,
                  " gate=", to_string(o.gate), " scale=", o.scale, " softcap=", o.softcap,
                  " threads=", o.num_threads);
}

// Outputs laid out like the prefill's: out [B, Hq, L, Dv], lse [B, Hq, L].
template <typename T>
struct Outputs {
  std::vector<T> out, lse;

  explicit Outputs(const Sequence<T>& s)
      : out(static_cast<std::size_t>(s.batch * s.heads_q * s.length * s.dim_v), T(-7)),
        lse(static_cast<std::size_t>(s.batch * s.heads_q * s.length), T(-7)) {}

  // Step p's out [B, Hq, 1, Dv] and lse [B, Hq, 1].
  TensorView<T, 4> out_step(const Sequence<T>& s, Index p) {
    return TensorView<T, 4>(out.data() + p * s.dim_v, {s.batch, s.heads_q, 1, s.dim_v},
                            {s.heads_q * s.length * s.dim_v, s.length * s.dim_v, s.dim_v, 1});
  }
  TensorView<T, 3> lse_step(const Sequence<T>& s, Index p) {
    return TensorView<T, 3>(lse.data() + p, {s.batch, s.heads_q, 1},
                            {s.heads_q * s.length, s.length, 1});
  }
};

template <typename T>
Outputs<T> run_prefill(const Sequence<T>& s, const SparseKOptions& options) {
  Outputs<T> result(s);
  sparsek_attention(s.q_steps(0, s.length), s.k_steps(0, s.length), s.v_steps(0, s.length),
                    s.u_steps(0, s.length), options,
                    TensorView<T, 4>(result.out.data(), {s.batch, s.heads_q, s.length, s.dim_v}),
                    TensorView<T, 3>(result.lse.data(), {s.batch, s.heads_q, s.length}));
  return result;
}

// Appends step p and attends with its query, writing into step p of `outputs`.
template <typename T>
void decode_step(SparseKCache<T>& cache, const Sequence<T>& s, Index p, Outputs<T>& outputs) {
  cache.append(s.k_steps(p, 1), s.v_steps(p, 1), s.u_steps(p, 1));
  cache.attend(s.q_steps(p, 1), outputs.out_step(s, p), outputs.lse_step(s, p));
}

// The largest |got − want| / (1 + |want|) and the step (position) where it occurs.
struct StepError {
  double value = 0;
  Index step = -1;
};

template <typename T>
StepError worst_step_error(const std::vector<T>& got, const std::vector<T>& want, Index length,
                           Index row_width) {
  StepError worst;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double difference = std::abs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    const double error = std::isfinite(difference)
                             ? difference / (1 + std::abs(static_cast<double>(want[i])))
                             : std::numeric_limits<double>::infinity();
    if (error > worst.value || !(error == error))
      worst = {error, static_cast<Index>(i) / row_width % length};
  }
  return worst;
}

template <typename T>
double step_tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-11;
}

// ---------------------------------------------------------------------------------------------
// Every step equals the prefill.

template <typename T>
void check_every_step_against_prefill(Index batch, Index length) {
  std::uint64_t seed = std::is_same_v<T, float> ? 7000 : 8000;
  double worst_out = 0, worst_lse = 0;
  for (Index window : {0, 16})
    for (Index sinks : {0, 2})
      for (SparseKGate gate : kGates) {
        const Scores scores = seed % 4 == 3 ? Scores::ties : Scores::spread;
        const Sequence<T> s = make_sequence<T>(++seed, batch, 2, 4, length, 16, 16, scores);
        const SparseKOptions options = make_options(32, window, sinks, gate);
        SCOPED_TRACE(describe("seed=", seed, " B=", batch, " L=", length,
                              " ties=", scores == Scores::ties, " ", describe_options(options)));
        const Outputs<T> prefill = run_prefill(s, options);

        SparseKCache<T> cache(s.batch, s.heads_kv, s.dim, s.dim_v, options);
        const T* keys_storage = cache.keys().data();
        const T* values_storage = cache.values().data();
        const Index capacity = cache.capacity();
        EXPECT_EQ(capacity, sinks + window + 32);
        Outputs<T> decoded(s);
        Index most_rows = 0;
        for (Index p = 0; p < length; ++p) {
          decode_step(cache, s, p, decoded);
          most_rows = std::max(most_rows, cache.stored_rows());
        }
        EXPECT_EQ(cache.length(), length);
        EXPECT_LE(most_rows, capacity);
        // Constant memory: the storage never moved or grew.
        EXPECT_EQ(cache.keys().data(), keys_storage);
        EXPECT_EQ(cache.values().data(), values_storage);
        EXPECT_EQ(cache.capacity(), capacity);

        const StepError out_error = worst_step_error(decoded.out, prefill.out, length, s.dim_v);
        EXPECT_LE(out_error.value, step_tolerance<T>()) << "out, worst at step " << out_error.step;
        const StepError lse_error = worst_step_error(decoded.lse, prefill.lse, length, 1);
        EXPECT_LE(lse_error.value, step_tolerance<T>()) << "lse, worst at step " << lse_error.step;
        worst_out = std::max(worst_out, out_error.value);
        worst_lse = std::max(worst_lse, lse_error.value);
      }
  ::testing::Test::RecordProperty("worst_out_error", describe(worst_out));
  ::testing::Test::RecordProperty("worst_lse_error", describe(worst_lse));
}

TEST(SparseKCache, EveryStepOf5000MatchesPrefillFloat) {
  check_every_step_against_prefill<float>(1, 5000);
}
TEST(SparseKCache, EveryStepOf5000MatchesPrefillDouble) {
  check_every_step_against_prefill<double>(1, 5000);
}

// ---------------------------------------------------------------------------------------------
// A float64 loop reference of the step at position p (docs/sparsek.md), written from the math:
// pool = positions sinks .. p − window; S = the topk largest u of the pool (ties: lower
// position); m = SPARSEK(u_pool, topk); visible = sinks ∪ window ∪ S with gate 1 outside S.

struct ReferenceStep {
  std::vector<double> out;  // [Hq, Dv] of one sequence
  std::vector<double> lse;  // [Hq]
  std::vector<Index> selected;
  std::vector<double> gates;  // of `selected`
};

ReferenceStep reference_step(const Sequence<double>& s, const SparseKOptions& o, Index b, Index p) {
  ReferenceStep result;
  result.out.assign(static_cast<std::size_t>(s.heads_q * s.dim_v), 0.0);
  result.lse.assign(static_cast<std::size_t>(s.heads_q), 0.0);
  const Index group = s.heads_q / s.heads_kv;
  const double scale = o.scale > 0 ? o.scale : 1 / std::sqrt(static_cast<double>(s.dim));
  const auto u_at = [&](Index h, Index j) { return s.u[(b * s.heads_kv + h) * s.length + j]; };
  for (Index h = 0; h < s.heads_kv; ++h) {
    // Selection and gates.
    std::vector<Index> pool;
    for (Index j = o.sink_tokens; j <= p - o.window; ++j) pool.push_back(j);
    std::vector<double> pool_scores, pool_gates;
    for (Index j : pool) pool_scores.push_back(u_at(h, j));
    reference::sparsek_reference(pool_scores, o.topk, pool_gates);
    std::vector<Index> ranked = pool;
    std::stable_sort(ranked.begin(), ranked.end(),
                     [&](Index a, Index c) { return u_at(h, a) > u_at(h, c); });
    ranked.resize(std::min<std::size_t>(ranked.size(), static_cast<std::size_t>(o.topk)));
    std::sort(ranked.begin(), ranked.end());
    // Visible keys and their gates.
    std::vector<std::pair<Index, double>> visible;
    for (Index j = 0; j <= p; ++j)
      if (j < o.sink_tokens || j > p - o.window) visible.emplace_back(j, 1.0);
    for (Index j : ranked) {
      const double gate = pool_gates[static_cast<std::size_t>(j - o.sink_tokens)];
      visible.emplace_back(j, o.gate == SparseKGate::none ? 1.0 : gate);
      if (h == 0) {
        result.selected.push_back(j);
        result.gates.push_back(gate);
      }
    }
    for (Index g = 0; g < group; ++g) {
      const Index head_q = h * group + g;
      const double* query = &s.q[((b * s.heads_q + head_q) * s.length + p) * s.dim];
      std::vector<double> logits;
      for (const auto& [j, gate] : visible) {
        const double* key = &s.k[((b * s.heads_kv + h) * s.length + j) * s.dim];
        double dot = 0;
        for (Index d = 0; d < s.dim; ++d) dot += query[d] * key[d];
        double logit = scale * dot * (o.gate == SparseKGate::kv ? gate : 1.0);
        if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
        logits.push_back(logit);
      }
      const double max_logit = *std::max_element(logits.begin(), logits.end());
      double sum = 0;
      for (double logit : logits) sum += std::exp(logit - max_logit);
      result.lse[static_cast<std::size_t>(head_q)] = max_logit + std::log(sum);
      for (std::size_t i = 0; i < visible.size(); ++i) {
        const auto [j, gate] = visible[i];
        const double weight =
            std::exp(logits[i] - max_logit) / sum * (o.gate == SparseKGate::none ? 1.0 : gate);
        const double* value = &s.v[((b * s.heads_kv + h) * s.length + j) * s.dim_v];
        for (Index d = 0; d < s.dim_v; ++d)
          result.out[static_cast<std::size_t>(head_q * s.dim_v + d)] += weight * value[d];
      }
    }
  }
  return result;
}

TEST(SparseKCache, StepsMatchFloat64LoopReference) {
  struct Case {
    Index topk, window, sinks;
    double scale, softcap;
    Scores scores;
  };
  const Case cases[] = {{5, 0, 0, 0, 0, Scores::spread},
                        {7, 4, 1, 0.3, 0, Scores::ties},
                        {3, 9, 3, 0, 2.5, Scores::spread},
                        {1, 1, 0, 0, 0, Scores::spread},
                        {200, 2, 2, 0, 0, Scores::spread}};
  std::uint64_t seed = 9000;
  for (const Case& c : cases)
    for (SparseKGate gate : kGates) {
      const Sequence<double> s = make_sequence<double>(++seed, 2, 2, 6, 120, 5, 3, c.scores);
      SparseKOptions options = make_options(c.topk, c.window, c.sinks, gate);
      options.scale = c.scale;
      options.softcap = c.softcap;
      SCOPED_TRACE(describe("seed=", seed, " ", describe_options(options)));
      SparseKCache<double> cache(s.batch, s.heads_kv, s.dim, s.dim_v, options);
      Outputs<double> decoded(s);
      for (Index p = 0; p < s.length; ++p) {
        decode_step(cache, s, p, decoded);
        for (Index b = 0; b < s.batch; ++b) {
          const ReferenceStep want = reference_step(s, options, b, p);
          std::vector<double> out, lse;
          for (Index h = 0; h < s.heads_q; ++h) {
            lse.push_back(
                decoded.lse[static_cast<std::size_t>((b * s.heads_q + h) * s.length + p)]);
            for (Index d = 0; d < s.dim_v; ++d)
              out.push_back(decoded.out[static_cast<std::size_t>(
                  ((b * s.heads_q + h) * s.length + p) * s.dim_v + d)]);
          }
          ASSERT_TRUE(matches_reference(out, want.out, 1e-12)) << "step " << p << " b=" << b;
          ASSERT_TRUE(matches_reference(lse, want.lse, 1e-12)) << "step " << p << " b=" << b;
          const SparseKCacheSelection<double> selection = cache.selected(b, 0);
          ASSERT_EQ(selection.positions, want.selected) << "step " << p << " b=" << b;
          ASSERT_TRUE(matches_reference(selection.gates, want.gates, 1e-12)) << "step " << p;
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The cache's own promises.

// attend() with the query of step p: lse and out of every (sequence, query head), in order.
template <typename T>
std::vector<double> attend_once(const SparseKCache<T>& cache, const Sequence<T>& s, Index p) {
  std::vector<T> out(static_cast<std::size_t>(s.batch * s.heads_q * s.dim_v));
  std::vector<T> lse(static_cast<std::size_t>(s.batch * s.heads_q));
  cache.attend(s.q_steps(p, 1), TensorView<T, 4>(out.data(), {s.batch, s.heads_q, 1, s.dim_v}),
               TensorView<T, 3>(lse.data(), {s.batch, s.heads_q, 1}));
  std::vector<double> result(lse.begin(), lse.end());
  result.insert(result.end(), out.begin(), out.end());
  return result;
}

template <typename T>
void check_chunked_appends() {
  std::uint64_t seed = 9100;
  for (Index window : {0, 5})
    for (SparseKGate gate : kGates) {
      const Sequence<T> s = make_sequence<T>(++seed, 2, 2, 4, 700, 6, 5, Scores::spread);
      const SparseKOptions options = make_options(9, window, 2, gate);
      SCOPED_TRACE(describe("seed=", seed, " ", describe_options(options)));
      SparseKCache<T> one_at_a_time(s.batch, s.heads_kv, s.dim, s.dim_v, options);
      SparseKCache<T> chunked(s.batch, s.heads_kv, s.dim, s.dim_v, options);
      RandomSource random(seed);
      Index p = 0;
      while (p < s.length) {
        // Chunks of 1 to 9 tokens, sometimes one of 80 (past the window, the sinks and topk).
        const Index n = std::min(s.length - p, random.chance(0.1) ? 80 : random.integer(1, 9));
        for (Index j = p; j < p + n; ++j)
          one_at_a_time.append(s.k_steps(j, 1), s.v_steps(j, 1), s.u_steps(j, 1));
        chunked.append(s.k_steps(p, n), s.v_steps(p, n), s.u_steps(p, n));
        p += n;
        ASSERT_EQ(chunked.length(), p);
        ASSERT_TRUE(
            bitwise_equal(attend_once(chunked, s, p - 1), attend_once(one_at_a_time, s, p - 1)))
            << "after " << p << " tokens";
        for (Index b = 0; b < s.batch; ++b)
          for (Index h = 0; h < s.heads_kv; ++h)
            ASSERT_EQ(chunked.selected(b, h).positions, one_at_a_time.selected(b, h).positions);
      }
    }
}

TEST(SparseKCache, AppendingSeveralTokensEqualsOneAtATimeFloat) { check_chunked_appends<float>(); }
TEST(SparseKCache, AppendingSeveralTokensEqualsOneAtATimeDouble) {
  check_chunked_appends<double>();
}

TEST(SparseKCache, StoredRowsFollowSinksWindowAndTopk) {
  for (Index sinks : {0, 3})
    for (Index window : {0, 5})
      for (Index topk : {1, 4}) {
        const SparseKOptions options = make_options(topk, window, sinks, SparseKGate::value);
        SCOPED_TRACE(describe_options(options));
        const Sequence<float> s = make_sequence<float>(9200, 1, 3, 3, 60, 4, 4, Scores::spread);
        SparseKCache<float> cache(1, 3, 4, 4, options);
        EXPECT_EQ(cache.capacity(), sinks + window + topk);
        EXPECT_EQ(cache.stored_rows(), 0);
        for (Index length = 1; length <= s.length; ++length) {
          cache.append(s.k_steps(length - 1, 1), s.v_steps(length - 1, 1),
                       s.u_steps(length - 1, 1));
          const Index pool = std::max<Index>(length - sinks - window, 0);
          const Index expected = std::min(length, sinks) +
                                 std::clamp<Index>(length - sinks, 0, window) +
                                 std::min(pool, topk);
          ASSERT_EQ(cache.stored_rows(), expected) << "length " << length;
          ASSERT_LE(cache.stored_rows(), cache.capacity());
          for (Index h = 0; h < 3; ++h) {
            const SparseKCacheSelection<float> selection = cache.selected(0, h);
            ASSERT_EQ(static_cast<Index>(selection.positions.size()), std::min(pool, topk));
            for (Index position : selection.positions) {
              ASSERT_GE(position, sinks);
              ASSERT_LE(position, length - 1 - window);
            }
          }
        }
      }
}

// τ keeps one double per pool score with p > 0: the ones (at most topk) and the fractional
// ones, the scores in (τ, τ + 1). With scores spread over many units (a position slope) that
// count stays bounded: it does not grow from the first 10,000 steps to the next 10,000.
TEST(SparseKCache, ThresholdStateStaysBoundedWithSpreadScores) {
  const Index topk = 16;
  SparseKCache<float> cache(1, 1, 2, 2, make_options(topk, 4, 1, SparseKGate::value));
  RandomSource random(9300);
  Index most_first_half = 0, most_second_half = 0;
  for (Index p = 0; p < 20000; ++p) {
    const std::vector<float> kv = convert<float>(random.normal(2));
    const auto u = static_cast<float>(random.normal(1, 0, 1.5)[0] + 0.01 * static_cast<double>(p));
    const TensorView<const float, 4> row(kv.data(), {1, 1, 1, 2});
    cache.append(row, row, TensorView<const float, 3>(&u, {1, 1, 1}));
    Index& most = p < 10000 ? most_first_half : most_second_half;
    most = std::max(most, cache.threshold_entries());
  }
  RecordProperty("threshold_entries_first_10000", static_cast<int>(most_first_half));
  RecordProperty("threshold_entries_next_10000", static_cast<int>(most_second_half));
  EXPECT_LE(most_second_half, 4 * topk);
  EXPECT_LE(most_second_half, most_first_half + topk / 2);
  EXPECT_LE(cache.stored_rows(), 1 + 4 + topk);
}

TEST(SparseKCache, ResultsIdenticalForOneTwoThreeThreads) {
  // Hq = 130 per kv head: three tiles per head; chunks of 70 tokens take the parallel append.
  struct Case {
    Index batch, heads_kv, heads_q;
  };
  std::uint64_t seed = 9400;
  for (const Case c : {Case{2, 3, 6}, Case{1, 1, 130}}) {
    const Sequence<float> s =
        make_sequence<float>(++seed, c.batch, c.heads_kv, c.heads_q, 150, 7, 9, Scores::spread);
    SCOPED_TRACE(describe("seed=", seed, " B=", c.batch, " Hkv=", c.heads_kv, " Hq=", c.heads_q));
    std::vector<SparseKCache<float>> caches;
    for (int threads : {1, 2, 3})
      caches.emplace_back(s.batch, s.heads_kv, s.dim, s.dim_v,
                          make_options(11, 6, 1, SparseKGate::kv, threads));
    for (Index p = 0; p < s.length;) {
      const Index n = p % 50 == 0 ? std::min<Index>(70, s.length - p) : 1;
      for (SparseKCache<float>& cache : caches)
        cache.append(s.k_steps(p, n), s.v_steps(p, n), s.u_steps(p, n));
      p += n;
      const std::vector<double> single = attend_once(caches[0], s, p - 1);
      for (std::size_t i = 1; i < caches.size(); ++i)
        ASSERT_TRUE(bitwise_equal(attend_once(caches[i], s, p - 1), single)) << "step " << p - 1;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 16-bit storage: the float cache on the same (representable) values, rounded.

template <typename H>
std::vector<H> to_half(const std::vector<float>& x) {
  std::vector<H> result;
  for (float value : x) result.push_back(to_storage<H>(value));
  return result;
}

template <typename H>
std::vector<float> representable(const std::vector<float>& x) {
  std::vector<float> result;
  for (float value : x) result.push_back(to_float(to_storage<H>(value)));
  return result;
}

template <typename H>
void check_half_cache_is_the_float_cache_rounded() {
  struct Case {
    Index batch, heads_kv, heads_q, dim, dim_v;
    SparseKOptions options;
  };
  // Decode groups of 1-4 rows (few-row tiles, gathered slots and contiguous sinks / window), a
  // group of 12 (many-row tiles: on AMX for bfloat16 with D % 32 == 0, Dv % 16 == 0), every gate.
  const Case cases[] = {
      {1, 1, 1, 8, 8, make_options(5, 0, 0, SparseKGate::value)},
      {2, 2, 8, 19, 11, make_options(7, 4, 2, SparseKGate::kv)},
      {1, 3, 6, 64, 40, make_options(9, 16, 1, SparseKGate::none, 2)},
      {1, 1, 12, 32, 16, make_options(6, 5, 2, SparseKGate::value, 3)},
  };
  std::uint64_t seed = 9700;
  for (const Case& c : cases) {
    Sequence<float> s = make_sequence<float>(++seed, c.batch, c.heads_kv, c.heads_q, 260, c.dim,
                                             c.dim_v, Scores::spread);
    s.q = representable<H>(s.q);
    s.k = representable<H>(s.k);
    s.v = representable<H>(s.v);
    s.u = representable<H>(s.u);
    SCOPED_TRACE(describe("seed=", seed, " B=", c.batch, " Hkv=", c.heads_kv, " Hq=", c.heads_q,
                          " D=", c.dim, " Dv=", c.dim_v, " ", describe_options(c.options)));
    const std::vector<H> q = to_half<H>(s.q), k = to_half<H>(s.k), v = to_half<H>(s.v),
                         u = to_half<H>(s.u);
    // The 16-bit views share s's layout: the same offsets into the 16-bit copies.
    SparseKCache<float> single(s.batch, s.heads_kv, s.dim, s.dim_v, c.options);
    SparseKCache<H> half(s.batch, s.heads_kv, s.dim, s.dim_v, c.options);
    // The same 16-bit cache on another thread count: the same bits.
    SparseKOptions other_options = c.options;
    other_options.num_threads = c.options.num_threads == 3 ? 1 : 3;
    SparseKCache<H> other(s.batch, s.heads_kv, s.dim, s.dim_v, other_options);
    const bool tiles = std::is_same_v<H, bfloat16> && build_info().level == "avx512-amx" &&
                       c.heads_q / c.heads_kv > 8 && c.dim % 32 == 0 && c.dim_v % 16 == 0;
    const auto offset = [](const TensorView<const float, 4>& view, const std::vector<float>& base) {
      return view.data() - base.data();
    };
    for (Index p = 0; p < s.length;) {
      const Index n = p % 97 == 0 ? std::min<Index>(40, s.length - p) : 1;
      const auto ks = s.k_steps(p, n), vs = s.v_steps(p, n), qs = s.q_steps(p + n - 1, 1);
      const auto us = s.u_steps(p, n);
      single.append(ks, vs, us);
      const TensorView<const H, 4> half_k(k.data() + offset(ks, s.k), ks.shape(), ks.strides());
      const TensorView<const H, 4> half_v(v.data() + offset(vs, s.v), vs.shape(), vs.strides());
      const TensorView<const H, 3> half_u(u.data() + (us.data() - s.u.data()), us.shape(),
                                          us.strides());
      half.append(half_k, half_v, half_u);
      other.append(half_k, half_v, half_u);
      p += n;
      std::vector<float> out(static_cast<std::size_t>(s.batch * s.heads_q * s.dim_v));
      std::vector<float> lse(static_cast<std::size_t>(s.batch * s.heads_q), -7.0f);
      std::vector<H> half_out(out.size(), to_storage<H>(-7.0f));
      std::vector<float> half_lse(lse.size(), -7.0f);
      single.attend(qs, TensorView<float, 4>(out.data(), {s.batch, s.heads_q, 1, s.dim_v}),
                    TensorView<float, 3>(lse.data(), {s.batch, s.heads_q, 1}));
      const TensorView<const H, 4> half_q(q.data() + offset(qs, s.q), qs.shape(), qs.strides());
      half.attend(half_q, TensorView<H, 4>(half_out.data(), {s.batch, s.heads_q, 1, s.dim_v}),
                  TensorView<float, 3>(half_lse.data(), {s.batch, s.heads_q, 1}));
      std::vector<H> other_out(out.size());
      std::vector<float> other_lse(lse.size());
      other.attend(half_q, TensorView<H, 4>(other_out.data(), {s.batch, s.heads_q, 1, s.dim_v}),
                   TensorView<float, 3>(other_lse.data(), {s.batch, s.heads_q, 1}));
      for (std::size_t i = 0; i < out.size(); ++i)
        ASSERT_EQ(other_out[i].bits, half_out[i].bits) << "threads, step " << p - 1;
      ASSERT_EQ(other_lse, half_lse) << "threads, step " << p - 1;
      for (std::size_t i = 0; i < out.size(); ++i) {
        if (tiles) {
          ASSERT_NEAR(to_float(half_out[i]), out[i], 4e-3 * (1 + std::abs(out[i])))
              << "step " << p - 1 << " out[" << i << "]";
        } else {
          ASSERT_EQ(half_out[i].bits, to_storage<H>(out[i]).bits)
              << "step " << p - 1 << " out[" << i << "]: float gave " << out[i];
        }
      }
      for (std::size_t i = 0; i < lse.size(); ++i) {
        if (tiles) {
          ASSERT_NEAR(half_lse[i], lse[i], 2e-5 * (1 + std::abs(lse[i]))) << "step " << p - 1;
        } else {
          ASSERT_EQ(half_lse[i], lse[i]) << "step " << p - 1 << " lse[" << i << "]";
        }
      }
    }
    for (Index b = 0; b < s.batch; ++b)
      for (Index head = 0; head < s.heads_kv; ++head) {
        const auto want = single.selected(b, head);
        const auto got = half.selected(b, head);
        EXPECT_EQ(got.positions, want.positions);
        EXPECT_EQ(got.gates, want.gates);
        EXPECT_EQ(half.threshold(b, head), single.threshold(b, head));
      }
    EXPECT_EQ(half.stored_rows(), single.stored_rows());
  }
}

TEST(SparseKCache, HalfStorageBFloat16IsTheFloatCacheRounded) {
  check_half_cache_is_the_float_cache_rounded<bfloat16>();
}
TEST(SparseKCache, HalfStorageFloat16IsTheFloatCacheRounded) {
  check_half_cache_is_the_float_cache_rounded<float16>();
}

TEST(SparseKCache, HalfStorageRejectsNonFiniteScoresNaming) {
  SparseKCache<bfloat16> cache(1, 1, 4, 4, make_options(2, 0, 0, SparseKGate::value));
  const std::vector<bfloat16> rows(4, to_storage<bfloat16>(1.0f));
  const bfloat16 score = to_storage<bfloat16>(std::numeric_limits<float>::infinity());
  const TensorView<const bfloat16, 4> row(rows.data(), {1, 1, 1, 4});
  try {
    cache.append(row, row, TensorView<const bfloat16, 3>(&score, {1, 1, 1}));
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("u[0, 0, 0] (position 0) must be finite, got inf"),
              std::string::npos)
        << error.what();
  }
  EXPECT_EQ(cache.length(), 0);
}

TEST(SparseKCache, ResetStartsOver) {
  const Sequence<double> s = make_sequence<double>(9500, 1, 2, 2, 90, 3, 3, Scores::spread);
  const SparseKOptions options = make_options(4, 3, 1, SparseKGate::value);
  SparseKCache<double> fresh(1, 2, 3, 3, options), reused(1, 2, 3, 3, options);
  reused.append(s.k_steps(0, 50), s.v_steps(0, 50), s.u_steps(0, 50));
  reused.reset();
  EXPECT_EQ(reused.length(), 0);
  EXPECT_EQ(reused.stored_rows(), 0);
  EXPECT_EQ(reused.threshold(0, 1), -std::numeric_limits<double>::infinity());
  for (Index p = 0; p < s.length; ++p) {
    fresh.append(s.k_steps(p, 1), s.v_steps(p, 1), s.u_steps(p, 1));
    reused.append(s.k_steps(p, 1), s.v_steps(p, 1), s.u_steps(p, 1));
    ASSERT_TRUE(bitwise_equal(attend_once(reused, s, p), attend_once(fresh, s, p))) << "step " << p;
  }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

TEST(SparseKCache, BadOptionsAreRejected) {
  const auto make = [](Index batch, Index heads_kv, Index dim, Index dim_v, SparseKOptions o) {
    return [=] { SparseKCache<float> cache(batch, heads_kv, dim, dim_v, o); };
  };
  const SparseKOptions good = make_options(4, 2, 1, SparseKGate::value);
  SparseKOptions o = good;
  EXPECT_TRUE(throws_error_with(make(-1, 1, 4, 4, good), {"SparseKCache", "batch = -1"}));
  EXPECT_TRUE(throws_error_with(make(1, 1, 0, 4, good), {"SparseKCache", "dim = 0"}));
  EXPECT_TRUE(throws_error_with(make(1, -2, 4, 4, good), {"heads_kv = -2"}));
  o.topk = 0;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"SparseKCache", "topk must be >= 1, got 0"}));
  o = good;
  o.window = -1;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"window must be >= 0", "got -1"}));
  o = good;
  o.sink_tokens = -3;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"sink_tokens must be >= 0", "got -3"}));
  o = good;
  o.window = 0;
  o.causal = false;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"causal must be true"}));
  o = good;
  o.q_offset = 5;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"q_offset must be -1", "got 5"}));
  o = good;
  o.scale = -1;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"scale"}));
  o = good;
  o.softcap = std::nan("");
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"softcap"}));
  o = good;
  o.num_threads = -1;
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"num_threads must be in [0, 1024]"}));
  o = good;
  o.gate = static_cast<SparseKGate>(7);
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"gate must be"}));
  o = good;
  o.topk = Index(1) << 50;  // 2^54 bytes of keys: no overflow, but more than can be allocated
  EXPECT_THROW(make(1, 1, 4, 4, o)(), MemoryError);
  o.topk = std::numeric_limits<Index>::max();  // sink_tokens + window + topk overflows
  EXPECT_TRUE(throws_error_with(make(1, 1, 4, 4, o), {"sink_tokens + window + topk"}));
}

// The observable state of a cache: length, rows, selections, τ, and the attention of a query.
template <typename T>
std::vector<double> snapshot(const SparseKCache<T>& cache, const Sequence<T>& s) {
  std::vector<double> state = {static_cast<double>(cache.length()),
                               static_cast<double>(cache.stored_rows())};
  for (Index b = 0; b < cache.batch(); ++b)
    for (Index h = 0; h < cache.heads_kv(); ++h) {
      state.push_back(cache.threshold(b, h));
      const SparseKCacheSelection<T> selection = cache.selected(b, h);
      for (std::size_t i = 0; i < selection.positions.size(); ++i) {
        state.push_back(static_cast<double>(selection.positions[i]));
        state.push_back(static_cast<double>(selection.gates[i]));
      }
    }
  if (cache.length() > 0) {
    const std::vector<double> attended = attend_once(cache, s, 0);
    state.insert(state.end(), attended.begin(), attended.end());
  }
  for (Index i = 0; i < cache.keys().numel(); ++i)
    state.push_back(static_cast<double>(cache.keys().data()[i]));
  return state;
}

TEST(SparseKCache, BadInputIsRejectedAndCacheUnchanged) {
  // B = 2, Hkv = 2, Hq = 4, D = 3, Dv = 2.
  Sequence<float> s = make_sequence<float>(9600, 2, 2, 4, 12, 3, 2, Scores::spread);
  SparseKCache<float> cache(2, 2, 3, 2, make_options(3, 2, 1, SparseKGate::value));
  std::vector<float> out(2 * 4 * 2), lse(2 * 4);
  const TensorView<float, 4> out_view(out.data(), {2, 4, 1, 2});
  EXPECT_TRUE(throws_error_with([&] { cache.attend(s.q_steps(0, 1), out_view); },
                                {"SparseKCache::attend", "empty", "append"}));
  cache.append(s.k_steps(0, 8), s.v_steps(0, 8), s.u_steps(0, 8));
  const std::vector<double> before = snapshot(cache, s);

  const auto rejected_append = [&](TensorView<const float, 4> k, TensorView<const float, 4> v,
                                   TensorView<const float, 3> u,
                                   std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(throws_error_with([&] { cache.append(k, v, u); }, pieces));
    EXPECT_TRUE(bitwise_equal(snapshot(cache, s), before));
  };
  std::vector<float> wide(2 * 2 * 3 * 4, 0.5f), three(3 * 2 * 3 * 3, 0.5f);
  rejected_append(TensorView<const float, 4>(wide.data(), {2, 2, 3, 4}), s.v_steps(8, 3),
                  s.u_steps(8, 3), {"SparseKCache::append", "k.shape[3]", "dim (D)", "3", "4"});
  rejected_append(TensorView<const float, 4>(three.data(), {3, 2, 3, 3}), s.v_steps(8, 3),
                  s.u_steps(8, 3), {"k.shape[0]", "batch"});
  rejected_append(TensorView<const float, 4>(three.data(), {2, 3, 3, 3}), s.v_steps(8, 3),
                  s.u_steps(8, 3), {"k.shape[1]", "heads_kv"});
  rejected_append(s.k_steps(8, 3), s.v_steps(8, 2), s.u_steps(8, 3), {"v.shape[2]", "(n)"});
  rejected_append(s.k_steps(8, 3), s.k_steps(8, 3), s.u_steps(8, 3), {"v.shape[3]", "dim_v"});
  rejected_append(s.k_steps(8, 3), s.v_steps(8, 3), s.u_steps(8, 2), {"u.shape[2]", "(n)"});
  // A bad score in the last token of a multi-token append: nothing of the call is applied.
  for (const float bad : {std::nanf(""), std::numeric_limits<float>::infinity()}) {
    std::vector<float> u(s.u.begin(), s.u.end());
    u[static_cast<std::size_t>(1 * s.heads_kv * s.length + 1 * s.length + 10)] = bad;
    const TensorView<const float, 3> u_bad(u.data() + 8, {2, 2, 3}, {2 * s.length, s.length, 1});
    rejected_append(s.k_steps(8, 3), s.v_steps(8, 3), u_bad,
                    {"u[1, 1, 2] (position 10) must be finite"});
  }

  const auto rejected_attend = [&](TensorView<const float, 4> q, TensorView<float, 4> o,
                                   TensorView<float, 3> l,
                                   std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(throws_error_with([&] { cache.attend(q, o, l); }, pieces));
    EXPECT_TRUE(bitwise_equal(snapshot(cache, s), before));
  };
  std::vector<float> out_two(2 * 4 * 2 * 2);
  rejected_attend(s.q_steps(0, 2), TensorView<float, 4>(out_two.data(), {2, 4, 2, 2}), {},
                  {"SparseKCache::attend", "q.shape[2] (Lq) must be 1", "got 2"});
  std::vector<float> q3(2 * 3 * 3, 0.f), out3(2 * 3 * 2);
  rejected_attend(TensorView<const float, 4>(q3.data(), {2, 3, 1, 3}),
                  TensorView<float, 4>(out3.data(), {2, 3, 1, 2}), {},
                  {"Hq = 3", "must be a multiple of", "Hkv = 2"});
  std::vector<float> q_wide(2 * 4 * 5, 0.f);
  rejected_attend(TensorView<const float, 4>(q_wide.data(), {2, 4, 1, 5}), out_view, {},
                  {"q.shape[3]", "dim (D)"});
  rejected_attend(TensorView<const float, 4>(q_wide.data(), {1, 4, 1, 3}),
                  TensorView<float, 4>(out.data(), {1, 4, 1, 2}), {}, {"q.shape[0]", "batch"});
  rejected_attend(s.q_steps(0, 1), TensorView<float, 4>(out.data(), {2, 4, 1, 1}), {},
                  {"out.shape[3]", "dim_v"});
  rejected_attend(s.q_steps(0, 1), out_view, TensorView<float, 3>(lse.data(), {2, 2, 1}),
                  {"lse.shape[1]", "Hq"});
  EXPECT_TRUE(throws_error_with([&] { (void)cache.selected(2, 0); },
                                {"SparseKCache::selected", "sequence must be in [0, 2)", "got 2"}));
  EXPECT_TRUE(throws_error_with([&] { (void)cache.threshold(0, -1); },
                                {"SparseKCache::threshold", "head must be in [0, 2)"}));
  // Zero tokens are a valid append that changes nothing.
  cache.append(s.k_steps(8, 0), s.v_steps(8, 0), s.u_steps(8, 0));
  EXPECT_TRUE(bitwise_equal(snapshot(cache, s), before));
}

}  // namespace
}  // namespace foveal::test
