// python/foveal/_tensor.hpp — any tensor a Python caller passes (a numpy array, a torch CPU
// tensor, anything with __dlpack__ or the buffer protocol) as one type, `Tensor`, with a pybind11
// type caster, and typed foveal views of the same memory. Never copies or converts.
//
// The caster accepts every object: what it cannot use (a list, a CUDA tensor, a tensor that
// requires grad) becomes a recorded problem that the first typed view reports, because only the
// binding knows the function and argument name a message must carry. So a binding reads
//   q.view<const T, 4>(fn, "q", "B, Hq, Lq, D")
// and a wrong rank, dtype, stride or device is a message naming q: TypeError for a dtype or an
// object that is no tensor, ValueError (foveal::Error) for the rest.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/core/dtype.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::python {

namespace py = pybind11;

// The element types a Tensor can hold; `other` for the rest (its name is kept for messages).
enum class DType : std::uint8_t {
  other,
  boolean,
  uint8,
  int32,
  int64,
  float16,
  bfloat16,
  float32,
  float64
};

template <typename T>
constexpr DType dtype_of() {
  using E = std::remove_const_t<T>;
  if constexpr (std::is_same_v<E, float>) return DType::float32;
  if constexpr (std::is_same_v<E, double>) return DType::float64;
  if constexpr (std::is_same_v<E, std::int64_t>) return DType::int64;
  if constexpr (std::is_same_v<E, std::int32_t>) return DType::int32;
  if constexpr (std::is_same_v<E, std::uint8_t>) return DType::uint8;
  if constexpr (std::is_same_v<E, bool>) return DType::boolean;
  if constexpr (std::is_same_v<E, foveal::bfloat16>) return DType::bfloat16;
  if constexpr (std::is_same_v<E, foveal::float16>) return DType::float16;
  return DType::other;
}

const char* dtype_name(DType dtype);

// A message with foveal's "foveal: " prefix.
template <typename... Pieces>
std::string message(Pieces&&... pieces) {
  std::ostringstream text;
  text << "foveal: ";
  detail::append_all(text, std::forward<Pieces>(pieces)...);
  return text.str();
}

// Python's TypeError, and foveal::Error (Python's ValueError), with that message.
template <typename... Pieces>
[[noreturn]] void type_error(Pieces&&... pieces) {
  throw py::type_error(message(std::forward<Pieces>(pieces)...));
}
template <typename... Pieces>
[[noreturn]] void value_error(Pieces&&... pieces) {
  throw Error(message(std::forward<Pieces>(pieces)...));
}

class Tensor {
 public:
  static constexpr int kMaxRank = 8;

  // Why an object cannot be used as a tensor (reported by the first typed view).
  enum class Problem : std::uint8_t { none, not_a_tensor, not_on_cpu, requires_grad, rejected };

  // The object as a tensor (see the caster below).
  static Tensor from(py::handle source);

  DType dtype() const { return dtype_; }
  // The dtype's name ("float32", or numpy's / torch's name of an unsupported one).
  std::string dtype_name() const;
  int rank() const { return rank_; }
  Index size(int dim) const { return shape_[dim]; }
  bool is_torch() const { return is_torch_; }
  // What keeps the memory alive (the array, or the DLPack capsule).
  const py::object& owner() const { return keep_alive_; }

  // Throws the recorded problem, if any, naming `function` and `name`.
  void require_usable(const char* function, const char* name) const;

  // A view of the memory as T with exactly Rank dimensions. `dims` names them for messages
  // ("B, Hq, Lq, D"); `dtype_note` says where the expected dtype comes from ("the dtype of q").
  template <typename T, int Rank>
  TensorView<T, Rank> view(const char* function, const char* name, const char* dims = nullptr,
                           const char* dtype_note = nullptr) const {
    require_usable(function, name);
    if (rank_ != Rank) reject_rank(function, name, Rank, dims);
    return typed_view<T, Rank>(function, name, dtype_note);
  }

  // A tensor of rank >= keep + 1... as a view whose dimensions before the last `keep` are merged
  // into one: keep = 1 gives [rows, n] of a [..., n] tensor, keep = 0 gives [size] of any
  // tensor (rank 0 included). An input whose merged dimensions have no single stride is copied
  // into `copy`; an output must merge (foveal::Error otherwise).
  template <typename T, int Keep>
  TensorView<T, Keep + 1> merged_view(const char* function, const char* name,
                                      std::vector<std::remove_const_t<T>>& copy,
                                      const char* dtype_note = nullptr) const {
    require_usable(function, name);
    if (rank_ < Keep || rank_ > kMaxRank)
      value_error(function, ": ", name, " must have at least ", Keep, " dimension",
                  Keep == 1 ? "" : "s", ", got ", rank_);
    if (dtype_ != dtype_of<T>()) reject_dtype(function, name, dtype_of<T>(), dtype_note);
    const Merge merge = merge_leading(function, name, rank_ - Keep);
    typename TensorView<T, Keep + 1>::Shape shape{}, strides{};
    shape[0] = merge.size;
    strides[0] = merge.stride;
    for (int dim = 0; dim < Keep; ++dim) {
      shape[dim + 1] = shape_[rank_ - Keep + dim];
      strides[dim + 1] = strides_[rank_ - Keep + dim];
    }
    const auto view = typed_view<T, Keep + 1>(function, name, dtype_note, shape, strides);
    if (merge.single_stride) return view;
    if constexpr (!std::is_const_v<T>) {
      value_error(function, ": ", name,
                  " must have leading dimensions that flatten without a copy (an output)");
    } else {
      copy.resize(static_cast<std::size_t>(view.numel()));
      std::size_t at = 0;
      for_each_leading_offset(rank_ - Keep, [&](Index offset) {
        if constexpr (Keep == 0) {
          copy[at++] = static_cast<const std::remove_const_t<T>*>(data_)[offset];
        } else {
          for (Index j = 0; j < shape[1]; ++j)
            copy[at++] = static_cast<const std::remove_const_t<T>*>(data_)[offset + j * strides[1]];
        }
      });
      strides[0] = Keep == 0 ? 1 : shape[1];
      if constexpr (Keep == 1) strides[1] = 1;
      return TensorView<T, Keep + 1>(copy.data(), shape, strides);
    }
  }

  // Whether both have the same shape; the shape as Python writes it, for messages.
  bool same_shape(const Tensor& other) const;
  std::string shape_string() const;

  // As view(), but a tensor of rank 1..Rank is accepted with leading size-1 dimensions added
  // (a broadcast bias of shape [Lq, Lk] is [1, 1, Lq, Lk]).
  template <typename T, int Rank>
  TensorView<T, Rank> view_leading_ones(const char* function, const char* name, int min_rank,
                                        const char* dims, const char* dtype_note) const {
    require_usable(function, name);
    if (rank_ < min_rank || rank_ > Rank) reject_rank_range(function, name, min_rank, Rank, dims);
    Tensor padded = *this;
    const int missing = Rank - rank_;
    for (int dim = Rank - 1; dim >= 0; --dim) {
      padded.shape_[dim] = dim >= missing ? shape_[dim - missing] : 1;
      padded.strides_[dim] = dim >= missing ? strides_[dim - missing] : 0;
    }
    padded.rank_ = Rank;
    return padded.typed_view<T, Rank>(function, name, dtype_note);
  }

 private:
  template <typename T, int Rank>
  TensorView<T, Rank> typed_view(const char* function, const char* name,
                                 const char* dtype_note) const {
    typename TensorView<T, Rank>::Shape shape{}, strides{};
    for (int dim = 0; dim < Rank; ++dim) {
      shape[dim] = shape_[dim];
      strides[dim] = strides_[dim];
    }
    return typed_view<T, Rank>(function, name, dtype_note, shape, strides);
  }

  template <typename T, int Rank>
  TensorView<T, Rank> typed_view(const char* function, const char* name, const char* dtype_note,
                                 const typename TensorView<T, Rank>::Shape& shape,
                                 const typename TensorView<T, Rank>::Shape& strides) const {
    if (dtype_ != dtype_of<T>()) reject_dtype(function, name, dtype_of<T>(), dtype_note);
    check(reinterpret_cast<std::uintptr_t>(data_) % alignof(std::remove_const_t<T>) == 0, function,
          ": ", name, " is not aligned to its element size ", alignof(std::remove_const_t<T>),
          " (a view at an odd byte offset)");
    if constexpr (!std::is_const_v<T>) check(writable_, function, ": ", name, " must be writable");
    return TensorView<T, Rank>(static_cast<T*>(data_), shape, strides);
  }

  [[noreturn]] void reject_rank(const char* function, const char* name, int rank,
                                const char* dims) const;
  [[noreturn]] void reject_rank_range(const char* function, const char* name, int min_rank,
                                      int max_rank, const char* dims) const;
  [[noreturn]] void reject_dtype(const char* function, const char* name, DType expected,
                                 const char* dtype_note) const;
  // Dimensions [0, count) merged: their element count, and the stride of the merged dimension
  // when one stride walks them all.
  struct Merge {
    Index size = 1;
    Index stride = 1;
    bool single_stride = true;
  };
  Merge merge_leading(const char* function, const char* name, int count) const;
  // Calls f(offset) for every index of dimensions [0, count), in row-major order.
  template <typename F>
  void for_each_leading_offset(int count, F&& f) const {
    std::array<Index, kMaxRank> index{};
    Index total = 1;
    for (int dim = 0; dim < count; ++dim) total *= shape_[dim];
    for (Index step = 0; step < total; ++step) {
      Index offset = 0;
      for (int dim = 0; dim < count; ++dim) offset += index[dim] * strides_[dim];
      f(offset);
      for (int dim = count - 1; dim >= 0 && ++index[dim] == shape_[dim]; --dim) index[dim] = 0;
    }
  }

  void from_numpy(const py::array& array);
  void from_dlpack(const py::object& capsule_owner);

  py::object keep_alive_;  // the source object, and a DLPack capsule while its memory is read
  void* data_ = nullptr;
  DType dtype_ = DType::other;
  std::string other_dtype_;
  int rank_ = 0;
  std::array<Index, kMaxRank> shape_{}, strides_{};  // strides in elements
  bool writable_ = false;
  bool is_torch_ = false;
  Problem problem_ = Problem::none;
  std::string problem_detail_;  // the object's type, its device, or a rejection message
};

// Calls f(float{}) or f(double{}) after the tensor's dtype; other dtypes are a TypeError naming
// the argument.
template <typename F>
decltype(auto) with_float_type(const char* function, const char* name, const Tensor& tensor,
                               F&& f) {
  tensor.require_usable(function, name);
  if (tensor.dtype() == DType::float64) return f(double{});
  if (tensor.dtype() != DType::float32)
    type_error(function, ": ", name, " must have dtype float32 or float64, got ",
               tensor.dtype_name());
  return f(float{});
}

// Calls f(float{}), f(double{}), f(bfloat16{}) or f(float16{}) after the tensor's dtype (the
// element types foveal stores); other dtypes are a TypeError naming the argument.
template <typename F>
decltype(auto) with_storage_type(const char* function, const char* name, const Tensor& tensor,
                                 F&& f) {
  tensor.require_usable(function, name);
  if (tensor.dtype() == DType::bfloat16) return f(foveal::bfloat16{});
  if (tensor.dtype() == DType::float16) return f(foveal::float16{});
  if (tensor.dtype() == DType::float64) return f(double{});
  if (tensor.dtype() != DType::float32)
    type_error(function, ": ", name, " must have dtype float32, float64, bfloat16 or float16, got ",
               tensor.dtype_name());
  return f(float{});
}

// A view of 8-bit cache storage (foveal::q8_block) held by a uint8 tensor whose last dimension
// is the 36 bytes of one block (its float32 scale, then its 32 int8 values): Rank dimensions of
// blocks, the last of them contiguous. The data must be 4-byte aligned (the scale) and every
// other stride a whole number of blocks; ValueError otherwise.
template <int Rank>
foveal::TensorView<foveal::q8_block, Rank> q8_view(const Tensor& tensor, const char* function,
                                                   const char* name, const char* dims) {
  static_assert(sizeof(foveal::q8_block) == 36 && alignof(foveal::q8_block) == 4,
                "a q8_block is a float and 32 int8 values");
  constexpr Index kBytes = sizeof(foveal::q8_block);
  const auto bytes = tensor.view<std::uint8_t, Rank + 1>(function, name, dims);
  if (bytes.size(Rank) != kBytes || bytes.stride(Rank) != 1)
    value_error(function, ": ", name,
                " must end in a contiguous dimension of 36 bytes (one 8-bit block: a float32 "
                "scale, then 32 int8 values), got shape ",
                tensor.shape_string());
  if (reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(foveal::q8_block) != 0)
    value_error(function, ": ", name,
                " must start at a 4-byte aligned address (each block begins with a float32)");
  typename TensorView<foveal::q8_block, Rank>::Shape shape{}, strides{};
  for (int dim = 0; dim < Rank; ++dim) {
    shape[dim] = bytes.size(dim);
    const Index stride = bytes.stride(dim);
    const bool blocks = dim == Rank - 1;  // the blocks of a row: contiguous
    if (shape[dim] > 1 && (blocks ? stride != kBytes : stride % kBytes != 0))
      value_error(
          function, ": ", name, ".stride(", dim, ") must be ",
          blocks ? "36 bytes (the blocks of a row contiguous)" : "a whole number of 36-byte blocks",
          ", got ", stride, " bytes");
    strides[dim] = shape[dim] > 1 ? stride / kBytes : (blocks ? 1 : 0);
  }
  return TensorView<foveal::q8_block, Rank>(reinterpret_cast<foveal::q8_block*>(bytes.data()),
                                            shape, strides);
}

// A read-only numpy array over a cache's storage `view`, keeping `owner` alive.
template <typename T>
py::array readonly_array(const foveal::TensorView<const T, 4>& view, const py::object& owner) {
  std::vector<py::ssize_t> shape(view.shape().begin(), view.shape().end());
  std::vector<py::ssize_t> strides;
  for (foveal::Index stride : view.strides())
    strides.push_back(static_cast<py::ssize_t>(stride * static_cast<foveal::Index>(sizeof(T))));
  // numpy has no bfloat16: its bits are handed out as uint16 (the Python layer views them as
  // torch.bfloat16).
  const py::dtype dtype = [] {
    if constexpr (std::is_same_v<T, foveal::bfloat16>) {
      return py::dtype("uint16");
    } else if constexpr (std::is_same_v<T, foveal::float16>) {
      return py::dtype("float16");
    } else {
      return py::dtype::of<T>();
    }
  }();
  py::array array(dtype, shape, strides, view.data(), owner);
  array.attr("setflags")(py::arg("write") = false);
  return array;
}

// A cache's storage [.., .., rows, `dim` values] for Python: readonly_array over it, or for
// 8-bit storage (blocks of q8_block) a float32 copy with every value dequantized.
template <typename T>
py::array storage_array(const foveal::TensorView<const T, 4>& view, foveal::Index dim,
                        const py::object& owner) {
  if constexpr (std::is_same_v<T, foveal::q8_block>) {
    py::array_t<float> copy({view.size(0), view.size(1), view.size(2), dim});
    float* to = copy.mutable_data();
    for (foveal::Index a = 0; a < view.size(0); ++a)
      for (foveal::Index b = 0; b < view.size(1); ++b)
        for (foveal::Index row = 0; row < view.size(2); ++row, to += dim)
          for (foveal::Index d = 0; d < dim; ++d)
            to[d] = foveal::q8_value(view.address(a, b, row, 0), d);
    return std::move(copy);
  } else {
    return readonly_array<T>(view, owner);
  }
}

// The view of an optional argument; None gives the null ("not given") view.
template <typename T, int Rank>
TensorView<T, Rank> optional_view(const std::optional<Tensor>& tensor, const char* function,
                                  const char* name, const char* dims = nullptr,
                                  const char* dtype_note = nullptr) {
  return tensor ? tensor->view<T, Rank>(function, name, dims, dtype_note) : TensorView<T, Rank>();
}

}  // namespace foveal::python

namespace pybind11::detail {

// Every object loads (problems are reported by the typed view, which knows the argument's name);
// None only into std::optional<Tensor>, where it means "not given".
template <>
struct type_caster<foveal::python::Tensor> {
  PYBIND11_TYPE_CASTER(foveal::python::Tensor, const_name("typing.Any"));
  bool load(handle source, bool) {
    value = foveal::python::Tensor::from(source);
    return true;
  }
};

}  // namespace pybind11::detail
