// PDE-SSM (docs/pde_ssm.md): parameter validation, the cached multiplier, and the forward and
// backward passes as (batch, channel chunk) tasks of FFT · multiply · inverse FFT.
#include "foveal/ssm/pde_ssm.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <complex>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "detail/fft.hpp"
#include "detail/kernels.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

PdeSsmMode pde_ssm_mode_from_string(std::string_view name) {
  if (name == "initial_value") return PdeSsmMode::initial_value;
  if (name == "forced") return PdeSsmMode::forced;
  check(false, "pde_ssm: mode must be \"initial_value\" or \"forced\", got \"", name, "\"");
  return PdeSsmMode::initial_value;
}

PdeSsmBoundary pde_ssm_boundary_from_string(std::string_view name) {
  if (name == "periodic") return PdeSsmBoundary::periodic;
  if (name == "zero") return PdeSsmBoundary::zero;
  check(false, "pde_ssm: boundary must be \"periodic\" or \"zero\", got \"", name, "\"");
  return PdeSsmBoundary::periodic;
}

PdeSsmDiffusionForm pde_ssm_diffusion_form_from_string(std::string_view name) {
  if (name == "cholesky") return PdeSsmDiffusionForm::cholesky;
  if (name == "raw") return PdeSsmDiffusionForm::raw;
  check(false, "pde_ssm: diffusion_form must be \"cholesky\" or \"raw\", got \"", name, "\"");
  return PdeSsmDiffusionForm::cholesky;
}

namespace {

constexpr const char* kFunction = "pde_ssm";
constexpr const char* kBackward = "pde_ssm_backward";
constexpr double kTwoPi = 6.283185307179586476925286766559;
// The largest τ·r accepted: the multiplier's peak e^{τ r} must stay far from float overflow.
constexpr double kMaxGrowthExponent = 80;
// Channels transformed together: the FFT's SIMD lanes, as many as it prefers.
template <typename T>
constexpr Index kChunkLanes = detail::RealFft2d<T>::kPreferredLanes;
// Moments the backward accumulates per channel (see ChannelMoments).
constexpr int kMomentCount = detail::kPdeMomentCount;

// One channel's PDE, resolved from its groups' parameters.
struct ChannelCoefficients {
  double k_yy = 0, k_xy = 0, k_xx = 0;  // K
  double b_y = 0, b_x = 0;              // velocity
  double reaction = 0, time = 1, skip = 0;
  std::array<double, 3> diffusion_parameters{};  // the three values given for K (chain rule)

  bool same_pde(const ChannelCoefficients& other) const {
    return k_yy == other.k_yy && k_xy == other.k_xy && k_xx == other.k_xx && b_y == other.b_y &&
           b_x == other.b_x && reaction == other.reaction && time == other.time &&
           skip == other.skip;
  }
};

// The signed FFT frequency of bin `index` of an n-point transform: 0..n/2, then -(n/2-1)..-1.
Index signed_frequency(Index index, Index n) { return index <= n / 2 ? index : index - n; }

// φ(z) = (e^z − 1)/z and φ'(z) given e^z, accurate for every z: Taylor series where
// |z| < 1/2 (where e^z − 1 cancels), the closed forms elsewhere (|e^z − 1| is not small there,
// or, near z = 2πik, φ itself is).
struct PhiValues {
  std::complex<double> phi;
  std::complex<double> derivative;
};

PhiValues phi_and_derivative(std::complex<double> z, std::complex<double> exp_z) {
  if (std::norm(z) < 0.25) {
    // φ = Σ_{n≥0} z^n/(n+1)!, φ' = Σ_{n≥1} n z^{n-1}/(n+1)!; 16 terms leave < 1e-18.
    constexpr int kTerms = 16;
    std::complex<double> phi = 0, derivative = 0;
    double inverse_factorial = 1;  // 1/(n+1)!, built up to n = kTerms
    for (int n = 1; n <= kTerms + 1; ++n) inverse_factorial /= n;
    for (int n = kTerms; n >= 0; --n) {
      phi = phi * z + inverse_factorial;
      if (n >= 1) derivative = derivative * z + static_cast<double>(n) * inverse_factorial;
      inverse_factorial *= n + 1;
    }
    return {phi, derivative};
  }
  const std::complex<double> phi = (exp_z - 1.0) / z;
  return {phi, (exp_z - phi) / z};
}

// The solution multiplier m(k) of one channel and, for forced mode, ∂m/∂λ, at one wavenumber,
// from z = τλ and e^{i Im z} (the caller builds the phase from per-row and per-column tables).
struct MultiplierValues {
  std::complex<double> multiplier;
  std::complex<double> derivative;  // ∂m/∂λ: τ m (initial value), τ² φ'(z) (forced)
};

MultiplierValues multiplier_at(double time, PdeSsmMode mode, std::complex<double> z,
                               std::complex<double> phase) {
  const std::complex<double> exp_z = std::exp(z.real()) * phase;
  if (mode == PdeSsmMode::initial_value) return {exp_z, time * exp_z};
  const PhiValues phi = phi_and_derivative(z, exp_z);
  return {time * phi.phi, time * time * phi.derivative};
}

// ---------------------------------------------------------------------------------------------
// Validation.

template <typename T, int Rank>
Index require_parameter(const char* name, const TensorView<const T, Rank>& view, Index channels,
                        Index columns) {
  detail::require_valid_view(kFunction, name, view);
  if constexpr (Rank == 2)
    check(view.size(1) == columns, kFunction, ": ", name, ".shape[1] must be ", columns, ", got ",
          view.size(1));
  const Index groups = view.size(0);
  check(groups >= 1 && channels % groups == 0, kFunction, ": ", name,
        ".shape[0] (its number of groups) must be C = ", channels, " or a divisor of it, got ",
        groups);
  for (Index g = 0; g < groups; ++g)
    for (Index j = 0; j < columns; ++j) {
      const double value =
          Rank == 2
              ? static_cast<double>(view.data()[g * view.stride(0) + j * view.stride(Rank - 1)])
              : static_cast<double>(view.data()[g * view.stride(0)]);
      check(std::isfinite(value), kFunction, ": ", name, "[", g, Rank == 2 ? ", " : "",
            Rank == 2 ? std::to_string(j) : std::string(), "] must be finite, got ", value);
    }
  return groups;
}

// Entry `column` of the group of channel c in a [G, columns] or [G] parameter.
template <typename T, int Rank>
double group_value(const TensorView<const T, Rank>& view, Index channels, Index c,
                   Index column = 0) {
  const Index group = c / (channels / view.size(0));
  if constexpr (Rank == 2) {
    return static_cast<double>(view(group, column));
  } else {
    return static_cast<double>(view(group));
  }
}

// The number of groups of each parameter (0 for an absent skip).
struct GroupCounts {
  Index diffusion = 0, velocity = 0, reaction = 0, time = 0, skip = 0;
};

void validate_grid(Index height, Index width, Index channels) {
  check(height >= 1, kFunction, ": height (H) must be >= 1, got ", height);
  check(width >= 1, kFunction, ": width (W) must be >= 1, got ", width);
  check(channels >= 1, kFunction, ": channels (C) must be >= 1, got ", channels);
  // 2H × 2W × C complex multipliers must be addressable with room to spare.
  constexpr Index kLimit = Index{1} << 40;
  check(height <= kLimit / width && height * width <= kLimit / channels, kFunction,
        ": the grid H × W × C = ", height, " × ", width, " × ", channels, " is too large");
}

template <typename T>
std::vector<ChannelCoefficients> resolve_coefficients(const PdeSsmParameters<T>& p,
                                                      const PdeSsmOptions& options, Index channels,
                                                      GroupCounts& groups) {
  groups.diffusion = require_parameter("diffusion", p.diffusion, channels, 3);
  groups.velocity = require_parameter("velocity", p.velocity, channels, 2);
  groups.reaction = require_parameter("reaction", p.reaction, channels, 1);
  groups.time = require_parameter("time", p.time, channels, 1);
  groups.skip = p.skip.is_null() ? 0 : require_parameter("skip", p.skip, channels, 1);
  for (Index g = 0; g < groups.time; ++g)
    check(p.time(g) > 0, kFunction, ": time[", g, "] (τ) must be > 0, got ", p.time(g));
  if (options.diffusion_form == PdeSsmDiffusionForm::raw) {
    for (Index g = 0; g < groups.diffusion; ++g) {
      const double k_yy = p.diffusion(g, 0), k_xy = p.diffusion(g, 1), k_xx = p.diffusion(g, 2);
      // The determinant may come out slightly negative when K was rounded from L Lᵀ.
      const double slack = 64 * std::numeric_limits<T>::epsilon() * k_yy * k_xx;
      check(k_yy >= 0 && k_xx >= 0 && k_yy * k_xx - k_xy * k_xy >= -slack, kFunction,
            ": diffusion[", g, "] = (K_yy, K_xy, K_xx) = (", k_yy, ", ", k_xy, ", ", k_xx,
            ") must be positive semi-definite (K_yy >= 0, K_xx >= 0, K_yy K_xx >= K_xy^2) "
            "with diffusion_form=\"raw\"");
    }
  }
  std::vector<ChannelCoefficients> coefficients(static_cast<std::size_t>(channels));
  for (Index c = 0; c < channels; ++c) {
    ChannelCoefficients& channel = coefficients[static_cast<std::size_t>(c)];
    for (Index j = 0; j < 3; ++j)
      channel.diffusion_parameters[static_cast<std::size_t>(j)] =
          group_value(p.diffusion, channels, c, j);
    const auto& [first, second, third] = channel.diffusion_parameters;
    if (options.diffusion_form == PdeSsmDiffusionForm::raw) {
      channel.k_yy = first;
      channel.k_xy = second;
      channel.k_xx = third;
    } else {  // L = [[l_yy, 0], [l_xy, l_xx]], K = L Lᵀ
      channel.k_yy = first * first;
      channel.k_xy = first * second;
      channel.k_xx = second * second + third * third;
    }
    channel.b_y = group_value(p.velocity, channels, c, 0);
    channel.b_x = group_value(p.velocity, channels, c, 1);
    channel.reaction = group_value(p.reaction, channels, c);
    channel.time = group_value(p.time, channels, c);
    channel.skip = p.skip.is_null() ? 0 : group_value(p.skip, channels, c);
    check(channel.time * channel.reaction <= kMaxGrowthExponent, kFunction,
          ": time * reaction (τ r) must be <= ", kMaxGrowthExponent,
          " (the multiplier e^{τ r} overflows beyond), got ", channel.time * channel.reaction,
          " for channel ", c);
  }
  return coefficients;
}

// A [B, H, W, C] tensor of the block: valid, with the block's H, W, C and the batch `batch`
// (negative: any).
template <typename T>
void require_grid_tensor(const char* function, const char* name, const TensorView<T, 4>& view,
                         Index height, Index width, Index channels, Index batch) {
  detail::require_valid_view(function, name, view);
  if (batch >= 0) detail::require_extent(function, name, view, 0, "B", batch);
  detail::require_extent(function, name, view, 1, "H", height);
  detail::require_extent(function, name, view, 2, "W", width);
  detail::require_extent(function, name, view, 3, "C", channels);
}

// Per-thread scratch of one call: `spectra` chunk spectra and the FFT's work buffer each,
// allocated once (the kernels never allocate).
template <typename T>
class ChunkWorkspace {
 public:
  ChunkWorkspace(const detail::RealFft2d<T>& fft, Index lanes, int spectra, int num_threads)
      : spectrum_size_(round_up(fft.spectrum_size(lanes))),
        work_size_(round_up(fft.work_size(lanes))),
        spectra_(spectra),
        memory_(detail::allocate_aligned<T>(
            static_cast<std::size_t>(per_thread() * std::max(num_threads, 1)))) {}

  T* spectrum(int index) const {
    return memory_.get() + per_thread() * detail::thread_index() + spectrum_size_ * index;
  }
  T* work() const { return spectrum(spectra_); }

 private:
  static Index round_up(Index count) {
    constexpr Index line = static_cast<Index>(detail::kTensorAlignment / sizeof(T));
    return (std::max<Index>(count, 1) + line - 1) / line * line;
  }
  Index per_thread() const { return spectrum_size_ * spectra_ + work_size_; }

  Index spectrum_size_;
  Index work_size_;
  int spectra_;
  detail::AlignedArray<T> memory_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// The cached state.

template <typename T>
struct PdeSsm<T>::State {
  State(Index height_, Index width_, Index channels_, const PdeSsmParameters<T>& parameters,
        const PdeSsmOptions& options_, int num_threads, bool build = true)
      : height((validate_grid(height_, width_, channels_), height_)),
        width(width_),
        channels(channels_),
        options(options_),
        transform_height(options_.boundary == PdeSsmBoundary::zero ? 2 * height_ : height_),
        transform_width(options_.boundary == PdeSsmBoundary::zero ? 2 * width_ : width_),
        spectrum_width(transform_width / 2 + 1),
        coefficients(resolve_coefficients(parameters, options_, channels_, groups)),
        fft(build ? transform_height : 1, build ? transform_width : 1),
        chunk_lanes(std::min(channels_, kChunkLanes<T>)),
        chunk_places(make_chunk_places()) {
    if (build) multiplier = fill_table(false, num_threads);
  }

  Index bins() const { return transform_height * spectrum_width; }
  Index num_chunks() const { return (channels + chunk_lanes - 1) / chunk_lanes; }
  Index chunk_begin(Index chunk) const { return chunk * chunk_lanes; }
  Index chunk_size(Index chunk) const {
    return std::min(chunk_lanes, channels - chunk_begin(chunk));
  }
  double row_wavenumber(Index row) const {
    return kTwoPi * static_cast<double>(signed_frequency(row, transform_height)) /
           static_cast<double>(transform_height);
  }
  double column_wavenumber(Index column) const {
    return kTwoPi * static_cast<double>(column) / static_cast<double>(transform_width);
  }

  // The chunked table of every channel's multiplier with its skip added (or, with
  // `derivative`, of ∂m/∂λ), one task per (run of channels with the same PDE, row). The phase
  // e^{−iτ b·k} is the product of a per-row and a per-column factor: one sine and cosine per
  // row and column instead of per bin.
  detail::AlignedArray<T> fill_table(bool derivative, int num_threads) const {
    auto table = detail::allocate_aligned<T>(static_cast<std::size_t>(channels * bins() * 2));
    std::vector<Index> run_begins;
    for (Index c = 0; c < channels; ++c)
      if (c == 0 || !coefficients[static_cast<std::size_t>(c)].same_pde(
                        coefficients[static_cast<std::size_t>(c - 1)]))
        run_begins.push_back(c);
    run_begins.push_back(channels);
    const Index runs = static_cast<Index>(run_begins.size()) - 1;
    const int threads = detail::resolve_num_threads(num_threads);
    std::vector<std::complex<double>> column_phase(static_cast<std::size_t>(runs * spectrum_width));
    parallel_for(runs, threads, [&](Index run) {
      const ChannelCoefficients& pde =
          coefficients[static_cast<std::size_t>(run_begins[static_cast<std::size_t>(run)])];
      for (Index column = 0; column < spectrum_width; ++column)
        column_phase[static_cast<std::size_t>(run * spectrum_width + column)] =
            std::polar(1.0, -pde.time * pde.b_x * column_wavenumber(column));
    });
    T* values = table.get();
    parallel_for(runs * transform_height, threads, [&](Index task) {
      const Index run = task / transform_height, row = task % transform_height;
      const Index first = run_begins[static_cast<std::size_t>(run)];
      const Index end = run_begins[static_cast<std::size_t>(run) + 1];
      const ChannelCoefficients& pde = coefficients[static_cast<std::size_t>(first)];
      const double k_y = row_wavenumber(row);
      const std::complex<double> row_phase = std::polar(1.0, -pde.time * pde.b_y * k_y);
      const std::complex<double>* phases =
          column_phase.data() + static_cast<std::size_t>(run * spectrum_width);
      for (Index column = 0; column < spectrum_width; ++column) {
        const double k_x = column_wavenumber(column);
        const double quadratic =
            pde.k_yy * k_y * k_y + 2 * pde.k_xy * k_y * k_x + pde.k_xx * k_x * k_x;
        // z = τλ, λ = −kᵀKk + r − i b·k.
        const std::complex<double> z(pde.time * (pde.reaction - quadratic),
                                     -pde.time * (pde.b_y * k_y + pde.b_x * k_x));
        const MultiplierValues m =
            multiplier_at(pde.time, options.mode, z, row_phase * phases[column]);
        const std::complex<double> value = derivative ? m.derivative : m.multiplier + pde.skip;
        const Index bin = row * spectrum_width + column;
        for (Index c = first; c < end; ++c) {
          const ChunkPlace& place = chunk_places[static_cast<std::size_t>(c)];
          values[place.base + 2 * bin * place.lanes] = static_cast<T>(value.real());
          values[place.base + (2 * bin + 1) * place.lanes] = static_cast<T>(value.imag());
        }
      }
    });
    return table;
  }

  // Where channel c sits in a chunked table: entry (bin, part) at base + (2 bin + part) lanes.
  struct ChunkPlace {
    Index base = 0;   // chunk begin · bins · 2 + lane
    Index lanes = 0;  // channels in the chunk
  };
  std::vector<ChunkPlace> make_chunk_places() const {
    std::vector<ChunkPlace> places(static_cast<std::size_t>(channels));
    for (Index c = 0; c < channels; ++c) {
      const Index begin = c / chunk_lanes * chunk_lanes;
      places[static_cast<std::size_t>(c)] = {begin * bins() * 2 + (c - begin),
                                             std::min(chunk_lanes, channels - begin)};
    }
    return places;
  }

  Index height, width, channels;
  PdeSsmOptions options;
  Index transform_height, transform_width, spectrum_width;
  GroupCounts groups;
  std::vector<ChannelCoefficients> coefficients;
  detail::RealFft2d<T> fft;
  Index chunk_lanes;
  std::vector<ChunkPlace> chunk_places;  // per channel
  detail::AlignedArray<T> multiplier;    // chunked: [chunk][bin][re, im][lane], skip folded in
};

template <typename T>
PdeSsm<T>::PdeSsm(Index height, Index width, Index channels, const PdeSsmParameters<T>& parameters,
                  const PdeSsmOptions& options, int num_threads)
    : state_(std::make_shared<const State>(height, width, channels, parameters, options,
                                           num_threads)) {}

template <typename T>
Index PdeSsm<T>::height() const {
  return state_->height;
}
template <typename T>
Index PdeSsm<T>::width() const {
  return state_->width;
}
template <typename T>
Index PdeSsm<T>::channels() const {
  return state_->channels;
}
template <typename T>
const PdeSsmOptions& PdeSsm<T>::options() const {
  return state_->options;
}
template <typename T>
Index PdeSsm<T>::transform_height() const {
  return state_->transform_height;
}
template <typename T>
Index PdeSsm<T>::transform_width() const {
  return state_->transform_width;
}

template <typename T>
void PdeSsm<T>::forward(TensorView<const T, 4> x, TensorView<T, 4> out, int num_threads) const {
  const State& s = *state_;
  detail::require_num_threads(kFunction, num_threads);
  require_grid_tensor(kFunction, "x", x, s.height, s.width, s.channels, -1);
  require_grid_tensor(kFunction, "out", out, s.height, s.width, s.channels, x.size(0));
  detail::require_disjoint(kFunction, "out", out, "x", x);
  const Index batch = x.size(0);
  if (batch == 0) return;
  const Index chunks = s.num_chunks();
  // Scratch for the threads the loop starts (never more than its tasks).
  const int threads = detail::team_size(chunks * batch, detail::resolve_num_threads(num_threads));
  const ChunkWorkspace<T> workspace(s.fft, s.chunk_lanes, 1, threads);
  const detail::Kernels<T>& kernels = detail::kernels<T>();
  // Task order keeps the batches of one chunk together: they share its multiplier.
  parallel_for(chunks * batch, threads, [&](Index task) {
    const Index chunk = task / batch, b = task % batch;
    const Index begin = s.chunk_begin(chunk), lanes = s.chunk_size(chunk);
    T* spectrum = workspace.spectrum(0);
    s.fft.forward(x.address(b, 0, 0, begin), x.stride(1), x.stride(2), x.stride(3), s.height,
                  s.width, lanes, spectrum, workspace.work());
    kernels.pde_multiply_spectrum(spectrum, s.multiplier.get() + begin * s.bins() * 2, s.bins(),
                                  lanes, false);
    s.fft.inverse(spectrum, out.address(b, 0, 0, begin), out.stride(1), out.stride(2),
                  out.stride(3), s.height, s.width, lanes, workspace.work());
  });
}

namespace {

// Writes the per-group sums of per-channel values value(c, j) (j < columns) into `gradient`
// [G, columns] or [G], channels of a group summed in order; a null view is skipped.
template <typename T, int Rank, typename Value>
void write_group_sums(TensorView<T, Rank> gradient, Index channels, Index columns, Value&& value) {
  if (gradient.is_null()) return;
  const Index groups = gradient.size(0), per_group = channels / groups;
  for (Index g = 0; g < groups; ++g)
    for (Index j = 0; j < columns; ++j) {
      double sum = 0;
      for (Index c = g * per_group; c < (g + 1) * per_group; ++c) sum += value(c, j);
      if constexpr (Rank == 2) {
        gradient(g, j) = static_cast<T>(sum);
      } else {
        gradient(g) = static_cast<T>(sum);
      }
    }
}

// A gradient view: null, or the shape of its parameter.
template <typename T, typename P, int Rank>
void require_gradient(const char* name, const TensorView<T, Rank>& gradient,
                      const TensorView<P, Rank>& parameter, Index groups) {
  if (gradient.is_null()) return;
  check(groups > 0, kBackward, ": ", name, " must be null: the block has no skip");
  detail::require_valid_view(kBackward, name, gradient);
  for (int dim = 0; dim < Rank; ++dim)
    check(gradient.size(dim) == parameter.size(dim), kBackward, ": ", name, ".shape[", dim,
          "] must equal the parameter's ", parameter.size(dim), ", got ", gradient.size(dim));
}

}  // namespace

template <typename T>
void PdeSsm<T>::backward(TensorView<const T, 4> x, TensorView<const T, 4> grad_out,
                         TensorView<T, 4> grad_x, const PdeSsmGradients<T>& gradients,
                         int num_threads) const {
  const State& s = *state_;
  detail::require_num_threads(kBackward, num_threads);
  require_grid_tensor(kBackward, "grad_out", grad_out, s.height, s.width, s.channels, -1);
  const Index batch = grad_out.size(0);
  const bool want_parameters = !gradients.diffusion.is_null() || !gradients.velocity.is_null() ||
                               !gradients.reaction.is_null() || !gradients.time.is_null() ||
                               !gradients.skip.is_null();
  if (want_parameters) require_grid_tensor(kBackward, "x", x, s.height, s.width, s.channels, batch);
  if (!grad_x.is_null()) {
    require_grid_tensor(kBackward, "grad_x", grad_x, s.height, s.width, s.channels, batch);
    detail::require_disjoint(kBackward, "grad_x", grad_x, "grad_out", grad_out);
    if (want_parameters) detail::require_disjoint(kBackward, "grad_x", grad_x, "x", x);
  }
  // Each gradient has its parameter's shape: the group counts are the State's.
  const auto shape2 = [](Index groups, Index columns) {
    return TensorView<const T, 2>(nullptr, {groups, columns});
  };
  const auto shape1 = [](Index groups) { return TensorView<const T, 1>(nullptr, {groups}); };
  require_gradient("gradients.diffusion", gradients.diffusion, shape2(s.groups.diffusion, 3),
                   s.groups.diffusion);
  require_gradient("gradients.velocity", gradients.velocity, shape2(s.groups.velocity, 2),
                   s.groups.velocity);
  require_gradient("gradients.reaction", gradients.reaction, shape1(s.groups.reaction),
                   s.groups.reaction);
  require_gradient("gradients.time", gradients.time, shape1(s.groups.time), s.groups.time);
  require_gradient("gradients.skip", gradients.skip, shape1(s.groups.skip), s.groups.skip);

  const Index chunks = s.num_chunks();
  const int threads = detail::team_size(chunks * batch, detail::resolve_num_threads(num_threads));
  std::vector<double> moments(
      want_parameters ? static_cast<std::size_t>(batch * s.channels * kMomentCount) : 0, 0.0);
  if (batch > 0 && (want_parameters || !grad_x.is_null())) {
    const bool forced = s.options.mode == PdeSsmMode::forced;
    const detail::AlignedArray<T> derivative =
        want_parameters && forced ? s.fill_table(true, threads) : nullptr;
    // Column weights of the half spectrum (self-conjugate columns count once) and wavenumbers.
    std::vector<T> weight(static_cast<std::size_t>(s.spectrum_width)), weight_k(weight),
        weight_kk(weight);
    for (Index column = 0; column < s.spectrum_width; ++column) {
      const bool self_conjugate = column == 0 || 2 * column == s.transform_width;
      const double w = self_conjugate ? 1 : 2, k_x = s.column_wavenumber(column);
      weight[static_cast<std::size_t>(column)] = static_cast<T>(w);
      weight_k[static_cast<std::size_t>(column)] = static_cast<T>(w * k_x);
      weight_kk[static_cast<std::size_t>(column)] = static_cast<T>(w * k_x * k_x);
    }
    std::vector<double> row_k(static_cast<std::size_t>(s.transform_height));
    for (Index row = 0; row < s.transform_height; ++row)
      row_k[static_cast<std::size_t>(row)] = s.row_wavenumber(row);
    std::vector<T> lane_time(static_cast<std::size_t>(s.channels)), lane_skip(lane_time);
    for (Index c = 0; c < s.channels; ++c) {
      lane_time[static_cast<std::size_t>(c)] =
          static_cast<T>(s.coefficients[static_cast<std::size_t>(c)].time);
      lane_skip[static_cast<std::size_t>(c)] =
          static_cast<T>(s.coefficients[static_cast<std::size_t>(c)].skip);
    }
    const ChunkWorkspace<T> workspace(s.fft, s.chunk_lanes, 2, threads);
    const detail::Kernels<T>& kernels = detail::kernels<T>();
    parallel_for(chunks * batch, threads, [&](Index task) {
      const Index chunk = task / batch, b = task % batch;
      const Index begin = s.chunk_begin(chunk), lanes = s.chunk_size(chunk);
      const Index table_begin = begin * s.bins() * 2;
      T* spectrum_g = workspace.spectrum(0);
      s.fft.forward(grad_out.address(b, 0, 0, begin), grad_out.stride(1), grad_out.stride(2),
                    grad_out.stride(3), s.height, s.width, lanes, spectrum_g, workspace.work());
      if (want_parameters) {
        T* spectrum_u = workspace.spectrum(1);
        s.fft.forward(x.address(b, 0, 0, begin), x.stride(1), x.stride(2), x.stride(3), s.height,
                      s.width, lanes, spectrum_u, workspace.work());
        const detail::PdeMomentPass<T> pass{s.multiplier.get() + table_begin,
                                            forced ? derivative.get() + table_begin : nullptr,
                                            lane_time.data() + begin,
                                            lane_skip.data() + begin,
                                            weight.data(),
                                            weight_k.data(),
                                            weight_kk.data(),
                                            row_k.data(),
                                            s.transform_height,
                                            s.spectrum_width,
                                            lanes};
        double* chunk_moments =
            moments.data() + static_cast<std::size_t>((b * s.channels + begin) * kMomentCount);
        kernels.pde_moments_and_adjoint(pass, spectrum_g, spectrum_u, chunk_moments);
      } else {
        kernels.pde_multiply_spectrum(spectrum_g, s.multiplier.get() + table_begin, s.bins(), lanes,
                                      true);
      }
      if (!grad_x.is_null())
        s.fft.inverse(spectrum_g, grad_x.address(b, 0, 0, begin), grad_x.stride(1),
                      grad_x.stride(2), grad_x.stride(3), s.height, s.width, lanes,
                      workspace.work());
    });
  }
  if (!want_parameters) return;

  // Per channel: the moments summed over the batch in order, normalized by 1 / (Ht Wt); then
  // the gradients of the channel's coefficients, then of the parameters, summed per group.
  const double normalization =
      1.0 / (static_cast<double>(s.transform_height) * static_cast<double>(s.transform_width));
  const double forced_term = s.options.mode == PdeSsmMode::forced ? 1 : 0;
  std::vector<std::array<double, 9>> channel_gradients(static_cast<std::size_t>(s.channels));
  for (Index c = 0; c < s.channels; ++c) {
    std::array<double, kMomentCount> m{};
    for (Index b = 0; b < batch; ++b)
      for (int j = 0; j < kMomentCount; ++j)
        m[static_cast<std::size_t>(j)] +=
            moments[static_cast<std::size_t>((b * s.channels + c) * kMomentCount + j)];
    for (double& value : m) value *= normalization;
    const auto& [re_a, re_a_yy, re_a_yx, re_a_xx, im_a_y, im_a_x, re_mp, re_p] = m;
    const ChannelCoefficients& pde = s.coefficients[static_cast<std::size_t>(c)];
    // λ = −(K_yy ky² + 2 K_xy ky kx + K_xx kx²) + r − i (b_y ky + b_x kx).
    const double grad_k_yy = -re_a_yy, grad_k_xy = -2 * re_a_yx, grad_k_xx = -re_a_xx;
    // ∂m/∂τ = λ m (initial value) or (m + λ ∂m/∂λ) / τ... both as (c_f m P + λ A) / τ.
    const double re_lambda_a = pde.reaction * re_a + pde.k_yy * grad_k_yy + pde.k_xy * grad_k_xy +
                               pde.k_xx * grad_k_xx + pde.b_y * im_a_y + pde.b_x * im_a_x;
    std::array<double, 3> grad_diffusion{grad_k_yy, grad_k_xy, grad_k_xx};
    if (s.options.diffusion_form == PdeSsmDiffusionForm::cholesky) {
      const auto& [l_yy, l_xy, l_xx] = pde.diffusion_parameters;
      // K_yy = l_yy², K_xy = l_yy l_xy, K_xx = l_xy² + l_xx².
      grad_diffusion = {2 * l_yy * grad_k_yy + l_xy * grad_k_xy,
                        l_yy * grad_k_xy + 2 * l_xy * grad_k_xx, 2 * l_xx * grad_k_xx};
    }
    channel_gradients[static_cast<std::size_t>(c)] = {
        grad_diffusion[0],
        grad_diffusion[1],
        grad_diffusion[2],
        im_a_y,
        im_a_x,
        re_a,
        (forced_term * re_mp + re_lambda_a) / pde.time,
        re_p,
        0};
  }
  const auto from_channel = [&](Index first) {
    return [&, first](Index c, Index j) {
      return channel_gradients[static_cast<std::size_t>(c)][static_cast<std::size_t>(first + j)];
    };
  };
  write_group_sums(gradients.diffusion, s.channels, 3, from_channel(0));
  write_group_sums(gradients.velocity, s.channels, 2, from_channel(3));
  write_group_sums(gradients.reaction, s.channels, 1, from_channel(5));
  write_group_sums(gradients.time, s.channels, 1, from_channel(6));
  write_group_sums(gradients.skip, s.channels, 1, from_channel(7));
}

template class PdeSsm<float>;
template class PdeSsm<double>;

namespace {

// The free functions: a block built for the call (grid and channels from the tensor). An empty
// batch computes nothing, so its block is validated but gets neither the multiplier table nor
// the transform plan (both grow with the grid: a [0, 4, 2**31, 3] tensor must not build them).
template <typename T>
PdeSsm<T> block_for(TensorView<const T, 4> grid, const PdeSsmParameters<T>& parameters,
                    const PdeSsmOptions& options, int num_threads) {
  return PdeSsm<T>(std::make_shared<const typename PdeSsm<T>::State>(
      grid.size(1), grid.size(2), grid.size(3), parameters, options, num_threads,
      grid.size(0) > 0));
}

}  // namespace

void pde_ssm(TensorView<const float, 4> x, const PdeSsmParameters<float>& parameters,
             TensorView<float, 4> out, const PdeSsmOptions& options, int num_threads) {
  block_for(x, parameters, options, num_threads).forward(x, out, num_threads);
}

void pde_ssm(TensorView<const double, 4> x, const PdeSsmParameters<double>& parameters,
             TensorView<double, 4> out, const PdeSsmOptions& options, int num_threads) {
  block_for(x, parameters, options, num_threads).forward(x, out, num_threads);
}

void pde_ssm_backward(TensorView<const float, 4> x, TensorView<const float, 4> grad_out,
                      const PdeSsmParameters<float>& parameters, TensorView<float, 4> grad_x,
                      const PdeSsmGradients<float>& gradients, const PdeSsmOptions& options,
                      int num_threads) {
  block_for(grad_out, parameters, options, num_threads)
      .backward(x, grad_out, grad_x, gradients, num_threads);
}

void pde_ssm_backward(TensorView<const double, 4> x, TensorView<const double, 4> grad_out,
                      const PdeSsmParameters<double>& parameters, TensorView<double, 4> grad_x,
                      const PdeSsmGradients<double>& gradients, const PdeSsmOptions& options,
                      int num_threads) {
  block_for(grad_out, parameters, options, num_threads)
      .backward(x, grad_out, grad_x, gradients, num_threads);
}

}  // namespace foveal
