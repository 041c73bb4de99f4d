// src/kernels/pde_ssm.hpp — the PDE-SSM kernels of one ISA level on one chunk's spectrum (split
// complex, [bin][re, im][lane]; included by level.cpp): the multiplier of the forward and the
// backward's fused moments-and-adjoint pass. src/pde_ssm.cpp plans the chunks and runs the FFT.
#pragma once

#include <algorithm>

#include "detail/fft.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {
namespace pde {

// (re, im) *= (m_re, m_im), or by its conjugate: one place, so that every pass rounds alike.
template <typename T, bool kConjugate>
inline void multiply_complex(T& re, T& im, T m_re, T m_im) {
  const T a = re, b = im;
  if constexpr (kConjugate) {
    re = a * m_re + b * m_im;
    im = b * m_re - a * m_im;
  } else {
    re = a * m_re - b * m_im;
    im = b * m_re + a * m_im;
  }
}

// spectrum *= table, bin by bin (conj(table) when `kConjugate`).
template <typename T, bool kConjugate>
void multiply_bins(T* __restrict spectrum, const T* __restrict table, Index bins, Index lanes) {
  for (Index bin = 0; bin < bins; ++bin) {
    T* __restrict re = spectrum + 2 * bin * lanes;
    T* __restrict im = re + lanes;
    const T* __restrict m_re = table + 2 * bin * lanes;
    const T* __restrict m_im = m_re + lanes;
    for (Index lane = 0; lane < lanes; ++lane)
      multiply_complex<T, kConjugate>(re[lane], im[lane], m_re[lane], m_im[lane]);
  }
}

// Per lane, with P = conj(ĝ) û, m = table − D, A = ∂m/∂λ P, sums over the half spectrum with
// column weights w: Σ w Re A, Σ w Re A ky², Σ w Re A ky kx, Σ w Re A kx², Σ w Im A ky,
// Σ w Im A kx, Σ w Re(m P), Σ w Re P (lane-major: moments[lane * kPdeMomentCount + j]). Then
// replaces ĝ by conj(table) ĝ, the spectrum of grad_x. Row sums run in T, totals in double.
template <typename T, bool kForced>
void moments_and_adjoint_of(const PdeMomentPass<T>& pass, T* __restrict spectrum_g,
                            const T* __restrict spectrum_u, double* moments) {
  constexpr Index kMaxLanes = RealFft2d<T>::kPreferredLanes;
  const Index lanes = pass.lanes;
  std::fill(moments, moments + lanes * kPdeMomentCount, 0.0);
  for (Index row = 0; row < pass.rows; ++row) {
    T re_a[kMaxLanes] = {}, re_a_k[kMaxLanes] = {}, re_a_kk[kMaxLanes] = {};
    T im_a[kMaxLanes] = {}, im_a_k[kMaxLanes] = {}, re_mp[kMaxLanes] = {}, re_p[kMaxLanes] = {};
    for (Index column = 0; column < pass.columns; ++column) {
      const Index offset = 2 * (row * pass.columns + column) * lanes;
      T* __restrict g_re = spectrum_g + offset;
      T* __restrict g_im = g_re + lanes;
      const T* __restrict u_re = spectrum_u + offset;
      const T* __restrict u_im = u_re + lanes;
      const T* __restrict m_re = pass.multiplier + offset;
      const T* __restrict m_im = m_re + lanes;
      const T weight = pass.column_weight[column];
      const T weight_k = pass.column_weight_k[column];
      const T weight_kk = pass.column_weight_kk[column];
      for (Index lane = 0; lane < lanes; ++lane) {
        const T gr = g_re[lane], gi = g_im[lane], ur = u_re[lane], ui = u_im[lane];
        const T p_re = gr * ur + gi * ui, p_im = gr * ui - gi * ur;
        const T mr = m_re[lane] - pass.skip[lane], mi = m_im[lane];
        T dr, di;
        if constexpr (kForced) {
          dr = pass.derivative[offset + lane];
          di = pass.derivative[offset + lanes + lane];
        } else {
          dr = pass.time[lane] * mr;
          di = pass.time[lane] * mi;
        }
        const T a_re = dr * p_re - di * p_im, a_im = dr * p_im + di * p_re;
        re_a[lane] += weight * a_re;
        re_a_k[lane] += weight_k * a_re;
        re_a_kk[lane] += weight_kk * a_re;
        im_a[lane] += weight * a_im;
        im_a_k[lane] += weight_k * a_im;
        re_mp[lane] += weight * (mr * p_re - mi * p_im);
        re_p[lane] += weight * p_re;
        // grad spectrum: conj(table) ĝ.
        multiply_complex<T, true>(g_re[lane], g_im[lane], m_re[lane], m_im[lane]);
      }
    }
    const double k_y = pass.row_k[row];
    for (Index lane = 0; lane < lanes; ++lane) {
      double* sums = moments + lane * kPdeMomentCount;
      sums[0] += re_a[lane];
      sums[1] += k_y * k_y * re_a[lane];
      sums[2] += k_y * re_a_k[lane];
      sums[3] += re_a_kk[lane];
      sums[4] += k_y * im_a[lane];
      sums[5] += im_a_k[lane];
      sums[6] += re_mp[lane];
      sums[7] += re_p[lane];
    }
  }
}

}  // namespace pde

template <typename T>
void pde_multiply_spectrum(T* spectrum, const T* table, Index bins, Index lanes, bool conjugate) {
  if (conjugate) {
    pde::multiply_bins<T, true>(spectrum, table, bins, lanes);
  } else {
    pde::multiply_bins<T, false>(spectrum, table, bins, lanes);
  }
}

template <typename T>
void pde_moments_and_adjoint(const PdeMomentPass<T>& pass, T* spectrum_g, const T* spectrum_u,
                             double* moments) {
  if (pass.derivative != nullptr) {
    pde::moments_and_adjoint_of<T, true>(pass, spectrum_g, spectrum_u, moments);
  } else {
    pde::moments_and_adjoint_of<T, false>(pass, spectrum_g, spectrum_u, moments);
  }
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
