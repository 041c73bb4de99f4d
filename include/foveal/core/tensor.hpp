// foveal/core/tensor.hpp — strided views over caller memory and owning aligned tensors.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include "foveal/core/error.hpp"

namespace foveal {

using Index = std::int64_t;

// A non-owning view: pointer, shape and strides counted in elements (any sign, any value).
// Cheap to copy; a view of T converts implicitly to a view of const T. The default-constructed
// view (null data, all-zero shape) is the "not given" value of optional arguments.
template <typename T, int Rank>
class TensorView {
  static_assert(Rank >= 1, "a TensorView has at least one dimension");

 public:
  using Shape = std::array<Index, Rank>;

  TensorView() = default;

  // Row-major contiguous view of `shape`.
  TensorView(T* data, const Shape& shape) : data_(data), shape_(shape) {
    Index stride = 1;
    for (int dim = Rank - 1; dim >= 0; --dim) {
      strides_[dim] = stride;
      stride *= shape_[dim];
    }
  }

  TensorView(T* data, const Shape& shape, const Shape& strides)
      : data_(data), shape_(shape), strides_(strides) {}

  // View of T -> view of const T.
  template <typename U,
            typename = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  TensorView(const TensorView<U, Rank>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  Index size(int dim) const { return shape_[dim]; }
  Index stride(int dim) const { return strides_[dim]; }
  static constexpr int rank() { return Rank; }

  // Number of elements (product of the shape).
  Index numel() const {
    Index count = 1;
    for (Index extent : shape_) count *= extent;
    return count;
  }
  bool empty() const { return numel() == 0; }

  // True for the default-constructed "not given" view.
  bool is_null() const {
    return data_ == nullptr &&
           std::all_of(shape_.begin(), shape_.end(), [](Index extent) { return extent == 0; });
  }

  // True when the strides are those of a row-major contiguous array (size-1 dims ignored).
  bool is_contiguous() const {
    Index expected = 1;
    for (int dim = Rank - 1; dim >= 0; --dim) {
      if (shape_[dim] != 1 && strides_[dim] != expected) return false;
      expected *= shape_[dim];
    }
    return true;
  }

  // Address of the element at the given indices (no bounds checks: validated code only). Also
  // valid for index 0 of an empty dimension, where no element may be read.
  template <typename... Indices>
  T* address(Indices... indices) const {
    static_assert(sizeof...(Indices) == Rank, "one index per dimension");
    const Index index_array[Rank] = {static_cast<Index>(indices)...};
    Index offset = 0;
    for (int dim = 0; dim < Rank; ++dim) offset += index_array[dim] * strides_[dim];
    return data_ + offset;
  }

  // Element at the given indices (no bounds checks: validated code only).
  template <typename... Indices>
  T& operator()(Indices... indices) const {
    return *address(indices...);
  }

  // The same memory with dimensions `a` and `b` swapped: [B, L, H, D] -> [B, H, L, D].
  TensorView transpose(int a, int b) const {
    TensorView swapped = *this;
    std::swap(swapped.shape_[a], swapped.shape_[b]);
    std::swap(swapped.strides_[a], swapped.strides_[b]);
    return swapped;
  }

 private:
  T* data_ = nullptr;
  Shape shape_{};
  Shape strides_{};
};

// The half-open byte range [begin, end) that a view can touch; empty for an empty view.
struct ByteRange {
  std::uintptr_t begin = 0;
  std::uintptr_t end = 0;
  bool overlaps(const ByteRange& other) const {
    return begin < end && other.begin < other.end && begin < other.end && other.begin < end;
  }
};

template <typename T, int Rank>
ByteRange byte_range(const TensorView<T, Rank>& view) {
  if (view.empty() || view.data() == nullptr) return {};
  Index lowest = 0;
  Index highest = 0;
  for (int dim = 0; dim < Rank; ++dim) {
    const Index reach = (view.size(dim) - 1) * view.stride(dim);
    (reach < 0 ? lowest : highest) += reach;
  }
  const auto base = reinterpret_cast<std::uintptr_t>(view.data());
  const auto element = static_cast<std::intptr_t>(sizeof(T));
  return {base + static_cast<std::uintptr_t>(lowest * element),
          base + static_cast<std::uintptr_t>((highest + 1) * element)};
}

namespace detail {

inline constexpr std::size_t kTensorAlignment = 64;

struct AlignedDeleter {
  void operator()(void* pointer) const { std::free(pointer); }
};

template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedDeleter>;

// 64-byte aligned, uninitialized storage for `count` elements of T (null when count is 0).
template <typename T>
AlignedArray<T> allocate_aligned(std::size_t count) {
  if (count == 0) return nullptr;
  check(count <= (SIZE_MAX - kTensorAlignment) / sizeof(T), "allocation of ", count,
        " elements overflows");
  const std::size_t bytes =
      (count * sizeof(T) + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  void* memory = std::aligned_alloc(kTensorAlignment, bytes);
  if (memory == nullptr) throw std::bad_alloc();
  return std::unique_ptr<T[], AlignedDeleter>(static_cast<T*>(memory));
}

}  // namespace detail

// An owning, row-major contiguous, 64-byte aligned, zero-initialized tensor. Move-only.
template <typename T, int Rank>
class Tensor {
  static_assert(std::is_trivially_copyable_v<T>, "Tensor holds plain numbers");

 public:
  using Shape = std::array<Index, Rank>;

  Tensor() = default;
  explicit Tensor(const Shape& shape) : shape_(shape) {
    Index count = 1;
    for (int dim = 0; dim < Rank; ++dim) {
      check(shape[dim] >= 0, "Tensor: shape[", dim, "] must be >= 0, got ", shape[dim]);
      count *= shape[dim];
    }
    storage_ = detail::allocate_aligned<T>(static_cast<std::size_t>(count));
    if (count > 0) std::memset(static_cast<void*>(storage_.get()), 0, sizeof(T) * count);
  }

  T* data() { return storage_.get(); }
  const T* data() const { return storage_.get(); }
  const Shape& shape() const { return shape_; }
  Index size(int dim) const { return shape_[dim]; }
  Index numel() const { return view().numel(); }

  TensorView<T, Rank> view() { return TensorView<T, Rank>(storage_.get(), shape_); }
  TensorView<const T, Rank> view() const {
    return TensorView<const T, Rank>(storage_.get(), shape_);
  }
  operator TensorView<T, Rank>() { return view(); }              // NOLINT
  operator TensorView<const T, Rank>() const { return view(); }  // NOLINT

  template <typename... Indices>
  T& operator()(Indices... indices) {
    return view()(indices...);
  }
  template <typename... Indices>
  const T& operator()(Indices... indices) const {
    return view()(indices...);
  }

 private:
  Shape shape_{};
  std::unique_ptr<T[], detail::AlignedDeleter> storage_;
};

}  // namespace foveal
