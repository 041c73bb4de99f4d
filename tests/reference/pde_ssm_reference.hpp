// tests/reference/pde_ssm_reference.hpp — the executable spec of the PDE-SSM block
// (docs/pde_ssm.md), float64, without any FFT.
//
// Per channel, the half-spectrum multiplier m(k) (k_y = 2π f_y / Ht with f_y signed, k_x =
// 2π f_x / Wt, f_x = 0..Wt/2) is completed to the full Ht × Wt grid the way irfft2 reads a
// half spectrum: bins past Wt/2 are conj(m(−k)), and the self-conjugate columns f_x = 0 and
// (even Wt) f_x = Wt/2 keep their Hermitian part (m(k) + conj(m(−k))) / 2. Its inverse DFT,
// computed by a direct sum, is a real kernel κ on the Ht × Wt torus, and the block's output is
// the direct circular convolution of κ with the input (zero boundary: the input embedded
// top-left in a 2H × 2W torus, the output cropped), plus D ⊙ u. O(N²) per channel.
#pragma once

#include <cmath>
#include <complex>
#include <cstdint>
#include <vector>

#include "foveal/ssm/pde_ssm.hpp"

namespace foveal::reference {

// One channel's PDE with K formed: λ(k) = −kᵀKk + r − i b·k.
struct PdeChannel {
  double k_yy = 0, k_xy = 0, k_xx = 0, b_y = 0, b_x = 0, reaction = 0, time = 1, skip = 0;
};

// m(k): e^{τλ} (initial value) or τ (e^{τλ} − 1) / (τλ) (forced; its Taylor series near 0).
inline std::complex<double> pde_multiplier(const PdeChannel& c, PdeSsmMode mode, double k_y,
                                           double k_x) {
  const std::complex<double> lambda(
      -(c.k_yy * k_y * k_y + 2 * c.k_xy * k_y * k_x + c.k_xx * k_x * k_x) + c.reaction,
      -(c.b_y * k_y + c.b_x * k_x));
  const std::complex<double> z = c.time * lambda;
  if (mode == PdeSsmMode::initial_value) return std::exp(z);
  if (std::abs(z) < 1e-4) return c.time * (1.0 + z / 2.0 + z * z / 6.0 + z * z * z / 24.0);
  return c.time * (std::exp(z) - 1.0) / z;
}

// κ(y, x) on the Ht × Wt torus, row-major [Ht, Wt].
inline std::vector<double> pde_kernel(const PdeChannel& c, PdeSsmMode mode, std::int64_t rows,
                                      std::int64_t columns) {
  const double two_pi = 6.283185307179586476925286766559;
  const auto signed_frequency = [](std::int64_t f, std::int64_t n) {
    return f <= n / 2 ? f : f - n;
  };
  const auto half = [&](std::int64_t f_y, std::int64_t f_x) {  // f_x in [0, columns / 2]
    const double k_y = two_pi * static_cast<double>(signed_frequency(f_y, rows)) / rows;
    const double k_x = two_pi * static_cast<double>(f_x) / columns;
    return pde_multiplier(c, mode, k_y, k_x);
  };
  std::vector<std::complex<double>> full(static_cast<std::size_t>(rows * columns));
  for (std::int64_t f_y = 0; f_y < rows; ++f_y) {
    const std::int64_t mirror_y = (rows - f_y) % rows;
    for (std::int64_t f_x = 0; f_x < columns; ++f_x) {
      std::complex<double> value;
      if (f_x == 0 || 2 * f_x == columns) {
        value = 0.5 * (half(f_y, f_x) + std::conj(half(mirror_y, f_x)));
      } else if (f_x <= columns / 2) {
        value = half(f_y, f_x);
      } else {
        value = std::conj(half(mirror_y, columns - f_x));
      }
      full[static_cast<std::size_t>(f_y * columns + f_x)] = value;
    }
  }
  std::vector<double> kernel(static_cast<std::size_t>(rows * columns));
  const double count = static_cast<double>(rows * columns);
  for (std::int64_t y = 0; y < rows; ++y)
    for (std::int64_t x = 0; x < columns; ++x) {
      std::complex<double> sum = 0;
      for (std::int64_t f_y = 0; f_y < rows; ++f_y)
        for (std::int64_t f_x = 0; f_x < columns; ++f_x) {
          const double angle = two_pi * (static_cast<double>(f_y * y % rows) / rows +
                                         static_cast<double>(f_x * x % columns) / columns);
          sum += full[static_cast<std::size_t>(f_y * columns + f_x)] *
                 std::complex<double>(std::cos(angle), std::sin(angle));
        }
      kernel[static_cast<std::size_t>(y * columns + x)] = sum.real() / count;
    }
  return kernel;
}

// x: [B, H, W, C] row-major, one PdeChannel per channel  ->  out: [B, H, W, C] (adjoint:
// grad_x from grad_out, the correlation with κ instead of the convolution).
inline std::vector<double> pde_ssm_reference(const std::vector<double>& x, std::int64_t batch,
                                             std::int64_t height, std::int64_t width,
                                             const std::vector<PdeChannel>& channels,
                                             PdeSsmMode mode, PdeSsmBoundary boundary,
                                             bool adjoint = false) {
  const std::int64_t count = static_cast<std::int64_t>(channels.size());
  const std::int64_t rows = boundary == PdeSsmBoundary::zero ? 2 * height : height;
  const std::int64_t columns = boundary == PdeSsmBoundary::zero ? 2 * width : width;
  const auto at = [&](std::int64_t b, std::int64_t y, std::int64_t x_, std::int64_t c) {
    return static_cast<std::size_t>(((b * height + y) * width + x_) * count + c);
  };
  std::vector<double> out(x.size(), 0.0);
  for (std::int64_t c = 0; c < count; ++c) {
    const PdeChannel& pde = channels[static_cast<std::size_t>(c)];
    const std::vector<double> kernel = pde_kernel(pde, mode, rows, columns);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t y = 0; y < height; ++y)
        for (std::int64_t x_ = 0; x_ < width; ++x_) {
          double sum = pde.skip * x[at(b, y, x_, c)];
          for (std::int64_t y_in = 0; y_in < height; ++y_in)
            for (std::int64_t x_in = 0; x_in < width; ++x_in) {
              const std::int64_t dy = adjoint ? y_in - y : y - y_in;
              const std::int64_t dx = adjoint ? x_in - x_ : x_ - x_in;
              sum += kernel[static_cast<std::size_t>(((dy + rows) % rows) * columns +
                                                     (dx + columns) % columns)] *
                     x[at(b, y_in, x_in, c)];
            }
          out[at(b, y, x_, c)] = sum;
        }
  }
  return out;
}

}  // namespace foveal::reference
