// tests/cpp/test_snapkv.cpp — foveal::snapkv_select and snapkv_gather against the float64
// reference (tests/reference/snapkv_reference.hpp), and the promises of the header: the forced
// keys (sinks, locals) are always kept, the count rule, the adaptive count shared by every head,
// the same selection for any thread count and layout, 16-bit storage selects as its widened
// values, decode over the gathered cache equals attention over the kept keys, bad arguments
// rejected before anything is written. Shapes include 1, primes and non-multiples of the window
// and the pooling kernel.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "foveal/attention/snapkv.hpp"
#include "harness.hpp"
#include "reference/snapkv_reference.hpp"

namespace foveal::test {
namespace {

std::string snap_string(const SnapKVOptions& s) {
  return describe("budget=", s.budget, " threshold=", s.threshold, " window=", s.window,
                  " pool=", s.pool, " local_tokens=", s.local_tokens);
}

reference::SnapKVReferenceOptions reference_snap(const SnapKVOptions& s) {
  return {s.budget, s.threshold, s.window, s.pool, s.local_tokens};
}

AttentionOptions causal_options(Index sink_tokens = 0) {
  AttentionOptions o;
  o.causal = true;
  o.sink_tokens = sink_tokens;
  return o;
}

// The inputs of p rounded to T (what a T kernel and the reference both read), and T copies of
// them laid out contiguously or with padded rows.
template <typename T>
struct Stored {
  std::vector<double> q, k, v;  // rounded to T
  std::vector<T> q_t, k_t, v_t;
  Shape<4> q_shape, k_shape, v_shape;
  Index padding;

  Stored(const Problem& p, Index padding_elements)
      : q_shape(p.q_shape()),
        k_shape(p.k_shape()),
        v_shape(p.v_shape()),
        padding(padding_elements) {
    const Inputs in = random_inputs(p);
    q = rounded(in.q);
    k = rounded(in.k);
    v = rounded(in.v);
    q_t = place(q, q_shape);
    k_t = place(k, k_shape);
    v_t = place(v, v_shape);
  }
  static std::vector<double> rounded(const std::vector<double>& values) {
    std::vector<double> out;
    for (const double x : values) out.push_back(widen(to_storage<T>(x)));
    return out;
  }
  static double widen(T x) {
    if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
      return static_cast<double>(to_float(x));
    } else {
      return static_cast<double>(x);
    }
  }
  std::vector<T> place(const std::vector<double>& values, const Shape<4>& shape) const {
    const Shape<4> strides = padded_strides<4>(shape, padding);
    std::vector<T> memory(
        static_cast<std::size_t>(std::max<Index>(1, span_elements<4>(shape, strides))),
        to_storage<T>(-7.0));
    const TensorView<T, 4> view(memory.data(), shape, strides);
    Index at = 0;
    for_each_element(
        view, [&](T& element) { element = to_storage<T>(values[static_cast<std::size_t>(at++)]); });
    return memory;
  }
  TensorView<const T, 4> qv() const {
    return padded_view<const T, 4>(q_t.data(), q_shape, padding);
  }
  TensorView<const T, 4> kv() const {
    return padded_view<const T, 4>(k_t.data(), k_shape, padding);
  }
  TensorView<const T, 4> vv() const {
    return padded_view<const T, 4>(v_t.data(), v_shape, padding);
  }
};

void expect_same_keys(const SnapKVSelection& got, const reference::SnapKVReference& want,
                      const Problem& p) {
  EXPECT_EQ(got.batch, p.batch);
  EXPECT_EQ(got.heads_kv, p.heads_kv);
  EXPECT_EQ(got.len_k, p.len_k);
  ASSERT_EQ(got.kept, want.kept);
  ASSERT_EQ(got.keys.size(), static_cast<std::size_t>(p.batch * p.heads_kv * got.kept));
  for (std::size_t head = 0; head < want.keys.size(); ++head) {
    const std::vector<std::int64_t> have(
        got.keys.begin() + static_cast<std::ptrdiff_t>(head) * got.kept,
        got.keys.begin() + static_cast<std::ptrdiff_t>(head + 1) * got.kept);
    EXPECT_EQ(have, want.keys[head]) << "head " << head;
  }
}

// snapkv_select<T> on the inputs of p (rounded to T) equals the reference exactly: the votes are
// float64 on both sides, over the same values in the same order.
template <typename T>
void expect_snapkv_matches(const Problem& p, const AttentionOptions& o, const SnapKVOptions& snap,
                           Index padding = 0) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o), "\n  ", snap_string(snap)));
  const Stored<T> in(p, padding);
  const SnapKVSelection got = snapkv_select(in.qv(), in.kv(), o, snap);
  expect_same_keys(got,
                   reference::snapkv_select_reference(shape_of(p), in.q, in.k, reference_options(o),
                                                      reference_snap(snap)),
                   p);
}

template <typename T>
class SnapKV : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, double, bfloat16, float16>;
struct StorageTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return dtype_name(dtype_of<T>());
  }
};
TYPED_TEST_SUITE(SnapKV, StorageTypes, StorageTypeNames);

constexpr Index kLengths[] = {1, 2, 7, 17, 63, 64, 65, 129, 200, 257};

TYPED_TEST(SnapKV, MatchesReferenceOnRandomShapesOptionsAndBudgets) {
  for (std::uint64_t seed = 500; seed < 560; ++seed) {
    RandomSource random(seed + 31);
    const Problem p = random_problem(seed, 1e6, kLengths, 5);
    AttentionOptions o =
        causal_options(random.pick({Index{0}, Index{0}, Index{1}, Index{4}, Index{70}}));
    o.softcap = random.pick({0.0, 0.0, 5.0});
    o.scale = random.pick({0.0, 0.0, 0.7});
    o.q_offset = random.chance(0.6) ? -1 : random.integer(0, p.len_k + 3);
    SnapKVOptions snap;
    snap.budget = random.pick({1.0 / 16, 0.2, 0.5, 1.0});
    snap.threshold = random.pick({0.0, 0.0, 0.3, 0.9, 1.0});
    snap.window = random.pick({Index{1}, Index{7}, Index{16}, Index{64}, Index{300}});
    snap.pool = random.pick({Index{1}, Index{3}, Index{7}, Index{13}});
    snap.local_tokens = random.pick({Index{0}, Index{5}, Index{64}});
    expect_snapkv_matches<TypeParam>(p, o, snap, random.chance(0.5) ? 3 : 0);
  }
}

TYPED_TEST(SnapKV, EveryGroupRatioAndLongerPrompts) {
  for (const Index ratio : kGroupRatios) {
    SnapKVOptions snap;
    snap.budget = 0.1;
    snap.local_tokens = 16;
    snap.window = 23;
    expect_snapkv_matches<TypeParam>(make_problem(2, 2 * ratio, 2, 601, 601, 16, 8, 700 + ratio),
                                     causal_options(3), snap);
    snap.threshold = 0.6;
    expect_snapkv_matches<TypeParam>(make_problem(1, 2 * ratio, 2, 601, 601, 16, 8, 720 + ratio),
                                     causal_options(0), snap);
  }
}

TEST(SnapKVSelect, KeepsSinksLocalsAndTheCountRule) {
  const Problem p = make_problem(2, 4, 2, 50, 301, 16, 16, 801);
  const Inputs in = random_inputs(p);
  const std::vector<double> q = in.q, k = in.k;
  const TensorView<const double, 4> qv(q.data(), p.q_shape()), kv(k.data(), p.k_shape());
  for (const Index sinks : {Index{0}, Index{4}, Index{400}})
    for (const Index local : {Index{0}, Index{32}, Index{301}})
      for (const double budget : {1.0 / 16, 0.5, 1.0}) {
        SnapKVOptions snap;
        snap.budget = budget;
        snap.local_tokens = local;
        const SnapKVSelection s = snapkv_select(qv, kv, causal_options(sinks), snap);
        const Index forced = std::min<Index>(301, std::min<Index>(sinks, 301) + local);
        const auto by_budget = static_cast<Index>(std::ceil(budget * 301));
        EXPECT_EQ(s.kept, std::min<Index>(301, std::max(by_budget, forced)));
        for (Index head = 0; head < 4; ++head) {
          const std::int64_t* keys = s.keys.data() + head * s.kept;
          EXPECT_TRUE(std::is_sorted(keys, keys + s.kept));
          EXPECT_TRUE(std::adjacent_find(keys, keys + s.kept) == keys + s.kept);
          for (Index key = 0; key < 301; ++key) {
            if (key < sinks || key >= 301 - local) {
              EXPECT_TRUE(std::binary_search(keys, keys + s.kept, key))
                  << "forced key " << key << " sinks " << sinks << " local " << local;
            }
          }
        }
      }
}

TEST(SnapKVSelect, KeepsAKeyTheObservationWindowAttendsTo) {
  // Random keys, one planted far back that every observation query points at: kept with a tiny
  // budget, together with its pooled neighbours.
  const Problem p = make_problem(1, 2, 1, 200, 1000, 32, 32, 901);
  Inputs in = random_inputs(p);
  const Index planted = 313;
  for (Index d = 0; d < p.dim; ++d) in.k[static_cast<std::size_t>(planted * p.dim + d)] = 3.0;
  for (Index h = 0; h < 2; ++h)
    for (Index i = 150; i < 200; ++i)
      for (Index d = 0; d < p.dim; ++d)
        in.q[static_cast<std::size_t>((h * 200 + i) * p.dim + d)] = 3.0;
  SnapKVOptions snap;
  snap.budget = 0.02;
  snap.window = 32;
  snap.local_tokens = 8;
  snap.pool = 5;
  const SnapKVSelection s =
      snapkv_select(TensorView<const double, 4>(in.q.data(), p.q_shape()),
                    TensorView<const double, 4>(in.k.data(), p.k_shape()), causal_options(), snap);
  ASSERT_EQ(s.kept, 20);
  for (Index key = planted - 2; key <= planted + 2; ++key)
    EXPECT_TRUE(std::binary_search(s.keys.begin(), s.keys.end(), key)) << key;
}

TEST(SnapKVSelect, AdaptiveCountIsTheLargestAnyHeadNeeds) {
  // Head 0 votes for one key (needs few), head 1 spreads its vote (needs many): both keep the
  // count head 1 needs, and a lower threshold never keeps more.
  const Problem p = make_problem(1, 2, 2, 64, 400, 16, 16, 911);
  Inputs in = random_inputs(p);
  for (Index d = 0; d < p.dim; ++d) in.k[static_cast<std::size_t>(100 * p.dim + d)] = 4.0;
  for (Index i = 0; i < 64; ++i)
    for (Index d = 0; d < p.dim; ++d) {
      in.q[static_cast<std::size_t>(i * p.dim + d)] = 4.0;
      in.q[static_cast<std::size_t>((64 + i) * p.dim + d)] = 0.0;
    }
  const TensorView<const double, 4> qv(in.q.data(), p.q_shape()), kv(in.k.data(), p.k_shape());
  SnapKVOptions snap;
  snap.budget = 1;
  snap.local_tokens = 0;
  snap.pool = 1;
  snap.window = 8;
  Index previous = 0;
  for (const double threshold : {0.05, 0.3, 0.6, 0.9, 1.0}) {
    snap.threshold = threshold;
    const SnapKVSelection s = snapkv_select(qv, kv, causal_options(), snap);
    const auto want = reference::snapkv_select_reference(
        shape_of(p), in.q, in.k, reference_options(causal_options()), reference_snap(snap));
    expect_same_keys(s, want, p);
    EXPECT_GE(s.kept, previous);
    previous = s.kept;
    EXPECT_TRUE(std::binary_search(s.keys.begin(), s.keys.begin() + s.kept, 100));
  }
  EXPECT_GT(previous, 300);  // a uniform vote needs almost every key at threshold 1
}

TYPED_TEST(SnapKV, SameSelectionForAnyThreadCountAndLayout) {
  const DefaultThreadsOnExit restore;
  const Problem p = make_problem(3, 8, 4, 97, 389, 24, 24, 1001);
  SnapKVOptions snap;
  snap.budget = 0.1;
  snap.window = 31;
  snap.local_tokens = 9;
  for (const double threshold : {0.0, 0.7}) {
    snap.threshold = threshold;
    const Stored<TypeParam> contiguous(p, 0), padded(p, 5);
    AttentionOptions o = causal_options(2);
    o.num_threads = 1;
    const SnapKVSelection one = snapkv_select(contiguous.qv(), contiguous.kv(), o, snap);
    for (const int threads : {2, 3, 7, 12}) {
      o.num_threads = threads;
      const SnapKVSelection many = snapkv_select(padded.qv(), padded.kv(), o, snap);
      EXPECT_EQ(many.kept, one.kept) << threads;
      EXPECT_EQ(many.keys, one.keys) << threads;
    }
    set_num_threads(5);
    o.num_threads = 0;
    EXPECT_EQ(snapkv_select(contiguous.qv(), contiguous.kv(), o, snap).keys, one.keys);
  }
}

TYPED_TEST(SnapKV, GatherCopiesTheKeptRowsIntoAnyLayout) {
  const Problem p = make_problem(2, 4, 2, 40, 131, 12, 5, 1101);
  const Stored<TypeParam> in(p, 2);
  SnapKVOptions snap;
  snap.budget = 0.2;
  snap.local_tokens = 7;
  const SnapKVSelection s = snapkv_select(in.qv(), in.kv(), causal_options(1), snap);
  const Shape<4> k_shape{2, 2, s.kept, 12}, v_shape{2, 2, s.kept, 5};
  for (const Index padding : {Index{0}, Index{3}}) {
    std::vector<TypeParam> out_k(
        static_cast<std::size_t>(span_elements<4>(k_shape, padded_strides<4>(k_shape, padding))));
    std::vector<TypeParam> out_v(
        static_cast<std::size_t>(span_elements<4>(v_shape, padded_strides<4>(v_shape, padding))));
    const auto kview = padded_view<TypeParam, 4>(out_k.data(), k_shape, padding);
    const auto vview = padded_view<TypeParam, 4>(out_v.data(), v_shape, padding);
    snapkv_gather(s, in.kv(), in.vv(), kview, vview);
    for (Index b = 0; b < 2; ++b)
      for (Index h = 0; h < 2; ++h)
        for (Index i = 0; i < s.kept; ++i) {
          const Index key = s.keys[static_cast<std::size_t>((b * 2 + h) * s.kept + i)];
          for (Index d = 0; d < 12; ++d)
            ASSERT_EQ(Stored<TypeParam>::widen(kview(b, h, i, d)),
                      Stored<TypeParam>::widen(in.kv()(b, h, key, d)));
          for (Index d = 0; d < 5; ++d)
            ASSERT_EQ(Stored<TypeParam>::widen(vview(b, h, i, d)),
                      Stored<TypeParam>::widen(in.vv()(b, h, key, d)));
        }
  }
}

TEST(SnapKVGather, DecodeOverTheCompressedCacheIsAttentionOverTheKeptKeys) {
  // Prefill 300 tokens, compress, append to a KVCache, decode two steps: each step equals the
  // float64 reference attention of the step's query over the kept keys and the new ones.
  const Problem p = make_problem(2, 6, 2, 300, 300, 16, 8, 1201);
  const Inputs in = random_inputs(p);
  const TensorView<const double, 4> q(in.q.data(), p.q_shape()), k(in.k.data(), p.k_shape()),
      v(in.v.data(), p.v_shape());
  SnapKVOptions snap;
  snap.budget = 0.15;
  snap.window = 32;
  snap.local_tokens = 16;
  const SnapKVSelection s = snapkv_select(q, k, causal_options(4), snap);
  std::vector<double> kept_k_data(static_cast<std::size_t>(2 * 2 * s.kept * 16));
  std::vector<double> kept_v_data(static_cast<std::size_t>(2 * 2 * s.kept * 8));
  snapkv_gather(s, k, v, TensorView<double, 4>(kept_k_data.data(), {2, 2, s.kept, 16}),
                TensorView<double, 4>(kept_v_data.data(), {2, 2, s.kept, 8}));
  const Index steps = 2;
  KVCache<double> cache(2, 2, s.kept + steps, 16, 8);
  cache.append(TensorView<const double, 4>(kept_k_data.data(), {2, 2, s.kept, 16}),
               TensorView<const double, 4>(kept_v_data.data(), {2, 2, s.kept, 8}));
  RandomSource random(1203);
  std::vector<double> all_k = kept_k_data, all_v = kept_v_data;  // grows per step: [B, H, n, D]
  Index n = s.kept;
  for (Index step = 0; step < steps; ++step) {
    const std::vector<double> new_k = round_to<float>(random.normal(2 * 2 * 16));
    const std::vector<double> new_v = round_to<float>(random.normal(2 * 2 * 8));
    const std::vector<double> new_q = round_to<float>(random.normal(2 * 6 * 16));
    cache.append(TensorView<const double, 4>(new_k.data(), {2, 2, 1, 16}),
                 TensorView<const double, 4>(new_v.data(), {2, 2, 1, 8}));
    std::vector<double> grown_k, grown_v;
    for (Index head = 0; head < 4; ++head) {
      grown_k.insert(grown_k.end(), all_k.begin() + head * n * 16,
                     all_k.begin() + (head + 1) * n * 16);
      grown_k.insert(grown_k.end(), new_k.begin() + head * 16, new_k.begin() + (head + 1) * 16);
      grown_v.insert(grown_v.end(), all_v.begin() + head * n * 8,
                     all_v.begin() + (head + 1) * n * 8);
      grown_v.insert(grown_v.end(), new_v.begin() + head * 8, new_v.begin() + (head + 1) * 8);
    }
    all_k = grown_k;
    all_v = grown_v;
    ++n;
    std::vector<double> out(2 * 6 * 8), lse(2 * 6);
    decode_attention(TensorView<const double, 4>(new_q.data(), {2, 6, 1, 16}), cache,
                     causal_options(), TensorView<double, 4>(out.data(), {2, 6, 1, 8}),
                     TensorView<double, 3>(lse.data(), {2, 6, 1}));
    std::vector<double> want_out, want_lse;
    reference::attention_reference({2, 6, 2, 1, n, 16, 8}, new_q, all_k, all_v,
                                   reference_options(causal_options()), want_out, want_lse);
    EXPECT_TRUE(matches_reference(out, want_out, 1e-12)) << "step " << step;
    EXPECT_TRUE(matches_reference(lse, want_lse, 1e-12)) << "step " << step;
  }
}

TEST(SnapKVSelect, EmptyShapes) {
  const SnapKVOptions snap;
  std::vector<double> q(64, 0.5), k(64, 0.5);
  // No keys: nothing kept. No query rows: the forced keys and the lowest others (all votes 0).
  const SnapKVSelection none =
      snapkv_select(TensorView<const double, 4>(q.data(), {1, 2, 4, 8}),
                    TensorView<const double, 4>(k.data(), {1, 1, 0, 8}), causal_options(), snap);
  EXPECT_EQ(none.kept, 0);
  EXPECT_TRUE(none.keys.empty());
  SnapKVOptions small;
  small.local_tokens = 2;
  small.budget = 0.5;
  const SnapKVSelection rows =
      snapkv_select(TensorView<const double, 4>(q.data(), {1, 2, 0, 8}),
                    TensorView<const double, 4>(k.data(), {1, 1, 8, 8}), causal_options(1), small);
  EXPECT_EQ(rows.keys, (std::vector<std::int64_t>{0, 1, 6, 7}));
  const SnapKVSelection batch =
      snapkv_select(TensorView<const double, 4>(q.data(), {0, 2, 4, 8}),
                    TensorView<const double, 4>(k.data(), {0, 1, 8, 8}), causal_options(), small);
  EXPECT_TRUE(batch.keys.empty());
}

// An option or argument that makes no sense is rejected with a message naming it.
TEST(SnapKVSelect, RejectsBadOptions) {
  const Problem p = make_problem(1, 4, 2, 8, 16, 8, 8, 1301);
  const Inputs in = random_inputs(p);
  const TensorView<const double, 4> q(in.q.data(), p.q_shape()), k(in.k.data(), p.k_shape());
  const auto rejects = [&](const AttentionOptions& o, const SnapKVOptions& snap,
                           std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(throws_error_with([&] { snapkv_select(q, k, o, snap); }, pieces));
  };
  const SnapKVOptions good;
  AttentionOptions not_causal;
  rejects(not_causal, good, {"snapkv_select", "causal must be true"});
  AttentionOptions windowed = causal_options();
  windowed.window_left = 8;
  rejects(windowed, good, {"window_left must be -1", "got 8"});
  AttentionOptions negative_sinks = causal_options();
  negative_sinks.sink_tokens = -1;
  rejects(negative_sinks, good, {"sink_tokens"});
  AttentionOptions offset = causal_options();
  offset.q_offset = -3;
  rejects(offset, good, {"q_offset"});
  for (const double budget : {0.0, -0.5, 1.5, std::nan("")})
    rejects(causal_options(),
            [&] {
              SnapKVOptions s;
              s.budget = budget;
              return s;
            }(),
            {"budget"});
  for (const double threshold : {-0.1, 1.01, std::nan("")})
    rejects(causal_options(),
            [&] {
              SnapKVOptions s;
              s.threshold = threshold;
              return s;
            }(),
            {"threshold"});
  rejects(causal_options(),
          [] {
            SnapKVOptions s;
            s.window = 0;
            return s;
          }(),
          {"window must be >= 1"});
  for (const Index pool : {Index{0}, Index{4}, Index{-3}})
    rejects(causal_options(),
            [&] {
              SnapKVOptions s;
              s.pool = pool;
              return s;
            }(),
            {"pool must be odd"});
  rejects(causal_options(),
          [] {
            SnapKVOptions s;
            s.local_tokens = -1;
            return s;
          }(),
          {"local_tokens"});
  // Shapes.
  const TensorView<const double, 4> q3(in.q.data(), {1, 3, 8, 8});
  EXPECT_TRUE(throws_error_with([&] { snapkv_select(q3, k, causal_options(), good); },
                                {"multiple of k.shape[1]"}));
  const TensorView<const double, 4> k_dim(in.k.data(), {1, 2, 8, 16});
  EXPECT_TRUE(
      throws_error_with([&] { snapkv_select(q, k_dim, causal_options(), good); }, {"k.shape[3]"}));
}

TEST(SnapKVGather, RejectsBadArgumentsBeforeWriting) {
  const Problem p = make_problem(1, 4, 2, 20, 40, 8, 6, 1401);
  const Inputs in = random_inputs(p);
  const TensorView<const double, 4> q(in.q.data(), p.q_shape()), k(in.k.data(), p.k_shape()),
      v(in.v.data(), p.v_shape());
  SnapKVOptions snap;
  snap.budget = 0.25;
  snap.local_tokens = 4;
  const SnapKVSelection good = snapkv_select(q, k, causal_options(), snap);
  ASSERT_EQ(good.kept, 10);
  std::vector<double> out_k(2 * 10 * 8, kSentinel), out_v(2 * 10 * 6, kSentinel);
  const TensorView<double, 4> ok(out_k.data(), {1, 2, 10, 8}), ov(out_v.data(), {1, 2, 10, 6});
  const auto rejects = [&](const SnapKVSelection& s, const TensorView<const double, 4>& kk,
                           const TensorView<const double, 4>& vv,
                           const TensorView<double, 4>& out_kk, const TensorView<double, 4>& out_vv,
                           const std::string& needle) {
    EXPECT_TRUE(throws_error_with([&] { snapkv_gather(s, kk, vv, out_kk, out_vv); },
                                  {"snapkv_gather", needle}));
    for (const double x : out_k) ASSERT_EQ(x, kSentinel) << needle;
    for (const double x : out_v) ASSERT_EQ(x, kSentinel) << needle;
  };
  const auto edited = [&](auto change) {
    SnapKVSelection copy = good;
    change(copy);
    return copy;
  };
  rejects(edited([](SnapKVSelection& s) { s.batch = 2; }), k, v, ok, ov, "selection.batch");
  rejects(edited([](SnapKVSelection& s) { s.heads_kv = 1; }), k, v, ok, ov, "selection.heads_kv");
  rejects(edited([](SnapKVSelection& s) { s.len_k = 41; }), k, v, ok, ov, "selection.len_k");
  rejects(edited([](SnapKVSelection& s) { s.kept = 41; }), k, v, ok, ov, "selection.kept");
  rejects(edited([](SnapKVSelection& s) { s.kept = -1; }), k, v, ok, ov, "selection.kept");
  rejects(edited([](SnapKVSelection& s) { s.keys.pop_back(); }), k, v, ok, ov, "must hold 20");
  rejects(edited([](SnapKVSelection& s) { s.keys[3] = s.keys[2]; }), k, v, ok, ov,
          "strictly increasing");
  rejects(edited([](SnapKVSelection& s) { s.keys[12] = 40; }), k, v, ok, ov, "keys[12]");
  rejects(edited([](SnapKVSelection& s) { s.keys[10] = -1; }), k, v, ok, ov, "keys[10]");
  rejects(good, k, TensorView<const double, 4>(in.v.data(), {1, 2, 39, 6}), ok, ov, "v.shape[2]");
  rejects(good, k, v, TensorView<double, 4>(out_k.data(), {1, 2, 9, 8}), ov, "out_k.shape[2]");
  rejects(good, k, v, ok, TensorView<double, 4>(out_v.data(), {1, 2, 10, 5}), "out_v.shape[3]");
  rejects(good, k, v, ok, TensorView<double, 4>(out_k.data() + 8, {1, 2, 10, 6}), "overlap");
  rejects(good, k, v, ok, TensorView<double, 4>(out_v.data(), {1, 2, 10, 6}, {0, 0, 0, 1}),
          "out_v");
}

}  // namespace
}  // namespace foveal::test
