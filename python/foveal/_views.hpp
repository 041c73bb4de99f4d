// python/foveal/_views.hpp — numpy arrays as foveal views of the same memory, for any element
// type the kernels read (float, double, int64, uint8). Never copies or converts: a wrong dtype
// raises TypeError, a wrong rank ValueError (through foveal::Error).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::python {

namespace py = pybind11;

// A view of `array` with its shape and strides (converted from bytes to elements). The dtype
// must be T's, and for a view of non-const T the array must be writable.
template <typename T, int Rank>
TensorView<T, Rank> array_view(const char* function, const char* name, const py::array& array) {
  using Element = std::remove_const_t<T>;
  const auto element_bytes = static_cast<py::ssize_t>(sizeof(Element));
  check(array.ndim() == Rank, function, ": ", name, " must have ", Rank, " dimensions, got ",
        array.ndim());
  const py::dtype expected = py::dtype::of<Element>();
  if (!array.dtype().is(expected)) {
    throw py::type_error(std::string("foveal: ") + function + ": " + name + " must have dtype " +
                         std::string(py::str(expected)) + ", got " +
                         std::string(py::str(array.dtype())));
  }
  typename TensorView<T, Rank>::Shape shape{}, strides{};
  for (int dim = 0; dim < Rank; ++dim) {
    check(array.strides(dim) % element_bytes == 0, function, ": ", name, ".strides[", dim,
          "] = ", array.strides(dim), " bytes is not a multiple of the element size ",
          element_bytes);
    shape[dim] = array.shape(dim);
    strides[dim] = array.strides(dim) / element_bytes;
  }
  check(reinterpret_cast<std::uintptr_t>(array.data()) % alignof(Element) == 0, function, ": ",
        name, " is not aligned to its element size ", alignof(Element),
        " (a view at an odd byte offset)");
  if constexpr (std::is_const_v<T>) {
    return TensorView<T, Rank>(static_cast<T*>(array.data()), shape, strides);
  } else {
    check(array.writeable(), function, ": ", name, " must be writable");
    return TensorView<T, Rank>(static_cast<T*>(const_cast<py::array&>(array).mutable_data()), shape,
                               strides);
  }
}

// array_view of an optional array; None gives the "not given" (null) view.
template <typename T, int Rank>
TensorView<T, Rank> optional_array_view(const char* function, const char* name,
                                        const std::optional<py::array>& array) {
  return array ? array_view<T, Rank>(function, name, *array) : TensorView<T, Rank>();
}

}  // namespace foveal::python
