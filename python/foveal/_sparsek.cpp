// foveal._core's SPARSEK bindings (OPERATORS.md §4). foveal/sparsek.py owns the docstrings,
// reshaping of leading dimensions, defaults and messages; these functions take numpy arrays as
// they are and release the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "_views.hpp"
#include "foveal/attention/sparsek.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::array_view;
using foveal::python::optional_array_view;

template <typename T>
void project(const py::array& z, Index k, const py::array& p, const std::optional<py::array>& tau,
             int num_threads) {
  constexpr const char* kFunction = "sparsek";
  const auto z_view = array_view<const T, 2>(kFunction, "z", z);
  const auto p_view = array_view<T, 2>(kFunction, "p", p);
  const auto tau_view = optional_array_view<T, 1>(kFunction, "tau", tau);
  py::gil_scoped_release release;
  foveal::sparsek(z_view, k, p_view, tau_view, num_threads);
}

template <typename T>
void backward(const py::array& p, const py::array& grad_p, const py::array& grad_z,
              int num_threads) {
  constexpr const char* kFunction = "sparsek_backward";
  const auto p_view = array_view<const T, 2>(kFunction, "p", p);
  const auto grad_p_view = array_view<const T, 2>(kFunction, "grad_p", grad_p);
  const auto grad_z_view = array_view<T, 2>(kFunction, "grad_z", grad_z);
  py::gil_scoped_release release;
  foveal::sparsek_backward(p_view, grad_p_view, grad_z_view, num_threads);
}

}  // namespace

void bind_sparsek(py::module_& m) {
  m.def(
      "sparsek",
      [](const py::array& z, Index k, const py::array& p, const std::optional<py::array>& tau,
         int num_threads) {
        if (z.dtype().is(py::dtype::of<double>()))
          project<double>(z, k, p, tau, num_threads);
        else
          project<float>(z, k, p, tau, num_threads);
      },
      py::arg("z"), py::arg("k"), py::arg("p"), py::arg("tau"), py::arg("num_threads"));
  m.def(
      "sparsek_backward",
      [](const py::array& p, const py::array& grad_p, const py::array& grad_z, int num_threads) {
        if (p.dtype().is(py::dtype::of<double>()))
          backward<double>(p, grad_p, grad_z, num_threads);
        else
          backward<float>(p, grad_p, grad_z, num_threads);
      },
      py::arg("p"), py::arg("grad_p"), py::arg("grad_z"), py::arg("num_threads"));
}
