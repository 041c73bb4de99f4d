// libFuzzer harness: the training-free sparse attention entry points, in float, double, bfloat16
// and float16. Sparse prefill, block-sparse and token top-k alike (BlockMethod, TokenMethod):
// <method>_select, <method>_attention with the selection it made, with a hand-made selection
// (from a drawn mask, then maybe broken: wrong geometry, offsets of the wrong length or not
// monotone, items out of range or not increasing) and in the one-call form, over drawn views and
// options (bad budgets, thresholds, block sizes). Quest decode: quest_decode_attention over a
// KVCache with or without page bounds (owned or over drawn views, ring or not), driven by a drawn
// sequence of appends (across pages), truncations, resets and bound refreshes after in-place
// edits.
//
// The invariants of the other harnesses (no crash; errors are foveal::Error; invalid views
// rejected), and:
//   - a rejected call writes no output and changes no cache (lengths, retained positions,
//     page bounds, storage: compared byte for byte);
//   - an accepted call on tame inputs (no NaN or infinity, |x| <= 8) and a moderate scale and
//     softcap gives a finite out and an lse that is finite or -inf (a query seeing no key);
//   - every accepted call gives the same bits at another thread count; the one-call form
//     gives the bits of <method>_select then <method>_attention with the selection;
//   - with budget 1 (every candidate kept; an all-true mask) the result is foveal::attention's
//     (or decode_attention's) to rounding;
//   - <method>_select makes a well-formed selection of the call's geometry, the same for
//     any thread count; <method>_attention rejects a selection that is not one;
//   - the cache's page bounds are always the min / max of its stored keys (NaN apart);
//   - snapkv_select's selection follows its rules, keeps the sinks and the newest keys, and is
//     the same for any thread count; snapkv_gather copies exactly the selected rows and rejects
//     (writing nothing) a selection that breaks the rules.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fuzz_common.hpp"
#include "reference/page_bound_reference.hpp"

namespace {

using namespace foveal_fuzz;
using foveal::BlockSelection;
using foveal::TensorView;

template <typename T>
using Compute = foveal::compute_type_t<T>;

// Half the inputs draw only valid sizes and options (the rest anything), so that enough calls
// get past the checks to the kernels.
bool valid_draws = false;

// An extent: in [low, high] for valid draws, else draw_extent (0 .. high, now and then
// negative or huge).
Index extent(FuzzedDataProvider& data, Index low, Index high) {
  return valid_draws ? data.ConsumeIntegralInRange<Index>(low, high) : draw_extent(data, high);
}

// An index option: in [low, high] for valid draws, else draw_index_option.
Index index_option(FuzzedDataProvider& data, Index low, Index high) {
  return valid_draws ? data.ConsumeIntegralInRange<Index>(low, high) : draw_index_option(data);
}

// Attention options; any q_offset (`any_q_offset`) or -1 now and then 3 (see
// draw_attention_options).
foveal::AttentionOptions attention_options(FuzzedDataProvider& data, bool any_q_offset) {
  if (!valid_draws) return draw_attention_options(data, any_q_offset);
  constexpr double kScales[] = {0.0, 0.0, 0.125, 0.5, 1.0, 30.0};
  foveal::AttentionOptions options;
  options.scale = kScales[data.ConsumeIntegralInRange<int>(0, 5)];
  options.causal = data.ConsumeBool();
  options.window_left = data.ConsumeBool() ? -1 : data.ConsumeIntegralInRange<Index>(0, 40);
  options.window_right = data.ConsumeBool() ? -1
                         : options.causal   ? 0
                                            : data.ConsumeIntegralInRange<Index>(0, 40);
  options.sink_tokens = data.ConsumeIntegralInRange<Index>(0, 3);
  options.softcap = data.ConsumeBool() ? 0.0 : 30.0;
  options.q_offset =
      any_q_offset && data.ConsumeBool() ? data.ConsumeIntegralInRange<Index>(0, 40) : -1;
  options.num_threads = data.ConsumeIntegralInRange<int>(0, 2);
  return options;
}

// Whether every element of the arena is tame: not NaN, |x| <= 8 (the ordinary fill values).
template <typename T>
bool tame(const Arena<T>& arena) {
  for (const auto& buffer : arena.buffers)
    for (const T& x : buffer)
      if (!(std::fabs(widen(x)) <= 8)) return false;
  return true;
}

// tame() of a cache's owned storage (contiguous).
template <typename T>
bool tame(const TensorView<const T, 4>& view) {
  for (Index i = 0, count = view.numel(); i < count; ++i)
    if (!(std::fabs(widen(view.data()[i])) <= 8)) return false;
  return true;
}

// Options under which tame inputs must give finite results.
bool moderate(const foveal::AttentionOptions& options) {
  return std::fabs(options.scale) <= 30 && std::fabs(options.softcap) <= 30;
}

// The output buffers of a call: out (of the storage type) and lse (of the compute type), apart
// from the inputs; their bytes, to check that a rejected call wrote nothing and that another
// run wrote the same bits.
template <typename T>
struct Outputs {
  Arena<T> out;
  Arena<Compute<T>> lse;
  explicit Outputs(FuzzedDataProvider& data) : out(data, 1), lse(data, 1) {}

  struct Bytes {
    std::vector<std::vector<T>> out;
    std::vector<std::vector<Compute<T>>> lse;
  };
  Bytes bytes() const { return {out.buffers, lse.buffers}; }
  void restore(const Bytes& bytes) {
    out.buffers = bytes.out;
    lse.buffers = bytes.lse;
  }
  bool same(const Bytes& bytes) const {
    const auto equal = [](const auto& a, const auto& b) {
      for (std::size_t i = 0; i < a.size(); ++i)
        if (std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(a[i][0])) != 0) return false;
      return true;
    };
    return equal(out.buffers, bytes.out) && equal(lse.buffers, bytes.lse);
  }
  // Every element of the outputs close to the one in `bytes` (NaN matches NaN): the results of
  // two calls that agree to rounding.
  bool close(const Bytes& bytes) const {
    const double tolerance = foveal::is_half_dtype_v<T>          ? 2e-2
                             : std::is_same_v<Compute<T>, float> ? 1e-4
                                                                 : 1e-10;
    const auto near = [&](const auto& a, const auto& b) {
      for (std::size_t i = 0; i < a.size(); ++i)
        for (std::size_t j = 0; j < a[i].size(); ++j) {
          const double x = widen(a[i][j]), y = widen(b[i][j]);
          if (std::isnan(x) || std::isnan(y)) {
            if (std::isnan(x) != std::isnan(y)) return false;
          } else if (x != y && !(std::fabs(x - y) <= tolerance * (1 + std::fabs(y)))) {
            return false;
          }
        }
      return true;
    };
    return near(out.buffers, bytes.out) && near(lse.buffers, bytes.lse);
  }
};

// out finite and lse finite or -inf.
template <typename T>
void check_finite(const char* what, const TensorView<T, 4>& out,
                  const TensorView<Compute<T>, 3>& lse) {
  for (Index i = 0, count = out.numel(); i < count; ++i)
    if (!std::isfinite(widen(element(out, i)))) finding(what, "a non-finite out from tame inputs");
  if (lse.is_null()) return;
  for (Index i = 0, count = lse.numel(); i < count; ++i) {
    const double x = element(lse, i);
    if (std::isnan(x) || x == std::numeric_limits<double>::infinity())
      finding(what, "an lse that is NaN or +inf from tame inputs");
  }
}

// A thread count other than `threads` among 1 .. 3.
int other_threads(FuzzedDataProvider& data, int threads) {
  const int pick = data.ConsumeIntegralInRange<int>(1, 3);
  return pick == threads ? pick % 3 + 1 : pick;
}

// The checks of a call into `outputs` (views out, lse), given how it answered from `before`:
// rejected, nothing written; accepted, finite on tame inputs, and `again` (the same call at
// another thread count, or the same result by another route) writes the same bits.
template <typename T, typename Again>
void check_answer(const char* what, Answer answer, Outputs<T>& outputs,
                  const typename Outputs<T>::Bytes& before, bool tame_call,
                  const TensorView<T, 4>& out, const TensorView<Compute<T>, 3>& lse,
                  Again&& again) {
  if (answer == Answer::rejected && !outputs.same(before))
    finding(what, "a rejected call wrote an output");
  if (answer != Answer::accepted) return;
  if (tame_call) check_finite<T>(what, out, lse);
  const typename Outputs<T>::Bytes first = outputs.bytes();
  outputs.restore(before);
  try {
    if (!again()) return;
  } catch (const foveal::Error& error) {
    std::fprintf(stderr, "%s\n", error.what());
    finding(what, "the same call at another thread count (or by another route) was rejected");
  } catch (const std::bad_alloc&) {
    return;
  }
  if (!outputs.same(first)) finding(what, "another thread count (or route) gave other bits");
}

// --------------------------------------------------------------------------------------------
// Block-sparse prefill.

double draw_fraction(FuzzedDataProvider& data, bool zero_ok) {
  constexpr double kValues[] = {1.0 / 16,
                                0.25,
                                0.5,
                                1.0,
                                1.0,
                                0.0,
                                -0.5,
                                1.5,
                                std::numeric_limits<double>::quiet_NaN(),
                                std::numeric_limits<double>::infinity(),
                                std::numeric_limits<double>::denorm_min(),
                                1e-300};
  if (zero_ok && data.ConsumeBool()) return 0.0;
  return kValues[data.ConsumeIntegralInRange<int>(0, valid_draws ? 3 : 11)];
}

Index draw_block_size(FuzzedDataProvider& data) {
  constexpr Index kOdd[] = {
      15, 17, 0, -16, 4096, 4097, Index{1} << 40, std::numeric_limits<Index>::min()};
  const int pick = data.ConsumeIntegralInRange<int>(0, valid_draws ? 7 : 15);
  return pick < 8 ? 16 * (1 + pick % 2) : kOdd[pick - 8];
}

// What block_sparse and token_topk differ in: the options (their local option), the selection's
// items (key blocks or keys) and their extent, the entry points and the names in findings.
struct BlockMethod {
  using Selection = BlockSelection;
  using Options = foveal::BlockSparseOptions;
  static constexpr const char* kSelect = "block_sparse_select";
  static constexpr const char* kAttendSparse = "block_sparse_attention(sparse)";
  static constexpr const char* kAttendSelection = "block_sparse_attention(selection)";
  static constexpr const char* kKept = "BlockSelection::kept";
  static std::vector<std::int64_t>& items(Selection& s) { return s.blocks; }
  static const std::vector<std::int64_t>& items(const Selection& s) { return s.blocks; }
  static std::int64_t& extent(Selection& s) { return s.key_blocks; }
  static std::int64_t extent(const Selection& s) { return s.key_blocks; }
  static Index extent_for(Index len_k, Index block_size) {
    return (len_k + block_size - 1) / block_size;
  }
  static void draw_local(FuzzedDataProvider& data, Options& sparse) {
    sparse.local_blocks = index_option(data, 0, 2);
  }
  template <typename... Args>
  static Selection select(Args&&... args) {
    return foveal::block_sparse_select(std::forward<Args>(args)...);
  }
  template <typename... Args>
  static void attend(Args&&... args) {
    foveal::block_sparse_attention(std::forward<Args>(args)...);
  }
};

struct TokenMethod {
  using Selection = foveal::TokenSelection;
  using Options = foveal::TokenTopkOptions;
  static constexpr const char* kSelect = "token_topk_select";
  static constexpr const char* kAttendSparse = "token_topk_attention(sparse)";
  static constexpr const char* kAttendSelection = "token_topk_attention(selection)";
  static constexpr const char* kKept = "TokenSelection::kept";
  static std::vector<std::int64_t>& items(Selection& s) { return s.keys; }
  static const std::vector<std::int64_t>& items(const Selection& s) { return s.keys; }
  static std::int64_t& extent(Selection& s) { return s.len_k; }
  static std::int64_t extent(const Selection& s) { return s.len_k; }
  static Index extent_for(Index len_k, Index /*block_size*/) { return len_k; }
  static void draw_local(FuzzedDataProvider& data, Options& sparse) {
    sparse.local_tokens = index_option(data, 0, 40);
    sparse.outliers = index_option(data, 0, 15);
  }
  template <typename... Args>
  static Selection select(Args&&... args) {
    return foveal::token_topk_select(std::forward<Args>(args)...);
  }
  template <typename... Args>
  static void attend(Args&&... args) {
    foveal::token_topk_attention(std::forward<Args>(args)...);
  }
};

// vertical_slash: token_topk's selection type and attention, its own options and selection.
struct LinesMethod : TokenMethod {
  using Options = foveal::VerticalSlashOptions;
  static constexpr const char* kSelect = "vertical_slash_select";
  static constexpr const char* kAttendSparse = "vertical_slash_attention(sparse)";
  static void draw_local(FuzzedDataProvider& data, Options& sparse) {
    sparse.local_tokens = index_option(data, 0, 40);
    sparse.last_queries = index_option(data, 1, 50);
  }
  template <typename... Args>
  static Selection select(Args&&... args) {
    return foveal::vertical_slash_select(std::forward<Args>(args)...);
  }
  template <typename... Args>
  static void attend(Args&&... args) {
    if constexpr ((std::is_same_v<std::decay_t<Args>, Options> || ...)) {
      foveal::vertical_slash_attention(std::forward<Args>(args)...);
    } else {
      foveal::token_topk_attention(std::forward<Args>(args)...);
    }
  }
};

template <typename Method>
typename Method::Options draw_sparse_options(FuzzedDataProvider& data) {
  typename Method::Options sparse;
  sparse.budget = draw_fraction(data, false);
  sparse.threshold = draw_fraction(data, true);
  sparse.block_size = draw_block_size(data);
  Method::draw_local(data, sparse);
  return sparse;
}

// The block geometry a selection must have for a call (the header's rules), when its numbers
// are small enough to compute here.
struct Geometry {
  bool known = false;
  bool bad_block_size = false;  // outside [16, 4096]
  Index block_size = 0, batch = 0, heads_kv = 0, first_query_block = 0, query_blocks = 0,
        extent = 0;  // key blocks (block_sparse) or keys (token_topk)
  Index lists() const { return batch * heads_kv * query_blocks; }
};

Index floor_div(Index value, Index divisor) {
  return value >= 0 ? value / divisor : -((-value + divisor - 1) / divisor);
}

template <typename Method, typename T>
Geometry geometry_of(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                     Index q_offset, Index block_size) {
  const Index batch = q.size(0), heads_kv = k.size(1), len_q = q.size(2), len_k = k.size(2);
  Geometry geometry;
  constexpr Index kSmall = Index{1} << 20;
  geometry.bad_block_size = block_size < 16 || block_size > 4096;
  const auto small = [](Index x) { return x >= 0 && x <= kSmall; };
  if (geometry.bad_block_size || !small(batch) || !small(heads_kv) || !small(len_q) ||
      !small(len_k) || q_offset > kSmall || q_offset < -1)
    return geometry;
  const Index offset = q_offset == -1 ? len_k - len_q : q_offset;
  geometry.known = true;
  geometry.block_size = block_size;
  geometry.batch = batch;
  geometry.heads_kv = heads_kv;
  geometry.extent = Method::extent_for(len_k, block_size);
  if (len_q > 0) {
    geometry.first_query_block = floor_div(offset, block_size);
    geometry.query_blocks =
        floor_div(offset + len_q - 1, block_size) - geometry.first_query_block + 1;
  }
  return geometry;
}

// Whether `selection` follows its class's rules for `geometry`.
template <typename Method>
bool well_formed(const typename Method::Selection& selection, const Geometry& geometry) {
  const std::vector<std::int64_t>& items = Method::items(selection);
  if (selection.block_size != geometry.block_size || selection.batch != geometry.batch ||
      selection.heads_kv != geometry.heads_kv ||
      selection.first_query_block != geometry.first_query_block ||
      selection.query_blocks != geometry.query_blocks ||
      Method::extent(selection) != geometry.extent)
    return false;
  const std::vector<std::int64_t>& offsets = selection.offsets;
  if (static_cast<Index>(offsets.size()) != geometry.lists() + 1 || offsets.front() != 0 ||
      offsets.back() != static_cast<Index>(items.size()))
    return false;
  for (std::size_t list = 0; list + 1 < offsets.size(); ++list) {
    if (offsets[list] > offsets[list + 1]) return false;
    for (Index i = offsets[list]; i < offsets[list + 1]; ++i) {
      const std::int64_t item = items[static_cast<std::size_t>(i)];
      if (item < 0 || item >= geometry.extent) return false;
      if (i > offsets[list] && items[static_cast<std::size_t>(i) - 1] >= item) return false;
    }
  }
  return true;
}

// A selection of `geometry` from a drawn mask (or every item: `all`).
template <typename Method>
typename Method::Selection selection_from_mask(FuzzedDataProvider& data, const Geometry& geometry,
                                               bool all) {
  typename Method::Selection selection;
  std::vector<std::int64_t>& items = Method::items(selection);
  selection.block_size = geometry.block_size;
  selection.batch = geometry.batch;
  selection.heads_kv = geometry.heads_kv;
  selection.first_query_block = geometry.first_query_block;
  selection.query_blocks = geometry.query_blocks;
  Method::extent(selection) = geometry.extent;
  selection.offsets.push_back(0);
  for (Index list = 0; list < geometry.lists(); ++list) {
    for (Index item = 0; item < geometry.extent; ++item)
      if (all || data.ConsumeBool()) items.push_back(item);
    selection.offsets.push_back(static_cast<std::int64_t>(items.size()));
  }
  return selection;
}

// One edit of a selection, most of them breaking it.
template <typename Method>
void perturb(FuzzedDataProvider& data, typename Method::Selection& selection) {
  auto& offsets = selection.offsets;
  auto& blocks = Method::items(selection);
  const auto any_of = [&](std::size_t size) {
    return static_cast<std::size_t>(
        data.ConsumeIntegralInRange<std::size_t>(0, size > 0 ? size - 1 : 0));
  };
  const Index delta = data.ConsumeBool() ? 1 : -1;
  switch (data.ConsumeIntegralInRange<int>(0, 12)) {
    case 0:
      selection.block_size = draw_block_size(data);
      break;
    case 1:
      selection.batch += delta;
      break;
    case 2:
      selection.heads_kv += delta;
      break;
    case 3:
      selection.first_query_block += delta;
      break;
    case 4:
      selection.query_blocks += delta;
      break;
    case 5:
      Method::extent(selection) += delta;
      break;
    case 6:  // one offset too many or too few (or none)
      if (data.ConsumeBool())
        offsets.push_back(offsets.empty() ? 0 : offsets.back());
      else if (data.ConsumeBool())
        offsets.clear();
      else if (!offsets.empty())
        offsets.pop_back();
      break;
    case 7:  // an offset moved (maybe not monotone any more)
      if (!offsets.empty()) offsets[any_of(offsets.size())] += delta;
      break;
    case 8:  // a block out of range
      if (!blocks.empty()) {
        constexpr std::int64_t kOdd[] = {-1, std::numeric_limits<std::int64_t>::min(),
                                         std::numeric_limits<std::int64_t>::max()};
        const int pick = data.ConsumeIntegralInRange<int>(0, 3);
        blocks[any_of(blocks.size())] = pick < 3 ? kOdd[pick] : Method::extent(selection);
      }
      break;
    case 9:  // two neighbours swapped or equal (not strictly increasing)
      if (blocks.size() >= 2) {
        const std::size_t i = any_of(blocks.size() - 1);
        if (data.ConsumeBool())
          std::swap(blocks[i], blocks[i + 1]);
        else
          blocks[i + 1] = blocks[i];
      }
      break;
    case 10:  // a block more or less than the offsets say
      if (data.ConsumeBool())
        blocks.push_back(0);
      else if (!blocks.empty())
        blocks.pop_back();
      break;
    case 11:  // a huge offset
      if (!offsets.empty())
        offsets[any_of(offsets.size())] = data.ConsumeBool()
                                              ? std::numeric_limits<std::int64_t>::max()
                                              : std::numeric_limits<std::int64_t>::min();
      break;
    default:  // a block dropped from a list (still well formed)
      if (!blocks.empty() && offsets.size() >= 2) {
        const std::size_t list = any_of(offsets.size() - 1);
        if (offsets[list] < offsets[list + 1]) {
          blocks.erase(blocks.begin() + offsets[list]);
          for (std::size_t i = list + 1; i < offsets.size(); ++i) --offsets[i];
        }
      }
  }
}

// The extents of a sparse prefill (or SnapKV) call: small, valid ones for valid draws.
AttentionDims draw_prefill_dims(FuzzedDataProvider& data) {
  AttentionDims dims{};
  dims.batch = extent(data, 1, 2);
  dims.heads_kv = extent(data, 1, 2);
  dims.group = extent(data, 1, 3);
  dims.len_q = extent(data, 1, 40);
  dims.len_k = extent(data, 1, 72);
  dims.dim = extent(data, 1, 3);
  dims.dim_v = extent(data, 1, 3);
  dims.heads_q = saturated_product(dims.heads_kv, dims.group);
  return dims;
}

// q [B, Hq, Lq, D], k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] drawn over `inputs`.
template <typename T>
std::array<DrawnView<const T, 4>, 3> draw_qkv(FuzzedDataProvider& data, Arena<T>& inputs,
                                              const AttentionDims& d) {
  auto q = draw_view<const T, T, 4>(data, inputs, {d.batch, d.heads_q, d.len_q, d.dim});
  auto k = draw_view<const T, T, 4>(data, inputs, {d.batch, d.heads_kv, d.len_k, d.dim});
  auto v = draw_view<const T, T, 4>(data, inputs, {d.batch, d.heads_kv, d.len_k, d.dim_v});
  return {q, k, v};
}

template <typename T, typename Method>
void run_sparse(FuzzedDataProvider& data) {
  using Selection = typename Method::Selection;
  // 0: the one-call form; 1: <method>_select, then the attention with its selection;
  // 2: the attention with a selection from a drawn mask.
  const int mode = data.ConsumeIntegralInRange<int>(0, 2);
  Arena<T> inputs(data, 2);
  Outputs<T> outputs(data);
  const AttentionDims dims = draw_prefill_dims(data);
  const auto [batch, heads_kv, group, len_q, len_k, dim, dim_v, heads_q] = dims;
  Expect expect, select_expect;
  auto qkv = draw_qkv<T>(data, inputs, dims);
  const auto& q = qkv[0];
  const auto& k = qkv[1];
  const auto& v = qkv[2];
  auto out = draw_view<T, T, 4>(data, outputs.out, {batch, heads_q, len_q, dim_v}, true);
  DrawnView<Compute<T>, 3> lse;
  if (data.ConsumeBool())
    lse = draw_view<Compute<T>, Compute<T>, 3>(data, outputs.lse, {batch, heads_q, len_q}, true);
  select_expect.add(q);
  select_expect.add(k);
  for (const auto* view : {&q, &k, &v}) expect.add(*view);
  expect.add(out);
  expect.add(lse);
  if (give_up(expect, dims)) return;

  foveal::AttentionOptions options = attention_options(data, true);
  const typename Method::Options sparse = draw_sparse_options<Method>(data);
  const bool tame_call = tame(inputs) && moderate(options);
  const auto before = outputs.bytes();
  const auto attend = [&](const Selection& selection, int threads) {
    foveal::AttentionOptions at = options;
    at.num_threads = threads;
    Method::attend(q.view, k.view, v.view, out.view, at, selection, lse.view);
  };
  const auto select = [&](int threads) {
    foveal::AttentionOptions at = options;
    at.num_threads = threads;
    return Method::select(q.view, k.view, at, sparse);
  };
  // With every candidate kept, the result is dense attention's to rounding.
  const auto check_dense = [&](const char* what) {
    if (!tame_call) return;
    const auto sparse_result = outputs.bytes();
    try {
      foveal::attention(q.view, k.view, v.view, out.view, options, lse.view);
    } catch (const std::exception&) {
      return;  // the checks of attention's arguments are fuzz_attention's business
    }
    if (!outputs.close(sparse_result)) finding(what, "differs from foveal::attention");
  };
  if (mode == 0) {  // the one-call form
    const Answer answer = answer_of(expect, Method::kAttendSparse, [&] {
      Method::attend(q.view, k.view, v.view, out.view, options, sparse, lse.view);
    });
    check_answer<T>(Method::kAttendSparse, answer, outputs, before, tame_call, out.view, lse.view,
                    [&] {
                      // Without query rows the one-call form skips the selection, which may
                      // be too large to make.
                      if (q.view.size(0) == 0 || q.view.size(1) == 0 || q.view.size(2) == 0)
                        return false;
                      const int threads = other_threads(data, options.num_threads);
                      attend(select(threads), threads);
                      return true;
                    });
    if (answer == Answer::accepted && sparse.budget == 1 && sparse.threshold == 0)
      check_dense(Method::kAttendSparse);
    return;
  }
  const Geometry geometry = geometry_of<Method>(
      q.view, k.view, options.q_offset,
      mode == 1 ? sparse.block_size : 16 * data.ConsumeIntegralInRange<Index>(1, 3));
  Selection selection;
  bool all = false;
  if (mode == 1) {
    const Answer answer =
        answer_of(select_expect, Method::kSelect, [&] { selection = select(options.num_threads); });
    if (answer != Answer::accepted) return;
    if (geometry.known && !well_formed<Method>(selection, geometry))
      finding(Method::kSelect, "made a selection that breaks its class's rules");
    // kept() reads the lists the offsets say.
    std::int64_t count = 0;
    for (Index list = 0; geometry.known && list < geometry.lists(); ++list) {
      const Index h = list / geometry.query_blocks % geometry.heads_kv;
      const Index b = list / geometry.query_blocks / geometry.heads_kv;
      const std::int64_t* kept =
          selection.kept(b, h, geometry.first_query_block + list % geometry.query_blocks, &count);
      if (kept !=
              Method::items(selection).data() + selection.offsets[static_cast<std::size_t>(list)] ||
          count != selection.offsets[static_cast<std::size_t>(list) + 1] -
                       selection.offsets[static_cast<std::size_t>(list)])
        finding(Method::kKept, "not the list the offsets say");
    }
    try {
      const Selection again = select(other_threads(data, options.num_threads));
      if (again.offsets != selection.offsets || Method::items(again) != Method::items(selection))
        finding(Method::kSelect, "another thread count selected otherwise");
    } catch (const std::bad_alloc&) {
    }
    all = sparse.budget == 1 && sparse.threshold == 0;
  } else {  // from a drawn block mask (all true now and then)
    if (!geometry.known || saturated_product(geometry.lists(), geometry.extent) > 4096) return;
    all = data.ConsumeBool();
    selection = selection_from_mask<Method>(data, geometry, all);
  }
  if (data.ConsumeIntegralInRange<int>(0, 2) == 0) {
    perturb<Method>(data, selection);
    all = false;
    // kept() of an edited selection: a list of it, or foveal::Error (never a read outside it).
    try {
      std::int64_t count = 0;
      const std::int64_t* kept = selection.kept(0, 0, selection.first_query_block, &count);
      const std::vector<std::int64_t>& items = Method::items(selection);
      if (count < 0 || kept < items.data() || kept + count > items.data() + items.size())
        finding(Method::kKept, "a list outside the items");
    } catch (const foveal::Error& error) {
      last_error = error.what();
    }
  }
  const Answer answer =
      answer_of(expect, Method::kAttendSelection, [&] { attend(selection, options.num_threads); });
  // Accepted: the selection must be well formed for the call's geometry at its block size.
  const Geometry wanted =
      geometry_of<Method>(q.view, k.view, options.q_offset, selection.block_size);
  if (answer == Answer::accepted &&
      (wanted.bad_block_size || (wanted.known && !well_formed<Method>(selection, wanted))))
    finding(Method::kAttendSelection, "accepted a malformed selection");
  check_answer<T>(Method::kAttendSelection, answer, outputs, before, tame_call, out.view, lse.view,
                  [&] {
                    attend(selection, other_threads(data, options.num_threads));
                    return true;
                  });
  if (answer == Answer::accepted && all) check_dense(Method::kAttendSelection);
}

// --------------------------------------------------------------------------------------------
// Quest decode over a KVCache with page bounds.

Index draw_page_bounds(FuzzedDataProvider& data) {
  constexpr Index kValues[] = {1,
                               2,
                               3,
                               4,
                               8,
                               16,
                               0,
                               -1,
                               Index{1} << 30,
                               (Index{1} << 30) + 1,
                               Index{1} << 62,
                               std::numeric_limits<Index>::min()};
  const int pick = data.ConsumeIntegralInRange<int>(0, valid_draws ? 4 : 15);
  return kValues[pick < 12 ? pick : pick % 6];
}

// Everything a rejected call must leave as it was: lengths, retained positions, page bounds and
// (of an owned cache) the storage; a wrapped cache's storage lies in the inputs arena.
template <typename T>
struct CacheState {
  std::vector<Index> lengths, first_retained;
  std::vector<foveal::page_bound_t<T>> bounds;
  std::vector<T> keys, values;
  std::vector<std::vector<T>> arena;

  CacheState(const foveal::KVCache<T>& cache, bool owned, const Arena<T>& inputs)
      : lengths(cache.lengths()) {
    for (Index b = 0; b < cache.batch(); ++b) first_retained.push_back(cache.first_retained(b));
    const auto page_bounds = cache.page_bounds();
    bounds.assign(page_bounds.data(), page_bounds.data() + page_bounds.numel());
    if (owned) {
      keys.assign(cache.keys().data(), cache.keys().data() + cache.keys().numel());
      values.assign(cache.values().data(), cache.values().data() + cache.values().numel());
    } else {
      arena = inputs.buffers;
    }
  }
  bool operator==(const CacheState& other) const {
    const auto same = [](const auto& a, const auto& b) {
      return a.size() == b.size() &&
             (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
    };
    if (!same(bounds, other.bounds) || !same(keys, other.keys) || !same(values, other.values) ||
        lengths != other.lengths || first_retained != other.first_retained ||
        arena.size() != other.arena.size())
      return false;
    for (std::size_t i = 0; i < arena.size(); ++i)
      if (!same(arena[i], other.arena[i])) return false;
    return true;
  }
};

// The page bounds are the min and max of each page's stored keys (+inf / -inf for none),
// rounded outward to bfloat16 unless the keys are float64.
template <typename T>
void check_bounds(const foveal::KVCache<T>& cache) {
  using C = Compute<T>;
  const Index page_size = cache.page_size();
  const auto bounds = cache.page_bounds();
  if (page_size == 0) {
    if (bounds.numel() != 0) finding("KVCache::page_bounds", "bounds without page bounds");
    return;
  }
  const Index pages = cache.capacity() / page_size + (cache.capacity() % page_size != 0);
  if (cache.pages() != pages || bounds.size(0) != cache.batch() ||
      bounds.size(1) != cache.heads_kv() || bounds.size(2) != pages || bounds.size(3) != 2 ||
      bounds.size(4) != cache.dim())
    finding("KVCache::page_bounds", "not of shape [B, Hkv, pages, 2, D]");
  if (cache.batch() == 0 || cache.heads_kv() == 0) return;
  const Index dim = cache.dim();
  std::vector<C> low(static_cast<std::size_t>(pages * dim)), high(low.size());
  for (Index b = 0; b < cache.batch(); ++b) {
    const foveal::KVCacheLayout layout = cache.layout(b);
    for (Index h = 0; h < cache.heads_kv(); ++h) {
      std::fill(low.begin(), low.end(), std::numeric_limits<C>::infinity());
      std::fill(high.begin(), high.end(), -std::numeric_limits<C>::infinity());
      for (int s = 0; s < layout.count; ++s)
        for (Index row = layout.spans[s].row; row < layout.spans[s].row + layout.spans[s].count;
             ++row)
          for (Index d = 0; d < dim; ++d) {
            const auto x = static_cast<C>(widen(*cache.keys().address(b, h, row, d)));
            const auto at = static_cast<std::size_t>(row / page_size * dim + d);
            if (std::isnan(x)) continue;
            low[at] = std::min(low[at], x);
            high[at] = std::max(high[at], x);
          }
      for (Index page = 0; page < pages; ++page)
        for (Index d = 0; d < dim; ++d) {
          const auto at = static_cast<std::size_t>(page * dim + d);
          using foveal::reference::bound_value, foveal::reference::stored_bound;
          if (bound_value(*bounds.address(b, h, page, 0, d)) != stored_bound<T>(low[at], false) ||
              bound_value(*bounds.address(b, h, page, 1, d)) != stored_bound<T>(high[at], true))
            finding("KVCache page bounds",
                    "not the min / max of the page's stored keys rounded outward");
        }
    }
  }
}

template <typename T>
void run_quest(FuzzedDataProvider& data) {
  Arena<T> inputs(data, 2);
  Outputs<T> outputs(data);
  const Index batch = extent(data, 1, 2), heads_kv = extent(data, 1, 2);
  const Index capacity = extent(data, 1, 24), dim = extent(data, 1, 3);
  const Index dim_v = extent(data, 1, 3);
  foveal::KVCacheOptions cache_options;
  cache_options.ring = data.ConsumeBool();
  cache_options.sink_tokens = index_option(data, 0, 2);
  cache_options.page_bounds =
      data.ConsumeIntegralInRange<int>(0, 5) == 5 ? 0 : draw_page_bounds(data);
  const bool owned = data.ConsumeBool();
  const std::unique_ptr<foveal::KVCache<T>> cache = draw_kv_cache(
      data, inputs, owned, {batch, heads_kv, capacity, dim, dim_v}, cache_options, 64, 4096);
  if (!cache) return;
  check_bounds(*cache);
  const Index b = cache->batch(), h = cache->heads_kv(), d = cache->dim(), dv = cache->dim_v();
  // An append; a rejected one changes nothing.
  const auto unchanged = [&](const CacheState<T>& before, const char* what) {
    if (!(CacheState<T>(*cache, owned, inputs) == before))
      finding(what, "a rejected call (or a read) changed the cache");
  };
  const auto append = [&](const DrawnAppend<T>& drawn, const CacheState<T>& before) {
    const Answer answer = answer_of(drawn.expect, "KVCache::append", [&] {
      if (drawn.ragged)
        cache->append(drawn.k.view, drawn.v.view, drawn.counts);
      else
        cache->append(drawn.k.view, drawn.v.view);
    });
    if (answer != Answer::accepted) unchanged(before, "KVCache::append");
  };
  if (valid_draws) {  // a prefill of 1 .. 24 tokens, so that the queries have keys to see
    const CacheState<T> before(*cache, owned, inputs);
    DrawnAppend<T> prefill;
    const Index n = data.ConsumeIntegralInRange<Index>(1, 24);
    prefill.k = draw_view<const T, T, 4>(data, inputs, {b, h, n, d});
    prefill.v = draw_view<const T, T, 4>(data, inputs, {b, h, n, dv});
    prefill.expect.add(prefill.k);
    prefill.expect.add(prefill.v);
    if (!prefill.expect.unusable) append(prefill, before);
    check_bounds(*cache);
  }
  for (int step = data.ConsumeIntegralInRange<int>(1, 10); step > 0; --step) {
    const CacheState<T> before(*cache, owned, inputs);
    switch (data.ConsumeIntegralInRange<int>(0, 6)) {
      case 0:
      case 1: {  // append, maybe ragged, maybe across pages
        const DrawnAppend<T> drawn = draw_append(data, inputs, b, h, d, dv);
        if (!drawn.expect.unusable) append(drawn, before);
        break;
      }
      case 2:
      case 3: {  // Quest decode
        const Index group = extent(data, 1, 3), len_q = extent(data, 1, 3);
        const Index heads_q = saturated_product(h, group);
        Expect expect;
        auto q = draw_view<const T, T, 4>(data, inputs, {b, heads_q, len_q, d});
        auto out = draw_view<T, T, 4>(data, outputs.out, {b, heads_q, len_q, dv}, true);
        DrawnView<Compute<T>, 3> lse;
        if (data.ConsumeBool())
          lse = draw_view<Compute<T>, Compute<T>, 3>(data, outputs.lse, {b, heads_q, len_q}, true);
        expect.add(q);
        expect.add(out);
        expect.add(lse);
        if (expect.unusable) break;
        const foveal::AttentionOptions options = attention_options(data, false);
        foveal::QuestOptions quest;
        quest.budget = draw_fraction(data, false);
        quest.local_pages = data.ConsumeIntegralInRange<int>(0, 7) == 7
                                ? (Index{1} << 40) - data.ConsumeIntegralInRange<int>(-1, 1)
                                : index_option(data, 0, 2);
        const bool tame_call = tame(inputs) && moderate(options) &&
                               (!owned || (tame(cache->keys()) && tame(cache->values())));
        const auto written = outputs.bytes();
        const auto call = [&](int threads) {
          foveal::AttentionOptions at = options;
          at.num_threads = threads;
          foveal::quest_decode_attention(q.view, *cache, at, quest, out.view, lse.view);
        };
        const Answer answer =
            answer_of(expect, "quest_decode_attention", [&] { call(options.num_threads); });
        unchanged(before, "quest_decode_attention");
        check_answer<T>("quest_decode_attention", answer, outputs, written, tame_call, out.view,
                        lse.view, [&] {
                          call(other_threads(data, options.num_threads));
                          return true;
                        });
        if (answer == Answer::accepted && quest.budget == 1 && tame_call) {
          const auto quest_result = outputs.bytes();
          foveal::decode_attention(q.view, *cache, options, out.view, lse.view);
          if (!outputs.close(quest_result))
            finding("quest_decode_attention(budget 1)", "differs from decode_attention");
        }
        break;
      }
      case 4: {  // truncate all or one sequence
        const Index length = draw_index_option(data);
        try {
          if (data.ConsumeBool())
            cache->truncate(length);
          else
            cache->truncate(draw_index_option(data), length);
        } catch (const foveal::Error& error) {
          last_error = error.what();
          unchanged(before, "KVCache::truncate");
        }
        break;
      }
      case 5:
        cache->reset();
        break;
      default: {  // a stored key edited in place (wrapped storage), then the bounds refreshed
        if (!owned && cache->keys().numel() > 0) {
          const TensorView<const T, 4> keys = cache->keys();
          const Index flat = data.ConsumeIntegralInRange<Index>(0, keys.numel() - 1);
          const_cast<T&>(element(keys, flat)) = foveal::to_storage<T>(draw_value<Compute<T>>(data));
        }
        const CacheState<T> edited(*cache, owned, inputs);
        cache->refresh_page_bounds();
        // Only the bounds may change.
        CacheState<T> after(*cache, owned, inputs);
        after.bounds = edited.bounds;
        if (!(after == edited)) finding("KVCache::refresh_page_bounds", "changed more than bounds");
      }
    }
    check_bounds(*cache);
  }
}

}  // namespace

// --------------------------------------------------------------------------------------------
// SnapKV: snapkv_select over drawn views and options, then snapkv_gather with its selection or
// an edited one.

// Whether `selection` follows SnapKVSelection's rules for B, Hkv, Lk and keeps the forced keys
// (the sinks and the newest local_tokens keys).
bool well_formed_snapkv(const foveal::SnapKVSelection& selection, Index batch, Index heads_kv,
                        Index len_k, Index sinks, Index local) {
  if (selection.batch != batch || selection.heads_kv != heads_kv || selection.len_k != len_k ||
      selection.kept < 0 || selection.kept > len_k ||
      static_cast<Index>(selection.keys.size()) != batch * heads_kv * selection.kept)
    return false;
  for (Index list = 0; list < batch * heads_kv; ++list) {
    const std::int64_t* keys = selection.keys.data() + list * selection.kept;
    for (Index i = 0; i < selection.kept; ++i) {
      if (keys[i] < 0 || keys[i] >= len_k || (i > 0 && keys[i] <= keys[i - 1])) return false;
    }
    const auto holds = [&](Index key) {
      return std::binary_search(keys, keys + selection.kept, static_cast<std::int64_t>(key));
    };
    for (Index key = 0; key < std::min(sinks, len_k); ++key)
      if (!holds(key)) return false;
    for (Index key = std::max<Index>(0, len_k - local); key < len_k; ++key)
      if (!holds(key)) return false;
  }
  return true;
}

template <typename T>
void run_snapkv(FuzzedDataProvider& data) {
  constexpr const char* kSelect = "snapkv_select";
  constexpr const char* kGather = "snapkv_gather";
  Arena<T> inputs(data, 2);
  Arena<T> gathered_k(data, 1), gathered_v(data, 1);  // apart: the outputs never overlap
  const AttentionDims dims = draw_prefill_dims(data);
  Expect select_expect, gather_expect;
  auto qkv = draw_qkv<T>(data, inputs, dims);
  const auto& q = qkv[0];
  const auto& k = qkv[1];
  const auto& v = qkv[2];
  select_expect.add(q);
  select_expect.add(k);
  gather_expect.add(k);
  gather_expect.add(v);
  if (give_up(select_expect, dims) || gather_expect.unusable) return;

  foveal::AttentionOptions options = attention_options(data, true);
  if (valid_draws) {  // SnapKV's own rules: the prompt's causal attention, no window
    options.causal = true;
    options.window_left = -1;
    options.window_right = -1;
  }
  foveal::SnapKVOptions snap;
  snap.budget = draw_fraction(data, false);
  snap.threshold = draw_fraction(data, true);
  snap.window = index_option(data, 1, 50);
  constexpr Index kPools[] = {1, 3, 7, 5, 2, 0, -1, Index{1} << 40};
  snap.pool = kPools[data.ConsumeIntegralInRange<int>(0, valid_draws ? 3 : 7)];
  snap.local_tokens = index_option(data, 0, 40);
  const auto select = [&](int threads) {
    foveal::AttentionOptions at = options;
    at.num_threads = threads;
    return foveal::snapkv_select(q.view, k.view, at, snap);
  };
  foveal::SnapKVSelection selection;
  if (answer_of(select_expect, kSelect, [&] { selection = select(options.num_threads); }) !=
      Answer::accepted)
    return;
  // (The views' extents: a drawn view may differ from the drawn dims.)
  const Index views_batch = k.view.size(0), views_heads = k.view.size(1),
              views_len = k.view.size(2);
  if (!select_expect.invalid && !well_formed_snapkv(selection, views_batch, views_heads, views_len,
                                                    options.sink_tokens, snap.local_tokens))
    finding(kSelect, "made a selection that breaks its rules or drops a forced key");
  try {
    const foveal::SnapKVSelection again = select(other_threads(data, options.num_threads));
    if (again.kept != selection.kept || again.keys != selection.keys)
      finding(kSelect, "another thread count selected otherwise");
  } catch (const std::bad_alloc&) {
  }

  // Now and then an edited selection, which snapkv_gather must reject unless it still follows
  // the rules.
  if (data.ConsumeIntegralInRange<int>(0, 2) == 0 && !selection.keys.empty()) {
    const auto at = static_cast<std::size_t>(
        data.ConsumeIntegralInRange<Index>(0, static_cast<Index>(selection.keys.size()) - 1));
    switch (data.ConsumeIntegralInRange<int>(0, 4)) {
      case 0:
        selection.keys[at] = data.ConsumeBool() ? -1 : selection.len_k;
        break;
      case 1:
        selection.keys[at] = selection.keys[at > 0                           ? at - 1
                                            : at + 1 < selection.keys.size() ? at + 1
                                                                             : at];
        break;
      case 2:
        ++selection.kept;
        break;
      case 3:
        selection.keys.pop_back();
        break;
      default:
        selection.len_k = data.ConsumeBool() ? selection.len_k + 1 : -1;
    }
  }
  const Index kept = selection.kept;
  const Index dim = k.view.size(3), dim_v = v.view.size(3);
  auto out_k = draw_view<T, T, 4>(data, gathered_k, {views_batch, views_heads, kept, dim}, true);
  auto out_v = draw_view<T, T, 4>(data, gathered_v, {views_batch, views_heads, kept, dim_v}, true);
  gather_expect.add(out_k);
  gather_expect.add(out_v);
  if (gather_expect.unusable) return;
  const auto unchanged = [](const Arena<T>& arena, const std::vector<T>& bytes) {
    return std::memcmp(arena.buffers[0].data(), bytes.data(), bytes.size() * sizeof(T)) == 0;
  };
  const std::vector<T> before_k = gathered_k.buffers[0], before_v = gathered_v.buffers[0];
  const Answer answer = answer_of(gather_expect, kGather, [&] {
    foveal::snapkv_gather(selection, k.view, v.view, out_k.view, out_v.view);
  });
  const bool rules = !gather_expect.invalid &&
                     well_formed_snapkv(selection, views_batch, views_heads, views_len, 0, 0);
  if (answer == Answer::rejected &&
      (!unchanged(gathered_k, before_k) || !unchanged(gathered_v, before_v)))
    finding(kGather, "a rejected call wrote an output");
  if (answer == Answer::accepted && !rules) finding(kGather, "accepted a malformed selection");
  if (answer != Answer::accepted) return;
  // Row i of (b, h) is the prompt's row keys[(b * Hkv + h) * kept + i], bit for bit.
  const auto same_bits = [](T a, T b) { return std::memcmp(&a, &b, sizeof(T)) == 0; };
  for (Index b = 0; b < views_batch; ++b)
    for (Index h = 0; h < views_heads; ++h)
      for (Index i = 0; i < kept; ++i) {
        const Index key =
            selection.keys[static_cast<std::size_t>((b * views_heads + h) * kept + i)];
        for (Index d = 0; d < dim; ++d)
          if (!same_bits(out_k.view(b, h, i, d), k.view(b, h, key, d)))
            finding(kGather, "a gathered key row is not the selected prompt row");
        for (Index d = 0; d < dim_v; ++d)
          if (!same_bits(out_v.view(b, h, i, d), v.view(b, h, key, d)))
            finding(kGather, "a gathered value row is not the selected prompt row");
      }
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  valid_draws = !data.ConsumeBool();  // (an exhausted input draws zeros: valid ones)
  const bool quest = data.ConsumeBool();
  const bool snapkv = quest && data.ConsumeBool();
  const bool tokens = data.ConsumeBool();
  const bool lines = tokens && data.ConsumeBool();
  const auto run = [&](auto type) {
    using T = decltype(type);
    if (snapkv) {
      run_snapkv<T>(data);
    } else if (quest) {
      run_quest<T>(data);
    } else if (lines) {
      run_sparse<T, LinesMethod>(data);
    } else if (tokens) {
      run_sparse<T, TokenMethod>(data);
    } else {
      run_sparse<T, BlockMethod>(data);
    }
  };
  switch (data.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
      run(float{});
      break;
    case 1:
      run(double{});
      break;
    case 2:
      run(foveal::bfloat16{});
      break;
    default:
      run(foveal::float16{});
  }
  return 0;
}
