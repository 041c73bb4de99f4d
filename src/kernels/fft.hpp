// src/kernels/fft.hpp — the FFT backend of one ISA level (included by level.cpp; detail/fft.hpp):
// Stockham mixed-radix passes over complex elements whose real and imaginary parts are vectors
// of channels, Bluestein for large prime factors, and the real 2-D transform built from them.
// Plans (twiddles, factors) are built by the level too, so a plan and its passes agree.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/fft.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {
namespace fft {

namespace {

// One complex element of a transform: lane c of `re` and `im` is channel c. P is Vec<T>
// (a chunk of kLanes<T> channels) or T itself (one channel: the remainder of a chunk).
template <typename P>
struct Complex {
  P re;
  P im;
};

template <typename P>
inline constexpr bool kIsScalar = std::is_arithmetic_v<P>;

// Every lane of a P set to `value`.
template <typename P, typename T>
inline P broadcast(T value) {
  if constexpr (kIsScalar<P>) {
    return value;
  } else {
    return splat<T>(value);
  }
}

// x * (w_re + i w_im), or x * conj(w) when Conjugate (the inverse transform's twiddles).
template <bool Conjugate, typename P, typename T>
inline Complex<P> rotate(const Complex<P>& x, T w_re, T w_im) {
  const P wr = broadcast<P>(w_re);
  const P wi = broadcast<P>(Conjugate ? -w_im : w_im);
  return {x.re * wr - x.im * wi, x.re * wi + x.im * wr};
}

// x * (-i) for the forward transform, x * (+i) for the inverse: the quarter-turn of radix 4.
template <bool Inverse, typename P>
inline Complex<P> quarter_turn(const Complex<P>& x) {
  if constexpr (Inverse) {
    return {-x.im, x.re};
  } else {
    return {x.im, -x.re};
  }
}

template <typename P>
inline Complex<P> operator+(const Complex<P>& a, const Complex<P>& b) {
  return {a.re + b.re, a.im + b.im};
}

template <typename P>
inline Complex<P> operator-(const Complex<P>& a, const Complex<P>& b) {
  return {a.re - b.re, a.im - b.im};
}

// The channels of one element read from memory where channel c sits at source[c * stride].
template <typename P, typename T>
inline P load_lanes(const T* source, Index stride) {
  if constexpr (kIsScalar<P>) {
    return *source;
  } else {
    if (stride == 1) return load<T>(source);
    P value{};
    for (int lane = 0; lane < kLanes<T>; ++lane) value[lane] = source[lane * stride];
    return value;
  }
}

// Writes the channels of one element to destination[c * stride].
template <typename P, typename T>
inline void store_lanes(T* destination, Index stride, const P& value) {
  if constexpr (kIsScalar<P>) {
    *destination = value;
  } else {
    if (stride == 1) {
      store<T>(destination, value);
      return;
    }
    for (int lane = 0; lane < kLanes<T>; ++lane) destination[lane * stride] = value[lane];
  }
}

// ---------------------------------------------------------------------------------------------
// Stockham passes.
//
// A length-n transform is a chain of passes, one per radix p of n = p_0 p_1 ... . Before a pass
// the data hold `l` interleaved sub-transforms of length S = p m (element j of sub-transform k
// at index k + l j); the decimation-in-frequency step
//   y_{k2}[n1] = ω_S^{n1 k2} Σ_{n2 < p} x[n1 + m n2] ω_p^{n2 k2}
// turns each into p sub-transforms of length m, written as l p interleaved ones, so after the
// last pass (m = 1) element k is X[k]: self-sorting, no digit reversal. Passes ping-pong
// between the data and a scratch buffer. ω_S = e^{-2πi/S} (conjugated for the inverse).

// in: [p, m, l] elements, out: [m, p, l]; twiddles: [m, p - 1] pairs (re, im) of ω_S^{n1 k2}.
// Radix 2.
template <bool Inverse, typename P, typename T>
void pass_radix2(const Complex<P>* in, Complex<P>* out, Index l, Index m, const T* twiddles) {
  const Index stride_in = l * m;
  for (Index n1 = 0; n1 < m; ++n1) {
    const Complex<P>* source = in + l * n1;
    Complex<P>* destination = out + 2 * l * n1;
    const T* w = twiddles + 2 * n1;
    for (Index k = 0; k < l; ++k) {
      const Complex<P> x0 = source[k], x1 = source[k + stride_in];
      destination[k] = x0 + x1;
      destination[k + l] = n1 == 0 ? x0 - x1 : rotate<Inverse>(x0 - x1, w[0], w[1]);
    }
  }
}

// Radix 4 (same layout contract as pass_radix2).
template <bool Inverse, typename P, typename T>
void pass_radix4(const Complex<P>* in, Complex<P>* out, Index l, Index m, const T* twiddles) {
  const Index stride_in = l * m;
  for (Index n1 = 0; n1 < m; ++n1) {
    const Complex<P>* source = in + l * n1;
    Complex<P>* destination = out + 4 * l * n1;
    const T* w = twiddles + 6 * n1;
    for (Index k = 0; k < l; ++k) {
      const Complex<P> x0 = source[k], x1 = source[k + stride_in];
      const Complex<P> x2 = source[k + 2 * stride_in], x3 = source[k + 3 * stride_in];
      const Complex<P> even_sum = x0 + x2, even_difference = x0 - x2;
      const Complex<P> odd_sum = x1 + x3;
      const Complex<P> odd_difference = quarter_turn<Inverse>(x1 - x3);
      const Complex<P> y1 = even_difference + odd_difference;
      const Complex<P> y2 = even_sum - odd_sum;
      const Complex<P> y3 = even_difference - odd_difference;
      destination[k] = even_sum + odd_sum;
      if (n1 == 0) {
        destination[k + l] = y1;
        destination[k + 2 * l] = y2;
        destination[k + 3 * l] = y3;
      } else {
        destination[k + l] = rotate<Inverse>(y1, w[0], w[1]);
        destination[k + 2 * l] = rotate<Inverse>(y2, w[2], w[3]);
        destination[k + 3 * l] = rotate<Inverse>(y3, w[4], w[5]);
      }
    }
  }
}

// The 4-point DFT of v0..v3 in place (forward sign unless Inverse).
template <bool Inverse, typename P>
inline void dft4(Complex<P>& v0, Complex<P>& v1, Complex<P>& v2, Complex<P>& v3) {
  const Complex<P> sum02 = v0 + v2, difference02 = v0 - v2, sum13 = v1 + v3;
  const Complex<P> turned13 = quarter_turn<Inverse>(v1 - v3);
  v0 = sum02 + sum13;
  v1 = difference02 + turned13;
  v2 = sum02 - sum13;
  v3 = difference02 - turned13;
}

// Radix 8 as 2 x 4: y_{2q} = DFT4(x_j + x_{j+4}), y_{2q+1} = DFT4((x_j - x_{j+4}) ω_8^j).
// Fewer passes over the line than radix 4 (same layout contract as pass_radix2).
template <bool Inverse, typename P, typename T>
void pass_radix8(const Complex<P>* in, Complex<P>* out, Index l, Index m, const T* twiddles) {
  const Index stride_in = l * m;
  const P root_half = broadcast<P>(static_cast<T>(0.70710678118654752440));
  for (Index n1 = 0; n1 < m; ++n1) {
    const Complex<P>* source = in + l * n1;
    Complex<P>* destination = out + 8 * l * n1;
    const T* w = twiddles + 14 * n1;
    for (Index k = 0; k < l; ++k) {
      Complex<P> even[4], odd[4];
      FOVEAL_UNROLL
      for (int j = 0; j < 4; ++j) {
        const Complex<P> low = source[k + j * stride_in], high = source[k + (j + 4) * stride_in];
        even[j] = low + high;
        odd[j] = low - high;
      }
      // odd[j] *= ω_8^j (conjugated for the inverse): 45, 90 and 135 degrees.
      const Complex<P> o1 = odd[1], o3 = odd[3];
      if constexpr (Inverse) {
        odd[1] = {(o1.re - o1.im) * root_half, (o1.re + o1.im) * root_half};
        odd[3] = {-(o3.re + o3.im) * root_half, (o3.re - o3.im) * root_half};
      } else {
        odd[1] = {(o1.re + o1.im) * root_half, (o1.im - o1.re) * root_half};
        odd[3] = {(o3.im - o3.re) * root_half, -(o3.re + o3.im) * root_half};
      }
      odd[2] = quarter_turn<Inverse>(odd[2]);
      dft4<Inverse>(even[0], even[1], even[2], even[3]);
      dft4<Inverse>(odd[0], odd[1], odd[2], odd[3]);
      destination[k] = even[0];
      if (n1 == 0) {
        FOVEAL_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (q > 0) destination[k + 2 * q * l] = even[q];
          destination[k + (2 * q + 1) * l] = odd[q];
        }
      } else {
        FOVEAL_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (q > 0)
            destination[k + 2 * q * l] =
                rotate<Inverse>(even[q], w[2 * (2 * q - 1)], w[2 * (2 * q - 1) + 1]);
          destination[k + (2 * q + 1) * l] =
              rotate<Inverse>(odd[q], w[2 * (2 * q)], w[2 * (2 * q) + 1]);
        }
      }
    }
  }
}

// Radix 16 as 4 x 4: with j = a + 4 b and q = c + 4 d (a, b, c, d < 4),
// y_q = Σ_a ω_4^{a d} ω_16^{a c} (Σ_b x_{a + 4 b} ω_4^{b c}): four DFT4s over b, twiddles
// ω_16^{a c}, four DFT4s over a. One sweep of the line where 8 and 2 (or 8 8 4 -> 16 16) take
// two (same layout contract as pass_radix2).
template <bool Inverse, typename P, typename T>
void pass_radix16(const Complex<P>* in, Complex<P>* out, Index l, Index m, const T* twiddles) {
  const Index stride_in = l * m;
  // ω_16^e for e = a c (forward roots; rotate conjugates them for the inverse).
  constexpr double kCos1 = 0.92387953251128675613, kSin1 = 0.38268343236508977173;
  constexpr double kHalf = 0.70710678118654752440;
  const T root_re[10] = {1, T(kCos1), T(kHalf), T(kSin1), 0, 0, T(-kHalf), 0, 0, T(-kCos1)};
  const T root_im[10] = {0, T(-kSin1), T(-kHalf), T(-kCos1), 0, 0, T(-kHalf), 0, 0, T(kSin1)};
  for (Index n1 = 0; n1 < m; ++n1) {
    const Complex<P>* source = in + l * n1;
    Complex<P>* destination = out + 16 * l * n1;
    const T* w = twiddles + 30 * n1;
    for (Index k = 0; k < l; ++k) {
      Complex<P> v[4][4];  // v[a][c]
      FOVEAL_UNROLL
      for (int a = 0; a < 4; ++a) {
        FOVEAL_UNROLL
        for (int b = 0; b < 4; ++b) v[a][b] = source[k + (a + 4 * b) * stride_in];
        dft4<Inverse>(v[a][0], v[a][1], v[a][2], v[a][3]);
      }
      FOVEAL_UNROLL
      for (int a = 1; a < 4; ++a) {
        FOVEAL_UNROLL
        for (int c = 1; c < 4; ++c) {
          const int e = a * c;
          v[a][c] = e == 4 ? quarter_turn<Inverse>(v[a][c])
                           : rotate<Inverse>(v[a][c], root_re[e], root_im[e]);
        }
      }
      FOVEAL_UNROLL
      for (int c = 0; c < 4; ++c) {
        dft4<Inverse>(v[0][c], v[1][c], v[2][c], v[3][c]);
        FOVEAL_UNROLL
        for (int d = 0; d < 4; ++d) {
          const int q = c + 4 * d;
          destination[k + q * l] =
              n1 == 0 || q == 0 ? v[d][c]
                                : rotate<Inverse>(v[d][c], w[2 * (q - 1)], w[2 * (q - 1) + 1]);
        }
      }
    }
  }
}

// Odd radix R (3, 5, 7, ..., 31) by the symmetric direct DFT: inputs j and R - j are paired,
// so each output pair k, R - k costs (R - 1) / 2 real-coefficient products of sums and of
// differences. cosines: [(R-1)/2, (R-1)/2] pairs (cos, sin) of 2π j k / R, k and j from 1.
template <int R, bool Inverse, typename P, typename T>
void pass_odd(const Complex<P>* in, Complex<P>* out, Index l, Index m, const T* twiddles,
              const T* cosines) {
  constexpr int kHalf = (R - 1) / 2;
  const Index stride_in = l * m;
  for (Index n1 = 0; n1 < m; ++n1) {
    const Complex<P>* source = in + l * n1;
    Complex<P>* destination = out + R * l * n1;
    const T* w = twiddles + 2 * (R - 1) * n1;
    for (Index k = 0; k < l; ++k) {
      const Complex<P> x0 = source[k];
      Complex<P> sums[kHalf], differences[kHalf];
      Complex<P> y0 = x0;
      FOVEAL_UNROLL
      for (int j = 1; j <= kHalf; ++j) {
        const Complex<P> a = source[k + j * stride_in], b = source[k + (R - j) * stride_in];
        sums[j - 1] = a + b;
        differences[j - 1] = a - b;
        y0 = y0 + sums[j - 1];
      }
      destination[k] = y0;
      FOVEAL_UNROLL
      for (int q = 1; q <= kHalf; ++q) {
        // even = x0 + Σ cos · sums, odd = Σ sin · differences; y_q = even - i odd (forward).
        Complex<P> even = x0, odd{P{}, P{}};
        FOVEAL_UNROLL
        for (int j = 1; j <= kHalf; ++j) {
          const T* cs = cosines + 2 * ((q - 1) * kHalf + (j - 1));
          const P c = broadcast<P>(cs[0]), s = broadcast<P>(cs[1]);
          even.re += c * sums[j - 1].re;
          even.im += c * sums[j - 1].im;
          odd.re += s * differences[j - 1].re;
          odd.im += s * differences[j - 1].im;
        }
        const Complex<P> turned = quarter_turn<Inverse>(odd);
        const Complex<P> y_q = even + turned, y_mirror = even - turned;
        if (n1 == 0) {
          destination[k + q * l] = y_q;
          destination[k + (R - q) * l] = y_mirror;
        } else {
          destination[k + q * l] = rotate<Inverse>(y_q, w[2 * (q - 1)], w[2 * (q - 1) + 1]);
          destination[k + (R - q) * l] =
              rotate<Inverse>(y_mirror, w[2 * (R - q - 1)], w[2 * (R - q - 1) + 1]);
        }
      }
    }
  }
}

// Radices with their own passes; any other factor <= kLargestDirectRadix is a prime handled
// by pass_odd; lengths with a larger prime factor use Bluestein.
constexpr int kLargestDirectRadix = 31;
constexpr int kOddRadices[] = {3, 5, 7, 11, 13, 17, 19, 23, 29, 31};

// The radices of n in pass order (16s where they save a pass, 8s, then one 4 or 2, then odd
// primes up to kLargestDirectRadix), or an empty list when a larger prime divides n.
std::vector<int> factor_into_radices(Index n) {
  std::vector<int> radices;
  int eights = 0;
  for (; n % 8 == 0; n /= 8) ++eights;
  int rest = n % 4 == 0 ? 4 : (n % 2 == 0 ? 2 : 1);
  n /= rest;
  // Radix 16 where it saves a sweep of the line: 8 2 -> 16. (8 8 4 -> 16 16 measured slower
  // at 256: two radix-16 passes cost more arithmetic than the radix-4 pass they save.)
  int sixteens = 0;
  if (rest == 2 && eights >= 1) sixteens = 1, eights -= 1, rest = 1;
  radices.insert(radices.end(), sixteens, 16);
  radices.insert(radices.end(), eights, 8);
  if (rest > 1) radices.push_back(rest);
  for (int prime : kOddRadices) {
    while (n % prime == 0) {
      radices.push_back(prime);
      n /= prime;
    }
  }
  if (n != 1) radices.clear();
  return radices;
}

// The smallest length >= n whose prime factors are 2, 3 and 5 (Bluestein's convolution size).
Index smooth_length_at_least(Index n) {
  for (Index candidate = n;; ++candidate) {
    Index rest = candidate;
    for (Index prime : {2, 3, 5})
      while (rest % prime == 0) rest /= prime;
    if (rest == 1) return candidate;
  }
}

constexpr double kPi = 3.14159265358979323846;

// e^{-2πi numerator / denominator} as (re, im), with the angle reduced exactly first.
std::pair<double, double> unit_root(Index numerator, Index denominator) {
  const Index reduced = ((numerator % denominator) + denominator) % denominator;
  const double angle = -2.0 * kPi * static_cast<double>(reduced) / static_cast<double>(denominator);
  return {std::cos(angle), std::sin(angle)};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The 1-D plan.

template <typename T>
class ComplexFftPlan {
 public:
  // Plans the length-n complex transform (n >= 1).
  explicit ComplexFftPlan(Index n);

  Index length() const { return length_; }
  // Elements of scratch execute needs beside the data.
  Index scratch_elements() const { return bluestein_length_ > 0 ? 2 * bluestein_length_ : length_; }

  // data: [n, batch] elements -> [n, batch]: the DFT of each of the `batch` interleaved
  // sequences (e^{-2πi} forward, e^{+2πi} inverse, unnormalized), left in `data` or in
  // `scratch` (the passes ping-pong; copying back would cost a pass): returns which. Both
  // buffers are overwritten. scratch: batch * scratch_elements() elements.
  template <bool Inverse, typename P>
  Complex<P>* execute(Complex<P>* data, Complex<P>* scratch, Index batch) const;

 private:
  struct Pass {
    int radix;
    Index l, m;
    Index twiddle_offset;  // into twiddles_: [m, radix - 1] pairs
    Index cosine_offset;   // into cosines_ (odd radices): [(radix-1)/2, (radix-1)/2] pairs
  };

  template <bool Inverse, typename P>
  void run_pass(const Pass& pass, const Complex<P>* in, Complex<P>* out, Index batch) const;
  template <bool Inverse, typename P>
  Complex<P>* execute_bluestein(Complex<P>* data, Complex<P>* scratch, Index batch) const;

  Index length_;
  std::vector<Pass> passes_;
  std::vector<T> twiddles_;
  std::vector<T> cosines_;
  // Bluestein: X[k] = c_k Σ_n (x_n c_n) conj(c_{k-n}) with the chirp c_n = e^{-πi n²/N}, a
  // cyclic convolution of length bluestein_length_ >= 2N - 1 done by the smooth sub-plan.
  Index bluestein_length_ = 0;
  std::vector<T> chirp_;           // [N] pairs c_n
  std::vector<T> kernel_forward_;  // [M] pairs: DFT_M of conj(c_{|j|}) placed cyclically, / M
  std::vector<T> kernel_inverse_;  // [M] pairs: the same for the conjugated chirp
  std::unique_ptr<ComplexFftPlan<T>> convolution_plan_;
};

template <typename T>
ComplexFftPlan<T>::ComplexFftPlan(Index n) : length_(n) {
  const std::vector<int> radices = factor_into_radices(n);
  if (radices.empty() && n > 1) {
    const Index m = smooth_length_at_least(2 * n - 1);
    bluestein_length_ = m;
    convolution_plan_ = std::make_unique<ComplexFftPlan<T>>(m);
    chirp_.resize(2 * n);
    for (Index k = 0; k < n; ++k) {
      // c_k = e^{-πi k²/N} = e^{-2πi k² / 2N}; k² mod 2N keeps the angle exact.
      const auto [re, im] = unit_root((k * k) % (2 * n), 2 * n);
      chirp_[2 * k] = static_cast<T>(re);
      chirp_[2 * k + 1] = static_cast<T>(im);
    }
    // The convolution kernels in double whatever T: their DFT through a double plan.
    const ComplexFftPlan<double> kernel_plan(m);
    std::vector<Complex<double>> kernel(m), scratch(kernel_plan.scratch_elements());
    for (int direction = 0; direction < 2; ++direction) {
      std::fill(kernel.begin(), kernel.end(), Complex<double>{0, 0});
      for (Index j = 0; j < n; ++j) {
        auto [re, im] = unit_root((j * j) % (2 * n), 2 * n);
        if (direction == 0) im = -im;  // forward convolves with conj(c)
        kernel[j] = {re, im};
        if (j > 0) kernel[m - j] = {re, im};
      }
      const Complex<double>* transformed =
          kernel_plan.execute<false, double>(kernel.data(), scratch.data(), 1);
      std::vector<T>& target = direction == 0 ? kernel_forward_ : kernel_inverse_;
      target.resize(2 * m);
      for (Index j = 0; j < m; ++j) {
        target[2 * j] = static_cast<T>(transformed[j].re / static_cast<double>(m));
        target[2 * j + 1] = static_cast<T>(transformed[j].im / static_cast<double>(m));
      }
    }
    return;
  }
  Index l = 1;
  for (int radix : radices) {
    const Index m = n / (l * radix);
    Pass pass{radix, l, m, static_cast<Index>(twiddles_.size()),
              static_cast<Index>(cosines_.size())};
    for (Index n1 = 0; n1 < m; ++n1) {
      for (int k2 = 1; k2 < radix; ++k2) {
        const auto [re, im] = unit_root(n1 * k2, radix * m);
        twiddles_.push_back(static_cast<T>(re));
        twiddles_.push_back(static_cast<T>(im));
      }
    }
    if (radix % 2 == 1) {
      const int half = (radix - 1) / 2;
      for (int q = 1; q <= half; ++q) {
        for (int j = 1; j <= half; ++j) {
          // ω_R^{jq} = cos - i sin with cos, sin of 2π j q / R.
          const auto [re, im] = unit_root(static_cast<Index>(j) * q, radix);
          cosines_.push_back(static_cast<T>(re));
          cosines_.push_back(static_cast<T>(-im));
        }
      }
    }
    passes_.push_back(pass);
    l *= radix;
  }
}

template <typename T>
template <bool Inverse, typename P>
void ComplexFftPlan<T>::run_pass(const Pass& pass, const Complex<P>* in, Complex<P>* out,
                                 Index batch) const {
  const T* twiddles = twiddles_.data() + pass.twiddle_offset;
  const T* cosines = cosines_.data() + pass.cosine_offset;
  // Interleaved sequences are more interleaved sub-transforms: element (j, b) of sub-transform
  // k sits at (k + l j) batch + b = (k batch + b) + (l batch) j.
  const Index l = pass.l * batch;
  switch (pass.radix) {
    case 2:
      return pass_radix2<Inverse>(in, out, l, pass.m, twiddles);
    case 4:
      return pass_radix4<Inverse>(in, out, l, pass.m, twiddles);
    case 8:
      return pass_radix8<Inverse>(in, out, l, pass.m, twiddles);
    case 16:
      return pass_radix16<Inverse>(in, out, l, pass.m, twiddles);
    case 3:
      return pass_odd<3, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 5:
      return pass_odd<5, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 7:
      return pass_odd<7, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 11:
      return pass_odd<11, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 13:
      return pass_odd<13, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 17:
      return pass_odd<17, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 19:
      return pass_odd<19, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 23:
      return pass_odd<23, Inverse>(in, out, l, pass.m, twiddles, cosines);
    case 29:
      return pass_odd<29, Inverse>(in, out, l, pass.m, twiddles, cosines);
    default:
      return pass_odd<31, Inverse>(in, out, l, pass.m, twiddles, cosines);
  }
}

template <typename T>
template <bool Inverse, typename P>
Complex<P>* ComplexFftPlan<T>::execute(Complex<P>* data, Complex<P>* scratch, Index batch) const {
  if (bluestein_length_ > 0) return execute_bluestein<Inverse>(data, scratch, batch);
  Complex<P>* source = data;
  Complex<P>* destination = scratch;
  for (const Pass& pass : passes_) {
    run_pass<Inverse>(pass, source, destination, batch);
    std::swap(source, destination);
  }
  return source;
}

template <typename T>
template <bool Inverse, typename P>
Complex<P>* ComplexFftPlan<T>::execute_bluestein(Complex<P>* data, Complex<P>* scratch,
                                                 Index batch) const {
  const Index n = length_, m = bluestein_length_;
  Complex<P>* padded = scratch;
  Complex<P>* other = scratch + m * batch;
  // The inverse transform is the forward one with every chirp conjugated.
  for (Index k = 0; k < n; ++k)
    for (Index b = 0; b < batch; ++b)
      padded[k * batch + b] =
          rotate<Inverse>(data[k * batch + b], chirp_[2 * k], chirp_[2 * k + 1]);
  for (Index i = n * batch; i < m * batch; ++i) padded[i] = {P{}, P{}};
  Complex<P>* spectrum = convolution_plan_->template execute<false>(padded, other, batch);
  const std::vector<T>& kernel = Inverse ? kernel_inverse_ : kernel_forward_;
  for (Index k = 0; k < m; ++k)
    for (Index b = 0; b < batch; ++b)
      spectrum[k * batch + b] =
          rotate<false>(spectrum[k * batch + b], kernel[2 * k], kernel[2 * k + 1]);
  const Complex<P>* convolved = convolution_plan_->template execute<true>(
      spectrum, spectrum == padded ? other : padded, batch);
  for (Index k = 0; k < n; ++k)
    for (Index b = 0; b < batch; ++b)
      data[k * batch + b] =
          rotate<Inverse>(convolved[k * batch + b], chirp_[2 * k], chirp_[2 * k + 1]);
  return data;
}

// ---------------------------------------------------------------------------------------------
// The real 2-D transform.
//
// Rows (along x) first: two real rows y, y + 1 ride as the real and imaginary parts of one
// complex transform of length W, and are separated by Hermitian symmetry
//   X_a[k] = (Z[k] + conj Z[W-k]) / 2,   X_b[k] = (Z[k] - conj Z[W-k]) / 2i,
// which works for every W (odd too) and needs no twiddles; rows at y >= h_in are zero and
// are skipped. Then the W/2 + 1 columns (along y), each gathered into a contiguous line so the
// passes run in L1. The inverse runs the same steps backwards; its row step builds
// Z = X_a + i X_b over all W bins from the kept half, dropping the imaginary parts of the
// kx = 0 and (even W) kx = W/2 bins as a real inverse transform does.

// The real 2-D transform of one level (detail::RealFft2d's kernel, see detail/fft.hpp).
template <typename T>
class LevelFft2d final : public RealFft2dKernel<T> {
 public:
  // height, width >= 1 (checked by RealFft2d).
  LevelFft2d(Index height, Index width);

  Index work_size(Index lanes) const override;
  void forward(const T* in, Index stride_y, Index stride_x, Index stride_c, Index h_in, Index w_in,
               Index lanes, T* spectrum, T* work) const override;
  void inverse(T* spectrum, T* out, Index stride_y, Index stride_x, Index stride_c, Index h_out,
               Index w_out, Index lanes, T* work) const override;

 private:
  Index spectrum_width() const { return width_ / 2 + 1; }
  // One pair of rows y, y + 1 (only y when !pair) of one lane group: the row transforms, read
  // from the input and written to the spectrum rows.
  template <typename P>
  void forward_row_pair(const T* row_a, Index stride_y, Index stride_x, Index stride_c, bool pair,
                        Index w_in, Index lanes, T* spectrum_row, T* work) const;
  // The column transforms of one lane group in place: rows [0, rows_in) are read (the rest are
  // zero), rows [0, rows_out) are written.
  template <bool Inverse, typename P>
  void transform_columns(Index rows_in, Index rows_out, Index lanes, T* spectrum, T* work) const;
  // The inverse row transforms of one pair of rows of one lane group, written to the output.
  template <typename P>
  void inverse_row_pair(const T* spectrum_row, T* row_a, Index stride_y, Index stride_x,
                        Index stride_c, bool pair, Index w_out, Index lanes, T* work) const;

  Index height_;
  Index width_;
  Index column_batch_;  // columns transformed together (a strip), see the constructor
  std::shared_ptr<const ComplexFftPlan<T>> column_plan_;  // length height, along y
  std::shared_ptr<const ComplexFftPlan<T>> row_plan_;     // length width, along x
};

template <typename T>
LevelFft2d<T>::LevelFft2d(Index height, Index width) : height_(height), width_(width) {
  column_plan_ = std::make_shared<const ComplexFftPlan<T>>(height);
  row_plan_ = width == height ? column_plan_ : std::make_shared<const ComplexFftPlan<T>>(width);
  // Columns go through in strips of column_batch_ neighbours: a strip's row is contiguous in
  // the spectrum (long vector reads instead of one element per row), the passes' inner loops
  // get longer, and the two strip buffers (about kStripElements elements each) stay in L2.
  constexpr Index kStripElements = 2048, kMostColumns = 16;
  const Index column_elements = std::max(height, column_plan_->scratch_elements());
  const Index most = std::clamp<Index>(kStripElements / column_elements, 1, kMostColumns);
  const Index strips = (spectrum_width() + most - 1) / most;
  column_batch_ = (spectrum_width() + strips - 1) / strips;
}

namespace {

// T elements of one complex element of a lane group (the widest P the kernels use).
template <typename T>
constexpr Index kElementTs = 2 * kLanes<T>;

}  // namespace

template <typename T>
Index LevelFft2d<T>::work_size(Index /*lanes*/) const {
  // [line][scratch] in elements of one vector: a row (W + its plan's scratch) or a strip of
  // columns (column_batch_ (H + its plan's scratch)), whichever is larger.
  const Index row = width_ + row_plan_->scratch_elements();
  const Index strip = column_batch_ * (height_ + column_plan_->scratch_elements());
  return std::max(row, strip) * kElementTs<T>;
}

namespace {

// The lane type P of a group of channels, passed to a generic lambda.
template <typename P>
struct LaneGroup {
  using type = P;
};

// Calls visit(LaneGroup<P>{}, lane) for every group of a chunk of `lanes` channels: vectors of
// kLanes<T> channels first (P = Vec<T>), then the remainder one channel at a time (P = T).
template <typename T, typename Visit>
void for_each_lane_group(Index lanes, Visit&& visit) {
  Index lane = 0;
  for (; lane + kLanes<T> <= lanes; lane += kLanes<T>) visit(LaneGroup<Vec<T>>{}, lane);
  for (; lane < lanes; ++lane) visit(LaneGroup<T>{}, lane);
}

}  // namespace

template <typename T>
template <typename P>
void LevelFft2d<T>::forward_row_pair(const T* row_a, Index stride_y, Index stride_x, Index stride_c,
                                     bool pair, Index w_in, Index lanes, T* spectrum_row,
                                     T* work) const {
  const Index width = width_, spectrum_width = width / 2 + 1;
  Complex<P>* line = reinterpret_cast<Complex<P>*>(work);
  Complex<P>* row_scratch = line + width;
  const Index element_stride = 2 * lanes;  // T elements between neighbouring spectrum bins
  const P half = broadcast<P>(static_cast<T>(0.5));
  const T* row_b = pair ? row_a + stride_y : row_a;  // no pointer from an unused stride
  Index x = 0;
  if constexpr (!kIsScalar<P>) {
    // Channels-first rows (x contiguous): kLanes<T> pixels of kLanes<T> channels at a time,
    // one vector load per channel and an in-register transpose instead of a gather per pixel.
    if (stride_x == 1 && stride_c != 1)
      for (; x + kLanes<T> <= w_in; x += kLanes<T>) {
        P block_a[kLanes<T>], block_b[kLanes<T>];
        FOVEAL_UNROLL
        for (int c = 0; c < kLanes<T>; ++c) {
          block_a[c] = load<T>(row_a + c * stride_c + x);
          block_b[c] = pair ? load<T>(row_b + c * stride_c + x) : P{};
        }
        transpose<T>(block_a);
        transpose<T>(block_b);
        FOVEAL_UNROLL
        for (int i = 0; i < kLanes<T>; ++i) line[x + i] = {block_a[i], block_b[i]};
      }
  }
  for (; x < w_in; ++x) {
    line[x].re = load_lanes<P>(row_a + x * stride_x, stride_c);
    line[x].im = pair ? load_lanes<P>(row_b + x * stride_x, stride_c) : P{};
  }
  for (Index x = w_in; x < width; ++x) line[x] = {P{}, P{}};
  const Complex<P>* transformed = row_plan_->template execute<false>(line, row_scratch, 1);
  T* out_a = spectrum_row;
  T* out_b = out_a + spectrum_width * element_stride;
  for (Index kx = 0; kx < spectrum_width; ++kx) {
    const Complex<P> z = transformed[kx], mirror = transformed[kx == 0 ? 0 : width - kx];
    T* bin_a = out_a + kx * element_stride;
    store_lanes<P>(bin_a, 1, (z.re + mirror.re) * half);
    store_lanes<P>(bin_a + lanes, 1, (z.im - mirror.im) * half);
    if (pair) {
      T* bin_b = out_b + kx * element_stride;
      store_lanes<P>(bin_b, 1, (z.im + mirror.im) * half);
      store_lanes<P>(bin_b + lanes, 1, (mirror.re - z.re) * half);
    }
  }
}

template <typename T>
template <bool Inverse, typename P>
void LevelFft2d<T>::transform_columns(Index rows_in, Index rows_out, Index lanes, T* spectrum,
                                      T* work) const {
  const Index height = height_, spectrum_width = width_ / 2 + 1;
  Complex<P>* line = reinterpret_cast<Complex<P>*>(work);
  Complex<P>* strip_scratch = line + column_batch_ * height;
  const Index element_stride = 2 * lanes;
  const Index row_stride = spectrum_width * element_stride;
  for (Index kx0 = 0; kx0 < spectrum_width; kx0 += column_batch_) {
    const Index count = std::min(column_batch_, spectrum_width - kx0);
    T* strip = spectrum + kx0 * element_stride;
    for (Index ky = 0; ky < rows_in; ++ky)
      for (Index b = 0; b < count; ++b) {
        const T* bin = strip + ky * row_stride + b * element_stride;
        line[ky * count + b] = {load_lanes<P>(bin, 1), load_lanes<P>(bin + lanes, 1)};
      }
    for (Index i = rows_in * count; i < height * count; ++i) line[i] = {P{}, P{}};
    const Complex<P>* transformed =
        column_plan_->template execute<Inverse>(line, strip_scratch, count);
    for (Index ky = 0; ky < rows_out; ++ky)
      for (Index b = 0; b < count; ++b) {
        T* bin = strip + ky * row_stride + b * element_stride;
        store_lanes<P>(bin, 1, transformed[ky * count + b].re);
        store_lanes<P>(bin + lanes, 1, transformed[ky * count + b].im);
      }
  }
}

template <typename T>
template <typename P>
void LevelFft2d<T>::inverse_row_pair(const T* spectrum_row, T* row_a, Index stride_y,
                                     Index stride_x, Index stride_c, bool pair, Index w_out,
                                     Index lanes, T* work) const {
  const Index width = width_, height = height_, spectrum_width = width / 2 + 1;
  Complex<P>* line = reinterpret_cast<Complex<P>*>(work);
  Complex<P>* row_scratch = line + width;
  const Index element_stride = 2 * lanes;
  const P scale = broadcast<P>(static_cast<T>(1.0 / (static_cast<double>(height) * width)));
  const Index nyquist = width % 2 == 0 ? width / 2 : -1;
  const T* spectrum_row_b = spectrum_row + spectrum_width * element_stride;
  for (Index kx = 0; kx < spectrum_width; ++kx) {
    const T* bin_a = spectrum_row + kx * element_stride;
    const T* bin_b = spectrum_row_b + kx * element_stride;
    const bool real_bin = kx == 0 || kx == nyquist;
    const P a_re = load_lanes<P>(bin_a, 1);
    const P a_im = real_bin ? P{} : load_lanes<P>(bin_a + lanes, 1);
    const P b_re = pair ? load_lanes<P>(bin_b, 1) : P{};
    const P b_im = pair && !real_bin ? load_lanes<P>(bin_b + lanes, 1) : P{};
    // Z[k] = X_a[k] + i X_b[k]; Z[W-k] = conj X_a[k] + i conj X_b[k].
    line[kx] = {a_re - b_im, a_im + b_re};
    if (width - kx >= spectrum_width) line[width - kx] = {a_re + b_im, b_re - a_im};
  }
  const Complex<P>* transformed = row_plan_->template execute<true>(line, row_scratch, 1);
  T* row_b = pair ? row_a + stride_y : row_a;  // no pointer from an unused stride
  Index x = 0;
  if constexpr (!kIsScalar<P>) {
    // Channels-first rows: the forward's transpose backwards (kLanes<T> pixels at a time).
    if (stride_x == 1 && stride_c != 1)
      for (; x + kLanes<T> <= w_out; x += kLanes<T>) {
        P block_a[kLanes<T>], block_b[kLanes<T>];
        FOVEAL_UNROLL
        for (int i = 0; i < kLanes<T>; ++i) {
          block_a[i] = transformed[x + i].re * scale;
          block_b[i] = transformed[x + i].im * scale;
        }
        transpose<T>(block_a);
        FOVEAL_UNROLL
        for (int c = 0; c < kLanes<T>; ++c) store<T>(row_a + c * stride_c + x, block_a[c]);
        if (!pair) continue;
        transpose<T>(block_b);
        FOVEAL_UNROLL
        for (int c = 0; c < kLanes<T>; ++c) store<T>(row_b + c * stride_c + x, block_b[c]);
      }
  }
  for (; x < w_out; ++x) {
    store_lanes<P>(row_a + x * stride_x, stride_c, transformed[x].re * scale);
    if (pair) store_lanes<P>(row_b + x * stride_x, stride_c, transformed[x].im * scale);
  }
}

// Rows go through a row pair at a time with every lane group of the chunk before the next
// pair, so the channels of a pixel are read (forward) or written (inverse) together: whole
// cache lines, once, instead of once per lane group a full 2-D transform apart. Columns then
// go through one lane group at a time.
template <typename T>
void LevelFft2d<T>::forward(const T* in, Index stride_y, Index stride_x, Index stride_c, Index h_in,
                            Index w_in, Index lanes, T* spectrum, T* work) const {
  const Index row_stride = spectrum_width() * 2 * lanes;
  for (Index y = 0; y < h_in; y += 2)
    for_each_lane_group<T>(lanes, [&](auto group, Index lane) {
      using P = typename decltype(group)::type;
      forward_row_pair<P>(in + y * stride_y + lane * stride_c, stride_y, stride_x, stride_c,
                          y + 1 < h_in, w_in, lanes, spectrum + y * row_stride + lane, work);
    });
  for_each_lane_group<T>(lanes, [&](auto group, Index lane) {
    using P = typename decltype(group)::type;
    transform_columns<false, P>(h_in, height_, lanes, spectrum + lane, work);
  });
}

template <typename T>
void LevelFft2d<T>::inverse(T* spectrum, T* out, Index stride_y, Index stride_x, Index stride_c,
                            Index h_out, Index w_out, Index lanes, T* work) const {
  const Index row_stride = spectrum_width() * 2 * lanes;
  for_each_lane_group<T>(lanes, [&](auto group, Index lane) {
    using P = typename decltype(group)::type;
    transform_columns<true, P>(height_, h_out, lanes, spectrum + lane, work);
  });
  for (Index y = 0; y < h_out; y += 2)
    for_each_lane_group<T>(lanes, [&](auto group, Index lane) {
      using P = typename decltype(group)::type;
      inverse_row_pair<P>(spectrum + y * row_stride + lane, out + y * stride_y + lane * stride_c,
                          stride_y, stride_x, stride_c, y + 1 < h_out, w_out, lanes, work);
    });
}

}  // namespace fft

template <typename T>
void real_fft_2d(Index height, Index width, std::shared_ptr<const RealFft2dKernel<T>>& plan) {
  plan = std::make_shared<const fft::LevelFft2d<T>>(height, width);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
