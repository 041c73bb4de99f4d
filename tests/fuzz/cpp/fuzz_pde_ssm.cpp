// libFuzzer harness: PDE-SSM parameters (values, group counts, views), modes, boundaries and
// diffusion forms, then forward and backward over drawn grids.
#include <optional>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

template <typename T>
void run(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  // Grid sizes: small, zero or negative. Huge positive ones allocate huge multipliers: the
  // known size-overflow / OOM findings (harden), not drawn.
  const Index height = draw_extent(data, 6), width = draw_extent(data, 6);
  const Index channels = draw_extent(data, 4), batch = draw_extent(data, 2);
  if (height > 64 || width > 64 || channels > 64) return;
  const Index groups = data.ConsumeBool() ? 1 : draw_extent(data, 4);
  Expect expect;
  auto diffusion = draw_view<const T, T, 2>(data, arena, {groups, 3});
  auto velocity = draw_view<const T, T, 2>(data, arena, {groups, 2});
  auto reaction = draw_view<const T, T, 1>(data, arena, {groups});
  auto time = draw_view<const T, T, 1>(data, arena, {groups});
  DrawnView<const T, 1> skip;
  if (data.ConsumeBool()) skip = draw_view<const T, T, 1>(data, arena, {groups});
  expect.add(diffusion), expect.add(velocity), expect.add(reaction), expect.add(time);
  expect.add(skip);
  if (expect.unusable) return;
  foveal::PdeSsmParameters<T> parameters{diffusion.view, velocity.view, reaction.view, time.view,
                                         skip.view};
  foveal::PdeSsmOptions options;
  options.mode = static_cast<foveal::PdeSsmMode>(data.ConsumeIntegralInRange<int>(0, 1));
  options.boundary = static_cast<foveal::PdeSsmBoundary>(data.ConsumeIntegralInRange<int>(0, 1));
  options.diffusion_form =
      static_cast<foveal::PdeSsmDiffusionForm>(data.ConsumeIntegralInRange<int>(0, 1));
  const int threads = draw_threads(data);
  std::optional<foveal::PdeSsm<T>> block;
  run_call(expect, "PdeSsm",
           [&] { block.emplace(height, width, channels, parameters, options, threads); });
  if (!block) return;
  Expect call;
  auto x = draw_view<const T, T, 4>(data, arena, {batch, height, width, channels});
  auto out = draw_view<T, T, 4>(data, arena, {batch, height, width, channels}, true);
  call.add(x), call.add(out);
  if (call.unusable) return;
  if (data.ConsumeBool()) {
    run_call(call, "PdeSsm::forward", [&] { block->forward(x.view, out.view, threads); });
    return;
  }
  // x is read (and validated) only when parameter gradients are asked for.
  Expect backward;
  backward.add(out);
  auto grad = draw_view<const T, T, 4>(data, arena, {batch, height, width, channels});
  backward.add(grad);
  foveal::PdeSsmGradients<T> gradients;
  if (data.ConsumeBool()) {
    auto g_diffusion = draw_view<T, T, 2>(data, arena, {groups, 3}, true);
    auto g_time = draw_view<T, T, 1>(data, arena, {groups}, true);
    backward.add(x), backward.add(g_diffusion), backward.add(g_time);
    gradients.diffusion = g_diffusion.view;
    gradients.time = g_time.view;
  }
  if (backward.unusable || x.validity == Validity::unusable) return;
  run_call(backward, "PdeSsm::backward",
           [&] { block->backward(x.view, grad.view, out.view, gradients, threads); });
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
