// src/detail/fft.hpp (private) — real 2-D FFT plans whose SIMD lanes are channels.
//
// The transform of a chunk of `lanes` channels runs all channels at once: one complex element
// of a 1-D FFT is a vector of lanes real parts plus a vector of lanes imaginary parts, so every
// butterfly is plain vertical vector arithmetic with no shuffles. Mixed radix 2, 3, 4, 5, 8 and
// odd primes up to 31; lengths with a larger prime factor go through Bluestein's chirp-z
// algorithm. The kernels live in src/kernels/fft.hpp, compiled per ISA level: a RealFft2d holds
// the plan of the level in use (docs/fft.md: the choice and the numbers).
#pragma once

#include <memory>

#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// What an ISA level's plan does (src/kernels/fft.hpp); RealFft2d below documents each call.
template <typename T>
class RealFft2dKernel {
 public:
  virtual ~RealFft2dKernel() = default;
  virtual Index work_size(Index lanes) const = 0;
  virtual void forward(const T* in, Index stride_y, Index stride_x, Index stride_c, Index h_in,
                       Index w_in, Index lanes, T* spectrum, T* work) const = 0;
  virtual void inverse(T* spectrum, T* out, Index stride_y, Index stride_x, Index stride_c,
                       Index h_out, Index w_out, Index lanes, T* work) const = 0;
};

// Real 2-D DFT over an [H, W] transform grid, batched over `lanes` channels that are
// transformed together (the channels are the SIMD lanes: channel c of a chunk is lane c).
// The input grid [h_in, w_in] (h_in <= H, w_in <= W) is embedded at the top-left corner and
// zero elsewhere (zero padding for the `zero` boundary: H = 2 h_in, W = 2 w_in); the inverse
// writes only the top-left [h_out, w_out] crop. The plan is immutable once built: forward and
// inverse are const and thread-safe (each thread passes its own `work` and `spectrum`).
template <typename T>
class RealFft2d {
 public:
  // A good chunk of channels for callers that choose one: 128 bytes of each pixel (32 floats,
  // 16 doubles), whole cache lines of a channels-last input; any lanes >= 1 works.
  static constexpr Index kPreferredLanes = 32 * 4 / static_cast<Index>(sizeof(T));

  // Plans the transform of an [height, width] grid; both must be >= 1 (foveal::Error if not).
  RealFft2d(Index height, Index width);

  Index height() const { return height_; }
  Index width() const { return width_; }
  // Number of kx bins kept by the real transform: width / 2 + 1.
  Index spectrum_width() const { return width_ / 2 + 1; }
  // T elements of scratch one forward or inverse call needs for `lanes` channels.
  Index work_size(Index lanes) const { return kernel_->work_size(lanes); }
  // Size in T elements of one spectrum of `lanes` channels: height * spectrum_width * 2 * lanes.
  Index spectrum_size(Index lanes) const { return height_ * spectrum_width() * 2 * lanes; }

  // in: [h_in, w_in, lanes] by strides  ->  spectrum: [H, W/2+1, 2 (re, im), lanes]
  // spectrum = DFT2(in) with e^{-2πi(ky y/H + kx x/W)}, unnormalized, kx in [0, W/2].
  // in(y, x, c) = in[y * stride_y + x * stride_x + c * stride_c] for y < h_in, x < w_in,
  // c < lanes (any strides, e.g. [H,W,C] channels-last: stride_c = 1; [C,H,W]: stride_x = 1).
  // Spectrum layout (split complex, lanes innermost, so a multiplier is applied with plain
  // vector ops): re(ky, kx, c) = spectrum[((ky * spectrum_width + kx) * 2 + 0) * lanes + c],
  //          im(ky, kx, c) = spectrum[((ky * spectrum_width + kx) * 2 + 1) * lanes + c].
  // `work` has work_size(lanes) elements, 64-byte aligned. Never allocates, never throws.
  void forward(const T* in, Index stride_y, Index stride_x, Index stride_c, Index h_in, Index w_in,
               Index lanes, T* spectrum, T* work) const {
    kernel_->forward(in, stride_y, stride_x, stride_c, h_in, w_in, lanes, spectrum, work);
  }

  // spectrum: [H, W/2+1, 2, lanes]  ->  out: [h_out, w_out, lanes] by strides
  // out(y, x, c) = (1 / (H W)) * real inverse DFT2 of the Hermitian spectrum, for y < h_out,
  // x < w_out (same strides convention). Like numpy/torch irfft2 with s=(H, W): the imaginary
  // parts of the kx = 0 column and (even W) of the kx = W/2 column are ignored as the real
  // inverse transform implies. `spectrum` is overwritten (used as scratch).
  void inverse(T* spectrum, T* out, Index stride_y, Index stride_x, Index stride_c, Index h_out,
               Index w_out, Index lanes, T* work) const {
    kernel_->inverse(spectrum, out, stride_y, stride_x, stride_c, h_out, w_out, lanes, work);
  }

 private:
  Index height_;
  Index width_;
  std::shared_ptr<const RealFft2dKernel<T>> kernel_;  // the plan of the ISA level in use
};

extern template class RealFft2d<float>;
extern template class RealFft2d<double>;

}  // namespace foveal::detail
