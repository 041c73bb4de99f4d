// foveal/core/tensor.hpp — strided views over caller memory and owning aligned tensors.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define FOVEAL_HAS_MMAP 1
#else
#define FOVEAL_HAS_MMAP 0
#endif

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

  // Row-major contiguous view of `shape`. The strides of an empty view whose extents multiply
  // past 2^63 (a [B, 0, 2^62, D] tensor: it addresses nothing) are 0 from the overflow on.
  TensorView(T* data, const Shape& shape) : data_(data), shape_(shape) {
    Index stride = 1;
    for (int dim = Rank - 1; dim >= 0; --dim) {
      strides_[dim] = stride;
      if (__builtin_mul_overflow(stride, shape_[dim], &stride)) stride = 0;
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

// "[2, 3, 4]"
inline std::string shape_string(const Index* shape, std::size_t rank) {
  std::string text = "[";
  for (std::size_t dim = 0; dim < rank; ++dim)
    text += (dim == 0 ? "" : ", ") + std::to_string(shape[dim]);
  return text + "]";
}

// The element count of an object of `shape` whose elements take `element_bytes` bytes: the one
// place foveal multiplies sizes before it allocates (tensors, scratch, the vectors sized from
// user input). Every extent must be >= 0, and the element count and the byte count must fit
// in an Index (2^63 - 1); otherwise throws foveal::Error naming `what` and the shape. A shape
// with a zero extent has 0 elements whatever the others.
inline Index checked_numel(const char* what, const Index* shape, std::size_t rank,
                           std::size_t element_bytes) {
  for (std::size_t dim = 0; dim < rank; ++dim)
    check(shape[dim] >= 0, what, ": shape[", dim, "] must be >= 0, got ", shape[dim], " (shape ",
          shape_string(shape, rank), ")");
  for (std::size_t dim = 0; dim < rank; ++dim)
    if (shape[dim] == 0) return 0;
  Index count = 1;
  Index bytes = 0;
  bool overflow = false;
  for (std::size_t dim = 0; dim < rank; ++dim)
    overflow |= __builtin_mul_overflow(count, shape[dim], &count);
  overflow |= __builtin_mul_overflow(count, static_cast<Index>(element_bytes), &bytes);
  check(!overflow, what, ": shape ", shape_string(shape, rank), " of ", element_bytes,
        "-byte elements is too large: its byte count overflows a 64-bit size (2^63 - 1)");
  return count;
}

// checked_numel for T elements: checked_numel<float>("VQ codebook", {codes, dim}).
template <typename T>
Index checked_numel(const char* what, std::initializer_list<Index> shape) {
  return checked_numel(what, shape.begin(), shape.size(), sizeof(T));
}

// a + b for sizes >= 0, checked like checked_numel.
inline Index checked_add(const char* what, Index a, Index b) {
  Index sum = 0;
  check(a >= 0 && b >= 0 && !__builtin_add_overflow(a, b, &sum), what, ": ", a, " + ", b,
        " must be a size >= 0 that fits in 64 bits");
  return sum;
}

inline constexpr std::size_t kTensorAlignment = 64;
// Zeroed allocations of at least this many bytes come straight from the kernel (mmap on POSIX):
// zero pages are mapped on first touch, so untouched pages cost no memory and nothing is
// written to zero them.
inline constexpr std::size_t kLazyAllocationBytes = std::size_t{1} << 21;

struct AlignedDeleter {
  std::size_t mapped_bytes = 0;  // nonzero: the length of an mmap-ed region
  void operator()(void* pointer) const {
#if FOVEAL_HAS_MMAP
    if (mapped_bytes != 0) {
      munmap(pointer, mapped_bytes);
      return;
    }
#endif
    std::free(pointer);
  }
};

template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedDeleter>;

// 64-byte aligned storage of `bytes` > 0 bytes, zeroed when asked; null when the system has no
// memory for it.
inline std::unique_ptr<void, AlignedDeleter> allocate_bytes(std::size_t bytes, bool zeroed) {
  const std::size_t rounded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
#if FOVEAL_HAS_MMAP
  if (zeroed && rounded >= kLazyAllocationBytes) {
    void* memory =
        mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return {nullptr, AlignedDeleter{}};
    return {memory, AlignedDeleter{rounded}};
  }
#endif
  void* memory = std::aligned_alloc(kTensorAlignment, rounded);
  if (memory != nullptr && zeroed) std::memset(memory, 0, rounded);
  return {memory, AlignedDeleter{}};
}

// 64-byte aligned storage for `count` elements of T (null when count is 0), uninitialized
// unless `zeroed`. Throws foveal::Error when the byte count overflows and foveal::MemoryError
// (naming `what` and the byte count) when the system cannot provide it.
template <typename T>
AlignedArray<T> allocate_aligned(std::size_t count, const char* what = "scratch buffer",
                                 bool zeroed = false) {
  if (count == 0) return nullptr;
  check(count <= static_cast<std::size_t>(std::numeric_limits<Index>::max()) / sizeof(T), what,
        ": ", count, " elements of ", sizeof(T), " bytes overflow a 64-bit size (2^63 - 1)");
  const std::size_t bytes = count * sizeof(T);
  auto memory = allocate_bytes(bytes, zeroed);
  if (memory == nullptr)
    throw MemoryError("foveal: " + std::string(what) + ": cannot allocate " +
                      std::to_string(bytes) + " bytes (out of memory)");
  const AlignedDeleter deleter = memory.get_deleter();
  return AlignedArray<T>(static_cast<T*>(memory.release()), deleter);
}

}  // namespace detail

// An owning, row-major contiguous, 64-byte aligned, zero-initialized tensor. Move-only. Sizes
// are checked (detail::checked_numel): a shape whose byte count overflows throws foveal::Error,
// one the system cannot provide foveal::MemoryError. Large tensors are zeroed lazily by the
// kernel (detail::kLazyAllocationBytes): their untouched pages take no memory.
template <typename T, int Rank>
class Tensor {
  static_assert(std::is_trivially_copyable_v<T>, "Tensor holds plain numbers");

 public:
  using Shape = std::array<Index, Rank>;

  Tensor() = default;
  // `what` names the tensor in error messages ("KVCache keys").
  explicit Tensor(const Shape& shape, const char* what = "Tensor") : shape_(shape) {
    const Index count = detail::checked_numel(what, shape.data(), Rank, sizeof(T));
    if (count == 0) return;
    auto memory = detail::allocate_bytes(static_cast<std::size_t>(count) * sizeof(T), true);
    if (memory == nullptr)
      throw MemoryError("foveal: " + std::string(what) + ": cannot allocate " +
                        std::to_string(static_cast<std::size_t>(count) * sizeof(T)) +
                        " bytes for shape " + detail::shape_string(shape.data(), Rank) +
                        " (out of memory)");
    const detail::AlignedDeleter deleter = memory.get_deleter();
    storage_ = detail::AlignedArray<T>(static_cast<T*>(memory.release()), deleter);
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
