// SparseK attention (docs/sparsek.md) on the shared engine.
//
// Two phases per call.
// 1. Selection, one task per (batch, kv head): the pool keys are pushed one at a time through
//    detail::PrefixThreshold (τ of every pool prefix) and detail::PrefixTopK (the top-k set);
//    a key enters the set when it is pushed and leaves it for good when a better key displaces
//    it, so one number per key (the prefix length at which it leaves) describes every query's
//    selection. A sweep over the tiles then lists, per tile of query rows, the union of their
//    selections in increasing key order: the set of the tile's first row plus the keys that
//    enter within the tile, at most topk + kBlockQ keys.
// 2. Attention (the ISA level's kernel, src/kernels/sparsek.hpp), one task per (batch, kv head,
// tile): the engine visits the tile's union in
//    blocks of kBlockK gathered rows, then the sinks and the window as contiguous blocks. In a
//    gathered block each key serves a contiguous range of the tile's rows (rows are sorted by
//    position and a key is selected over an interval of positions), so the mask and the gates
//    clip(u_j − τ_row, 0, 1) are vector operations over rows.
// Nothing depends on the thread count, so results are bitwise identical for any of them.
#include "foveal/sparsek/attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "detail/attention_setup.hpp"
#include "detail/kernels.hpp"
#include "detail/sparsek_selection.hpp"
#include "foveal/detail/sparsek_prefix.hpp"

namespace foveal {

SparseKGate parse_sparsek_gate(const std::string& name) {
  if (name == "value") return SparseKGate::value;
  if (name == "kv") return SparseKGate::kv;
  if (name == "none") return SparseKGate::none;
  throw Error("foveal: sparsek_attention: gate must be \"value\", \"kv\" or \"none\", got \"" +
              name + "\"");
}

const char* to_string(SparseKGate gate) {
  switch (gate) {
    case SparseKGate::value:
      return "value";
    case SparseKGate::kv:
      return "kv";
    case SparseKGate::none:
      return "none";
  }
  return "unknown";
}

namespace detail {

Index SparseKGeometry::pool_length(Index position) const {
  if (!causal) return pool_size;
  // Positions are at most |q_offset| + Lq away from 0 (validated), so this cannot overflow.
  return std::clamp<Index>(position - window - sinks + 1, 0, pool_size);
}

SparseKGeometry SparseKGeometry::make(const SparseKOptions& options, Index len_q, Index len_k) {
  return make(options, len_q, len_k, options.q_offset == -1 ? len_k - len_q : options.q_offset);
}

SparseKGeometry SparseKGeometry::make(const SparseKOptions& options, Index len_q, Index len_k,
                                      Index q_offset) {
  SparseKGeometry geometry;
  geometry.len_q = len_q;
  geometry.len_k = len_k;
  geometry.q_offset = q_offset;
  geometry.causal = options.causal;
  geometry.sinks = std::min<Index>(options.sink_tokens, len_k);
  // A window wider than every distance between a query and a key shows every earlier key.
  const Index reach = std::abs(geometry.q_offset) + len_q + len_k;
  geometry.window = std::min<Index>(options.window, reach);
  geometry.pool_size = len_k - geometry.sinks;
  geometry.topk = std::min<Index>(options.topk, std::max<Index>(geometry.pool_size, 1));
  return geometry;
}

template <typename T>
void select_head(const T* u, Index u_stride, const SparseKGeometry& geometry,
                 HeadSelection& selection) {
  const Index pool = geometry.pool_size;
  selection.tau.assign(static_cast<std::size_t>(pool) + 1,
                       -std::numeric_limits<double>::infinity());
  selection.evicted_at.assign(static_cast<std::size_t>(pool), pool + 1);
  PrefixThreshold threshold(geometry.topk);
  PrefixTopK top(geometry.topk);
  for (Index key = 0; key < pool; ++key) {
    const double z = static_cast<double>(widen(u[(geometry.sinks + key) * u_stride]));
    threshold.push(z);
    const Index evicted = top.push(key, z);
    if (evicted >= 0) selection.evicted_at[static_cast<std::size_t>(evicted)] = key + 1;
    selection.tau[static_cast<std::size_t>(key) + 1] = threshold.threshold();
  }
}

template void select_head(const float*, Index, const SparseKGeometry&, HeadSelection&);
template void select_head(const double*, Index, const SparseKGeometry&, HeadSelection&);
template void select_head(const bfloat16*, Index, const SparseKGeometry&, HeadSelection&);
template void select_head(const float16*, Index, const SparseKGeometry&, HeadSelection&);

void SelectionSweep::advance_to(Index length) {
  const auto& evicted_at = selection_.evicted_at;
  for (; next_ < length; ++next_)
    if (evicted_at[static_cast<std::size_t>(next_)] > next_ + 1) live_.push_back(next_);
  // Keys selected at `length` are those pushed before it and not evicted by then.
  live_.erase(std::remove_if(
                  live_.begin(), live_.end(),
                  [&](Index key) { return evicted_at[static_cast<std::size_t>(key)] <= length; }),
              live_.end());
}

void SelectionSweep::append_entering(Index length_lo, Index length_hi,
                                     std::vector<Index>& keys) const {
  const auto& evicted_at = selection_.evicted_at;
  for (Index key = length_lo; key < length_hi; ++key)
    if (evicted_at[static_cast<std::size_t>(key)] > key + 1) keys.push_back(key);
}

void build_tile_unions(const HeadSelection& selection, const SparseKGeometry& geometry, Index group,
                       TileUnions& unions) {
  const Index rows = geometry.len_q * group;
  const Index tiles = (rows + kBlockQ - 1) / kBlockQ;
  unions.offsets.assign(static_cast<std::size_t>(tiles) + 1, 0);
  unions.keys.clear();
  SelectionSweep sweep(selection);
  for (Index tile = 0; tile < tiles; ++tile) {
    const Index flat_lo = tile * kBlockQ;
    const Index flat_hi = std::min(rows, flat_lo + kBlockQ) - 1;
    const Index length_lo = geometry.pool_length(geometry.q_offset + flat_lo / group);
    const Index length_hi = geometry.pool_length(geometry.q_offset + flat_hi / group);
    sweep.advance_to(length_lo);
    unions.keys.insert(unions.keys.end(), sweep.live().begin(), sweep.live().end());
    sweep.append_entering(length_lo, length_hi, unions.keys);
    unions.offsets[static_cast<std::size_t>(tile) + 1] = static_cast<Index>(unions.keys.size());
  }
  // Pool indices -> key positions.
  for (Index& key : unions.keys) key += geometry.sinks;
}

void require_sparsek_options(const char* function, const SparseKOptions& options,
                             bool variable_length) {
  require_attention_options(function, options, variable_length);
  check(options.window_left == -1 &&
            (options.window_right == -1 || (options.causal && options.window_right == 0)),
        function,
        ": SparseK's window is `window` (the keys before the query); window_left and "
        "window_right must stay -1, got ",
        options.window_left, " and ", options.window_right);
  check(options.topk >= 1, function, ": topk must be >= 1, got ", options.topk);
  check(options.window >= 0, function, ": window must be >= 0 (0: no window), got ",
        options.window);
  check(options.causal || options.window == 0, function,
        ": a window needs causal = true (non-causal SparseK shares one selection and has no "
        "window), got window = ",
        options.window);
  check(options.gate == SparseKGate::value || options.gate == SparseKGate::kv ||
            options.gate == SparseKGate::none,
        function, ": gate must be value, kv or none");
}

}  // namespace detail

namespace {

constexpr const char* kAttention = "sparsek_attention";

using detail::HeadSelection;
using detail::require_scores;
using detail::select_all;
using detail::SparseKGeometry;
using detail::TileUnions;

// SparseK attention of validated parameters (query 0 at params.q_offset, any value) and scores.
template <typename T>
void run_sparsek_attention(const detail::FlashParams<T>& params, TensorView<const T, 3> u,
                           const SparseKOptions& options) {
  const Index batch = params.q.size(0), heads_kv = params.k.size(1), len_q = params.q.size(2);
  const Index len_k = params.k.size(2);
  if (batch == 0 || heads_kv == 0 || len_q == 0) return;

  const Index group = params.q.size(1) / heads_kv;
  detail::SparseKPlan<T> plan;
  plan.params = params;
  plan.u = u;
  plan.gate = options.gate;
  SparseKGeometry& geometry = plan.geometry;
  geometry = SparseKGeometry::make(options, len_q, len_k, params.q_offset);
  plan.selections = select_all(u, geometry, params.num_threads);
  const std::vector<HeadSelection>& selections = plan.selections;

  // Tile unions of every head (non-causal: every tile shares the one selection).
  std::vector<TileUnions>& unions = plan.unions;
  unions.resize(static_cast<std::size_t>(batch * heads_kv));
  parallel_for(batch * heads_kv, detail::team_size(batch * heads_kv, params.num_threads),
               [&](Index task) {
                 detail::build_tile_unions(selections[static_cast<std::size_t>(task)], geometry,
                                           group, unions[static_cast<std::size_t>(task)]);
               });
  for (const TileUnions& head : unions)
    for (std::size_t t = 0; t + 1 < head.offsets.size(); ++t)
      plan.widest_union = std::max(plan.widest_union, head.offsets[t + 1] - head.offsets[t]);
  detail::kernels<T>().sparsek_attention(plan);
}

template <typename T>
void attention_impl(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                    TensorView<const T, 3> u, const SparseKOptions& options, TensorView<T, 4> out,
                    TensorView<compute_type_t<T>, 3> lse) {
  detail::require_sparsek_options(kAttention, options, /*variable_length=*/true);
  const detail::FlashParams<T> params = detail::prepare_attention<T>(
      kAttention, q, k, v, out, options, lse, {}, /*variable_length=*/true);
  const Index batch = q.size(0), heads_kv = k.size(1), len_k = k.size(2);
  require_scores(kAttention, u, batch, heads_kv, len_k);
  detail::require_disjoint(kAttention, "out", out, "u", u);
  if (!lse.is_null()) detail::require_disjoint(kAttention, "lse", lse, "u", u);
  const detail::AlignedArray<detail::SequenceKeys> sequences =
      detail::sequence_keys(kAttention, options, params, params.rows_per_head() > 0);
  if (sequences == nullptr) {
    run_sparsek_attention(params, u, options);
    return;
  }
  // A variable-length batch: each row is the call on its own keys (and scores), its positions
  // counted from its first key. The rows run one after the other, each on every thread.
  for (Index b = 0; b < batch; ++b) {
    const detail::SequenceKeys& row = sequences[static_cast<std::size_t>(b)];
    run_sparsek_attention(detail::row_params(params, b, row), detail::row_keys(u, b, row), options);
  }
}

// ---------------------------------------------------------------------------------------------
// Inspection, prefix thresholds, linear scores.

template <typename T>
void select_impl(TensorView<const T, 3> u, Index len_q, const SparseKOptions& options,
                 TensorView<std::int64_t, 4> indices, TensorView<T, 4> gates) {
  constexpr const char* kFunction = "sparsek_select";
  detail::require_sparsek_options(kFunction, options);
  check(len_q >= 0, kFunction, ": len_q must be >= 0, got ", len_q);
  const Index batch = u.size(0), heads_kv = u.size(1), len_k = u.size(2);
  require_scores(kFunction, u, batch, heads_kv, len_k);
  detail::require_q_offset(kFunction, options.q_offset);
  detail::require_valid_view(kFunction, "indices", indices);
  detail::require_valid_view(kFunction, "gates", gates);
  const Index shape[4] = {batch, heads_kv, len_q, options.topk};
  const char* names[4] = {"u.shape[0] (B)", "u.shape[1] (Hkv)", "len_q", "topk"};
  for (int d = 0; d < 4; ++d) {
    detail::require_extent(kFunction, "indices", indices, d, names[d], shape[d]);
    detail::require_extent(kFunction, "gates", gates, d, names[d], shape[d]);
  }
  detail::require_disjoint(kFunction, "gates", gates, "u", u);
  detail::require_disjoint(kFunction, "indices", indices, "u", u);
  detail::require_disjoint(kFunction, "indices", indices, "gates", gates);
  if (batch == 0 || heads_kv == 0 || len_q == 0) return;

  const SparseKGeometry geometry = SparseKGeometry::make(options, len_q, len_k);
  const int threads = detail::resolve_num_threads(options.num_threads);
  const std::vector<HeadSelection> selections = select_all(u, geometry, threads);
  parallel_for(batch * heads_kv, detail::team_size(batch * heads_kv, threads), [&](Index task) {
    const Index b = task / heads_kv, h = task % heads_kv;
    const HeadSelection& selection = selections[static_cast<std::size_t>(task)];
    detail::SelectionSweep sweep(selection);
    for (Index i = 0; i < len_q; ++i) {
      const Index length = geometry.pool_length(geometry.q_offset + i);
      sweep.advance_to(length);
      const double tau = selection.tau[static_cast<std::size_t>(length)];
      const auto& live = sweep.live();
      for (Index slot = 0; slot < options.topk; ++slot) {
        const bool used = slot < static_cast<Index>(live.size());
        const Index key = used ? live[static_cast<std::size_t>(slot)] + geometry.sinks : -1;
        indices(b, h, i, slot) = key;
        gates(b, h, i, slot) =
            used ? static_cast<T>(std::clamp(static_cast<double>(u(b, h, key)) - tau, 0.0, 1.0))
                 : T(0);
      }
    }
  });
}

template <typename T>
void prefix_thresholds_impl(TensorView<const T, 2> z, Index k, TensorView<T, 2> tau,
                            TensorView<std::int64_t, 2> evicted_at, int num_threads) {
  constexpr const char* kFunction = "sparsek_prefix_thresholds";
  check(k >= 1, kFunction, ": k must be >= 1, got ", k);
  detail::require_num_threads(kFunction, num_threads);
  detail::require_valid_view(kFunction, "z", z);
  detail::require_valid_view(kFunction, "tau", tau);
  const Index rows = z.size(0), n = z.size(1);
  detail::require_extent(kFunction, "tau", tau, 0, "z.shape[0]", rows);
  detail::require_extent(kFunction, "tau", tau, 1, "z.shape[1]", n);
  detail::require_disjoint(kFunction, "tau", tau, "z", z);
  if (!evicted_at.is_null()) {
    detail::require_valid_view(kFunction, "evicted_at", evicted_at);
    detail::require_extent(kFunction, "evicted_at", evicted_at, 0, "z.shape[0]", rows);
    detail::require_extent(kFunction, "evicted_at", evicted_at, 1, "z.shape[1]", n);
    detail::require_disjoint(kFunction, "evicted_at", evicted_at, "z", z);
    detail::require_disjoint(kFunction, "evicted_at", evicted_at, "tau", tau);
  }
  if (rows == 0 || n == 0) return;  // before any loop over a huge extent of an empty z
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      check(std::isfinite(z(r, j)), kFunction, ": z[", r, ", ", j, "] must be finite, got ",
            z(r, j));

  SparseKOptions options;
  options.topk = k;
  options.causal = true;
  const SparseKGeometry geometry = SparseKGeometry::make(options, 0, n);
  const int threads = detail::resolve_num_threads(num_threads);
  parallel_for(rows, detail::team_size(rows, threads), [&](Index r) {
    HeadSelection selection;
    detail::select_head(z.address(r, 0), z.stride(1), geometry, selection);
    for (Index m = 1; m <= n; ++m) tau(r, m - 1) = static_cast<T>(selection.tau[m]);
    if (!evicted_at.is_null())
      for (Index j = 0; j < n; ++j) evicted_at(r, j) = selection.evicted_at[j];
  });
}

template <typename T>
void linear_scores_impl(TensorView<const T, 3> x, TensorView<const T, 2> w, double slope,
                        TensorView<T, 3> u, int num_threads) {
  constexpr const char* kFunction = "sparsek_linear_scores";
  detail::require_valid_view(kFunction, "x", x);
  detail::require_valid_view(kFunction, "w", w);
  detail::require_valid_view(kFunction, "u", u);
  check(std::isfinite(slope), kFunction, ": slope must be finite, got ", slope);
  detail::require_num_threads(kFunction, num_threads);
  const Index batch = x.size(0), len = x.size(1), dim = x.size(2), heads = w.size(0);
  detail::require_extent(kFunction, "w", w, 1, "x.shape[2] (Dm)", dim);
  detail::require_extent(kFunction, "u", u, 0, "x.shape[0] (B)", batch);
  detail::require_extent(kFunction, "u", u, 1, "w.shape[0] (H)", heads);
  detail::require_extent(kFunction, "u", u, 2, "x.shape[1] (L)", len);
  detail::require_disjoint(kFunction, "u", u, "x", x);
  detail::require_disjoint(kFunction, "u", u, "w", w);
  // Nothing to write (H = 0 leaves x unread): return before a loop over B * L rows.
  if (u.empty()) return;
  const int threads = detail::resolve_num_threads(num_threads);
  parallel_for(batch * len, detail::team_size(batch * len, threads), [&](Index task) {
    const Index b = task / len, j = task % len;
    for (Index h = 0; h < heads; ++h) {
      double sum = 0;
      for (Index d = 0; d < dim; ++d)
        sum += static_cast<double>(x(b, j, d)) * static_cast<double>(w(h, d));
      u(b, h, j) = static_cast<T>(sum + slope * static_cast<double>(j));
    }
  });
}

}  // namespace

void sparsek_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                       TensorView<const float, 4> v, TensorView<const float, 3> u,
                       const SparseKOptions& options, TensorView<float, 4> out,
                       TensorView<float, 3> lse) {
  attention_impl<float>(q, k, v, u, options, out, lse);
}
void sparsek_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                       TensorView<const double, 4> v, TensorView<const double, 3> u,
                       const SparseKOptions& options, TensorView<double, 4> out,
                       TensorView<double, 3> lse) {
  attention_impl<double>(q, k, v, u, options, out, lse);
}

void sparsek_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                       TensorView<const bfloat16, 4> v, TensorView<const bfloat16, 3> u,
                       const SparseKOptions& options, TensorView<bfloat16, 4> out,
                       TensorView<float, 3> lse) {
  attention_impl<bfloat16>(q, k, v, u, options, out, lse);
}
void sparsek_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                       TensorView<const float16, 4> v, TensorView<const float16, 3> u,
                       const SparseKOptions& options, TensorView<float16, 4> out,
                       TensorView<float, 3> lse) {
  attention_impl<float16>(q, k, v, u, options, out, lse);
}

void sparsek_select(TensorView<const float, 3> u, Index len_q, const SparseKOptions& options,
                    TensorView<std::int64_t, 4> indices, TensorView<float, 4> gates) {
  select_impl<float>(u, len_q, options, indices, gates);
}
void sparsek_select(TensorView<const double, 3> u, Index len_q, const SparseKOptions& options,
                    TensorView<std::int64_t, 4> indices, TensorView<double, 4> gates) {
  select_impl<double>(u, len_q, options, indices, gates);
}

void sparsek_prefix_thresholds(TensorView<const float, 2> z, Index k, TensorView<float, 2> tau,
                               TensorView<std::int64_t, 2> evicted_at, int num_threads) {
  prefix_thresholds_impl<float>(z, k, tau, evicted_at, num_threads);
}
void sparsek_prefix_thresholds(TensorView<const double, 2> z, Index k, TensorView<double, 2> tau,
                               TensorView<std::int64_t, 2> evicted_at, int num_threads) {
  prefix_thresholds_impl<double>(z, k, tau, evicted_at, num_threads);
}

void sparsek_linear_scores(TensorView<const float, 3> x, TensorView<const float, 2> w, double slope,
                           TensorView<float, 3> u, int num_threads) {
  linear_scores_impl<float>(x, w, slope, u, num_threads);
}
void sparsek_linear_scores(TensorView<const double, 3> x, TensorView<const double, 2> w,
                           double slope, TensorView<double, 3> u, int num_threads) {
  linear_scores_impl<double>(x, w, slope, u, num_threads);
}

}  // namespace foveal
