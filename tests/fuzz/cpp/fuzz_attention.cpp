// libFuzzer harness: dense and sliding-window attention, forward and backward, over drawn views
// and options.
#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

template <typename T>
void run(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  const Index batch = draw_extent(data, 2), heads_kv = draw_extent(data, 2);
  const Index group = draw_extent(data, 3), len_q = draw_extent(data, 6);
  const Index len_k = draw_extent(data, 8), dim = draw_extent(data, 8);
  const Index dim_v = draw_extent(data, 8);
  const Index heads_q = saturated_product(heads_kv, group);
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
  DrawnView<const T, 4> bias;
  const bool sliding = data.ConsumeIntegralInRange<int>(0, 3) == 0;
  if (!sliding && data.ConsumeBool()) {
    bias = draw_view<const T, T, 4>(
        data, arena,
        {data.ConsumeBool() ? batch : 1, data.ConsumeBool() ? heads_q : 1, len_q, len_k});
    expect.add(bias);
  }
  if (expect.unusable) return;
  if (!expect.invalid && too_costly(batch, heads_q, len_q, len_k, double(dim) + double(dim_v) + 1))
    return;

  foveal::AttentionOptions options;
  options.scale = data.ConsumeBool() ? 0.0 : draw_option(data);
  options.causal = data.ConsumeBool();
  options.window_left = draw_index_option(data);
  options.window_right = draw_index_option(data);
  options.sink_tokens = draw_index_option(data);
  options.softcap = data.ConsumeBool() ? 0.0 : draw_option(data);
  options.q_offset = data.ConsumeBool() ? -1 : draw_index_option(data);
  options.num_threads = draw_threads(data);
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
