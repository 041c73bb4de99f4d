// libFuzzer harness: SparseK options and views through sparsek_attention, sparsek_select,
// the SPARSEK projection, its prefix thresholds, and a SparseKCache fed token by token.
#include <memory>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

foveal::SparseKOptions draw_options(FuzzedDataProvider& data) {
  foveal::SparseKOptions options;
  options.topk = draw_index_option(data);
  options.window = draw_index_option(data);
  options.sink_tokens = draw_index_option(data);
  options.gate = static_cast<foveal::SparseKGate>(data.ConsumeIntegralInRange<int>(0, 2));
  options.causal = data.ConsumeIntegralInRange<int>(0, 3) != 0;
  options.scale = data.ConsumeBool() ? 0.0 : draw_option(data);
  options.softcap = data.ConsumeBool() ? 0.0 : draw_option(data);
  options.q_offset = data.ConsumeBool() ? -1 : draw_index_option(data);
  options.num_threads = draw_threads(data);
  return options;
}

template <typename T>
void run(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  Arena<std::int64_t> index_arena(data, 1);
  const Index batch = draw_extent(data, 2), heads_kv = draw_extent(data, 2);
  const Index group = draw_extent(data, 2), len_q = draw_extent(data, 6);
  const Index len_k = draw_extent(data, 8), dim = draw_extent(data, 6);
  const Index dim_v = draw_extent(data, 6);
  const Index heads_q = saturated_product(heads_kv, group);
  const foveal::SparseKOptions options = draw_options(data);
  // topk as an extent of the selection outputs: small when the option is.
  const Index top = options.topk >= 0 && options.topk <= 8 ? options.topk : 3;
  Expect expect;
  switch (data.ConsumeIntegralInRange<int>(0, 4)) {
    case 0: {
      auto q = draw_view<const T, T, 4>(data, arena, {batch, heads_q, len_q, dim});
      auto k = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, len_k, dim});
      auto v = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, len_k, dim_v});
      auto u = draw_view<const T, T, 3>(data, arena, {batch, heads_kv, len_k});
      auto out = draw_view<T, T, 4>(data, arena, {batch, heads_q, len_q, dim_v}, true);
      DrawnView<T, 3> lse;
      if (data.ConsumeBool()) lse = draw_view<T, T, 3>(data, arena, {batch, heads_q, len_q}, true);
      expect.add(q), expect.add(k), expect.add(v), expect.add(u), expect.add(out), expect.add(lse);
      if (expect.unusable) return;
      if (!expect.invalid &&
          too_costly(batch, heads_q, len_q, len_k, double(dim) + double(dim_v) + 8))
        return;
      run_call(expect, "sparsek_attention", [&] {
        foveal::sparsek_attention(q.view, k.view, v.view, u.view, options, out.view, lse.view);
      });
      break;
    }
    case 1: {
      auto u = draw_view<const T, T, 3>(data, arena, {batch, heads_kv, len_k});
      auto indices = draw_view<std::int64_t, std::int64_t, 4>(data, index_arena,
                                                              {batch, heads_kv, len_q, top}, true);
      auto gates = draw_view<T, T, 4>(data, arena, {batch, heads_kv, len_q, top}, true);
      expect.add(u), expect.add(indices), expect.add(gates);
      if (expect.unusable) return;
      run_call(expect, "sparsek_select",
               [&] { foveal::sparsek_select(u.view, len_q, options, indices.view, gates.view); });
      break;
    }
    case 2: {
      auto z = draw_view<const T, T, 2>(data, arena, {len_q, len_k});
      auto p = draw_view<T, T, 2>(data, arena, {len_q, len_k}, true);
      DrawnView<T, 1> tau;
      if (data.ConsumeBool()) tau = draw_view<T, T, 1>(data, arena, {len_q}, true);
      expect.add(z), expect.add(p), expect.add(tau);
      if (expect.unusable) return;
      run_call(expect, "sparsek", [&] {
        foveal::sparsek(z.view, options.topk, p.view, tau.view, options.num_threads);
      });
      break;
    }
    case 3: {
      auto z = draw_view<const T, T, 2>(data, arena, {len_q, len_k});
      auto tau = draw_view<T, T, 2>(data, arena, {len_q, len_k}, true);
      DrawnView<std::int64_t, 2> evicted;
      if (data.ConsumeBool())
        evicted = draw_view<std::int64_t, std::int64_t, 2>(data, index_arena, {len_q, len_k}, true);
      expect.add(z), expect.add(tau), expect.add(evicted);
      if (expect.unusable) return;
      run_call(expect, "sparsek_prefix_thresholds", [&] {
        foveal::sparsek_prefix_thresholds(z.view, options.topk, tau.view, evicted.view,
                                          options.num_threads);
      });
      break;
    }
    default: {
      // A SparseKCache (capacity sinks + window + topk rows: only small options are drawn,
      // huge ones are the known OOM finding) fed and queried in turns.
      if (options.topk > 64 || options.window > 64 || options.sink_tokens > 64) return;
      if (batch > 4 || heads_kv > 4 || dim > 16 || dim_v > 16) return;
      std::unique_ptr<foveal::SparseKCache<T>> cache;
      try {
        cache = std::make_unique<foveal::SparseKCache<T>>(batch, heads_kv, dim, dim_v, options);
      } catch (const foveal::Error&) {
        return;
      }
      for (int step = data.ConsumeIntegralInRange<int>(1, 8); step > 0; --step) {
        Expect call;
        if (data.ConsumeIntegralInRange<int>(0, 2) != 0) {
          const Index n = draw_extent(data, 3);
          auto k = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, n, dim});
          auto v = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, n, dim_v});
          auto u = draw_view<const T, T, 3>(data, arena, {batch, heads_kv, n});
          call.add(k), call.add(v), call.add(u);
          if (call.unusable) continue;
          const Index length = cache->length();
          bool rejected = false;
          run_call(call, "SparseKCache::append", [&] {
            try {
              cache->append(k.view, v.view, u.view);
            } catch (const foveal::Error&) {
              rejected = true;
              throw;
            }
          });
          if (rejected && cache->length() != length) {
            std::fprintf(stderr, "foveal fuzz: a rejected SparseKCache::append changed it\n");
            std::abort();
          }
        } else {
          auto q = draw_view<const T, T, 4>(data, arena, {batch, heads_q, 1, dim});
          auto out = draw_view<T, T, 4>(data, arena, {batch, heads_q, 1, dim_v}, true);
          call.add(q), call.add(out);
          if (call.unusable) continue;
          run_call(call, "SparseKCache::attend", [&] { cache->attend(q.view, out.view); });
          try {
            (void)cache->selected(draw_index_option(data), draw_index_option(data));
            (void)cache->threshold(draw_index_option(data), draw_index_option(data));
          } catch (const foveal::Error&) {
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  if (data.ConsumeBool())
    run<float>(data);
  else
    run<double>(data);
  return 0;
}
