// detail::RealFft2d (detail/fft.hpp): the checks, then the plan of the ISA level in use
// (src/kernels/fft.hpp).
#include "detail/fft.hpp"

#include "detail/kernels.hpp"
#include "foveal/core/error.hpp"

namespace foveal::detail {

template <typename T>
RealFft2d<T>::RealFft2d(Index height, Index width) : height_(height), width_(width) {
  check(height >= 1, "RealFft2d: height must be >= 1, got ", height);
  check(width >= 1, "RealFft2d: width must be >= 1, got ", width);
  kernels<T>().real_fft_2d(height, width, kernel_);
}

template class RealFft2d<float>;
template class RealFft2d<double>;

}  // namespace foveal::detail
