// libFuzzer harness: dense and sliding-window attention, forward and backward, over drawn views
// and options (key ranges of variable-length batches included).
#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

template <typename T>
void run(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  const AttentionDims dims = draw_attention_dims(data);
  const auto [batch, heads_kv, group, len_q, len_k, dim, dim_v, heads_q] = dims;
  Expect expect;
  auto q = draw_view<const T, T, 4>(data, arena, {batch, heads_q, len_q, dim});
  auto k = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, len_k, dim});
  auto v = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, len_k, dim_v});
  auto out = draw_view<T, T, 4>(data, arena, {batch, heads_q, len_q, dim_v}, true);
  for (const auto* view : {&q, &k, &v}) expect.add(*view);
  expect.add(out);
  DrawnView<T, 3> lse;
  if (data.ConsumeBool()) {
    lse = draw_view<T, T, 3>(data, arena, {batch, heads_q, len_q}, true);
    expect.add(lse);
  }
  const bool sliding = data.ConsumeIntegralInRange<int>(0, 3) == 0;
  const DrawnView<const T, 4> bias = draw_bias(data, arena, dims, sliding, expect);
  if (give_up(expect, dims)) return;

  foveal::AttentionOptions options = draw_attention_options(data, true);
  DrawnKeyRanges ranges;
  ranges.draw(data, batch, len_k);
  ranges.apply(options);
  if (data.ConsumeIntegralInRange<int>(0, 2) == 0) {
    // The backward: out and lse become inputs (the forward's), grad_out and the gradients are
    // drawn like the rest.
    auto grad_out = draw_view<const T, T, 4>(data, arena, {batch, heads_q, len_q, dim_v});
    auto grad_q = draw_view<T, T, 4>(data, arena, {batch, heads_q, len_q, dim}, true);
    auto grad_k = draw_view<T, T, 4>(data, arena, {batch, heads_kv, len_k, dim}, true);
    auto grad_v = draw_view<T, T, 4>(data, arena, {batch, heads_kv, len_k, dim_v}, true);
    for (const auto* view : {&grad_q, &grad_k, &grad_v}) expect.add(*view);
    expect.add(grad_out);
    if (expect.unusable) return;
    const foveal::TensorView<const T, 4> out_read = out.view;
    const foveal::TensorView<const T, 3> lse_read = lse.view;
    if (sliding) {
      run_call(expect, "sliding_window_attention_backward", [&] {
        foveal::sliding_window_attention_backward(q.view, k.view, v.view, out_read, lse_read,
                                                  grad_out.view, grad_q.view, grad_k.view,
                                                  grad_v.view, options);
      });
    } else {
      run_call(expect, "attention_backward", [&] {
        foveal::attention_backward(q.view, k.view, v.view, out_read, lse_read, grad_out.view,
                                   grad_q.view, grad_k.view, grad_v.view, options, bias.view);
      });
    }
    return;
  }
  if (sliding) {
    run_call(expect, "sliding_window_attention", [&] {
      foveal::sliding_window_attention(q.view, k.view, v.view, out.view, options, lse.view);
    });
  } else {
    run_call(expect, "attention", [&] {
      foveal::attention(q.view, k.view, v.view, out.view, options, lse.view, bias.view);
    });
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
