// tests/reference/fft_reference.hpp — the executable spec of the real 2-D FFT (detail/fft.hpp).
//
// Plain float64 O(N²) DFT sums, one dimension at a time, one channel at a time, no tricks:
//   rfft2:  X[ky, kx] = Σ_{y < h_in, x < w_in} x[y, x] e^{-2πi (ky y / H + kx x / W)},
//           kx in [0, W/2]  (the input is zero outside [h_in, w_in]);
//   irfft2: numpy's irfft2 with s = (H, W): an inverse complex DFT along y for every kept kx,
//           then along x the real inverse of the Hermitian half spectrum, which reads only the
//           real parts of the kx = 0 and (even W) kx = W/2 bins; scaled by 1 / (H W).
#pragma once

#include <cmath>
#include <complex>
#include <cstdint>
#include <vector>

namespace foveal::reference {

// roots[j] = e^{sign 2πi j / n} for j < n: the DFT's factors, indexed by (k j) mod n.
inline std::vector<std::complex<double>> roots_reference(std::int64_t n, int sign) {
  const double kPi = 3.14159265358979323846;
  std::vector<std::complex<double>> roots(n);
  for (std::int64_t j = 0; j < n; ++j) {
    const double angle = sign * 2.0 * kPi * static_cast<double>(j) / static_cast<double>(n);
    roots[j] = {std::cos(angle), std::sin(angle)};
  }
  return roots;
}

// x: [h_in, w_in] row-major  ->  [H, W/2 + 1] row-major.
inline std::vector<std::complex<double>> rfft2_reference(const std::vector<double>& x,
                                                         std::int64_t h_in, std::int64_t w_in,
                                                         std::int64_t height, std::int64_t width) {
  const std::int64_t spectrum_width = width / 2 + 1;
  const std::vector<std::complex<double>> roots_x = roots_reference(width, -1);
  const std::vector<std::complex<double>> roots_y = roots_reference(height, -1);
  // Along x: rows[y][kx].
  std::vector<std::complex<double>> rows(h_in * spectrum_width);
  for (std::int64_t y = 0; y < h_in; ++y)
    for (std::int64_t kx = 0; kx < spectrum_width; ++kx) {
      std::complex<double> sum = 0;
      for (std::int64_t col = 0; col < w_in; ++col)
        sum += x[y * w_in + col] * roots_x[(kx * col) % width];
      rows[y * spectrum_width + kx] = sum;
    }
  // Along y.
  std::vector<std::complex<double>> spectrum(height * spectrum_width);
  for (std::int64_t ky = 0; ky < height; ++ky)
    for (std::int64_t kx = 0; kx < spectrum_width; ++kx) {
      std::complex<double> sum = 0;
      for (std::int64_t y = 0; y < h_in; ++y)
        sum += rows[y * spectrum_width + kx] * roots_y[(ky * y) % height];
      spectrum[ky * spectrum_width + kx] = sum;
    }
  return spectrum;
}

// spectrum: [H, W/2 + 1] row-major (any values: not necessarily Hermitian)  ->  [H, W].
inline std::vector<double> irfft2_reference(const std::vector<std::complex<double>>& spectrum,
                                            std::int64_t height, std::int64_t width) {
  const std::int64_t spectrum_width = width / 2 + 1;
  const std::vector<std::complex<double>> roots_x = roots_reference(width, +1);
  const std::vector<std::complex<double>> roots_y = roots_reference(height, +1);
  // Along y: columns[y][kx], complex.
  std::vector<std::complex<double>> columns(height * spectrum_width);
  for (std::int64_t y = 0; y < height; ++y)
    for (std::int64_t kx = 0; kx < spectrum_width; ++kx) {
      std::complex<double> sum = 0;
      for (std::int64_t ky = 0; ky < height; ++ky)
        sum += spectrum[ky * spectrum_width + kx] * roots_y[(ky * y) % height];
      columns[y * spectrum_width + kx] = sum;
    }
  // Along x: the real inverse, each interior bin standing for itself and its conjugate mirror.
  std::vector<double> out(height * width);
  for (std::int64_t y = 0; y < height; ++y)
    for (std::int64_t col = 0; col < width; ++col) {
      double sum = columns[y * spectrum_width].real();
      for (std::int64_t kx = 1; kx < spectrum_width; ++kx) {
        const std::complex<double> bin = columns[y * spectrum_width + kx];
        if (2 * kx == width) {
          sum += bin.real() * ((col % 2 == 0) ? 1.0 : -1.0);  // e^{iπ col}, imag dropped
        } else {
          sum += 2 * (bin * roots_x[(kx * col) % width]).real();
        }
      }
      out[y * width + col] = sum / static_cast<double>(height * width);
    }
  return out;
}

}  // namespace foveal::reference
