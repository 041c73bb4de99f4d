// tests/reference/fft_reference.hpp — the executable spec of the real 2-D FFT (src/detail/fft.hpp).
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

// The columns of a [rows, cols] row-major grid, each a sequence of the first `rows` entries
// of a length-n DFT (zero beyond), transformed: out[k][col] = Σ_j in[j][col] e^{sign 2πi jk/n}
// for k < n. Rows of a grid are the columns of its transpose: callers pick the orientation.
inline std::vector<std::complex<double>> dft_columns_reference(
    const std::vector<std::complex<double>>& in, std::int64_t rows, std::int64_t cols,
    std::int64_t n, int sign) {
  const std::vector<std::complex<double>> roots = roots_reference(n, sign);
  std::vector<std::complex<double>> out(n * cols);
  for (std::int64_t k = 0; k < n; ++k)
    for (std::int64_t col = 0; col < cols; ++col) {
      std::complex<double> sum = 0;
      for (std::int64_t j = 0; j < rows; ++j) sum += in[j * cols + col] * roots[(j * k) % n];
      out[k * cols + col] = sum;
    }
  return out;
}

// The transpose of a [rows, cols] row-major grid.
inline std::vector<std::complex<double>> transpose_reference(
    const std::vector<std::complex<double>>& in, std::int64_t rows, std::int64_t cols) {
  std::vector<std::complex<double>> out(in.size());
  for (std::int64_t row = 0; row < rows; ++row)
    for (std::int64_t col = 0; col < cols; ++col) out[col * rows + row] = in[row * cols + col];
  return out;
}

// x: [h_in, w_in] row-major  ->  [H, W/2 + 1] row-major.
inline std::vector<std::complex<double>> rfft2_reference(const std::vector<double>& x,
                                                         std::int64_t h_in, std::int64_t w_in,
                                                         std::int64_t height, std::int64_t width) {
  const std::int64_t spectrum_width = width / 2 + 1;
  // Along x (the columns of the transpose), keeping kx <= W/2.
  const std::vector<std::complex<double>> x_t =
      transpose_reference(std::vector<std::complex<double>>(x.begin(), x.end()), h_in, w_in);
  std::vector<std::complex<double>> rows_t = dft_columns_reference(x_t, w_in, h_in, width, -1);
  rows_t.resize(spectrum_width * h_in);
  // Along y.
  return dft_columns_reference(transpose_reference(rows_t, spectrum_width, h_in), h_in,
                               spectrum_width, height, -1);
}

// spectrum: [H, W/2 + 1] row-major (any values: not necessarily Hermitian)  ->  [H, W].
inline std::vector<double> irfft2_reference(const std::vector<std::complex<double>>& spectrum,
                                            std::int64_t height, std::int64_t width) {
  const std::int64_t spectrum_width = width / 2 + 1;
  const std::vector<std::complex<double>> roots_x = roots_reference(width, +1);
  // Along y: columns[y][kx], complex.
  const std::vector<std::complex<double>> columns =
      dft_columns_reference(spectrum, height, spectrum_width, height, +1);
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
