// foveal::SparseKCache: constant-memory SparseK decode on the shared engine.
//
// append pushes each token through the window ring into the pool of every (sequence, kv head):
// detail::PrefixThreshold and detail::PrefixTopK, the same state machines, fed the same scores
// in the same order, as the prefill's selection phase, so τ and the top-k set of the newest
// query are exactly those of sparsek_attention. attend runs one engine tile per (sequence,
// kv head) (more when a GQA group has more than kBlockQ query heads) with a policy that visits
// the selected slots as gathered blocks gated like the prefill (src/detail/sparsek_gates.hpp), then
// the sinks and the window, which sit in contiguous rows. Tasks share nothing that depends on the
// thread count, so results are bitwise identical for any of them.
#include "foveal/sparsek/cache.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "detail/attention_setup.hpp"
#include "detail/kernels.hpp"
#include "detail/sparsek_selection.hpp"
#include "foveal/attention/kv_cache.hpp"

namespace foveal {

template <typename S>
SparseKCache<S>::SparseKCache(Index batch, Index heads_kv, Index dim, Index dim_v,
                              const SparseKOptions& options)
    : options_(options) {
  constexpr const char* kFunction = "SparseKCache";
  check(batch >= 0 && heads_kv >= 0 && dim >= 1 && dim_v >= 0, kFunction,
        ": sizes must be >= 0 (dim >= 1), got batch = ", batch, ", heads_kv = ", heads_kv,
        ", dim = ", dim, ", dim_v = ", dim_v);
  detail::require_sparsek_options(kFunction, options);
  check(options.causal, kFunction,
        ": causal must be true (the query is the newest token and sees only earlier ones)");
  check(options.q_offset == -1, kFunction,
        ": q_offset must be -1 (the query sits at the newest position), got ", options.q_offset);
  scale_ = detail::resolve_scale<Compute>(kFunction, options, dim);
  // Storage is allocated once, for every row the cache may ever hold.
  const Index capacity =
      detail::checked_add("SparseKCache: sink_tokens + window + topk",
                          detail::checked_add("SparseKCache: sink_tokens + window",
                                              options.sink_tokens, options.window),
                          options.topk);
  const Index heads = detail::checked_numel<HeadState>("SparseKCache heads", {batch, heads_kv});
  keys_ = Tensor<S, 4>({batch, heads_kv, capacity, dim}, "SparseKCache keys");
  values_ = Tensor<S, 4>({batch, heads_kv, capacity, dim_v}, "SparseKCache values");
  scores_ = Tensor<Compute, 3>({batch, heads_kv, capacity}, "SparseKCache scores");
  detail::checked_numel<Index>("SparseKCache top-k slots", {heads, options.topk});
  heads_.reserve(static_cast<std::size_t>(heads));
  for (Index head = 0; head < heads; ++head) heads_.emplace_back(options.topk);
  slot_rows_.resize(static_cast<std::size_t>(options.topk));
  for (Index slot = 0; slot < options.topk; ++slot)
    slot_rows_[static_cast<std::size_t>(slot)] = options.sink_tokens + options.window + slot;
}

template <typename S>
Index SparseKCache<S>::selected_count() const {
  const Index pool = std::max<Index>(length_ - options_.sink_tokens - options_.window, 0);
  return std::min(pool, options_.topk);
}

template <typename S>
Index SparseKCache<S>::always_visible_rows() const {
  const Index sinks = std::min(length_, options_.sink_tokens);
  const Index window = std::clamp<Index>(length_ - options_.sink_tokens, 0, options_.window);
  return sinks + window;
}

template <typename S>
Index SparseKCache<S>::stored_rows() const {
  return always_visible_rows() + selected_count();
}

template <typename S>
Index SparseKCache<S>::threshold_entries() const {
  Index most = 0;
  for (const HeadState& head : heads_) most = std::max(most, head.threshold.held());
  return most;
}

template <typename S>
Index SparseKCache<S>::ring_row(Index position) const {
  return options_.sink_tokens + (position - options_.sink_tokens) % options_.window;
}

template <typename S>
void SparseKCache<S>::write_row(Index head_index, Index row, const S* k_row, Index k_stride,
                                const S* v_row, Index v_stride, Compute score) {
  const Index b = head_index / heads_kv(), h = head_index % heads_kv();
  detail::copy_strided_row(k_row, k_stride, keys_.view().address(b, h, row, 0), dim());
  detail::copy_strided_row(v_row, v_stride, values_.view().address(b, h, row, 0), dim_v());
  scores_(b, h, row) = score;
}

template <typename S>
void SparseKCache<S>::enter_pool(Index head_index, Index position, const S* k_row, Index k_stride,
                                 const S* v_row, Index v_stride, Compute score) {
  HeadState& head = heads_[static_cast<std::size_t>(head_index)];
  const auto z = static_cast<double>(score);
  head.threshold.push(z);
  const Index evicted = head.top.push(position, z);
  if (evicted == position) return;  // not among the top k: dropped for good
  // A free slot while the set grows (slots fill in order), else the displaced token's slot.
  const auto slot = evicted < 0
                        ? std::find(head.slot_position.begin(), head.slot_position.end(), Index(-1))
                        : std::find(head.slot_position.begin(), head.slot_position.end(), evicted);
  *slot = position;
  write_row(head_index, slot_rows_[static_cast<std::size_t>(slot - head.slot_position.begin())],
            k_row, k_stride, v_row, v_stride, score);
}

template <typename S>
void SparseKCache<S>::push_token(Index head_index, Index position, const S* k_row, Index k_stride,
                                 const S* v_row, Index v_stride, Compute score) {
  const Index sinks = options_.sink_tokens, window = options_.window;
  if (position < sinks) {
    write_row(head_index, position, k_row, k_stride, v_row, v_stride, score);
    return;
  }
  if (window == 0) {
    enter_pool(head_index, position, k_row, k_stride, v_row, v_stride, score);
    return;
  }
  // The token leaving the window shares the ring row of the new one: move it to the pool first.
  const Index row = ring_row(position);
  const Index leaving = position - window;
  if (leaving >= sinks) {
    const Index b = head_index / heads_kv(), h = head_index % heads_kv();
    enter_pool(head_index, leaving, keys_.view().address(b, h, row, 0), 1,
               values_.view().address(b, h, row, 0), 1, scores_(b, h, row));
  }
  write_row(head_index, row, k_row, k_stride, v_row, v_stride, score);
}

template <typename S>
void SparseKCache<S>::append(TensorView<const S, 4> k, TensorView<const S, 4> v,
                             TensorView<const S, 3> u) {
  constexpr const char* kFunction = "SparseKCache::append";
  const detail::UseGuard::Mutation mutation(guard_, "cache", kFunction);
  detail::require_valid_view(kFunction, "k", k);
  detail::require_valid_view(kFunction, "v", v);
  detail::require_valid_view(kFunction, "u", u);
  const Index count = k.size(2);
  detail::require_extent(kFunction, "k", k, 0, "the cache's batch (B)", batch());
  detail::require_extent(kFunction, "k", k, 1, "the cache's heads_kv (Hkv)", heads_kv());
  detail::require_extent(kFunction, "k", k, 3, "the cache's dim (D)", dim());
  detail::require_extent(kFunction, "v", v, 0, "the cache's batch (B)", batch());
  detail::require_extent(kFunction, "v", v, 1, "the cache's heads_kv (Hkv)", heads_kv());
  detail::require_extent(kFunction, "v", v, 2, "k.shape[2] (n)", count);
  detail::require_extent(kFunction, "v", v, 3, "the cache's dim_v (Dv)", dim_v());
  detail::require_extent(kFunction, "u", u, 0, "the cache's batch (B)", batch());
  detail::require_extent(kFunction, "u", u, 1, "the cache's heads_kv (Hkv)", heads_kv());
  detail::require_extent(kFunction, "u", u, 2, "k.shape[2] (n)", count);
  const TensorView<const S, 4> keys = keys_.view(), values = values_.view();
  const TensorView<const Compute, 3> scores = scores_.view();
  detail::require_disjoint(kFunction, "the cache's keys", keys, "k", k);
  detail::require_disjoint(kFunction, "the cache's values", values, "v", v);
  detail::require_disjoint(kFunction, "the cache's scores", scores, "u", u);
  // (No scores, no loop: a cache of no heads may have any batch, even 2^58.)
  const bool has_scores = heads_kv() > 0 && count > 0;
  for (Index b = 0; has_scores && b < batch(); ++b)
    for (Index h = 0; h < heads_kv(); ++h)
      for (Index j = 0; j < count; ++j)
        check(std::isfinite(detail::widen(u(b, h, j))), kFunction, ": u[", b, ", ", h, ", ", j,
              "] (position ", length_ + j, ") must be finite, got ", detail::widen(u(b, h, j)));

  // Heads are independent; a few tokens are not worth waking threads for.
  const Index heads = batch() * heads_kv();
  const int requested = count >= 64 ? detail::resolve_num_threads(options_.num_threads) : 1;
  parallel_for(heads, detail::team_size(heads, requested), [&](Index head_index) {
    const Index b = head_index / heads_kv(), h = head_index % heads_kv();
    for (Index j = 0; j < count; ++j)
      push_token(head_index, length_ + j, k.address(b, h, j, 0), k.stride(3), v.address(b, h, j, 0),
                 v.stride(3), detail::widen(u(b, h, j)));
  });
  length_ += count;
}

template <typename S>
void SparseKCache<S>::attend(TensorView<const S, 4> q, TensorView<S, 4> out,
                             TensorView<Compute, 3> lse) const {
  constexpr const char* kFunction = "SparseKCache::attend";
  const detail::UseGuard::Read reading(guard_, "cache", kFunction);
  detail::require_queries_and_outputs(
      kFunction, q, out, lse, {"the cache's heads_kv", heads_kv(), "the cache's dim_v", dim_v()});
  detail::require_extent(kFunction, "q", q, 0, "the cache's batch (B)", batch());
  check(q.size(2) == 1, kFunction,
        ": q.shape[2] (Lq) must be 1 (one query per sequence, at the newest position), got ",
        q.size(2));
  detail::require_extent(kFunction, "q", q, 3, "the cache's dim (D)", dim());
  detail::require_disjoint(kFunction, "out", out, "the cache's keys", keys());
  detail::require_disjoint(kFunction, "out", out, "the cache's values", values());
  if (!lse.is_null()) {
    detail::require_disjoint(kFunction, "lse", lse, "the cache's keys", keys());
    detail::require_disjoint(kFunction, "lse", lse, "the cache's values", values());
  }
  check(length_ >= 1, kFunction,
        ": the cache is empty; append the newest token's k, v and u before attending");
  const Index heads_q = q.size(1);
  if (batch() == 0 || heads_q == 0) return;

  detail::SparseKCachePlan<S> plan;
  detail::FlashParams<S>& params = plan.params;
  params.q = q;
  params.k = keys();
  params.v = values();
  params.out = out;
  params.lse = lse;
  params.q_offset = length_ - 1;
  params.scale = scale_;
  params.softcap = options_.softcap;
  params.num_threads = detail::resolve_num_threads(options_.num_threads);

  plan.slot_rows = slot_rows_.data();
  plan.scores = scores_.data() + options_.sink_tokens + options_.window;
  plan.score_stride = capacity();
  plan.selected = selected_count();
  plan.always_visible = always_visible_rows();
  plan.gate = options_.gate;
  plan.thresholds.resize(heads_.size());
  for (std::size_t head = 0; head < heads_.size(); ++head)
    plan.thresholds[head] = static_cast<Compute>(heads_[head].threshold.threshold());
  detail::kernels<S>().sparsek_cache_attention(plan);
}

template <typename S>
void SparseKCache<S>::reset() {
  const detail::UseGuard::Mutation mutation(guard_, "cache", "SparseKCache::reset");
  length_ = 0;
  for (HeadState& head : heads_) {
    head.threshold.reset();
    head.top.reset();
    std::fill(head.slot_position.begin(), head.slot_position.end(), Index(-1));
  }
}

template <typename S>
void SparseKCache<S>::require_head(const char* method, Index sequence, Index head) const {
  check(sequence >= 0 && sequence < batch(), "SparseKCache::", method, ": sequence must be in [0, ",
        batch(), "), got ", sequence);
  check(head >= 0 && head < heads_kv(), "SparseKCache::", method, ": head must be in [0, ",
        heads_kv(), "), got ", head);
}

template <typename S>
double SparseKCache<S>::threshold(Index sequence, Index head) const {
  require_head("threshold", sequence, head);
  return heads_[static_cast<std::size_t>(sequence * heads_kv() + head)].threshold.threshold();
}

template <typename S>
SparseKCacheSelection<compute_type_t<S>> SparseKCache<S>::selected(Index sequence,
                                                                   Index head) const {
  require_head("selected", sequence, head);
  const HeadState& state = heads_[static_cast<std::size_t>(sequence * heads_kv() + head)];
  const double tau = state.threshold.threshold();
  std::vector<std::pair<Index, Index>> by_position;  // (position, slot)
  for (Index slot = 0; slot < selected_count(); ++slot)
    by_position.emplace_back(state.slot_position[static_cast<std::size_t>(slot)], slot);
  std::sort(by_position.begin(), by_position.end());
  SparseKCacheSelection<Compute> selection;
  for (const auto& [position, slot] : by_position) {
    const Compute score = scores_(sequence, head, slot_rows_[static_cast<std::size_t>(slot)]);
    selection.positions.push_back(position);
    selection.gates.push_back(
        static_cast<Compute>(std::clamp(static_cast<double>(score) - tau, 0.0, 1.0)));
  }
  return selection;
}

template class SparseKCache<float>;
template class SparseKCache<double>;
template class SparseKCache<bfloat16>;
template class SparseKCache<float16>;

}  // namespace foveal
