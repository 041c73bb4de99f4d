// tests/cpp/harness.hpp — the one test harness every operator's tests share.
//
// Seeded random inputs, the same logical tensor placed in memory with different strides,
// a normalized error against a float64 reference, bitwise comparisons, and checks that a
// call is rejected with a message naming what was wrong.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::test {

// The thread-count tests compare 1 thread with several on shapes small enough that the work
// threshold would run them all on one thread: every test binary turns it off, and
// test_parallel.cpp, which checks the threshold, turns it back on where it needs it.
inline const bool kWorkThresholdOff = (detail::set_min_work_per_thread(0), true);

template <int Rank>
using Shape = std::array<Index, Rank>;

// ---------------------------------------------------------------------------------------------
// Describing a case, for SCOPED_TRACE.

// "[2, 4, 37, 19]".
template <std::size_t Rank>
std::string shape_string(const std::array<Index, Rank>& shape) {
  std::ostringstream text;
  text << "[";
  for (std::size_t dim = 0; dim < Rank; ++dim) text << (dim > 0 ? ", " : "") << shape[dim];
  text << "]";
  return text.str();
}

// The pieces streamed one after another: SCOPED_TRACE(describe("seed=", seed, " q=", ...)).
template <typename... Pieces>
std::string describe(const Pieces&... pieces) {
  std::ostringstream text;
  (text << ... << pieces);
  return text.str();
}

// ---------------------------------------------------------------------------------------------
// Random inputs.

// A seeded source of test data (std::mt19937_64): the seed alone reproduces a case.
class RandomSource {
 public:
  explicit RandomSource(std::uint64_t seed) : seed_(seed), engine_(seed) {}

  std::uint64_t seed() const { return seed_; }

  // `count` samples of N(mean, stddev^2).
  std::vector<double> normal(std::size_t count, double mean = 0, double stddev = 1) {
    std::normal_distribution<double> distribution(mean, stddev);
    std::vector<double> values(count);
    for (double& value : values) value = distribution(engine_);
    return values;
  }

  // `count` samples uniform in [low, high).
  std::vector<double> uniform(std::size_t count, double low, double high) {
    std::uniform_real_distribution<double> distribution(low, high);
    std::vector<double> values(count);
    for (double& value : values) value = distribution(engine_);
    return values;
  }

  // An integer uniform in [low, high] (both included).
  Index integer(Index low, Index high) {
    return std::uniform_int_distribution<Index>(low, high)(engine_);
  }

  // True with probability `probability`.
  bool chance(double probability) { return std::bernoulli_distribution(probability)(engine_); }

  // One element of `choices`, uniformly.
  template <typename Choices>
  auto pick(const Choices& choices) {
    const auto count = static_cast<Index>(std::size(choices));
    return *(std::begin(choices) + integer(0, count - 1));
  }
  template <typename Element>
  Element pick(std::initializer_list<Element> choices) {
    return *(choices.begin() + integer(0, static_cast<Index>(choices.size()) - 1));
  }

 private:
  std::uint64_t seed_;
  std::mt19937_64 engine_;
};

// A copy of `values` converted to T (double -> float rounds to nearest).
template <typename T>
std::vector<T> convert(const std::vector<double>& values) {
  return std::vector<T>(values.begin(), values.end());
}

// `values` rounded to T and back: inputs a float64 reference can share with a T kernel.
template <typename T>
std::vector<double> round_to(const std::vector<double>& values) {
  std::vector<double> rounded(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) rounded[i] = static_cast<T>(values[i]);
  return rounded;
}

// ---------------------------------------------------------------------------------------------
// Comparing results.

// Normalized error: max |got - ref| / max |ref| (finite ref entries; 1 when all are 0); a
// non-finite ref entry must be matched exactly, else the error is +inf.
struct NormalizedError {
  double value = 0;
  std::size_t worst_index = 0;  // where the largest difference is
};

inline NormalizedError max_normalized_error(const std::vector<double>& got,
                                            const std::vector<double>& ref) {
  constexpr double kInfinity = std::numeric_limits<double>::infinity();
  if (got.size() != ref.size()) return {kInfinity, 0};
  double ref_norm = 0;
  for (double value : ref)
    if (std::isfinite(value)) ref_norm = std::max(ref_norm, std::abs(value));
  if (ref_norm == 0) ref_norm = 1;
  NormalizedError result;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    double difference = 0;
    if (!std::isfinite(ref[i]) || !std::isfinite(got[i])) {
      difference = (got[i] == ref[i]) ? 0 : kInfinity;
    } else {
      difference = std::abs(got[i] - ref[i]);
    }
    const double normalized = difference / ref_norm;
    if (normalized > result.value) result = {normalized, i};
  }
  return result;
}

// Passes when max_normalized_error(got, ref) <= tolerance; says where it fails otherwise.
inline ::testing::AssertionResult matches_reference(const std::vector<double>& got,
                                                    const std::vector<double>& ref,
                                                    double tolerance) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << "size " << got.size() << " != reference size " << ref.size();
  }
  const NormalizedError error = max_normalized_error(got, ref);
  if (error.value <= tolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "normalized error " << error.value << " > tolerance " << tolerance
         << " (worst at flat index " << error.worst_index << ": got " << got[error.worst_index]
         << ", reference " << ref[error.worst_index] << ")";
}

// Passes when both hold the same bits element by element (so -0 != 0, -inf == -inf).
inline ::testing::AssertionResult bitwise_equal(const std::vector<double>& got,
                                                const std::vector<double>& want) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(double)) != 0) {
      return ::testing::AssertionFailure()
             << "first difference at flat index " << i << ": " << got[i] << " vs " << want[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// Moving values between logical row-major order and strided views.

template <int Rank>
Index shape_numel(const Shape<Rank>& shape) {
  Index count = 1;
  for (Index extent : shape) count *= extent;
  return count;
}

// Calls visit(element) for every element of `view` in logical row-major order.
template <typename T, int Rank, typename Visit>
void for_each_element(const TensorView<T, Rank>& view, Visit&& visit) {
  if (view.empty()) return;
  Shape<Rank> index{};
  for (;;) {
    Index offset = 0;
    for (int dim = 0; dim < Rank; ++dim) offset += index[dim] * view.stride(dim);
    visit(view.data()[offset]);
    int dim = Rank - 1;
    while (dim >= 0 && ++index[dim] == view.size(dim)) index[dim--] = 0;
    if (dim < 0) return;
  }
}

// The elements of `view` in logical row-major order, as double.
template <typename T, int Rank>
std::vector<double> gather(const TensorView<T, Rank>& view) {
  std::vector<double> values;
  values.reserve(static_cast<std::size_t>(view.numel()));
  for_each_element(view, [&](T& element) { values.push_back(static_cast<double>(element)); });
  return values;
}

// Writes `values` (logical row-major order) into `view`, converting to T.
template <typename T, int Rank>
void scatter(const std::vector<double>& values, const TensorView<T, Rank>& view) {
  std::size_t next = 0;
  for_each_element(view, [&](T& element) { element = static_cast<T>(values.at(next++)); });
}

// ---------------------------------------------------------------------------------------------
// Strided views of existing buffers.

// Row-major strides of `shape` with `padding` unused elements after every row of every
// dimension, so that no dimension but the last is contiguous.
template <int Rank>
Shape<Rank> padded_strides(const Shape<Rank>& shape, Index padding) {
  Shape<Rank> strides{};
  Index stride = 1;
  for (int dim = Rank - 1; dim >= 0; --dim) {
    strides[dim] = stride;
    stride = stride * shape[dim] + padding;
  }
  return strides;
}

// The number of elements a buffer needs to hold a view of `shape` with non-negative `strides`.
template <int Rank>
Index span_elements(const Shape<Rank>& shape, const Shape<Rank>& strides) {
  Index last = 0;
  for (int dim = 0; dim < Rank; ++dim) {
    if (shape[dim] == 0) return 0;
    last += (shape[dim] - 1) * strides[dim];
  }
  return last + 1;
}

// A view with logical shape `shape` of `data` laid out with dimensions a and b swapped,
// made with TensorView::transpose (no copy).
template <typename T, int Rank>
TensorView<T, Rank> swapped_layout_view(T* data, const Shape<Rank>& shape, int a, int b) {
  Shape<Rank> memory_shape = shape;
  std::swap(memory_shape[a], memory_shape[b]);
  return TensorView<T, Rank>(data, memory_shape).transpose(a, b);
}

// An existing [B, L, H, D] buffer seen as [B, H, L, D]; `bhld_shape` is the logical shape.
template <typename T>
TensorView<T, 4> blhd_as_bhld(T* data, const Shape<4>& bhld_shape) {
  return swapped_layout_view<T, 4>(data, bhld_shape, 1, 2);
}

// A view of `data` with padded (non-contiguous) row strides: see padded_strides. The buffer
// must hold span_elements(shape, padded_strides(shape, padding)) elements.
template <typename T, int Rank>
TensorView<T, Rank> padded_view(T* data, const Shape<Rank>& shape, Index padding) {
  return TensorView<T, Rank>(data, shape, padded_strides<Rank>(shape, padding));
}

// The memory of `view` with dimension `dim` walked backwards (negative stride).
template <typename T, int Rank>
TensorView<T, Rank> flipped(const TensorView<T, Rank>& view, int dim) {
  Shape<Rank> strides = view.strides();
  T* data = view.data();
  if (view.size(dim) > 0) data += (view.size(dim) - 1) * strides[dim];
  strides[dim] = -strides[dim];
  return TensorView<T, Rank>(data, view.shape(), strides);
}

// `view` with every size-1 dimension given an unusual stride (never stepped over, so any
// stride is valid there).
template <typename T, int Rank>
TensorView<T, Rank> with_odd_unit_strides(const TensorView<T, Rank>& view) {
  Shape<Rank> strides = view.strides();
  for (int dim = 0; dim < Rank; ++dim)
    if (view.size(dim) == 1) strides[dim] = (dim % 2 == 0 ? 977 : -31) * (dim + 1);
  return TensorView<T, Rank>(view.data(), view.shape(), strides);
}

// How a StridedBuffer places its logical tensor in memory.
enum class Layout {
  kContiguous,      // row-major
  kSwapped12,       // dims 1 and 2 swapped in memory ([B, L, H, D] seen as [B, H, L, D])
  kPadded,          // padded_strides with 3 elements of padding
  kReversed,        // row-major, dimension Rank - 2 walked backwards (negative stride)
  kOddUnitStrides,  // row-major, size-1 dimensions with unusual strides
};

inline const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous:
      return "contiguous";
    case Layout::kSwapped12:
      return "swapped dims 1 and 2";
    case Layout::kPadded:
      return "padded rows";
    case Layout::kReversed:
      return "reversed dim Rank-2";
    case Layout::kOddUnitStrides:
      return "odd strides on size-1 dims";
  }
  return "?";
}

// Owned memory holding a tensor of `shape` in a given layout; every element outside the view
// starts as `fill`, so reads of padding (fill NaN) and stray writes (outside_untouched) show.
template <typename T, int Rank>
class StridedBuffer {
 public:
  StridedBuffer(const Shape<Rank>& shape, Layout layout, T fill) : fill_(fill) {
    constexpr Index kPadding = 3;
    switch (layout) {
      case Layout::kPadded:
        storage_.assign(static_cast<std::size_t>(
                            span_elements<Rank>(shape, padded_strides<Rank>(shape, kPadding))),
                        fill);
        view_ = padded_view<T, Rank>(storage_.data(), shape, kPadding);
        break;
      case Layout::kSwapped12:
        storage_.assign(static_cast<std::size_t>(shape_numel<Rank>(shape)), fill);
        if constexpr (Rank >= 3) {
          view_ = swapped_layout_view<T, Rank>(storage_.data(), shape, 1, 2);
        } else {
          view_ = TensorView<T, Rank>(storage_.data(), shape);
        }
        break;
      case Layout::kReversed:
        storage_.assign(static_cast<std::size_t>(shape_numel<Rank>(shape)), fill);
        view_ = flipped(TensorView<T, Rank>(storage_.data(), shape), Rank >= 2 ? Rank - 2 : 0);
        break;
      case Layout::kOddUnitStrides:
        storage_.assign(static_cast<std::size_t>(shape_numel<Rank>(shape)), fill);
        view_ = with_odd_unit_strides(TensorView<T, Rank>(storage_.data(), shape));
        break;
      case Layout::kContiguous:
        storage_.assign(static_cast<std::size_t>(shape_numel<Rank>(shape)), fill);
        view_ = TensorView<T, Rank>(storage_.data(), shape);
        break;
    }
  }
  StridedBuffer(const std::vector<double>& values, const Shape<Rank>& shape, Layout layout, T fill)
      : StridedBuffer(shape, layout, fill) {
    scatter(values, view_);
  }
  StridedBuffer(const StridedBuffer&) = delete;
  StridedBuffer& operator=(const StridedBuffer&) = delete;

  TensorView<T, Rank> view() const { return view_; }
  TensorView<const T, Rank> const_view() const { return view_; }

  // True when every element outside the view still holds the fill value (bitwise).
  bool outside_untouched() const {
    std::vector<bool> inside(storage_.size(), false);
    for_each_element(view_, [&](T& element) {
      inside[static_cast<std::size_t>(&element - storage_.data())] = true;
    });
    for (std::size_t i = 0; i < storage_.size(); ++i)
      if (!inside[i] && std::memcmp(&storage_[i], &fill_, sizeof(T)) != 0) return false;
    return true;
  }

 private:
  T fill_;
  std::vector<T> storage_;
  TensorView<T, Rank> view_;
};

// ---------------------------------------------------------------------------------------------
// Rejected input.

// Passes when call() throws foveal::Error whose message contains every piece.
template <typename Call>
::testing::AssertionResult throws_error_with(Call&& call,
                                             std::initializer_list<std::string> pieces) {
  try {
    call();
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string& piece : pieces) {
      if (message.find(piece) == std::string::npos) {
        return ::testing::AssertionFailure()
               << "message \"" << message << "\" does not contain \"" << piece << "\"";
      }
    }
    return ::testing::AssertionSuccess() << message;
  } catch (const std::exception& other) {
    return ::testing::AssertionFailure() << "threw something else: " << other.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

// ---------------------------------------------------------------------------------------------
// Finite differences.

// The gradient of the scalar f() in every element of `values` by central differences,
// (f(x + step) − f(x − step)) / 2 step, one element at a time; `values` is what f reads and is
// left as it was.
template <typename Scalar>
std::vector<double> central_differences(std::vector<double>& values, double step, Scalar&& f) {
  std::vector<double> gradient(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double original = values[i];
    values[i] = original + step;
    const double above = f();
    values[i] = original - step;
    const double below = f();
    values[i] = original;
    gradient[i] = (above - below) / (2 * step);
  }
  return gradient;
}

// ---------------------------------------------------------------------------------------------
// Threads.

// Puts foveal's global thread count back to its default (set_num_threads(0)) on scope exit.
class DefaultThreadsOnExit {
 public:
  DefaultThreadsOnExit() = default;
  DefaultThreadsOnExit(const DefaultThreadsOnExit&) = delete;
  DefaultThreadsOnExit& operator=(const DefaultThreadsOnExit&) = delete;
  ~DefaultThreadsOnExit() { set_num_threads(0); }
};

}  // namespace foveal::test
