// The PDE-SSM block (docs/pde_ssm.md) against tests/reference/pde_ssm_reference.hpp (a direct
// O(N²) convolution, no FFT), its physics (mean conservation, smoothing, exact shifts, no
// wrap-around with the zero boundary, τ → 0), its backward against finite differences, thread
// counts, and rejected input.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpp/harness.hpp"
#include "foveal/ssm/pde_ssm.hpp"
#include "reference/pde_ssm_reference.hpp"

namespace foveal {
namespace {

using reference::PdeChannel;
using test::describe;
using test::RandomSource;
using test::throws_error_with;

// Parameter values in double (rounded to the kernel's type where they meet it), each tensor
// with its own group count.
struct Parameters {
  Index diffusion_groups = 1, velocity_groups = 1, reaction_groups = 1, time_groups = 1;
  Index skip_groups = 0;  // 0: no skip
  std::vector<double> diffusion, velocity, reaction, time, skip;

  // Random values for C channels: every group count drawn from the divisors of C.
  static Parameters random(RandomSource& random, Index channels, bool with_skip) {
    std::vector<Index> divisors;
    for (Index g = 1; g <= channels; ++g)
      if (channels % g == 0) divisors.push_back(g);
    Parameters p;
    p.diffusion_groups = random.pick(divisors);
    p.velocity_groups = random.pick(divisors);
    p.reaction_groups = random.pick(divisors);
    p.time_groups = random.pick(divisors);
    p.skip_groups = with_skip ? random.pick(divisors) : 0;
    p.diffusion = random.normal(static_cast<std::size_t>(3 * p.diffusion_groups), 0, 0.7);
    p.velocity = random.normal(static_cast<std::size_t>(2 * p.velocity_groups), 0, 1.5);
    p.reaction = random.uniform(static_cast<std::size_t>(p.reaction_groups), -0.5, 0.2);
    p.time = random.uniform(static_cast<std::size_t>(p.time_groups), 0.2, 1.5);
    p.skip = random.normal(static_cast<std::size_t>(p.skip_groups), 0, 1);
    return p;
  }

  // One group for everything: K, b, r, τ, no skip.
  static Parameters uniform(std::array<double, 3> k, std::array<double, 2> b, double r,
                            double tau) {
    Parameters p;
    p.diffusion = {k[0], k[1], k[2]};
    p.velocity = {b[0], b[1]};
    p.reaction = {r};
    p.time = {tau};
    return p;
  }

  // Values rounded to T, as a T kernel sees them.
  template <typename T>
  Parameters rounded() const {
    Parameters p = *this;
    for (auto* values : {&p.diffusion, &p.velocity, &p.reaction, &p.time, &p.skip})
      *values = test::round_to<T>(*values);
    return p;
  }

  // The per-channel PDEs the reference reads.
  std::vector<PdeChannel> channels(Index count, PdeSsmDiffusionForm parameterization) const {
    std::vector<PdeChannel> result(static_cast<std::size_t>(count));
    const auto entry = [count](const std::vector<double>& values, Index groups, Index c,
                               Index columns, Index column) {
      return values[static_cast<std::size_t>(c / (count / groups) * columns + column)];
    };
    for (Index c = 0; c < count; ++c) {
      PdeChannel& pde = result[static_cast<std::size_t>(c)];
      const double first = entry(diffusion, diffusion_groups, c, 3, 0);
      const double second = entry(diffusion, diffusion_groups, c, 3, 1);
      const double third = entry(diffusion, diffusion_groups, c, 3, 2);
      if (parameterization == PdeSsmDiffusionForm::raw) {
        pde.k_yy = first, pde.k_xy = second, pde.k_xx = third;
      } else {
        pde.k_yy = first * first, pde.k_xy = first * second;
        pde.k_xx = second * second + third * third;
      }
      pde.b_y = entry(velocity, velocity_groups, c, 2, 0);
      pde.b_x = entry(velocity, velocity_groups, c, 2, 1);
      pde.reaction = entry(reaction, reaction_groups, c, 1, 0);
      pde.time = entry(time, time_groups, c, 1, 0);
      pde.skip = skip_groups > 0 ? entry(skip, skip_groups, c, 1, 0) : 0;
    }
    return result;
  }

  // With diffusion read raw: K = L Lᵀ of the Cholesky values.
  Parameters as_raw() const {
    Parameters p = *this;
    for (Index g = 0; g < diffusion_groups; ++g) {
      const double l_yy = diffusion[3 * g], l_xy = diffusion[3 * g + 1];
      const double l_xx = diffusion[3 * g + 2];
      p.diffusion[3 * g] = l_yy * l_yy;
      p.diffusion[3 * g + 1] = l_yy * l_xy;
      p.diffusion[3 * g + 2] = l_xy * l_xy + l_xx * l_xx;
    }
    return p;
  }
};

// T copies of Parameters and the views the kernel reads.
template <typename T>
struct TypedParameters {
  explicit TypedParameters(const Parameters& p)
      : source(p),
        diffusion(test::convert<T>(p.diffusion)),
        velocity(test::convert<T>(p.velocity)),
        reaction(test::convert<T>(p.reaction)),
        time(test::convert<T>(p.time)),
        skip(test::convert<T>(p.skip)) {}

  PdeSsmParameters<T> views() const {
    PdeSsmParameters<T> views;
    views.diffusion = TensorView<const T, 2>(diffusion.data(), {source.diffusion_groups, 3});
    views.velocity = TensorView<const T, 2>(velocity.data(), {source.velocity_groups, 2});
    views.reaction = TensorView<const T, 1>(reaction.data(), {source.reaction_groups});
    views.time = TensorView<const T, 1>(time.data(), {source.time_groups});
    if (source.skip_groups > 0)
      views.skip = TensorView<const T, 1>(skip.data(), {source.skip_groups});
    return views;
  }

  Parameters source;
  std::vector<T> diffusion, velocity, reaction, time, skip;
};

// The gradients of every parameter of `p`, as buffers and views.
template <typename T>
struct GradientBuffers {
  explicit GradientBuffers(const Parameters& p)
      : source(p),
        diffusion(p.diffusion.size(), T(-7)),
        velocity(p.velocity.size(), T(-7)),
        reaction(p.reaction.size(), T(-7)),
        time(p.time.size(), T(-7)),
        skip(p.skip.size(), T(-7)) {}

  PdeSsmGradients<T> views() {
    PdeSsmGradients<T> views;
    views.diffusion = TensorView<T, 2>(diffusion.data(), {source.diffusion_groups, 3});
    views.velocity = TensorView<T, 2>(velocity.data(), {source.velocity_groups, 2});
    views.reaction = TensorView<T, 1>(reaction.data(), {source.reaction_groups});
    views.time = TensorView<T, 1>(time.data(), {source.time_groups});
    if (source.skip_groups > 0) views.skip = TensorView<T, 1>(skip.data(), {source.skip_groups});
    return views;
  }
  // All gradients in one list: diffusion, velocity, reaction, time, skip.
  std::vector<double> all() const {
    std::vector<double> values;
    for (const auto* part : {&diffusion, &velocity, &reaction, &time, &skip})
      values.insert(values.end(), part->begin(), part->end());
    return values;
  }

  Parameters source;
  std::vector<T> diffusion, velocity, reaction, time, skip;
};

// A [B, H, W, C] tensor in channels-last memory or in [B, C, H, W] memory seen through
// channels_first_as_last.
template <typename T>
struct GridTensor {
  GridTensor(const test::Shape<4>& shape, bool channels_first, T fill = T(0))
      : storage(static_cast<std::size_t>(test::shape_numel<4>(shape)), fill) {
    const auto [b, h, w, c] = shape;
    view = channels_first ? channels_first_as_last(TensorView<T, 4>(storage.data(), {b, c, h, w}))
                          : TensorView<T, 4>(storage.data(), shape);
  }
  GridTensor(const std::vector<double>& values, const test::Shape<4>& shape, bool channels_first)
      : GridTensor(shape, channels_first) {
    test::scatter(values, view);
  }
  TensorView<const T, 4> const_view() const { return view; }

  std::vector<T> storage;
  TensorView<T, 4> view;
};

PdeSsmOptions make_options(PdeSsmMode mode, PdeSsmBoundary boundary,
                           PdeSsmDiffusionForm diffusion_form = PdeSsmDiffusionForm::cholesky) {
  PdeSsmOptions options;
  options.mode = mode;
  options.boundary = boundary;
  options.diffusion_form = diffusion_form;
  return options;
}

std::string options_string(const PdeSsmOptions& options) {
  return describe(options.mode == PdeSsmMode::forced ? "forced" : "initial_value", "/",
                  options.boundary == PdeSsmBoundary::zero ? "zero" : "periodic", "/",
                  options.diffusion_form == PdeSsmDiffusionForm::raw ? "raw" : "cholesky");
}

// foveal's forward of `x` [B, H, W, C] (logical order) in the given memory layout, as double.
template <typename T>
std::vector<double> run_forward(const std::vector<double>& x, const test::Shape<4>& shape,
                                const Parameters& p, const PdeSsmOptions& options,
                                bool channels_first, int num_threads = 2) {
  const GridTensor<T> input(x, shape, channels_first);
  GridTensor<T> out(shape, !channels_first, T(-7));
  const TypedParameters<T> typed(p);
  pde_ssm(input.const_view(), typed.views(), out.view, options, num_threads);
  return test::gather(out.view);
}

std::vector<double> run_reference(const std::vector<double>& x, const test::Shape<4>& shape,
                                  const Parameters& p, const PdeSsmOptions& options,
                                  bool adjoint = false) {
  const auto [batch, height, width, channels] = shape;
  return reference::pde_ssm_reference(x, batch, height, width,
                                      p.channels(channels, options.diffusion_form), options.mode,
                                      options.boundary, adjoint);
}

// Normalized error bound of a T forward against the float64 reference.
template <typename T>
double forward_tolerance() {
  return std::is_same_v<T, float> ? 3e-6 : 1e-12;
}

constexpr PdeSsmMode kModes[] = {PdeSsmMode::initial_value, PdeSsmMode::forced};
constexpr PdeSsmBoundary kBoundaries[] = {PdeSsmBoundary::periodic, PdeSsmBoundary::zero};
const Index kExtents[] = {1, 2, 3, 5, 7, 8, 11, 12};

template <typename T>
void check_against_reference() {
  std::uint64_t seed = 600;
  for (int round = 0; round < 6; ++round)
    for (PdeSsmMode mode : kModes)
      for (PdeSsmBoundary boundary : kBoundaries)
        for (bool channels_first : {false, true}) {
          RandomSource random(++seed);
          const test::Shape<4> shape = {
              random.integer(1, 2), random.pick(kExtents), random.pick(kExtents),
              random.pick({Index{1}, Index{3}, Index{6}, Index{17}, Index{36}, Index{40}})};
          const PdeSsmDiffusionForm parameterization =
              random.chance(0.5) ? PdeSsmDiffusionForm::raw : PdeSsmDiffusionForm::cholesky;
          const PdeSsmOptions options = make_options(mode, boundary, parameterization);
          Parameters p = Parameters::random(random, shape[3], random.chance(0.5));
          if (parameterization == PdeSsmDiffusionForm::raw) p = p.as_raw();
          p = p.rounded<T>();
          SCOPED_TRACE(describe("seed=", seed, " shape=", test::shape_string(shape), " ",
                                options_string(options), channels_first ? " [B,C,H,W]" : ""));
          const std::vector<double> x =
              test::round_to<T>(random.normal(test::shape_numel<4>(shape)));
          EXPECT_TRUE(test::matches_reference(run_forward<T>(x, shape, p, options, channels_first),
                                              run_reference(x, shape, p, options),
                                              forward_tolerance<T>()));
        }
}

TEST(PdeSsm, MatchesDirectConvolutionReferenceFloat) { check_against_reference<float>(); }
TEST(PdeSsm, MatchesDirectConvolutionReferenceDouble) { check_against_reference<double>(); }

TEST(PdeSsm, ClassReusesItsMultiplierAndMatchesTheFreeFunction) {
  RandomSource random(41);
  const test::Shape<4> shape = {3, 9, 6, 20};
  const Parameters p = Parameters::random(random, shape[3], true).rounded<float>();
  const TypedParameters<float> typed(p);
  for (PdeSsmBoundary boundary : kBoundaries) {
    const PdeSsmOptions options = make_options(PdeSsmMode::forced, boundary);
    const PdeSsm<float> block(shape[1], shape[2], shape[3], typed.views(), options);
    EXPECT_EQ(block.transform_height(), boundary == PdeSsmBoundary::zero ? 18 : 9);
    EXPECT_EQ(block.transform_width(), boundary == PdeSsmBoundary::zero ? 12 : 6);
    for (int call = 0; call < 2; ++call) {
      const std::vector<double> x = test::round_to<float>(random.normal(9 * 6 * 20 * 3));
      const GridTensor<float> input(x, shape, false);
      GridTensor<float> out(shape, false);
      block.forward(input.const_view(), out.view);
      EXPECT_TRUE(test::bitwise_equal(test::gather(out.view),
                                      run_forward<float>(x, shape, p, options, false)));
    }
  }
}

// The free functions on an empty batch check their arguments but build nothing: a grid of
// 4 × (2^31 + 1) × 3 would need a table and a transform plan of hundreds of GB.
TEST(PdeSsm, FreeFunctionsOnAnEmptyBatchBuildNoTable) {
  RandomSource random(43);
  const Parameters p = Parameters::random(random, 3, true).rounded<float>();
  const TypedParameters<float> typed(p);
  const PdeSsmOptions options = make_options(PdeSsmMode::forced, PdeSsmBoundary::periodic);
  const Index width = (Index{1} << 31) + 1;
  const TensorView<const float, 4> x(nullptr, {0, 4, width, 3});
  const TensorView<float, 4> out(nullptr, {0, 4, width, 3});
  pde_ssm(x, typed.views(), out, options);
  pde_ssm_backward(x, x, typed.views(), TensorView<float, 4>(nullptr, {0, 4, width, 3}), {},
                   options);
  // Still checked: a parameter that does not fit the channels.
  const Parameters wrong = Parameters::random(random, 2, true).rounded<float>();
  const TypedParameters<float> wrong_typed(wrong);
  EXPECT_THROW(pde_ssm(x, wrong_typed.views(), out, options), foveal::Error);
}

// ---------------------------------------------------------------------------------------------
// Physics.

// Mean of every (b, c) grid of x [B, H, W, C].
std::vector<double> grid_means(const std::vector<double>& x, const test::Shape<4>& shape) {
  const auto [batch, height, width, channels] = shape;
  std::vector<double> means(static_cast<std::size_t>(batch * channels), 0.0);
  for (Index i = 0; i < static_cast<Index>(x.size()); ++i)
    means[static_cast<std::size_t>(i / (height * width * channels) * channels + i % channels)] +=
        x[static_cast<std::size_t>(i)] / static_cast<double>(height * width);
  return means;
}

// Σ x² and Σ of squared differences of periodic neighbours (the roughness) over all of x.
std::array<double, 2> energy_and_roughness(const std::vector<double>& x,
                                           const test::Shape<4>& shape) {
  const auto [batch, height, width, channels] = shape;
  const auto at = [&](Index b, Index y, Index x_, Index c) {
    return x[static_cast<std::size_t>(((b * height + y) * width + x_) * channels + c)];
  };
  double energy = 0, roughness = 0;
  for (Index b = 0; b < batch; ++b)
    for (Index y = 0; y < height; ++y)
      for (Index x_ = 0; x_ < width; ++x_)
        for (Index c = 0; c < channels; ++c) {
          const double value = at(b, y, x_, c);
          energy += value * value;
          const double down = at(b, (y + 1) % height, x_, c) - value;
          const double right = at(b, y, (x_ + 1) % width, c) - value;
          roughness += down * down + right * right;
        }
  return {energy, roughness};
}

TEST(PdeSsm, DiffusionConservesTheMeanAndSmooths) {
  std::uint64_t seed = 700;
  for (int round = 0; round < 8; ++round) {
    RandomSource random(++seed);
    const test::Shape<4> shape = {2, random.integer(3, 16), random.integer(3, 16), 5};
    Parameters p = Parameters::random(random, shape[3], false);
    for (double& r : p.reaction) r = random.chance(0.5) ? 0.0 : -std::abs(r);
    SCOPED_TRACE(describe("seed=", seed, " shape=", test::shape_string(shape)));
    const std::vector<double> x = random.normal(test::shape_numel<4>(shape));
    const auto [energy_in, roughness_in] = energy_and_roughness(x, shape);
    for (PdeSsmBoundary boundary : kBoundaries) {
      const PdeSsmOptions options = make_options(PdeSsmMode::initial_value, boundary);
      const std::vector<double> y = run_forward<double>(x, shape, p, options, false);
      const auto [energy_out, roughness_out] = energy_and_roughness(y, shape);
      EXPECT_LE(energy_out, energy_in * (1 + 1e-12)) << "energy grew, r <= 0";
      if (boundary == PdeSsmBoundary::zero) continue;
      EXPECT_LE(roughness_out, roughness_in * (1 + 1e-12)) << "periodic diffusion roughened";
      // Convection and diffusion move mass around; only the reaction changes the mean.
      const std::vector<double> means_in = grid_means(x, shape), means_out = grid_means(y, shape);
      for (std::size_t i = 0; i < means_in.size(); ++i) {
        const PdeChannel pde =
            p.channels(shape[3], PdeSsmDiffusionForm::cholesky)[i % static_cast<std::size_t>(5)];
        EXPECT_NEAR(means_out[i], means_in[i] * std::exp(pde.time * pde.reaction), 1e-12);
      }
    }
  }
}

// x [B, H, W, C] shifted by (dy, dx): periodic wraps around, zero lets zeros enter.
std::vector<double> shifted(const std::vector<double>& x, const test::Shape<4>& shape, Index dy,
                            Index dx, bool periodic) {
  const auto [batch, height, width, channels] = shape;
  std::vector<double> out(x.size(), 0.0);
  for (Index b = 0; b < batch; ++b)
    for (Index y = 0; y < height; ++y)
      for (Index x_ = 0; x_ < width; ++x_) {
        Index y_from = y - dy, x_from = x_ - dx;
        if (periodic) {
          y_from = (y_from % height + height) % height;
          x_from = (x_from % width + width) % width;
        } else if (y_from < 0 || y_from >= height || x_from < 0 || x_from >= width) {
          continue;
        }
        for (Index c = 0; c < channels; ++c)
          out[static_cast<std::size_t>(((b * height + y) * width + x_) * channels + c)] =
              x[static_cast<std::size_t>(((b * height + y_from) * width + x_from) * channels + c)];
      }
  return out;
}

template <typename T>
void check_integer_shifts() {
  const double tolerance = std::is_same_v<T, float> ? 2e-6 : 1e-13;
  std::uint64_t seed = 800;
  for (const auto& [height, width] : {std::array<Index, 2>{8, 8}, {7, 12}, {13, 5}, {1, 9}}) {
    for (const auto& [dy, dx] : {std::array<Index, 2>{2, -3}, {-1, 1}, {0, 4}}) {
      RandomSource random(++seed);
      const test::Shape<4> shape = {2, height, width, 3};
      const double tau = 0.5;
      // u(x, τ) = u(x − b τ): velocity (dy, dx) / τ moves the field by (dy, dx) cells.
      const Parameters p = Parameters::uniform({0, 0, 0}, {dy / tau, dx / tau}, 0, tau);
      const std::vector<double> x = test::round_to<T>(random.normal(test::shape_numel<4>(shape)));
      SCOPED_TRACE(describe("seed=", seed, " shape=", test::shape_string(shape), " shift=(", dy,
                            ", ", dx, ")"));
      for (PdeSsmBoundary boundary : kBoundaries) {
        const PdeSsmOptions options = make_options(PdeSsmMode::initial_value, boundary);
        // The zero boundary transforms on 2H × 2W: shifts shorter than the grid never wrap.
        const bool periodic = boundary == PdeSsmBoundary::periodic;
        if (!periodic && (std::abs(dy) >= height || std::abs(dx) >= width)) continue;
        EXPECT_TRUE(test::matches_reference(run_forward<T>(x, shape, p, options, true),
                                            shifted(x, shape, dy, dx, periodic), tolerance))
            << (periodic ? "periodic" : "zero boundary");
      }
    }
  }
}

TEST(PdeSsm, IntegerConvectionShiftsExactlyFloat) { check_integer_shifts<float>(); }
TEST(PdeSsm, IntegerConvectionShiftsExactlyDouble) { check_integer_shifts<double>(); }

TEST(PdeSsm, ZeroBoundaryKeepsDiffusionFromWrappingAround) {
  // A unit impulse in the corner diffusing: periodic puts mass in the opposite corners, the
  // zero boundary (a linear convolution) only what the kernel's far tail carries.
  const test::Shape<4> shape = {1, 12, 12, 1};
  std::vector<double> x(144, 0.0);
  x[0] = 1;
  const Parameters p = Parameters::uniform({1.2, 0, 1.2}, {0, 0}, 0, 1);
  const auto corner_mass = [](const std::vector<double>& y) {
    return std::abs(y[11]) + std::abs(y[11 * 12]) + std::abs(y[143]);
  };
  const double periodic = corner_mass(run_forward<double>(
      x, shape, p, make_options(PdeSsmMode::initial_value, PdeSsmBoundary::periodic), false));
  const double zero = corner_mass(run_forward<double>(
      x, shape, p, make_options(PdeSsmMode::initial_value, PdeSsmBoundary::zero), false));
  EXPECT_GT(periodic, 0.05);
  EXPECT_LT(zero, 1e-3 * periodic);
}

TEST(PdeSsm, VanishingTimeIsTheIdentity) {
  RandomSource random(901);
  const test::Shape<4> shape = {2, 7, 10, 4};
  Parameters p = Parameters::random(random, shape[3], false);
  for (double& tau : p.time) tau = 1e-9;
  const std::vector<double> x = random.normal(test::shape_numel<4>(shape));
  for (PdeSsmBoundary boundary : kBoundaries) {
    // Initial value: y → x. Forced: y ≈ τ x (the input held for a vanishing time).
    const std::vector<double> y_initial =
        run_forward<double>(x, shape, p, make_options(PdeSsmMode::initial_value, boundary), false);
    EXPECT_TRUE(test::matches_reference(y_initial, x, 1e-7));
    std::vector<double> y_forced =
        run_forward<double>(x, shape, p, make_options(PdeSsmMode::forced, boundary), false);
    for (double& value : y_forced) value /= 1e-9;
    EXPECT_TRUE(test::matches_reference(y_forced, x, 1e-7));
  }
}

TEST(PdeSsm, ForcedModeIsExactWhereTheSymbolVanishes) {
  // K = 0, b = 0: m = τ φ(τ r) everywhere, which must not lose digits as τ r → 0.
  const test::Shape<4> shape = {1, 4, 6, 2};
  RandomSource random(902);
  const std::vector<double> x = random.normal(test::shape_numel<4>(shape));
  for (double r : {0.0, 1e-15, -3e-9, 2e-4, -0.7}) {
    const double tau = 1.5;
    const Parameters p = Parameters::uniform({0, 0, 0}, {0, 0}, r, tau);
    const double factor = r == 0 ? tau : std::expm1(tau * r) / r;
    std::vector<double> expected = x;
    for (double& value : expected) value *= factor;
    EXPECT_TRUE(test::matches_reference(
        run_forward<double>(x, shape, p, make_options(PdeSsmMode::forced, PdeSsmBoundary::periodic),
                            false),
        expected, 1e-14))
        << "r = " << r;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

// foveal's backward as double: {grad_x, all parameter gradients}.
template <typename T>
std::array<std::vector<double>, 2> run_backward(const std::vector<double>& x,
                                                const std::vector<double>& grad_out,
                                                const test::Shape<4>& shape, const Parameters& p,
                                                const PdeSsmOptions& options, bool channels_first,
                                                int num_threads = 2) {
  const GridTensor<T> input(x, shape, channels_first), grad(grad_out, shape, !channels_first);
  GridTensor<T> grad_x(shape, channels_first, T(-7));
  const TypedParameters<T> typed(p);
  GradientBuffers<T> gradients(p);
  pde_ssm_backward(input.const_view(), grad.const_view(), typed.views(), grad_x.view,
                   gradients.views(), options, num_threads);
  return {test::gather(grad_x.view), gradients.all()};
}

// Central differences of L = <grad_out, reference(x; θ)> over every parameter value.
std::vector<double> finite_difference_gradients(const std::vector<double>& x,
                                                const std::vector<double>& grad_out,
                                                const test::Shape<4>& shape, const Parameters& p,
                                                const PdeSsmOptions& options) {
  const auto loss = [&](const Parameters& q) {
    const std::vector<double> y = run_reference(x, shape, q, options);
    double sum = 0;
    for (std::size_t i = 0; i < y.size(); ++i) sum += grad_out[i] * y[i];
    return sum;
  };
  std::vector<double> gradients;
  Parameters probe = p;
  for (auto* values :
       {&probe.diffusion, &probe.velocity, &probe.reaction, &probe.time, &probe.skip})
    for (double& value : *values) {
      const double saved = value, step = 1e-5 * std::max(1.0, std::abs(saved));
      value = saved + step;
      const double up = loss(probe);
      value = saved - step;
      const double down = loss(probe);
      value = saved;
      gradients.push_back((up - down) / (2 * step));
    }
  return gradients;
}

TEST(PdeSsm, BackwardMatchesAdjointReferenceAndFiniteDifferences) {
  std::uint64_t seed = 1000;
  for (PdeSsmMode mode : kModes)
    for (PdeSsmBoundary boundary : kBoundaries)
      for (PdeSsmDiffusionForm parameterization :
           {PdeSsmDiffusionForm::cholesky, PdeSsmDiffusionForm::raw}) {
        RandomSource random(++seed);
        const test::Shape<4> shape = {2, random.pick(kExtents), random.pick(kExtents),
                                      random.pick({Index{1}, Index{4}, Index{6}})};
        const PdeSsmOptions options = make_options(mode, boundary, parameterization);
        Parameters p = Parameters::random(random, shape[3], random.chance(0.7));
        if (parameterization == PdeSsmDiffusionForm::raw) p = p.as_raw();
        SCOPED_TRACE(describe("seed=", seed, " shape=", test::shape_string(shape), " ",
                              options_string(options)));
        const std::vector<double> x = random.normal(test::shape_numel<4>(shape));
        const std::vector<double> grad_out = random.normal(test::shape_numel<4>(shape));
        const auto [grad_x, gradients] =
            run_backward<double>(x, grad_out, shape, p, options, random.chance(0.5));
        EXPECT_TRUE(test::matches_reference(
            grad_x, run_reference(grad_out, shape, p, options, true), 1e-12));
        EXPECT_TRUE(test::matches_reference(
            gradients, finite_difference_gradients(x, grad_out, shape, p, options), 1e-7));
        // Float accumulates its moments in float rows: a looser bound against double.
        const auto [grad_x_float, gradients_float] =
            run_backward<float>(x, grad_out, shape, p.rounded<float>(), options, false);
        const auto [grad_x_rounded, gradients_rounded] =
            run_backward<double>(test::round_to<float>(x), test::round_to<float>(grad_out), shape,
                                 p.rounded<float>(), options, false);
        EXPECT_TRUE(test::matches_reference(grad_x_float, grad_x_rounded, 3e-6));
        EXPECT_TRUE(test::matches_reference(gradients_float, gradients_rounded, 2e-5));
      }
}

TEST(PdeSsm, BackwardComputesOnlyWhatIsAsked) {
  RandomSource random(1100);
  const test::Shape<4> shape = {2, 5, 6, 4};
  const Parameters p = Parameters::random(random, shape[3], true);
  const PdeSsmOptions options = make_options(PdeSsmMode::forced, PdeSsmBoundary::zero);
  const std::vector<double> x = random.normal(test::shape_numel<4>(shape));
  const std::vector<double> grad_out = random.normal(test::shape_numel<4>(shape));
  const auto [grad_x, gradients] = run_backward<double>(x, grad_out, shape, p, options, false);
  const TypedParameters<double> typed(p);
  const GridTensor<double> grad(grad_out, shape, false);
  // grad_x only: x is not read (a null view is fine).
  GridTensor<double> grad_x_only(shape, false);
  pde_ssm_backward(TensorView<const double, 4>(), grad.const_view(), typed.views(),
                   grad_x_only.view, PdeSsmGradients<double>{}, options);
  EXPECT_TRUE(test::bitwise_equal(test::gather(grad_x_only.view), grad_x));
  // Parameter gradients only.
  const GridTensor<double> input(x, shape, false);
  GradientBuffers<double> only_parameters(p);
  pde_ssm_backward(input.const_view(), grad.const_view(), typed.views(), TensorView<double, 4>(),
                   only_parameters.views(), options);
  EXPECT_TRUE(test::bitwise_equal(only_parameters.all(), gradients));
}

TEST(PdeSsm, ResultsAreIdenticalForAnyThreadCount) {
  test::DefaultThreadsOnExit restore;
  RandomSource random(1200);
  const test::Shape<4> shape = {3, 10, 7, 70};  // 3 chunks of the 32-float chunking, 3 batches
  const Parameters p = Parameters::random(random, shape[3], true).rounded<float>();
  const std::vector<double> x = test::round_to<float>(random.normal(test::shape_numel<4>(shape)));
  const std::vector<double> g = test::round_to<float>(random.normal(test::shape_numel<4>(shape)));
  for (PdeSsmMode mode : kModes)
    for (PdeSsmBoundary boundary : kBoundaries) {
      const PdeSsmOptions options = make_options(mode, boundary);
      SCOPED_TRACE(options_string(options));
      const std::vector<double> y1 = run_forward<float>(x, shape, p, options, false, 1);
      const auto backward1 = run_backward<float>(x, g, shape, p, options, false, 1);
      for (int threads : {2, 3}) {
        EXPECT_TRUE(
            test::bitwise_equal(run_forward<float>(x, shape, p, options, false, threads), y1));
        const auto backward = run_backward<float>(x, g, shape, p, options, false, threads);
        EXPECT_TRUE(test::bitwise_equal(backward[0], backward1[0]));
        EXPECT_TRUE(test::bitwise_equal(backward[1], backward1[1]));
      }
      set_num_threads(3);  // the global setting, for a call that names none
      EXPECT_TRUE(test::bitwise_equal(run_forward<float>(x, shape, p, options, false, 0), y1));
    }
}

// ---------------------------------------------------------------------------------------------
// Rejected input.

TEST(PdeSsm, ParsesOptionNamesAndRejectsUnknownOnes) {
  EXPECT_EQ(pde_ssm_mode_from_string("forced"), PdeSsmMode::forced);
  EXPECT_EQ(pde_ssm_mode_from_string("initial_value"), PdeSsmMode::initial_value);
  EXPECT_EQ(pde_ssm_boundary_from_string("zero"), PdeSsmBoundary::zero);
  EXPECT_EQ(pde_ssm_boundary_from_string("periodic"), PdeSsmBoundary::periodic);
  EXPECT_EQ(pde_ssm_diffusion_form_from_string("raw"), PdeSsmDiffusionForm::raw);
  EXPECT_EQ(pde_ssm_diffusion_form_from_string("cholesky"), PdeSsmDiffusionForm::cholesky);
  EXPECT_TRUE(throws_error_with([] { pde_ssm_mode_from_string("steady"); },
                                {"mode", "\"initial_value\" or \"forced\"", "\"steady\""}));
  EXPECT_TRUE(throws_error_with([] { pde_ssm_boundary_from_string("reflect"); },
                                {"boundary", "\"periodic\" or \"zero\"", "\"reflect\""}));
  EXPECT_TRUE(throws_error_with([] { pde_ssm_diffusion_form_from_string("full"); },
                                {"diffusion_form", "\"cholesky\" or \"raw\"", "\"full\""}));
}

TEST(PdeSsm, RejectsBadInputAndLeavesTheOutputUntouched) {
  const test::Shape<4> shape = {2, 4, 5, 6};
  RandomSource random(1300);
  const std::vector<double> x_values = random.normal(test::shape_numel<4>(shape));
  const GridTensor<float> x(x_values, shape, false);
  GridTensor<float> out(shape, false, -7.0f);
  const Parameters good = Parameters::uniform({1, 0, 1}, {0.5, 0.5}, 0, 1);
  const auto rejects = [&](const Parameters& p, const PdeSsmOptions& options,
                           std::initializer_list<std::string> pieces) {
    const TypedParameters<float> typed(p);
    const auto result = throws_error_with(
        [&] { pde_ssm(x.const_view(), typed.views(), out.view, options); }, pieces);
    for (float value : out.storage)
      if (value != -7.0f) return ::testing::AssertionFailure() << "out was written";
    return result;
  };
  const PdeSsmOptions periodic = make_options(PdeSsmMode::initial_value, PdeSsmBoundary::periodic);
  Parameters p = good;
  p.time = {0};
  EXPECT_TRUE(rejects(p, periodic, {"pde_ssm", "time[0]", "must be > 0", "got 0"}));
  p.time = {-1};
  EXPECT_TRUE(rejects(p, periodic, {"time[0]", "must be > 0", "got -1"}));
  p = good;
  p.diffusion = {1, 2, 1};
  EXPECT_TRUE(rejects(
      p,
      make_options(PdeSsmMode::initial_value, PdeSsmBoundary::periodic, PdeSsmDiffusionForm::raw),
      {"diffusion[0]", "positive semi-definite", "(1, 2, 1)"}));
  p.diffusion = {-1, 0, 1};
  EXPECT_TRUE(
      rejects(p, make_options(PdeSsmMode::forced, PdeSsmBoundary::zero, PdeSsmDiffusionForm::raw),
              {"diffusion[0]", "positive semi-definite"}));
  p.diffusion = {1, 2, 1};  // fine as a Cholesky factor
  const TypedParameters<float> cholesky(p);
  pde_ssm(x.const_view(), cholesky.views(), out.view, periodic);
  std::fill(out.storage.begin(), out.storage.end(), -7.0f);
  p = good;
  p.velocity = {0.5, std::nan("")};
  EXPECT_TRUE(rejects(p, periodic, {"velocity[0, 1]", "must be finite", "nan"}));
  p = good;
  p.reaction = {std::numeric_limits<double>::infinity()};
  EXPECT_TRUE(rejects(p, periodic, {"reaction[0]", "must be finite", "inf"}));
  p = good;
  p.skip_groups = 1;
  p.skip = {std::nan("")};
  EXPECT_TRUE(rejects(p, periodic, {"skip[0]", "must be finite"}));
  p = good;
  p.reaction = {100};
  EXPECT_TRUE(rejects(p, periodic, {"time * reaction", "<= 80", "got 100"}));
  p = good;
  p.time_groups = 4;
  p.time = {1, 1, 1, 1};
  EXPECT_TRUE(rejects(p, periodic, {"time.shape[0]", "C = 6 or a divisor of it", "got 4"}));
  p = good;
  p.velocity_groups = 12;
  p.velocity.assign(24, 0.0);
  EXPECT_TRUE(rejects(p, periodic, {"velocity.shape[0]", "C = 6", "got 12"}));

  // A grid of size 0.
  const TypedParameters<float> typed(good);
  std::vector<float> empty_storage(12, 0.0f);
  const TensorView<const float, 4> empty_grid(empty_storage.data(), {2, 0, 5, 6});
  EXPECT_TRUE(throws_error_with(
      [&] {
        pde_ssm(empty_grid, typed.views(), TensorView<float, 4>(empty_storage.data(), {2, 0, 5, 6}),
                periodic);
      },
      {"height (H) must be >= 1", "got 0"}));
  EXPECT_TRUE(throws_error_with([&] { PdeSsm<float>(4, 0, 6, typed.views(), periodic); },
                                {"width (W) must be >= 1"}));
  // Shapes of the tensors against the block.
  const PdeSsm<float> block(4, 5, 6, typed.views(), periodic);
  GridTensor<float> wrong(test::Shape<4>{2, 4, 5, 3}, false);
  EXPECT_TRUE(throws_error_with([&] { block.forward(wrong.const_view(), out.view); },
                                {"x.shape[3]", "C = 6", "got 3"}));
  GridTensor<float> wrong_batch(test::Shape<4>{1, 4, 5, 6}, false);
  EXPECT_TRUE(throws_error_with([&] { block.forward(x.const_view(), wrong_batch.view); },
                                {"out.shape[0]", "B = 2", "got 1"}));
  EXPECT_TRUE(throws_error_with(
      [&] {
        block.forward(x.const_view(),
                      TensorView<float, 4>(const_cast<float*>(x.storage.data()), shape));
      },
      {"out must not overlap x"}));
  // Gradients of the wrong shape, or for a skip the block does not have.
  std::vector<float> gradient_storage(8, 0.0f);
  PdeSsmGradients<float> gradients;
  gradients.time = TensorView<float, 1>(gradient_storage.data(), {2});
  EXPECT_TRUE(throws_error_with(
      [&] { block.backward(x.const_view(), x.const_view(), out.view, gradients); },
      {"pde_ssm_backward", "gradients.time.shape[0]", "1", "got 2"}));
  gradients = {};
  gradients.skip = TensorView<float, 1>(gradient_storage.data(), {1});
  EXPECT_TRUE(throws_error_with(
      [&] { block.backward(x.const_view(), x.const_view(), out.view, gradients); },
      {"gradients.skip must be null", "no skip"}));
  for (float value : out.storage) EXPECT_EQ(value, -7.0f);
}

TEST(PdeSsm, EmptyBatchIsANoOp) {
  const Parameters p = Parameters::uniform({1, 0, 1}, {0, 0}, 0, 1);
  const TypedParameters<double> typed(p);
  std::vector<double> storage(1, 0.0);
  const TensorView<double, 4> empty(storage.data(), {0, 3, 3, 2});
  pde_ssm(empty, typed.views(), empty, {});
  GradientBuffers<double> gradients(p);
  pde_ssm_backward(empty, empty, typed.views(), empty, gradients.views(), {});
  for (double value : gradients.all()) EXPECT_EQ(value, 0.0);
}

}  // namespace
}  // namespace foveal
