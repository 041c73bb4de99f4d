// foveal/ssm/pde_ssm.hpp — the PDE-SSM 2-D Fourier mixing block (docs/pde_ssm.md).
//
// Every channel of an H × W token grid evolves by its own convection–diffusion–reaction PDE
// ∂u/∂t = ∇·(K∇u) − b·∇u + r u, solved exactly in the Fourier domain: one real 2-D FFT, a
// multiplication by the symbol's solution operator m(k), one inverse FFT; O(N log N) for N
// tokens. The multiplier depends only on the parameters and the grid, so the PdeSsm class
// computes it once (with the FFT plan) and applies it to any number of batches.
//
// Layout: the input is one logical [B, H, W, C] view with any strides. Channels-last memory is
// that view as it is; [B, C, H, W] memory is passed through channels_first_as_last (a stride
// permutation, no copy), as attention takes [B, L, H, D] memory by swapping strides.
#pragma once

#include <memory>
#include <string_view>
#include <utility>

#include "foveal/core/tensor.hpp"

namespace foveal {

// initial_value: y = F⁻¹[exp(τλ) F u] (u is the state at t = 0, y the state at t = τ).
// forced: y = F⁻¹[τ φ(τλ) F u], φ(z) = (e^z − 1)/z (h' = L h + u held over [0, τ], h(0) = 0).
enum class PdeSsmMode { initial_value, forced };
// periodic: FFT on H × W. zero: FFT on 2H × 2W with the input embedded top-left, crop to
// H × W (a linear convolution: opposite edges do not talk to each other).
enum class PdeSsmBoundary { periodic, zero };
// How PdeSsmParameters::diffusion is read, per group: cholesky (l_yy, l_xy, l_xx), the lower
// triangular factor L = [[l_yy, 0], [l_xy, l_xx]] of K = L Lᵀ (PSD for any values: what
// training should use); raw (K_yy, K_xy, K_xx), validated positive semi-definite.
enum class PdeSsmDiffusionForm { cholesky, raw };

// "initial_value" | "forced"; anything else throws foveal::Error listing the names.
PdeSsmMode pde_ssm_mode_from_string(std::string_view name);
// "periodic" | "zero"; anything else throws foveal::Error listing the names.
PdeSsmBoundary pde_ssm_boundary_from_string(std::string_view name);
// "cholesky" | "raw"; anything else throws foveal::Error listing the names.
PdeSsmDiffusionForm pde_ssm_diffusion_form_from_string(std::string_view name);

struct PdeSsmOptions {
  PdeSsmMode mode = PdeSsmMode::initial_value;
  PdeSsmBoundary boundary = PdeSsmBoundary::periodic;
  PdeSsmDiffusionForm diffusion_form = PdeSsmDiffusionForm::cholesky;
};

// The learnable parameters. Each tensor has its own group count G (its first extent), which
// must divide C: channel c uses entry c / (C / G). G = C is per channel, G = 1 shared by all.
template <typename T>
struct PdeSsmParameters {
  TensorView<const T, 2> diffusion;  // [G, 3]: see PdeSsmDiffusionForm
  TensorView<const T, 2> velocity;   // [G, 2]: (b_y, b_x), grid cells per unit time
  TensorView<const T, 1> reaction;   // [G]: r
  TensorView<const T, 1> time;       // [G]: τ > 0
  TensorView<const T, 1> skip;       // [G]: D in y += D ⊙ u, or null (no skip)
};

// Where pde_ssm_backward writes the parameter gradients: each view has its parameter's shape,
// or is null when that gradient is not wanted (skip must be null when there is no skip).
template <typename T>
struct PdeSsmGradients {
  TensorView<T, 2> diffusion;  // [G, 3], with respect to the parameterization's three values
  TensorView<T, 2> velocity;   // [G, 2]
  TensorView<T, 1> reaction;   // [G]
  TensorView<T, 1> time;       // [G]
  TensorView<T, 1> skip;       // [G]
};

// bchw: [B, C, H, W] memory  ->  the same memory as a [B, H, W, C] view (strides permuted).
template <typename T>
TensorView<T, 4> channels_first_as_last(const TensorView<T, 4>& bchw) {
  return bchw.transpose(1, 2).transpose(2, 3);
}

// The block for one grid and one set of parameters, with its multiplier and FFT plan cached.
// Copies are cheap and share the cache; forward and backward are const and thread-safe.
template <typename T>
class PdeSsm {
 public:
  // Validates the parameters (finite; τ > 0; raw K positive semi-definite; every group count
  // dividing `channels`) and computes the multiplier of every channel on the transform grid
  // (H × W periodic, 2H × 2W zero). height, width, channels >= 1.
  PdeSsm(Index height, Index width, Index channels, const PdeSsmParameters<T>& parameters,
         const PdeSsmOptions& options = {}, int num_threads = 0);

  // x: [B, H, W, C]  ->  out: [B, H, W, C] (any strides, out not overlapping x)
  // out = F⁻¹[m F x] + D ⊙ x per channel. Results are bitwise identical for any thread count.
  void forward(TensorView<const T, 4> x, TensorView<T, 4> out, int num_threads = 0) const;

  // x, grad_out: [B, H, W, C]  ->  grad_x: [B, H, W, C] (null: not wanted) and the parameter
  // gradients (docs/pde_ssm.md): grad_x = F⁻¹[conj(m) F grad_out] + D ⊙ grad_out, and
  // ∂L/∂θ = Σ_k Re(conj(ĝ_k) ∂m_k/∂θ û_k) (with the half-spectrum weights and normalization
  // that docs/pde_ssm.md gives) summed over channels of a group and the batch in a fixed order.
  // Bitwise identical for any thread count.
  void backward(TensorView<const T, 4> x, TensorView<const T, 4> grad_out, TensorView<T, 4> grad_x,
                const PdeSsmGradients<T>& gradients, int num_threads = 0) const;

  Index height() const;
  Index width() const;
  Index channels() const;
  const PdeSsmOptions& options() const;
  // The transform grid: H × W (periodic) or 2H × 2W (zero).
  Index transform_height() const;
  Index transform_width() const;

  struct State;  // the cached multiplier, plan and per-channel coefficients (src/pde_ssm.cpp)
  // A block over a state built elsewhere (only the library can build one: the free functions).
  explicit PdeSsm(std::shared_ptr<const State> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<const State> state_;
};

extern template class PdeSsm<float>;
extern template class PdeSsm<double>;

// x: [B, H, W, C]  ->  out: [B, H, W, C]: PdeSsm(H, W, C, parameters, options).forward(x, out)
// (the multiplier is computed for this call; keep a PdeSsm to reuse it).
void pde_ssm(TensorView<const float, 4> x, const PdeSsmParameters<float>& parameters,
             TensorView<float, 4> out, const PdeSsmOptions& options = {}, int num_threads = 0);
void pde_ssm(TensorView<const double, 4> x, const PdeSsmParameters<double>& parameters,
             TensorView<double, 4> out, const PdeSsmOptions& options = {}, int num_threads = 0);

// x, grad_out: [B, H, W, C]  ->  grad_x: [B, H, W, C] and the parameter gradients:
// PdeSsm(H, W, C, parameters, options).backward(x, grad_out, grad_x, gradients).
void pde_ssm_backward(TensorView<const float, 4> x, TensorView<const float, 4> grad_out,
                      const PdeSsmParameters<float>& parameters, TensorView<float, 4> grad_x,
                      const PdeSsmGradients<float>& gradients, const PdeSsmOptions& options = {},
                      int num_threads = 0);
void pde_ssm_backward(TensorView<const double, 4> x, TensorView<const double, 4> grad_out,
                      const PdeSsmParameters<double>& parameters, TensorView<double, 4> grad_x,
                      const PdeSsmGradients<double>& gradients, const PdeSsmOptions& options = {},
                      int num_threads = 0);

}  // namespace foveal
