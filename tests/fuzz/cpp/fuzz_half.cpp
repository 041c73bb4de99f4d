// libFuzzer harness: the 16-bit storage paths (bfloat16, float16). attention and
// sliding_window_attention over drawn views and options, decode_attention over a 16-bit
// KVCache, and batch_decode_attention / batch_prefill_attention over a 16-bit PagedKVCache,
// each cache driven by a drawn sequence of operations.
//
// The float harnesses' invariants (no crash; errors are foveal::Error; invalid views rejected; a
// rejected call changes no cache), and two more: a rejected call writes no output, and an
// accepted one equals the float call on the widened inputs (at any other thread count), out
// rounded to the storage type and lse the same, bit for bit. The caches run in lockstep with
// float caches that receive the widened appends; out and lse are drawn apart from the inputs,
// so that no output overlaps an input and the float call sees the inputs the 16-bit call saw.
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;
using foveal::TensorView;

// A view's elements as float: a contiguous copy of the same shape (all strides 0 when it is
// empty, whatever its extents); a null view stays null. Only for views the library accepted
// (made after the 16-bit call).
template <int Rank>
struct Widened {
  std::vector<float> data;
  TensorView<float, Rank> view;

  Widened() = default;
  template <typename S>
  explicit Widened(const TensorView<S, Rank>& source) {
    if (source.is_null()) return;
    const Index count = source.numel();
    data.resize(static_cast<std::size_t>(std::max<Index>(count, 1)));
    if (count == 0) {
      view = TensorView<float, Rank>(data.data(), source.shape(), {});
      return;
    }
    view = TensorView<float, Rank>(data.data(), source.shape());
    for (Index i = 0; i < count; ++i)
      data[static_cast<std::size_t>(i)] = foveal::to_float(element(source, i));
  }
  // A fresh output of `shape` (or null when `like` is).
  template <typename S>
  static Widened output(const TensorView<S, Rank>& like) {
    Widened result;
    if (like.is_null()) return result;
    const Index count = like.numel();
    result.data.assign(static_cast<std::size_t>(std::max<Index>(count, 1)), -1.0f);
    result.view = count == 0 ? TensorView<float, Rank>(result.data.data(), like.shape(), {})
                             : TensorView<float, Rank>(result.data.data(), like.shape());
    return result;
  }
  TensorView<const float, Rank> input() const { return view; }
};

bool is_nan(foveal::bfloat16 x) { return (x.bits & 0x7f80) == 0x7f80 && (x.bits & 0x7f) != 0; }
bool is_nan(foveal::float16 x) { return (x.bits & 0x7c00) == 0x7c00 && (x.bits & 0x3ff) != 0; }

// out of the 16-bit call == the float call's out rounded; lse bitwise the same (NaN: any NaN).
template <typename H>
void check_results(const char* what, const TensorView<H, 4>& out, const Widened<4>& single_out,
                   const TensorView<float, 3>& lse, const Widened<3>& single_lse) {
  for (Index i = 0, count = out.numel(); i < count; ++i) {
    const H got = element(out, i);
    const float want = element(single_out.view, i);
    if (std::isnan(want) ? !is_nan(got) : got.bits != foveal::to_storage<H>(want).bits) {
      std::fprintf(stderr, "out[%lld]: got %a (bits %#x), the float call gave %a\n",
                   static_cast<long long>(i), static_cast<double>(foveal::to_float(got)),
                   static_cast<unsigned>(got.bits), static_cast<double>(want));
      finding(what, "out differs from the float call's, rounded");
    }
  }
  if (lse.is_null()) return;
  for (Index i = 0, count = lse.numel(); i < count; ++i) {
    const float got = element(lse, i), want = element(single_lse.view, i);
    if (std::isnan(got) ? !std::isnan(want) : std::memcmp(&got, &want, sizeof(float)) != 0) {
      std::fprintf(stderr, "lse[%lld]: got %a, the float call gave %a\n", static_cast<long long>(i),
                   static_cast<double>(got), static_cast<double>(want));
      finding(what, "lse differs from the float call's");
    }
  }
}

// The float call on the widened inputs of a call the 16-bit call accepted must be accepted.
template <typename Call>
bool float_call(const char* what, Call&& call) {
  try {
    call();
  } catch (const foveal::Error& error) {
    std::fprintf(stderr, "%s\n", error.what());
    finding(what, "the float call rejected what the 16-bit call accepted");
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

// The bytes of the output buffers, to check that a rejected call wrote nothing.
template <typename H>
struct Snapshot {
  std::vector<std::vector<H>> out;
  std::vector<std::vector<float>> lse;
  Snapshot(const Arena<H>& outputs, const Arena<float>& lse_buffers)
      : out(outputs.buffers), lse(lse_buffers.buffers) {}
  void check_unchanged(const Arena<H>& outputs, const Arena<float>& lse_buffers,
                       const char* what) const {
    for (std::size_t b = 0; b < out.size(); ++b)
      if (std::memcmp(out[b].data(), outputs.buffers[b].data(), out[b].size() * sizeof(H)) != 0)
        finding(what, "a rejected call wrote out");
    for (std::size_t b = 0; b < lse.size(); ++b)
      if (std::memcmp(lse[b].data(), lse_buffers.buffers[b].data(),
                      lse[b].size() * sizeof(float)) != 0)
        finding(what, "a rejected call wrote lse");
  }
};

// The float call's options: the same but for another valid thread count.
foveal::AttentionOptions float_options(FuzzedDataProvider& data, foveal::AttentionOptions options) {
  options.num_threads = data.ConsumeIntegralInRange<int>(0, 3);
  return options;
}

// The buffers of one input: inputs, and apart from them out and lse.
template <typename H>
struct Buffers {
  Arena<H> inputs;
  Arena<H> outputs;
  Arena<float> lse;
  explicit Buffers(FuzzedDataProvider& data) : inputs(data, 2), outputs(data, 1), lse(data, 1) {}
};

// q [S, Hq, Lq, D] and the outputs out [S, Hq, Lq, Dv], lse [S, Hq, Lq] (maybe absent).
template <typename H>
struct QueryViews {
  DrawnView<const H, 4> q;
  DrawnView<H, 4> out;
  DrawnView<float, 3> lse;
};

template <typename H>
QueryViews<H> draw_queries(FuzzedDataProvider& data, Buffers<H>& buffers,
                           const std::array<Index, 4>& q_shape, Index dim_v, Expect& expect) {
  QueryViews<H> views;
  views.q = draw_view<const H, H, 4>(data, buffers.inputs, q_shape);
  views.out =
      draw_view<H, H, 4>(data, buffers.outputs, {q_shape[0], q_shape[1], q_shape[2], dim_v}, true);
  expect.add(views.q);
  expect.add(views.out);
  if (data.ConsumeBool()) {
    views.lse =
        draw_view<float, float, 3>(data, buffers.lse, {q_shape[0], q_shape[1], q_shape[2]}, true);
    expect.add(views.lse);
  }
  return views;
}

// Which calls check_against_float ran through: none (the 16-bit call was rejected), the
// 16-bit one only (the float one ran out of memory), both.
enum class Ran { none, half_only, both };

// Runs `half` (the 16-bit call into `views`): a rejected call must write no output. When it
// was accepted, runs `single(wide_q, out, lse, options)`, the float call on the widened q into
// fresh float outputs at another thread count, and compares.
template <typename H, typename HalfCall, typename FloatCall>
Ran check_against_float(FuzzedDataProvider& data, const Buffers<H>& buffers, const Expect& expect,
                        const char* what, const QueryViews<H>& views,
                        const foveal::AttentionOptions& options, HalfCall&& half,
                        FloatCall&& single) {
  const Snapshot<H> written(buffers.outputs, buffers.lse);
  const Answer answer = answer_of(expect, what, half);
  if (answer == Answer::rejected) written.check_unchanged(buffers.outputs, buffers.lse, what);
  if (answer != Answer::accepted) return Ran::none;
  const Widened<4> wide_q(views.q.view);
  Widened<4> single_out = Widened<4>::output(views.out.view);
  Widened<3> single_lse = Widened<3>::output(views.lse.view);
  const foveal::AttentionOptions wide_options = float_options(data, options);
  if (!float_call(what,
                  [&] { single(wide_q.input(), single_out.view, single_lse.view, wide_options); }))
    return Ran::half_only;
  check_results<H>(what, views.out.view, single_out, views.lse.view, single_lse);
  return Ran::both;
}

// An owned cache or pool of drawn sizes, or null: sizes above 16 are not drawn (huge ones are
// known findings, see fuzz_kv_cache.cpp) and a rejected construction gives the input up.
template <typename Cache, typename... Options>
std::unique_ptr<Cache> small_owned(std::initializer_list<Index> sizes, const Options&... options) {
  for (Index size : sizes)
    if (size > 16) return nullptr;
  const auto at = [&](std::size_t i) { return sizes.begin()[i]; };
  try {
    return std::make_unique<Cache>(at(0), at(1), at(2), at(3), at(4), options...);
  } catch (const foveal::Error&) {
    return nullptr;
  }
}

// ---------------------------------------------------------------------------------------------
// attention, sliding_window_attention.

template <typename H>
void run_dense(FuzzedDataProvider& data) {
  Buffers<H> buffers(data);
  const AttentionDims dims = draw_attention_dims(data);
  const auto [batch, heads_kv, group, len_q, len_k, dim, dim_v, heads_q] = dims;
  Expect expect;
  const QueryViews<H> views =
      draw_queries(data, buffers, {batch, heads_q, len_q, dim}, dim_v, expect);
  auto k = draw_view<const H, H, 4>(data, buffers.inputs, {batch, heads_kv, len_k, dim});
  auto v = draw_view<const H, H, 4>(data, buffers.inputs, {batch, heads_kv, len_k, dim_v});
  expect.add(k);
  expect.add(v);
  const bool sliding = data.ConsumeIntegralInRange<int>(0, 3) == 0;
  const DrawnView<const H, 4> bias = draw_bias(data, buffers.inputs, dims, sliding, expect);
  if (give_up(expect, dims)) return;
  foveal::AttentionOptions options = draw_attention_options(data, true);
  DrawnKeyRanges ranges;
  ranges.draw(data, batch, len_k);
  ranges.apply(options);
  check_against_float(
      data, buffers, expect, sliding ? "16-bit sliding_window_attention" : "16-bit attention",
      views, options,
      [&] {
        if (sliding)
          foveal::sliding_window_attention(views.q.view, k.view, v.view, views.out.view, options,
                                           views.lse.view);
        else
          foveal::attention(views.q.view, k.view, v.view, views.out.view, options, views.lse.view,
                            bias.view);
      },
      [&](auto q, auto out, auto lse, const foveal::AttentionOptions& single) {
        const Widened<4> wide_k(k.view), wide_v(v.view), wide_bias(bias.view);
        if (sliding)
          foveal::sliding_window_attention(q, wide_k.input(), wide_v.input(), out, single, lse);
        else
          foveal::attention(q, wide_k.input(), wide_v.input(), out, single, lse, wide_bias.input());
      });
}

// ---------------------------------------------------------------------------------------------
// decode_attention over a KVCache<H>, a float cache in lockstep.

template <typename H>
void run_kv_cache(FuzzedDataProvider& data) {
  Buffers<H> buffers(data);
  const Index batch = draw_extent(data, 2), heads_kv = draw_extent(data, 2);
  const Index capacity = draw_extent(data, 6), dim = draw_extent(data, 5);
  const Index dim_v = draw_extent(data, 5);
  foveal::KVCacheOptions cache_options;
  cache_options.ring = data.ConsumeBool();
  cache_options.sink_tokens = draw_index_option(data);
  const auto cache =
      small_owned<foveal::KVCache<H>>({batch, heads_kv, capacity, dim, dim_v}, cache_options);
  if (!cache) return;
  foveal::KVCache<float> single(batch, heads_kv, capacity, dim, dim_v, cache_options);
  const auto check_lockstep = [&](const char* what) {
    if (cache->lengths() != single.lengths()) finding(what, "the float cache's lengths differ");
  };
  for (int step = data.ConsumeIntegralInRange<int>(1, 8); step > 0; --step) {
    const std::vector<Index> before = cache->lengths();
    switch (data.ConsumeIntegralInRange<int>(0, 5)) {
      case 0:
      case 1: {  // append, maybe ragged
        const DrawnAppend<H> drawn = draw_append(data, buffers.inputs, batch, heads_kv, dim, dim_v);
        if (drawn.expect.unusable) break;
        const Answer answer = answer_of(drawn.expect, "16-bit KVCache::append", [&] {
          if (drawn.ragged)
            cache->append(drawn.k.view, drawn.v.view, drawn.counts);
          else
            cache->append(drawn.k.view, drawn.v.view);
        });
        if (answer != Answer::accepted) {
          if (cache->lengths() != before) finding("KVCache::append", "a rejected call changed it");
          break;
        }
        const Widened<4> wide_k(drawn.k.view), wide_v(drawn.v.view);
        float_call("16-bit KVCache::append", [&] {
          if (drawn.ragged)
            single.append(wide_k.input(), wide_v.input(), drawn.counts);
          else
            single.append(wide_k.input(), wide_v.input());
        });
        check_lockstep("KVCache::append");
        break;
      }
      case 2: {  // decode
        const Index group = draw_extent(data, 3), len_q = draw_extent(data, 3);
        Expect expect;
        const QueryViews<H> views = draw_queries(
            data, buffers, {batch, saturated_product(heads_kv, group), len_q, dim}, dim_v, expect);
        if (expect.unusable) break;
        const foveal::AttentionOptions options = draw_attention_options(data, false);
        check_against_float(
            data, buffers, expect, "16-bit decode_attention", views, options,
            [&] {
              foveal::decode_attention(views.q.view, *cache, options, views.out.view,
                                       views.lse.view);
            },
            [&](auto q, auto out, auto lse, const foveal::AttentionOptions& wide_options) {
              foveal::decode_attention(q, single, wide_options, out, lse);
            });
        if (cache->lengths() != before) finding("decode_attention", "decode changed the cache");
        break;
      }
      case 3: {  // truncate all or one sequence
        const Index length = draw_index_option(data);
        const bool all = data.ConsumeBool();
        const Index sequence = all ? 0 : draw_index_option(data);
        try {
          if (all)
            cache->truncate(length);
          else
            cache->truncate(sequence, length);
        } catch (const foveal::Error&) {
          if (cache->lengths() != before)
            finding("KVCache::truncate", "a rejected call changed it");
          break;
        }
        float_call("16-bit KVCache::truncate", [&] {
          if (all)
            single.truncate(length);
          else
            single.truncate(sequence, length);
        });
        check_lockstep("KVCache::truncate");
        break;
      }
      default:
        cache->reset();
        single.reset();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The paged batch calls over a PagedKVCache<H>, a float pool in lockstep.

template <typename H>
void run_paged(FuzzedDataProvider& data) {
  Buffers<H> buffers(data);
  const Index pages = draw_extent(data, 8), page_size = draw_extent(data, 4);
  const Index heads_kv = draw_extent(data, 2), dim = draw_extent(data, 5);
  const Index dim_v = draw_extent(data, 5);
  const auto pool = small_owned<foveal::PagedKVCache<H>>({pages, page_size, heads_kv, dim, dim_v});
  if (!pool) return;
  foveal::PagedKVCache<float> single(pages, page_size, heads_kv, dim, dim_v);
  std::vector<Index> ids = {pool->add_sequence(), pool->add_sequence()};
  single.add_sequence();
  single.add_sequence();
  // An id handed out (maybe removed since), now and then any number.
  const auto draw_id = [&] {
    return data.ConsumeIntegralInRange<int>(0, 9) == 0
               ? draw_index_option(data)
               : ids[data.ConsumeIntegralInRange<std::size_t>(0, ids.size() - 1)];
  };
  // A list of ids (repeats allowed).
  const auto draw_ids = [&] {
    std::vector<Index> list;
    for (int n = data.ConsumeIntegralInRange<int>(0, 3); n > 0; --n) list.push_back(draw_id());
    return list;
  };
  const auto check_lockstep = [&](const char* what) {
    if (pool_state(*pool) != pool_state(single)) finding(what, "the float pool differs");
  };
  for (int step = data.ConsumeIntegralInRange<int>(1, 8); step > 0; --step) {
    const auto before = pool_state(*pool);
    const auto check_unchanged = [&](const char* what) {
      if (pool_state(*pool) != before) finding(what, "a rejected call changed the pool");
    };
    const int op = data.ConsumeIntegralInRange<int>(0, 6);
    if (op <= 3) {  // append, prefill (appends and attends), batch decode
      const std::vector<Index> sequences = draw_ids();
      const auto count = static_cast<Index>(sequences.size());
      const Index n = draw_extent(data, 4), group = draw_extent(data, 3);
      const Index heads_q = saturated_product(heads_kv, group);
      Expect expect;
      DrawnView<const H, 4> k, v;
      std::vector<Index> counts;
      if (op <= 2) {
        k = draw_view<const H, H, 4>(data, buffers.inputs, {count, heads_kv, n, dim});
        v = draw_view<const H, H, 4>(data, buffers.inputs, {count, heads_kv, n, dim_v});
        expect.add(k);
        expect.add(v);
        counts = draw_append_counts(data, count);
      }
      if (op == 0) {
        if (expect.unusable) continue;
        const Answer answer = answer_of(expect, "16-bit PagedKVCache::append",
                                        [&] { pool->append(sequences, k.view, v.view, counts); });
        if (answer != Answer::accepted) {
          check_unchanged("PagedKVCache::append");
          continue;
        }
        const Widened<4> wide_k(k.view), wide_v(v.view);
        float_call("16-bit PagedKVCache::append",
                   [&] { single.append(sequences, wide_k.input(), wide_v.input(), counts); });
        check_lockstep("PagedKVCache::append");
        continue;
      }
      // Prefill: q [S, Hq, n, D]; decode: q [S, Hq, Lq, D], Lq = n.
      const QueryViews<H> views =
          draw_queries(data, buffers, {count, heads_q, n, dim}, dim_v, expect);
      if (expect.unusable) continue;
      const foveal::AttentionOptions options = draw_attention_options(data, false);
      const auto sharing =
          data.ConsumeBool() ? foveal::PrefixSharing::detect : foveal::PrefixSharing::off;
      if (op <= 2) {
        const char* what = "16-bit batch_prefill_attention";
        const Ran ran = check_against_float(
            data, buffers, expect, what, views, options,
            [&] {
              foveal::batch_prefill_attention(views.q.view, k.view, v.view, *pool, sequences,
                                              counts, options, views.out.view, views.lse.view,
                                              sharing);
            },
            [&](auto q, auto out, auto lse, const foveal::AttentionOptions& wide_options) {
              const Widened<4> wide_k(k.view), wide_v(v.view);
              foveal::batch_prefill_attention(q, wide_k.input(), wide_v.input(), single, sequences,
                                              counts, wide_options, out, lse, sharing);
            });
        if (ran == Ran::none) {
          check_unchanged(what);
          continue;
        }
        if (ran == Ran::half_only) return;  // the pools are no longer in lockstep
        check_lockstep(what);
        continue;
      }
      const char* what = "16-bit batch_decode_attention";
      check_against_float(
          data, buffers, expect, what, views, options,
          [&] {
            foveal::batch_decode_attention(views.q.view, *pool, sequences, options, views.out.view,
                                           views.lse.view, sharing);
          },
          [&](auto q, auto out, auto lse, const foveal::AttentionOptions& wide_options) {
            foveal::batch_decode_attention(q, single, sequences, wide_options, out, lse, sharing);
          });
      check_unchanged(what);  // a read, accepted or not
    } else if (op == 4) {     // fork or a new sequence
      const bool fork = data.ConsumeBool();
      const Index parent = draw_id();
      Index id = -1;
      const Answer answer = answer_of(Expect{}, "16-bit PagedKVCache::fork", [&] {
        id = fork ? pool->fork(parent) : pool->add_sequence();
      });
      if (answer != Answer::accepted) {  // an unknown parent, or no free page
        check_unchanged("PagedKVCache::fork");
        continue;
      }
      float_call("16-bit PagedKVCache::fork",
                 [&] { (void)(fork ? single.fork(parent) : single.add_sequence()); });
      ids.push_back(id);
      check_lockstep("PagedKVCache::fork");
    } else {  // truncate, remove, or release (later calls that see released keys must throw)
      const int cut = data.ConsumeIntegralInRange<int>(0, 2);
      const Index sequence = draw_id();
      const Index length = draw_index_option(data);
      const Index end = draw_index_option(data);  // release's; `length` is its begin
      const char* what = cut == 0   ? "PagedKVCache::remove"
                         : cut == 1 ? "PagedKVCache::truncate"
                                    : "PagedKVCache::release";
      // The same operation on either pool.
      const auto apply = [&](auto& cache) {
        if (cut == 0)
          cache.remove(sequence);
        else if (cut == 1)
          cache.truncate(sequence, length);
        else
          (void)cache.release(sequence, length, end);
      };
      const Answer answer = answer_of(Expect{}, what, [&] { apply(*pool); });
      if (answer != Answer::accepted) {
        check_unchanged(what);
        continue;
      }
      float_call(what, [&] { apply(single); });
      check_lockstep(what);
    }
  }
}

template <typename H>
void run(FuzzedDataProvider& data) {
  switch (data.ConsumeIntegralInRange<int>(0, 3)) {
    case 0:
    case 1:
      run_dense<H>(data);
      break;
    case 2:
      run_kv_cache<H>(data);
      break;
    default:
      run_paged<H>(data);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  if (data.ConsumeBool())
    run<foveal::bfloat16>(data);
  else
    run<foveal::float16>(data);
  return 0;
}
