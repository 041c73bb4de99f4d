// foveal::snapkv_select / snapkv_gather: validation, the votes of the observation window (plain
// float64 loops: a few rows against every key, far less than the prefill it follows), the
// per-head cut and the gather of the kept rows.
#include "foveal/attention/snapkv.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "detail/attention_setup.hpp"
#include "detail/flash_engine.hpp"
#include "detail/sparse_lists.hpp"
#include "foveal/core/parallel.hpp"

namespace foveal {
namespace {

using detail::checked_numel;
using detail::require_disjoint;
using detail::require_extent;
using detail::require_valid_view;
using detail::resolve_num_threads;

constexpr const char* kSelect = "snapkv_select";
constexpr const char* kGather = "snapkv_gather";

template <typename T>
double widen(T x) {
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
    return static_cast<double>(to_float(x));
  } else {
    return static_cast<double>(x);
  }
}

void require_snap_options(const SnapKVOptions& snap) {
  check(std::isfinite(snap.budget) && snap.budget > 0 && snap.budget <= 1, kSelect,
        ": budget must be in (0, 1] (the fraction of the prompt's keys kept), got ", snap.budget);
  check(std::isfinite(snap.threshold) && snap.threshold >= 0 && snap.threshold <= 1, kSelect,
        ": threshold must be in [0, 1] (0 = off; else the pooled vote to keep), got ",
        snap.threshold);
  check(snap.window >= 1, kSelect, ": window must be >= 1 (observation rows), got ", snap.window);
  check(snap.pool >= 1 && snap.pool % 2 == 1, kSelect,
        ": pool must be odd and >= 1 (a kernel centred on each key), got ", snap.pool);
  check(snap.local_tokens >= 0, kSelect, ": local_tokens must be >= 0, got ", snap.local_tokens);
}

// How many keys every head keeps: `forced` = the sinks [0, sinks) and the locals
// [len_k - local, len_k) (their union), and at most n in all (see SnapKVOptions).
struct KeepCounts {
  Index sinks = 0;
  Index local = 0;
  Index forced = 0;
  Index n = 0;
};

KeepCounts keep_counts(Index len_k, Index sink_tokens, const SnapKVOptions& snap) {
  KeepCounts counts;
  counts.sinks = std::min(sink_tokens, len_k);
  counts.local = std::min(snap.local_tokens, len_k - counts.sinks);  // the union, no overlap
  counts.forced = counts.sinks + counts.local;
  const double budget_keys = std::ceil(snap.budget * static_cast<double>(len_k));
  const Index by_budget =
      budget_keys >= static_cast<double>(len_k) ? len_k : static_cast<Index>(budget_keys);
  counts.n = std::max(by_budget, counts.forced);
  return counts;
}

// Orders keys by pooled vote, largest first (NaN lowest), ties to the lower key.
struct ByVote {
  const double* pooled;
  static double rank(double vote) {
    return vote == vote ? vote : -std::numeric_limits<double>::infinity();
  }
  bool operator()(Index a, Index b) const {
    const double rank_a = rank(pooled[a]), rank_b = rank(pooled[b]);
    return rank_a > rank_b || (rank_a == rank_b && a < b);
  }
};

// Per-thread memory of the selection.
struct SnapScratch {
  std::vector<double> query;       // [D]: one observation row, widened
  std::vector<double> logits;      // [Lk]: its logits, then exp(logit - max)
  std::vector<double> head_vote;   // [Lk]: one query head's summed softmax
  std::vector<double> group_vote;  // [Lk]: summed over the group's heads
  std::vector<Index> order;        // the keys that are not forced
};

struct VotePlan {
  Index q_offset = 0;
  Index first_row = 0;  // the observation rows [first_row, Lq)
  double scale = 0;
  double softcap = 0;
  Index pool = 1;
};

// Keys whose logits one pass computes together.
constexpr Index kKeysAtOnce = 8;

// pooled[0, Lk) = the pooled vote of (b, kv head h) (see SnapKVOptions).
template <typename T>
void vote(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k, const VotePlan& plan,
          Index b, Index h, SnapScratch& own, double* pooled) {
  const Index heads_kv = k.size(1), len_k = k.size(2), len_q = q.size(2), dim = q.size(3);
  const Index group = q.size(1) / heads_kv;
  std::fill(own.group_vote.begin(), own.group_vote.end(), 0.0);
  for (Index g = 0; g < group; ++g) {
    const Index head = h * group + g;
    std::fill(own.head_vote.begin(), own.head_vote.end(), 0.0);
    for (Index i = plan.first_row; i < len_q; ++i) {
      const Index position = plan.q_offset + i;
      const Index visible = position < 0 ? 0 : std::min(len_k, position + 1);
      if (visible == 0) continue;
      const T* row = q.address(b, head, i, 0);
      for (Index d = 0; d < dim; ++d) own.query[static_cast<std::size_t>(d)] = widen(row[d]);
      // q . k_j for kKeysAtOnce keys at a time: independent sums (each in the order of d, as
      // the reference adds them) that the CPU overlaps instead of waiting on one chain.
      double largest = -std::numeric_limits<double>::infinity();
      const auto keep_logit = [&](Index j, double dot) {
        double logit = plan.scale * dot;
        if (plan.softcap > 0) logit = plan.softcap * std::tanh(logit / plan.softcap);
        own.logits[static_cast<std::size_t>(j)] = logit;
        if (logit > largest) largest = logit;
      };
      Index j = 0;
      for (; j + kKeysAtOnce <= visible; j += kKeysAtOnce) {
        const T* keys[kKeysAtOnce];
        for (Index u = 0; u < kKeysAtOnce; ++u) keys[u] = k.address(b, h, j + u, 0);
        double dots[kKeysAtOnce] = {};
        for (Index d = 0; d < dim; ++d) {
          const double query_d = own.query[static_cast<std::size_t>(d)];
          for (Index u = 0; u < kKeysAtOnce; ++u) dots[u] += query_d * widen(keys[u][d]);
        }
        for (Index u = 0; u < kKeysAtOnce; ++u) keep_logit(j + u, dots[u]);
      }
      for (; j < visible; ++j) {
        const T* key = k.address(b, h, j, 0);
        double dot = 0;
        for (Index d = 0; d < dim; ++d)
          dot += own.query[static_cast<std::size_t>(d)] * widen(key[d]);
        keep_logit(j, dot);
      }
      if (!std::isfinite(largest)) continue;
      double total = 0;
      for (Index j = 0; j < visible; ++j) {
        double& value = own.logits[static_cast<std::size_t>(j)];
        value = std::exp(value - largest);
        total += value;
      }
      for (Index j = 0; j < visible; ++j)
        own.head_vote[static_cast<std::size_t>(j)] +=
            own.logits[static_cast<std::size_t>(j)] / total;
    }
    for (Index j = 0; j < len_k; ++j)
      own.group_vote[static_cast<std::size_t>(j)] += own.head_vote[static_cast<std::size_t>(j)];
  }
  const double heads = static_cast<double>(std::max<Index>(group, 1));
  for (Index j = 0; j < len_k; ++j) own.group_vote[static_cast<std::size_t>(j)] /= heads;
  const Index radius = plan.pool / 2;
  for (Index j = 0; j < len_k; ++j) {
    const Index begin = j > radius ? j - radius : 0;
    const Index end = len_k - j > radius ? j + radius + 1 : len_k;
    double sum = 0;
    for (Index t = begin; t < end; ++t) sum += own.group_vote[static_cast<std::size_t>(t)];
    pooled[j] = sum / static_cast<double>(plan.pool);
  }
}

// The keys that are not forced, [sinks, len_k - local), into own.order.
void free_keys(const KeepCounts& counts, Index len_k, SnapScratch& own) {
  own.order.clear();
  for (Index key = counts.sinks; key < len_k - counts.local; ++key) own.order.push_back(key);
}

// How many keys a head with these pooled votes needs to reach threshold of its total (forced
// ones first, then by vote; at most n). A head without a positive, finite total needs only the
// forced keys.
Index needed_keys(const double* pooled, Index len_k, const KeepCounts& counts, double threshold,
                  SnapScratch& own) {
  double total = 0, mass = 0;
  for (Index j = 0; j < len_k; ++j) total += pooled[j];
  if (!(total > 0) || !std::isfinite(total)) return counts.forced;
  for (Index j = 0; j < counts.sinks; ++j) mass += pooled[j];
  for (Index j = len_k - counts.local; j < len_k; ++j) mass += pooled[j];
  const double target = threshold * total;
  free_keys(counts, len_k, own);
  const Index wanted = counts.n - counts.forced;
  std::partial_sort(own.order.begin(), own.order.begin() + wanted, own.order.end(), ByVote{pooled});
  Index needed = counts.forced;
  for (Index r = 0; r < wanted && !(mass >= target); ++r, ++needed)
    mass += pooled[own.order[static_cast<std::size_t>(r)]];
  return needed;
}

// Writes the `kept` keys of one head: the sinks, the best kept - forced of the others by vote,
// the locals; ascending.
void cut(const double* pooled, Index len_k, const KeepCounts& counts, Index kept, SnapScratch& own,
         std::int64_t* out) {
  Index count = 0;
  for (Index key = 0; key < counts.sinks; ++key) out[count++] = key;
  const Index wanted = kept - counts.forced;
  if (wanted > 0) {
    free_keys(counts, len_k, own);
    const auto middle = own.order.begin() + wanted;
    if (middle != own.order.end())
      std::nth_element(own.order.begin(), middle - 1, own.order.end(), ByVote{pooled});
    std::sort(own.order.begin(), middle);
    for (auto at = own.order.begin(); at != middle; ++at) out[count++] = *at;
  }
  for (Index key = len_k - counts.local; key < len_k; ++key) out[count++] = key;
}

template <typename T>
SnapKVSelection select_impl(TensorView<const T, 4> q, TensorView<const T, 4> k,
                            const AttentionOptions& options, const SnapKVOptions& snap) {
  detail::require_select_inputs(kSelect, q, k, options);
  check(options.causal, kSelect,
        ": causal must be true (the observation window votes with the prompt's causal "
        "attention)");
  check(options.window_left == -1, kSelect,
        ": window_left must be -1 (a sliding-window layer keeps its window, not a SnapKV "
        "selection), got ",
        options.window_left);
  require_snap_options(snap);
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2);
  VotePlan plan;
  plan.q_offset = options.q_offset == -1 ? len_k - len_q : options.q_offset;
  Index last_position = 0;
  check(!__builtin_add_overflow(plan.q_offset, len_q, &last_position), kSelect, ": q_offset (",
        plan.q_offset, ") + Lq (", len_q, ") passes the largest position, 2^63 - 1");
  plan.first_row = len_q - std::min(snap.window, len_q);
  plan.scale = detail::resolve_scale<double>(kSelect, options, dim);
  plan.softcap = options.softcap;
  plan.pool = snap.pool;
  const int num_threads = resolve_num_threads(options.num_threads);

  const KeepCounts counts = keep_counts(len_k, options.sink_tokens, snap);
  const Index heads = checked_numel<double>(kSelect, {batch, heads_kv});
  const bool votes_needed = counts.n > counts.forced && (snap.threshold > 0 || counts.n < len_k);
  SnapKVSelection selection;
  selection.batch = batch;
  selection.heads_kv = heads_kv;
  selection.len_k = len_k;
  selection.kept = counts.n;
  if (!votes_needed || heads == 0) {
    if (snap.threshold > 0) selection.kept = counts.forced;  // no head needs more
    selection.keys.resize(static_cast<std::size_t>(
        checked_numel<std::int64_t>(kSelect, {batch, heads_kv, selection.kept})));
    SnapScratch own;
    for (Index head = 0; head < heads; ++head)
      cut(nullptr, len_k, counts, selection.kept, own,
          selection.keys.data() + head * selection.kept);
    return selection;
  }

  std::vector<double> pooled(
      static_cast<std::size_t>(checked_numel<double>(kSelect, {batch, heads_kv, len_k})));
  const double work = static_cast<double>(batch) * static_cast<double>(heads_q) *
                      static_cast<double>(len_q - plan.first_row) * static_cast<double>(len_k) *
                      static_cast<double>(dim);
  const int threads = detail::team_size(heads, num_threads, detail::saturated_work(work));
  std::vector<SnapScratch> scratch(static_cast<std::size_t>(threads));
  for (SnapScratch& own : scratch) {
    own.query.resize(static_cast<std::size_t>(dim));
    own.logits.resize(static_cast<std::size_t>(len_k));
    own.head_vote.resize(static_cast<std::size_t>(len_k));
    own.group_vote.resize(static_cast<std::size_t>(len_k));
    own.order.reserve(static_cast<std::size_t>(len_k));
  }
  std::vector<Index> needed(static_cast<std::size_t>(heads), counts.n);
  parallel_for(heads, threads, [&](Index head) {
    SnapScratch& own = scratch[static_cast<std::size_t>(detail::thread_index())];
    double* head_pooled = pooled.data() + head * len_k;
    vote(q, k, plan, head / heads_kv, head % heads_kv, own, head_pooled);
    if (snap.threshold > 0)
      needed[static_cast<std::size_t>(head)] =
          needed_keys(head_pooled, len_k, counts, snap.threshold, own);
  });
  selection.kept = *std::max_element(needed.begin(), needed.end());
  selection.keys.resize(static_cast<std::size_t>(
      checked_numel<std::int64_t>(kSelect, {batch, heads_kv, selection.kept})));
  parallel_for(heads, threads, [&](Index head) {
    SnapScratch& own = scratch[static_cast<std::size_t>(detail::thread_index())];
    cut(pooled.data() + head * len_k, len_k, counts, selection.kept, own,
        selection.keys.data() + head * selection.kept);
  });
  return selection;
}

// The selection's fields match k and its lists follow the rules of SnapKVSelection.
void require_gather_selection(const SnapKVSelection& selection, Index batch, Index heads_kv,
                              Index len_k) {
  detail::require_selection_field(kGather, "batch", selection.batch, batch, "k.shape[0]");
  detail::require_selection_field(kGather, "heads_kv", selection.heads_kv, heads_kv, "k.shape[1]");
  detail::require_selection_field(kGather, "len_k", selection.len_k, len_k, "k.shape[2]");
  check(selection.kept >= 0 && selection.kept <= len_k, kGather, ": selection.kept must be in [0, ",
        len_k, "] (k.shape[2]), got ", selection.kept);
  const Index items = checked_numel<std::int64_t>(kGather, {batch, heads_kv, selection.kept});
  check(static_cast<Index>(selection.keys.size()) == items, kGather, ": selection.keys must hold ",
        items, " keys (batch * heads_kv * kept), got ", selection.keys.size());
  for (Index at = 0; at < items; ++at) {
    const std::int64_t key = selection.keys[static_cast<std::size_t>(at)];
    const bool first = at % selection.kept == 0;
    check(key >= 0 && key < len_k &&
              (first || key > selection.keys[static_cast<std::size_t>(at - 1)]),
          kGather, ": selection.keys[", at, "] = ", key,
          " breaks the rules: keys of a head must be strictly increasing, in [0, ", len_k, ")");
  }
}

template <typename T>
void gather_impl(const SnapKVSelection& selection, TensorView<const T, 4> k,
                 TensorView<const T, 4> v, TensorView<T, 4> out_k, TensorView<T, 4> out_v) {
  require_valid_view(kGather, "k", k);
  require_valid_view(kGather, "v", v);
  require_valid_view(kGather, "out_k", out_k);
  require_valid_view(kGather, "out_v", out_v);
  const Index batch = k.size(0), heads_kv = k.size(1), len_k = k.size(2), dim = k.size(3);
  const Index dim_v = v.size(3);
  require_extent(kGather, "v", v, 0, "k.shape[0] (B)", batch);
  require_extent(kGather, "v", v, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(kGather, "v", v, 2, "k.shape[2] (Lk)", len_k);
  require_gather_selection(selection, batch, heads_kv, len_k);
  require_extent(kGather, "out_k", out_k, 0, "k.shape[0] (B)", batch);
  require_extent(kGather, "out_k", out_k, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(kGather, "out_k", out_k, 2, "selection.kept", selection.kept);
  require_extent(kGather, "out_k", out_k, 3, "k.shape[3] (D)", dim);
  require_extent(kGather, "out_v", out_v, 0, "k.shape[0] (B)", batch);
  require_extent(kGather, "out_v", out_v, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(kGather, "out_v", out_v, 2, "selection.kept", selection.kept);
  require_extent(kGather, "out_v", out_v, 3, "v.shape[3] (Dv)", dim_v);
  require_disjoint(kGather, "out_k", out_k, "k", k);
  require_disjoint(kGather, "out_k", out_k, "v", v);
  require_disjoint(kGather, "out_v", out_v, "k", k);
  require_disjoint(kGather, "out_v", out_v, "v", v);
  require_disjoint(kGather, "out_k", out_k, "out_v", out_v);
  const Index heads = batch * heads_kv;  // bounded: the keys above were counted
  if (selection.kept == 0 || heads == 0) return;
  const double work = static_cast<double>(heads) * static_cast<double>(selection.kept) *
                      static_cast<double>(dim + dim_v);
  const int threads =
      detail::team_size(heads, resolve_num_threads(0), detail::saturated_work(work));
  parallel_for(heads, threads, [&](Index head) {
    const Index b = head / heads_kv, h = head % heads_kv;
    const std::int64_t* keys = selection.keys.data() + head * selection.kept;
    for (Index i = 0; i < selection.kept; ++i) {
      for (Index d = 0; d < dim; ++d) *out_k.address(b, h, i, d) = *k.address(b, h, keys[i], d);
      for (Index d = 0; d < dim_v; ++d) *out_v.address(b, h, i, d) = *v.address(b, h, keys[i], d);
    }
  });
}

}  // namespace

#define FOVEAL_SNAPKV_ENTRY_POINTS(T)                                                            \
  SnapKVSelection snapkv_select(TensorView<const T, 4> q, TensorView<const T, 4> k,              \
                                const AttentionOptions& options, const SnapKVOptions& snap) {    \
    return select_impl<T>(q, k, options, snap);                                                  \
  }                                                                                              \
  void snapkv_gather(const SnapKVSelection& selection, TensorView<const T, 4> k,                 \
                     TensorView<const T, 4> v, TensorView<T, 4> out_k, TensorView<T, 4> out_v) { \
    gather_impl<T>(selection, k, v, out_k, out_v);                                               \
  }

FOVEAL_SNAPKV_ENTRY_POINTS(float)
FOVEAL_SNAPKV_ENTRY_POINTS(double)
FOVEAL_SNAPKV_ENTRY_POINTS(bfloat16)
FOVEAL_SNAPKV_ENTRY_POINTS(float16)

#undef FOVEAL_SNAPKV_ENTRY_POINTS

}  // namespace foveal
