// src/kernels/level.cpp — one ISA level's kernels and their table, foveal_kernels_<namespace>.
// CMakeLists.txt compiles this file once per level (FOVEAL_LEVEL, FOVEAL_LEVEL_TARGET); all the
// code it defines lives in the level region of its headers (detail/isa.hpp).
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "kernels/attention.hpp"
#include "kernels/block_sparse.hpp"
#include "kernels/fft.hpp"
#include "kernels/pde_ssm.hpp"
#include "kernels/quest.hpp"
#include "kernels/spade.hpp"
#include "kernels/sparsek.hpp"
#include "kernels/sparsek_backward.hpp"
#include "kernels/token_topk.hpp"
#include "kernels/vertical_slash.hpp"
#include "kernels/vq.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

template <typename T>
constexpr Kernels<T> level_kernels() {
#define FOVEAL_KERNEL_ADDRESS(name, parameters) &name<T>,
  return {FOVEAL_KERNELS(FOVEAL_KERNEL_ADDRESS)};
#undef FOVEAL_KERNEL_ADDRESS
}

template <typename T>
constexpr HalfKernels<T> level_half_kernels() {
#define FOVEAL_KERNEL_ADDRESS(name, parameters) &name<T>,
  return {FOVEAL_HALF_KERNELS(FOVEAL_KERNEL_ADDRESS)};
#undef FOVEAL_KERNEL_ADDRESS
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail

extern const foveal::detail::KernelTable FOVEAL_CONCAT(foveal_kernels_, FOVEAL_LEVEL) = {
    foveal::detail::level_kernels<float>(),
    foveal::detail::level_kernels<double>(),
    foveal::detail::level_half_kernels<foveal::bfloat16>(),
    foveal::detail::level_half_kernels<foveal::float16>(),
    {&foveal::detail::decode_attention<float, foveal::q8_block>,
     &foveal::detail::quest_decode_attention<float, foveal::q8_block>,
     &foveal::detail::paged_attention<float, foveal::q8_block>}};
FOVEAL_LEVEL_POP
