// foveal._core — the compiled half of the Python package. The pure-Python layer
// (foveal/__init__.py) owns docstrings, defaults, input conversion and messages; this module
// maps numpy arrays onto views without copying and releases the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "foveal/foveal.hpp"

namespace py = pybind11;
void bind_spade(py::module_& m);  // _spade.cpp

namespace {

// A view of `array` (shape and strides taken as they are; strides converted from bytes).
// The dtype must be T and, for outputs, the array writable.
template <typename T, int Rank>
foveal::TensorView<T, Rank> view_of(const char* function, const char* name,
                                    const py::array& array) {
  using Element = std::remove_const_t<T>;
  foveal::check(array.ndim() == Rank, function, ": ", name, " must have ", Rank,
                " dimensions, got ", array.ndim());
  if (!array.dtype().is(py::dtype::of<Element>())) {
    throw py::type_error(std::string("foveal: ") + function + ": " + name + " must have dtype " +
                         foveal::dtype_name(foveal::dtype_of<Element>()) + ", got " +
                         std::string(py::str(array.dtype())));
  }
  std::array<foveal::Index, Rank> shape{};
  std::array<foveal::Index, Rank> strides{};
  for (int dim = 0; dim < Rank; ++dim) {
    shape[dim] = array.shape(dim);
    foveal::check(array.strides(dim) % static_cast<py::ssize_t>(sizeof(Element)) == 0, function,
                  ": ", name, ".strides[", dim, "] = ", array.strides(dim),
                  " bytes is not a multiple of the element size ", sizeof(Element));
    strides[dim] = array.strides(dim) / static_cast<py::ssize_t>(sizeof(Element));
  }
  foveal::check(reinterpret_cast<std::uintptr_t>(array.data()) % alignof(Element) == 0, function,
                ": ", name, " is not aligned to its element size ", alignof(Element),
                " (a view at an odd byte offset)");
  T* data;
  if constexpr (std::is_const_v<T>) {
    data = static_cast<T*>(array.data());
  } else {
    foveal::check(array.writeable(), function, ": ", name, " must be writable");
    data = static_cast<T*>(const_cast<py::array&>(array).mutable_data());
  }
  return foveal::TensorView<T, Rank>(data, shape, strides);
}

// The view of an optional array: the "not given" view for None.
template <typename T, int Rank>
foveal::TensorView<T, Rank> optional_view_of(const char* function, const char* name,
                                             const std::optional<py::array>& array) {
  return array ? view_of<T, Rank>(function, name, *array) : foveal::TensorView<T, Rank>();
}

foveal::AttentionOptions make_options(double scale, bool causal, int64_t window_left,
                                      int64_t window_right, int64_t sink_tokens, double softcap,
                                      int64_t q_offset, int num_threads) {
  foveal::AttentionOptions options;
  options.scale = scale;
  options.causal = causal;
  options.window_left = window_left;
  options.window_right = window_right;
  options.sink_tokens = sink_tokens;
  options.softcap = softcap;
  options.q_offset = q_offset;
  options.num_threads = num_threads;
  return options;
}

bool is_float64(const py::array& array) { return array.dtype().is(py::dtype::of<double>()); }

using Extras = std::map<std::string, py::array>;

// The views of one attention call, for element type T.
template <typename T>
foveal::AttentionArgs<T> attention_args(const char* fn, const py::array& q, const py::array& k,
                                        const py::array& v, const py::array& out,
                                        const std::optional<py::array>& lse,
                                        const std::optional<py::array>& bias,
                                        const Extras& extras) {
  foveal::AttentionArgs<T> args;
  args.q = view_of<const T, 4>(fn, "q", q);
  args.k = view_of<const T, 4>(fn, "k", k);
  args.v = view_of<const T, 4>(fn, "v", v);
  args.out = view_of<T, 4>(fn, "out", out);
  args.lse = optional_view_of<T, 3>(fn, "lse", lse);
  args.bias = optional_view_of<const T, 4>(fn, "bias", bias);
  for (const auto& [name, array] : extras)
    args.extras[name] = view_of<const T, 3>(fn, name.c_str(), array);
  return args;
}

// Calls run(args) with the views typed after q's dtype (float64, else float32), the GIL
// released around the call.
template <typename Run>
void run_typed(const char* fn, const py::array& q, const py::array& k, const py::array& v,
               const py::array& out, const std::optional<py::array>& lse,
               const std::optional<py::array>& bias, const Extras& extras, Run&& run) {
  if (is_float64(q)) {
    const auto args = attention_args<double>(fn, q, k, v, out, lse, bias, extras);
    py::gil_scoped_release release;
    run(args);
  } else {
    const auto args = attention_args<float>(fn, q, k, v, out, lse, bias, extras);
    py::gil_scoped_release release;
    run(args);
  }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "foveal's compiled kernels; use the functions of the foveal package instead.";
  m.attr("__version__") = FOVEAL_VERSION;

  m.def("set_num_threads", &foveal::set_num_threads, py::arg("num_threads"));
  m.def("get_num_threads", &foveal::get_num_threads);
  bind_spade(m);

  m.def(
      "attention",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& out,
         const std::optional<py::array>& lse, const std::optional<py::array>& bias, double scale,
         bool causal, int64_t window_left, int64_t window_right, int64_t sink_tokens,
         double softcap, int64_t q_offset, int num_threads) {
        const auto options = make_options(scale, causal, window_left, window_right, sink_tokens,
                                          softcap, q_offset, num_threads);
        run_typed("attention", q, k, v, out, lse, bias, {}, [&](const auto& args) {
          foveal::attention(args.q, args.k, args.v, args.out, options, args.lse, args.bias);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
      py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
      py::arg("sink_tokens"), py::arg("softcap"), py::arg("q_offset"), py::arg("num_threads"));

  m.def("attention_kernel_names", &foveal::attention_kernel_names);

  py::class_<foveal::AttentionKernel>(m, "AttentionKernel")
      .def_property_readonly("name", &foveal::AttentionKernel::name)
      .def(
          "forward",
          [](const foveal::AttentionKernel& kernel, const py::array& q, const py::array& k,
             const py::array& v, const py::array& out, const std::optional<py::array>& lse,
             const std::optional<py::array>& bias, const Extras& extras) {
            run_typed("AttentionKernel.forward", q, k, v, out, lse, bias, extras,
                      [&](const auto& args) { kernel.forward(args); });
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
          py::arg("extras"));

  m.def(
      "make_attention",
      [](const std::string& name, double scale, bool causal, int64_t window_left,
         int64_t window_right, int64_t sink_tokens, double softcap, int64_t q_offset,
         int num_threads, const std::map<std::string, std::string>& params) {
        foveal::AttentionConfig config;
        config.options = make_options(scale, causal, window_left, window_right, sink_tokens,
                                      softcap, q_offset, num_threads);
        config.params = params;
        return foveal::make_attention(name, config);
      },
      py::arg("name"), py::arg("scale"), py::arg("causal"), py::arg("window_left"),
      py::arg("window_right"), py::arg("sink_tokens"), py::arg("softcap"), py::arg("q_offset"),
      py::arg("num_threads"), py::arg("params"));
}
