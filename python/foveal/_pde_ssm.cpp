// foveal._core's PDE-SSM bindings (docs/pde_ssm.md). foveal/pde_ssm.py owns the docstrings,
// defaults, the conversion of number and list parameters and output allocation; these functions
// read the caller's tensors as they are (a channels_first grid through permuted strides; a
// parameter of fewer dimensions padded in front: [3] is [1, 3], a scalar [1]) and release the
// GIL around every kernel. The library checks every value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/ssm/pde_ssm.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::Keywords;
using foveal::python::Tensor;
using foveal::python::with_float_type;
using OptionalTensor = std::optional<Tensor>;

// Whether `layout` is channels_first; anything but the two names is a foveal::Error.
bool channels_first(const Keywords& keywords) {
  const std::string layout = keywords.text("layout", "channels_last");
  if (layout != "channels_last" && layout != "channels_first")
    foveal::python::value_error(keywords.function(),
                                ": layout must be \"channels_last\" ([B, H, W, C]) or "
                                "\"channels_first\" ([B, C, H, W]), got '",
                                layout, "'");
  return layout == "channels_first";
}

// A grid tensor as [B, H, W, C] (channels_first memory [B, C, H, W] read through its strides).
template <typename T>
foveal::TensorView<T, 4> grid_view(const char* fn, const char* name, const Tensor& tensor,
                                   bool first, const char* dtype_note) {
  const auto view = tensor.view<T, 4>(fn, name, first ? "B, C, H, W" : "B, H, W, C", dtype_note);
  if (!first) return view;
  return foveal::TensorView<T, 4>(view.data(),
                                  {view.size(0), view.size(2), view.size(3), view.size(1)},
                                  {view.stride(0), view.stride(2), view.stride(3), view.stride(1)});
}

template <typename T>
foveal::TensorView<T, 4> optional_grid_view(const char* fn, const char* name,
                                            const OptionalTensor& tensor, bool first,
                                            const char* dtype_note) {
  return tensor ? grid_view<T>(fn, name, *tensor, first, dtype_note) : foveal::TensorView<T, 4>();
}

// A parameter (or its gradient) of shape [G, columns] (or [columns]), or [G] (or a scalar) when
// columns = 0.
template <typename T, int Rank>
foveal::TensorView<T, Rank> parameter_view(const char* fn, const char* name, const Tensor& tensor,
                                           const char* dtype_note) {
  const char* dims = Rank == 2 ? "[G, n] or [n]" : "[G] or a scalar";
  return tensor.view_leading_ones<T, Rank>(fn, name, Rank - 1, dims, dtype_note);
}

template <typename T, int Rank>
foveal::TensorView<T, Rank> optional_parameter_view(const char* fn, const char* name,
                                                    const OptionalTensor& tensor,
                                                    const char* dtype_note) {
  return tensor ? parameter_view<T, Rank>(fn, name, *tensor, dtype_note)
                : foveal::TensorView<T, Rank>();
}

// The five parameters, in the order diffusion, velocity, reaction, time, skip (skip may be None).
struct ParameterTensors {
  const Tensor& diffusion;
  const Tensor& velocity;
  const Tensor& reaction;
  const Tensor& time;
  const OptionalTensor& skip;

  template <typename T>
  foveal::PdeSsmParameters<T> views(const char* fn, const char* dtype_note) const {
    foveal::PdeSsmParameters<T> p;
    p.diffusion = parameter_view<const T, 2>(fn, "diffusion", diffusion, dtype_note);
    p.velocity = parameter_view<const T, 2>(fn, "velocity", velocity, dtype_note);
    p.reaction = parameter_view<const T, 1>(fn, "reaction", reaction, dtype_note);
    p.time = parameter_view<const T, 1>(fn, "time", time, dtype_note);
    p.skip = optional_parameter_view<const T, 1>(fn, "skip", skip, dtype_note);
    return p;
  }
};

// The gradients asked for (None: not computed), each of its parameter's shape.
struct GradientTensors {
  const OptionalTensor& diffusion;
  const OptionalTensor& velocity;
  const OptionalTensor& reaction;
  const OptionalTensor& time;
  const OptionalTensor& skip;

  template <typename T>
  foveal::PdeSsmGradients<T> views(const char* fn, const char* dtype_note) const {
    foveal::PdeSsmGradients<T> g;
    g.diffusion = optional_parameter_view<T, 2>(fn, "grad_diffusion", diffusion, dtype_note);
    g.velocity = optional_parameter_view<T, 2>(fn, "grad_velocity", velocity, dtype_note);
    g.reaction = optional_parameter_view<T, 1>(fn, "grad_reaction", reaction, dtype_note);
    g.time = optional_parameter_view<T, 1>(fn, "grad_time", time, dtype_note);
    g.skip = optional_parameter_view<T, 1>(fn, "grad_skip", skip, dtype_note);
    return g;
  }
};

foveal::PdeSsmOptions block_options(const Keywords& keywords) {
  foveal::PdeSsmOptions options;
  options.mode = foveal::pde_ssm_mode_from_string(keywords.text("mode", "initial_value"));
  options.boundary = foveal::pde_ssm_boundary_from_string(keywords.text("boundary", "periodic"));
  options.diffusion_form =
      foveal::pde_ssm_diffusion_form_from_string(keywords.text("diffusion_form", "cholesky"));
  return options;
}

template <typename T>
void bind_block(py::module_& m, const char* class_name) {
  using Block = foveal::PdeSsm<T>;
  const char* same = "the block's dtype";
  py::class_<Block>(m, class_name)
      .def(py::init([](const Tensor& diffusion, const Tensor& velocity, const Tensor& reaction,
                       const Tensor& time, const OptionalTensor& skip, const py::kwargs& kwargs) {
             const char* fn = "PdeSsm";
             const Keywords keywords(fn, kwargs);
             const Index height = keywords.integer("height");
             const Index width = keywords.integer("width");
             const Index channels = keywords.integer("channels");
             const auto options = block_options(keywords);
             const int num_threads = keywords.threads();
             keywords.require_all_read();
             const ParameterTensors tensors{diffusion, velocity, reaction, time, skip};
             const auto parameters = tensors.views<T>(fn, "the block's dtype");
             py::gil_scoped_release release;
             return new Block(height, width, channels, parameters, options, num_threads);
           }),
           py::arg("diffusion"), py::arg("velocity"), py::arg("reaction"), py::arg("time"),
           py::arg("skip"))
      .def_property_readonly("height", &Block::height)
      .def_property_readonly("width", &Block::width)
      .def_property_readonly("channels", &Block::channels)
      .def_property_readonly("transform_height", &Block::transform_height)
      .def_property_readonly("transform_width", &Block::transform_width)
      .def(
          "forward",
          [same](const Block& block, const Tensor& x, const Tensor& out, const py::kwargs& kwargs) {
            const char* fn = "pde_ssm";
            const Keywords keywords(fn, kwargs);
            const bool first = channels_first(keywords);
            const int num_threads = keywords.threads();
            keywords.require_all_read();
            const auto x_view = grid_view<const T>(fn, "x", x, first, same);
            const auto out_view = grid_view<T>(fn, "out", out, first, same);
            py::gil_scoped_release release;
            block.forward(x_view, out_view, num_threads);
          },
          py::arg("x"), py::arg("out"))
      .def(
          "backward",
          [same](const Block& block, const OptionalTensor& x, const Tensor& grad_out,
                 const OptionalTensor& grad_x, const OptionalTensor& grad_diffusion,
                 const OptionalTensor& grad_velocity, const OptionalTensor& grad_reaction,
                 const OptionalTensor& grad_time, const OptionalTensor& grad_skip,
                 const py::kwargs& kwargs) {
            const char* fn = "pde_ssm_backward";
            const Keywords keywords(fn, kwargs);
            const bool first = channels_first(keywords);
            const int num_threads = keywords.threads();
            keywords.require_all_read();
            const auto grad_out_view = grid_view<const T>(fn, "grad_out", grad_out, first, same);
            const auto x_view = optional_grid_view<const T>(fn, "x", x, first, same);
            const auto grad_x_view = optional_grid_view<T>(fn, "grad_x", grad_x, first, same);
            const GradientTensors tensors{grad_diffusion, grad_velocity, grad_reaction, grad_time,
                                          grad_skip};
            const auto gradients = tensors.views<T>(fn, same);
            py::gil_scoped_release release;
            block.backward(x_view, grad_out_view, grad_x_view, gradients, num_threads);
          },
          py::arg("x"), py::arg("grad_out"), py::arg("grad_x"), py::arg("grad_diffusion"),
          py::arg("grad_velocity"), py::arg("grad_reaction"), py::arg("grad_time"),
          py::arg("grad_skip"));
}

// The free functions: the block is built for the call from x's grid (none on an empty batch).
void forward(const Tensor& x, const Tensor& out, const Tensor& diffusion, const Tensor& velocity,
             const Tensor& reaction, const Tensor& time, const OptionalTensor& skip,
             const py::kwargs& kwargs) {
  const char* fn = "pde_ssm";
  const Keywords keywords(fn, kwargs);
  const bool first = channels_first(keywords);
  const auto options = block_options(keywords);
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "x", x, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of x";
    const auto x_view = grid_view<const T>(fn, "x", x, first, nullptr);
    const auto out_view = grid_view<T>(fn, "out", out, first, same);
    const auto parameters =
        ParameterTensors{diffusion, velocity, reaction, time, skip}.views<T>(fn, same);
    py::gil_scoped_release release;
    foveal::pde_ssm(x_view, parameters, out_view, options, num_threads);
  });
}

void backward(const OptionalTensor& x, const Tensor& grad_out, const OptionalTensor& grad_x,
              const OptionalTensor& grad_diffusion, const OptionalTensor& grad_velocity,
              const OptionalTensor& grad_reaction, const OptionalTensor& grad_time,
              const OptionalTensor& grad_skip, const Tensor& diffusion, const Tensor& velocity,
              const Tensor& reaction, const Tensor& time, const OptionalTensor& skip,
              const py::kwargs& kwargs) {
  const char* fn = "pde_ssm_backward";
  const Keywords keywords(fn, kwargs);
  const bool first = channels_first(keywords);
  const auto options = block_options(keywords);
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "grad_out", grad_out, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of grad_out";
    const auto grad_out_view = grid_view<const T>(fn, "grad_out", grad_out, first, nullptr);
    const auto x_view = optional_grid_view<const T>(fn, "x", x, first, same);
    const auto grad_x_view = optional_grid_view<T>(fn, "grad_x", grad_x, first, same);
    const auto parameters =
        ParameterTensors{diffusion, velocity, reaction, time, skip}.views<T>(fn, same);
    const auto gradients =
        GradientTensors{grad_diffusion, grad_velocity, grad_reaction, grad_time, grad_skip}
            .views<T>(fn, same);
    py::gil_scoped_release release;
    foveal::pde_ssm_backward(x_view, grad_out_view, parameters, grad_x_view, gradients, options,
                             num_threads);
  });
}

}  // namespace

void bind_pde_ssm(py::module_& m) {
  bind_block<float>(m, "PdeSsmF32");
  bind_block<double>(m, "PdeSsmF64");
  // The options of a call as plain values, checked (for foveal.torch's custom ops).
  m.def("pde_ssm_options", [](const std::string& function, const py::kwargs& kwargs) {
    const Keywords keywords(function.c_str(), kwargs);
    const bool first = channels_first(keywords);
    const auto options = block_options(keywords);
    const int num_threads = keywords.threads();
    keywords.require_all_read();
    py::dict values;
    values["mode"] = keywords.text("mode", "initial_value");
    values["boundary"] = keywords.text("boundary", "periodic");
    values["diffusion_form"] = keywords.text("diffusion_form", "cholesky");
    values["layout"] = first ? "channels_first" : "channels_last";
    values["num_threads"] = num_threads == 0 ? py::object(py::none()) : py::int_(num_threads);
    static_cast<void>(options);
    return values;
  });
  m.def("pde_ssm", &forward, py::arg("x"), py::arg("out"), py::arg("diffusion"),
        py::arg("velocity"), py::arg("reaction"), py::arg("time"), py::arg("skip"));
  m.def("pde_ssm_backward", &backward, py::arg("x"), py::arg("grad_out"), py::arg("grad_x"),
        py::arg("grad_diffusion"), py::arg("grad_velocity"), py::arg("grad_reaction"),
        py::arg("grad_time"), py::arg("grad_skip"), py::arg("diffusion"), py::arg("velocity"),
        py::arg("reaction"), py::arg("time"), py::arg("skip"));
}
