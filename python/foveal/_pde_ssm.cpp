// foveal._core's PDE-SSM bindings (docs/pde_ssm.md). foveal/pde_ssm.py owns the docstrings,
// defaults, layouts and messages; these classes take numpy arrays as they are (x as a
// [B, H, W, C] view with any strides) and release the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "_views.hpp"
#include "foveal/ssm/pde_ssm.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::array_view;
using foveal::python::optional_array_view;
using OptionalArray = std::optional<py::array>;

template <typename T>
foveal::PdeSsm<T> make_block(Index height, Index width, Index channels, const py::array& diffusion,
                             const py::array& velocity, const py::array& reaction,
                             const py::array& time, const OptionalArray& skip,
                             const std::string& mode, const std::string& boundary,
                             const std::string& diffusion_form, int num_threads) {
  constexpr const char* kFunction = "pde_ssm";
  foveal::PdeSsmOptions options;
  options.mode = foveal::pde_ssm_mode_from_string(mode);
  options.boundary = foveal::pde_ssm_boundary_from_string(boundary);
  options.diffusion_form = foveal::pde_ssm_diffusion_form_from_string(diffusion_form);
  foveal::PdeSsmParameters<T> parameters;
  parameters.diffusion = array_view<const T, 2>(kFunction, "diffusion", diffusion);
  parameters.velocity = array_view<const T, 2>(kFunction, "velocity", velocity);
  parameters.reaction = array_view<const T, 1>(kFunction, "reaction", reaction);
  parameters.time = array_view<const T, 1>(kFunction, "time", time);
  parameters.skip = optional_array_view<const T, 1>(kFunction, "skip", skip);
  py::gil_scoped_release release;
  return foveal::PdeSsm<T>(height, width, channels, parameters, options, num_threads);
}

template <typename T>
void bind_block(py::module_& m, const char* class_name) {
  using Block = foveal::PdeSsm<T>;
  py::class_<Block>(m, class_name)
      .def(py::init(&make_block<T>), py::arg("height"), py::arg("width"), py::arg("channels"),
           py::arg("diffusion"), py::arg("velocity"), py::arg("reaction"), py::arg("time"),
           py::arg("skip"), py::arg("mode"), py::arg("boundary"), py::arg("diffusion_form"),
           py::arg("num_threads"))
      .def_property_readonly("height", &Block::height)
      .def_property_readonly("width", &Block::width)
      .def_property_readonly("channels", &Block::channels)
      .def_property_readonly("transform_height", &Block::transform_height)
      .def_property_readonly("transform_width", &Block::transform_width)
      .def(
          "forward",
          [](const Block& block, const py::array& x, const py::array& out, int num_threads) {
            constexpr const char* kFunction = "pde_ssm";
            const auto x_view = array_view<const T, 4>(kFunction, "x", x);
            const auto out_view = array_view<T, 4>(kFunction, "out", out);
            py::gil_scoped_release release;
            block.forward(x_view, out_view, num_threads);
          },
          py::arg("x"), py::arg("out"), py::arg("num_threads"))
      .def(
          "backward",
          [](const Block& block, const OptionalArray& x, const py::array& grad_out,
             const OptionalArray& grad_x, const OptionalArray& grad_diffusion,
             const OptionalArray& grad_velocity, const OptionalArray& grad_reaction,
             const OptionalArray& grad_time, const OptionalArray& grad_skip, int num_threads) {
            constexpr const char* kFunction = "pde_ssm_backward";
            const auto x_view = optional_array_view<const T, 4>(kFunction, "x", x);
            const auto grad_out_view = array_view<const T, 4>(kFunction, "grad_out", grad_out);
            const auto grad_x_view = optional_array_view<T, 4>(kFunction, "grad_x", grad_x);
            foveal::PdeSsmGradients<T> gradients;
            gradients.diffusion = optional_array_view<T, 2>(kFunction, "diffusion", grad_diffusion);
            gradients.velocity = optional_array_view<T, 2>(kFunction, "velocity", grad_velocity);
            gradients.reaction = optional_array_view<T, 1>(kFunction, "reaction", grad_reaction);
            gradients.time = optional_array_view<T, 1>(kFunction, "time", grad_time);
            gradients.skip = optional_array_view<T, 1>(kFunction, "skip", grad_skip);
            py::gil_scoped_release release;
            block.backward(x_view, grad_out_view, grad_x_view, gradients, num_threads);
          },
          py::arg("x"), py::arg("grad_out"), py::arg("grad_x"), py::arg("grad_diffusion"),
          py::arg("grad_velocity"), py::arg("grad_reaction"), py::arg("grad_time"),
          py::arg("grad_skip"), py::arg("num_threads"));
}

}  // namespace

void bind_pde_ssm(py::module_& m) {
  bind_block<float>(m, "PdeSsmF32");
  bind_block<double>(m, "PdeSsmF64");
}
