// The real 2-D FFT backend (detail/fft.hpp) against tests/reference/fft_reference.hpp.
#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <vector>

#include "cpp/harness.hpp"
#include "detail/fft.hpp"
#include "foveal/core/tensor.hpp"
#include "reference/fft_reference.hpp"

namespace foveal {
namespace {

using detail::RealFft2d;
using test::describe;
using test::RandomSource;

// A transform grid, the part of it the input fills (forward) or the crop the inverse writes,
// the channels transformed together, and where they sit in memory.
struct FftCase {
  Index height, width, h_data, w_data, lanes;
  bool channels_last;  // [h, w, C] with the chunk inside wider channels; else [C, h, w]
};

// Sizes 1, primes on both sides of the direct-radix limit (31; 37, 97, 127, 251 go through
// Bluestein), smooth sizes, rectangles, zero padding / crops, lanes 1, 3, 16 and 33;
// channels-first rows of whole vectors plus a tail (the transposing loads), paired or not.
const FftCase kCases[] = {
    {1, 1, 1, 1, 1, true},          {2, 2, 2, 2, 3, true},          {3, 5, 3, 5, 16, false},
    {5, 7, 5, 7, 33, true},         {7, 11, 7, 11, 1, false},       {11, 13, 11, 13, 16, true},
    {13, 16, 13, 16, 3, true},      {16, 17, 16, 17, 33, false},    {17, 31, 17, 31, 16, true},
    {31, 37, 31, 37, 3, false},     {37, 48, 37, 48, 16, true},     {48, 60, 48, 60, 1, true},
    {64, 64, 32, 32, 16, true},     {60, 64, 30, 32, 33, false},    {97, 100, 97, 100, 3, true},
    {100, 128, 50, 64, 16, true},   {128, 128, 128, 128, 16, true}, {127, 251, 127, 251, 1, true},
    {243, 256, 243, 256, 1, false}, {256, 256, 128, 128, 16, true}, {64, 127, 64, 127, 16, true},
    {251, 16, 200, 10, 16, false},  {2, 1, 2, 1, 16, true},         {1, 9, 1, 9, 16, true},
    {74, 34, 37, 17, 16, true},     {162, 125, 81, 100, 3, true},   {40, 24, 33, 20, 8, false},
    {33, 40, 33, 40, 16, false},
};

// Where a [h, w] grid of `lanes` channels lives: channels-last inside a tensor of lanes + 5
// channels starting at channel 2, or channels-first behind one leading channel.
struct GridLayout {
  Index offset, stride_y, stride_x, stride_c, size;

  GridLayout(Index h, Index w, Index lanes, bool channels_last) {
    if (channels_last) {
      const Index channels = lanes + 5;
      offset = 2;
      stride_c = 1;
      stride_x = channels;
      stride_y = w * channels;
      size = h * w * channels;
    } else {
      offset = h * w;
      stride_x = 1;
      stride_y = w;
      stride_c = h * w;
      size = (lanes + 1) * h * w;
    }
  }
  Index at(Index y, Index x, Index c) const {
    return offset + y * stride_y + x * stride_x + c * stride_c;
  }
};

// The 64-byte-aligned scratch a call needs.
template <typename T>
Tensor<T, 1> make_work(const RealFft2d<T>& plan, Index lanes) {
  return Tensor<T, 1>({plan.work_size(lanes)});
}

// max |error| allowed relative to the largest reference value: float 1e-7, double 4e-16 per
// pass of log2(H W) (measured worst: 3.3e-7 for float at 64x127, 1.5e-15 for double at
// 127x251, both through Bluestein).
template <typename T>
double tolerance_for(const FftCase& shape) {
  const double passes = std::log2(static_cast<double>(shape.height * shape.width)) + 2;
  return (sizeof(T) == 4 ? 1e-7 : 4e-16) * passes;
}

// One case's random input in its layout and its forward transform.
template <typename T>
struct ForwardRun {
  GridLayout layout;
  std::vector<double> input;  // values representable in T
  std::vector<T> input_t;
  RealFft2d<T> plan;
  std::vector<T> spectrum;
  Tensor<T, 1> work;

  ForwardRun(const FftCase& shape, RandomSource& random)
      : layout(shape.h_data, shape.w_data, shape.lanes, shape.channels_last),
        input(test::round_to<T>(random.normal(layout.size))),
        input_t(test::convert<T>(input)),
        plan(shape.height, shape.width),
        spectrum(plan.spectrum_size(shape.lanes), T(-7)),
        work(make_work(plan, shape.lanes)) {
    plan.forward(input_t.data() + layout.offset, layout.stride_y, layout.stride_x, layout.stride_c,
                 shape.h_data, shape.w_data, shape.lanes, spectrum.data(), work.data());
  }
};

template <typename T>
std::string case_name(const FftCase& shape, std::uint64_t seed) {
  return describe(sizeof(T) == 4 ? "float" : "double", " seed=", seed, " H=", shape.height,
                  " W=", shape.width, " data=", shape.h_data, "x", shape.w_data,
                  " lanes=", shape.lanes,
                  shape.channels_last ? " channels-last" : " channels-first");
}

template <typename T>
void check_forward_matches_reference() {
  std::uint64_t seed = 100;
  for (const FftCase& shape : kCases) {
    RandomSource random(++seed);
    SCOPED_TRACE(case_name<T>(shape, seed));
    const ForwardRun<T> run(shape, random);
    const GridLayout& layout = run.layout;
    const std::vector<double>& input = run.input;
    const std::vector<T>& spectrum = run.spectrum;
    const Index spectrum_width = run.plan.spectrum_width();
    std::vector<double> got, want;
    for (Index c = 0; c < shape.lanes; ++c) {
      std::vector<double> channel(shape.h_data * shape.w_data);
      for (Index y = 0; y < shape.h_data; ++y)
        for (Index x = 0; x < shape.w_data; ++x)
          channel[y * shape.w_data + x] = input[layout.at(y, x, c)];
      const std::vector<std::complex<double>> reference = reference::rfft2_reference(
          channel, shape.h_data, shape.w_data, shape.height, shape.width);
      for (Index bin = 0; bin < shape.height * spectrum_width; ++bin) {
        got.push_back(spectrum[(bin * 2 + 0) * shape.lanes + c]);
        got.push_back(spectrum[(bin * 2 + 1) * shape.lanes + c]);
        want.push_back(reference[bin].real());
        want.push_back(reference[bin].imag());
      }
    }
    EXPECT_TRUE(test::matches_reference(got, want, tolerance_for<T>(shape)));
  }
}

TEST(Fft, ForwardMatchesReferenceFloat) { check_forward_matches_reference<float>(); }
TEST(Fft, ForwardMatchesReferenceDouble) { check_forward_matches_reference<double>(); }

// The inverse of an arbitrary (non-Hermitian) spectrum, cropped, equals numpy's irfft2: the
// imaginary parts of the kx = 0 and Nyquist bins after the transform along y are dropped.
template <typename T>
void check_inverse_matches_irfft2_convention() {
  std::uint64_t seed = 200;
  for (const FftCase& shape : kCases) {
    RandomSource random(++seed);
    SCOPED_TRACE(case_name<T>(shape, seed));
    const RealFft2d<T> plan(shape.height, shape.width);
    const Index spectrum_width = plan.spectrum_width();
    const std::vector<double> spectrum_values =
        test::round_to<T>(random.normal(plan.spectrum_size(shape.lanes)));
    std::vector<T> spectrum = test::convert<T>(spectrum_values);
    const GridLayout layout(shape.h_data, shape.w_data, shape.lanes, shape.channels_last);
    std::vector<T> out(layout.size, T(-7));
    Tensor<T, 1> work = make_work(plan, shape.lanes);
    plan.inverse(spectrum.data(), out.data() + layout.offset, layout.stride_y, layout.stride_x,
                 layout.stride_c, shape.h_data, shape.w_data, shape.lanes, work.data());

    std::vector<double> got, want;
    for (Index c = 0; c < shape.lanes; ++c) {
      std::vector<std::complex<double>> channel(shape.height * spectrum_width);
      for (Index bin = 0; bin < shape.height * spectrum_width; ++bin)
        channel[bin] = {spectrum_values[(bin * 2 + 0) * shape.lanes + c],
                        spectrum_values[(bin * 2 + 1) * shape.lanes + c]};
      const std::vector<double> reference =
          reference::irfft2_reference(channel, shape.height, shape.width);
      for (Index y = 0; y < shape.h_data; ++y)
        for (Index x = 0; x < shape.w_data; ++x) {
          got.push_back(out[layout.at(y, x, c)]);
          want.push_back(reference[y * shape.width + x]);
        }
    }
    EXPECT_TRUE(test::matches_reference(got, want, tolerance_for<T>(shape)));
    // Nothing outside the crop's channels was written.
    for (Index i = 0; i < layout.size; ++i) {
      const Index c =
          shape.channels_last ? i % (shape.lanes + 5) - 2 : i / (shape.h_data * shape.w_data) - 1;
      if (c < 0 || c >= shape.lanes) {
        ASSERT_EQ(out[i], T(-7)) << "wrote outside at " << i;
      }
    }
  }
}

TEST(Fft, InverseMatchesIrfft2ConventionFloat) { check_inverse_matches_irfft2_convention<float>(); }
TEST(Fft, InverseMatchesIrfft2ConventionDouble) {
  check_inverse_matches_irfft2_convention<double>();
}

// inverse(forward(x)) cropped to the data is x, for periodic and zero-padded grids.
template <typename T>
void check_round_trip() {
  std::uint64_t seed = 300;
  for (const FftCase& shape : kCases) {
    RandomSource random(++seed);
    SCOPED_TRACE(case_name<T>(shape, seed));
    ForwardRun<T> run(shape, random);
    const GridLayout& layout = run.layout;
    std::vector<T> out(run.input_t);
    run.plan.inverse(run.spectrum.data(), out.data() + layout.offset, layout.stride_y,
                     layout.stride_x, layout.stride_c, shape.h_data, shape.w_data, shape.lanes,
                     run.work.data());
    EXPECT_TRUE(test::matches_reference(std::vector<double>(out.begin(), out.end()), run.input,
                                        tolerance_for<T>(shape)));
  }
}

TEST(Fft, InverseOfForwardIsIdentityFloat) { check_round_trip<float>(); }
TEST(Fft, InverseOfForwardIsIdentityDouble) { check_round_trip<double>(); }

TEST(Fft, SpectrumGeometry) {
  const RealFft2d<float> plan(6, 9);
  EXPECT_EQ(plan.height(), 6);
  EXPECT_EQ(plan.width(), 9);
  EXPECT_EQ(plan.spectrum_width(), 5);
  EXPECT_EQ(plan.spectrum_size(3), 6 * 5 * 2 * 3);
  EXPECT_GT(plan.work_size(3), 0);
}

TEST(Fft, RejectsEmptyGrid) {
  EXPECT_TRUE(test::throws_error_with([] { RealFft2d<float>(0, 4); }, {"height must be >= 1"}));
  EXPECT_TRUE(test::throws_error_with([] { RealFft2d<double>(4, 0); }, {"width must be >= 1"}));
}

}  // namespace
}  // namespace foveal
