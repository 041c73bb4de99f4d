// foveal._core — the compiled half of the Python package. The pure-Python layer
// (foveal/__init__.py) owns docstrings, defaults, input conversion and messages; this module
// maps numpy arrays onto views without copying and releases the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "_views.hpp"
#include "foveal/foveal.hpp"

namespace py = pybind11;
void bind_sparsek(py::module_& m);  // _sparsek.cpp
void bind_spade(py::module_& m);    // _spade.cpp
void bind_vq(py::module_& m);       // _vq.cpp
void bind_pde_ssm(py::module_& m);  // _pde_ssm.cpp

namespace {

using foveal::python::array_view;
using foveal::python::optional_array_view;

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
  args.q = array_view<const T, 4>(fn, "q", q);
  args.k = array_view<const T, 4>(fn, "k", k);
  args.v = array_view<const T, 4>(fn, "v", v);
  args.out = array_view<T, 4>(fn, "out", out);
  args.lse = optional_array_view<T, 3>(fn, "lse", lse);
  args.bias = optional_array_view<const T, 4>(fn, "bias", bias);
  for (const auto& [name, array] : extras)
    args.extras[name] = array_view<const T, 3>(fn, name.c_str(), array);
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

// A KVCache and, when it wraps caller memory, the arrays that own that memory.
template <typename T>
struct PyKVCache {
  foveal::KVCache<T> cache;
  py::object keys_owner;
  py::object values_owner;
};

// A read-only numpy array over `view`, keeping `owner` alive.
template <typename T>
py::array readonly_array(const foveal::TensorView<const T, 4>& view, const py::object& owner) {
  std::vector<py::ssize_t> shape(view.shape().begin(), view.shape().end());
  std::vector<py::ssize_t> strides;
  for (foveal::Index stride : view.strides())
    strides.push_back(static_cast<py::ssize_t>(stride * static_cast<foveal::Index>(sizeof(T))));
  py::array array(py::dtype::of<T>(), shape, strides, view.data(), owner);
  array.attr("setflags")(py::arg("write") = false);
  return array;
}

template <typename T>
void bind_kv_cache(py::module_& m, const char* class_name) {
  using Cache = PyKVCache<T>;
  py::class_<Cache>(m, class_name)
      .def(py::init([](int64_t batch, int64_t heads_kv, int64_t capacity, int64_t dim,
                       int64_t dim_v, bool ring, int64_t sink_tokens) {
             return new Cache{foveal::KVCache<T>(batch, heads_kv, capacity, dim, dim_v,
                                                 foveal::KVCacheOptions{ring, sink_tokens}),
                              py::none(), py::none()};
           }),
           py::arg("batch"), py::arg("heads_kv"), py::arg("capacity"), py::arg("dim"),
           py::arg("dim_v"), py::arg("ring"), py::arg("sink_tokens"))
      .def_static(
          "wrap",
          [](const py::array& keys, const py::array& values, bool ring, int64_t sink_tokens,
             const std::vector<int64_t>& lengths) {
            const char* fn = "KVCache.wrap";
            return new Cache{
                foveal::KVCache<T>(array_view<T, 4>(fn, "keys", keys),
                                   array_view<T, 4>(fn, "values", values),
                                   foveal::KVCacheOptions{ring, sink_tokens},
                                   std::vector<foveal::Index>(lengths.begin(), lengths.end())),
                keys, values};
          },
          py::arg("keys"), py::arg("values"), py::arg("ring"), py::arg("sink_tokens"),
          py::arg("lengths"))
      .def_property_readonly("batch", [](const Cache& c) { return c.cache.batch(); })
      .def_property_readonly("heads_kv", [](const Cache& c) { return c.cache.heads_kv(); })
      .def_property_readonly("capacity", [](const Cache& c) { return c.cache.capacity(); })
      .def_property_readonly("dim", [](const Cache& c) { return c.cache.dim(); })
      .def_property_readonly("dim_v", [](const Cache& c) { return c.cache.dim_v(); })
      .def_property_readonly("ring", [](const Cache& c) { return c.cache.ring(); })
      .def_property_readonly("sink_tokens", [](const Cache& c) { return c.cache.sink_tokens(); })
      .def_property_readonly("lengths", [](const Cache& c) { return c.cache.lengths(); })
      .def(
          "first_retained",
          [](const Cache& c, int64_t sequence) { return c.cache.first_retained(sequence); },
          py::arg("sequence"))
      .def_property_readonly("keys",
                             [](py::object self) {
                               return readonly_array<T>(self.cast<const Cache&>().cache.keys(),
                                                        self);
                             })
      .def_property_readonly("values",
                             [](py::object self) {
                               return readonly_array<T>(self.cast<const Cache&>().cache.values(),
                                                        self);
                             })
      .def(
          "append",
          [](Cache& c, const py::array& k, const py::array& v,
             const std::optional<std::vector<int64_t>>& counts) {
            const char* fn = "KVCache.append";
            const auto k_view = array_view<const T, 4>(fn, "k", k);
            const auto v_view = array_view<const T, 4>(fn, "v", v);
            py::gil_scoped_release release;
            if (counts) {
              c.cache.append(k_view, v_view,
                             std::vector<foveal::Index>(counts->begin(), counts->end()));
            } else {
              c.cache.append(k_view, v_view);
            }
          },
          py::arg("k"), py::arg("v"), py::arg("counts"))
      .def(
          "truncate", [](Cache& c, int64_t length) { c.cache.truncate(length); }, py::arg("length"))
      .def(
          "truncate_sequence",
          [](Cache& c, int64_t sequence, int64_t length) { c.cache.truncate(sequence, length); },
          py::arg("sequence"), py::arg("length"))
      .def("reset", [](Cache& c) { c.cache.reset(); })
      .def(
          "decode",
          [](const Cache& c, const py::array& q, const py::array& out,
             const std::optional<py::array>& lse, double scale, bool causal, int64_t window_left,
             int64_t window_right, int64_t sink_tokens, double softcap, int num_threads) {
            const char* fn = "decode_attention";
            const auto options = make_options(scale, causal, window_left, window_right, sink_tokens,
                                              softcap, -1, num_threads);
            const auto q_view = array_view<const T, 4>(fn, "q", q);
            const auto out_view = array_view<T, 4>(fn, "out", out);
            const auto lse_view = optional_array_view<T, 3>(fn, "lse", lse);
            py::gil_scoped_release release;
            foveal::decode_attention(q_view, c.cache, options, out_view, lse_view);
          },
          py::arg("q"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("causal"),
          py::arg("window_left"), py::arg("window_right"), py::arg("sink_tokens"),
          py::arg("softcap"), py::arg("num_threads"));
}

template <typename T>
void merge_typed(const py::array& out_a, const py::array& lse_a, const py::array& out_b,
                 const py::array& lse_b, const py::array& out, const std::optional<py::array>& lse,
                 int num_threads) {
  const char* fn = "merge_states";
  const auto out_a_view = array_view<const T, 4>(fn, "out_a", out_a);
  const auto lse_a_view = array_view<const T, 3>(fn, "lse_a", lse_a);
  const auto out_b_view = array_view<const T, 4>(fn, "out_b", out_b);
  const auto lse_b_view = array_view<const T, 3>(fn, "lse_b", lse_b);
  const auto out_view = array_view<T, 4>(fn, "out", out);
  const auto lse_view = optional_array_view<T, 3>(fn, "lse", lse);
  py::gil_scoped_release release;
  foveal::merge_states(out_a_view, lse_a_view, out_b_view, lse_b_view, out_view, lse_view,
                       num_threads);
}

// The gradients of attention (sliding = false) or sliding_window_attention (sliding = true).
template <typename T>
void backward_typed(bool sliding, const py::array& q, const py::array& k, const py::array& v,
                    const py::array& out, const py::array& lse, const py::array& grad_out,
                    const py::array& grad_q, const py::array& grad_k, const py::array& grad_v,
                    const std::optional<py::array>& bias, const foveal::AttentionOptions& options) {
  const char* fn = sliding ? "sliding_window_attention_backward" : "attention_backward";
  const auto q_view = array_view<const T, 4>(fn, "q", q);
  const auto k_view = array_view<const T, 4>(fn, "k", k);
  const auto v_view = array_view<const T, 4>(fn, "v", v);
  const auto out_view = array_view<const T, 4>(fn, "out", out);
  const auto lse_view = array_view<const T, 3>(fn, "lse", lse);
  const auto grad_out_view = array_view<const T, 4>(fn, "grad_out", grad_out);
  const auto grad_q_view = array_view<T, 4>(fn, "grad_q", grad_q);
  const auto grad_k_view = array_view<T, 4>(fn, "grad_k", grad_k);
  const auto grad_v_view = array_view<T, 4>(fn, "grad_v", grad_v);
  const auto bias_view = optional_array_view<const T, 4>(fn, "bias", bias);
  py::gil_scoped_release release;
  if (sliding) {
    foveal::sliding_window_attention_backward(q_view, k_view, v_view, out_view, lse_view,
                                              grad_out_view, grad_q_view, grad_k_view, grad_v_view,
                                              options);
  } else {
    foveal::attention_backward(q_view, k_view, v_view, out_view, lse_view, grad_out_view,
                               grad_q_view, grad_k_view, grad_v_view, options, bias_view);
  }
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "foveal's compiled kernels; use the functions of the foveal package instead.";
  m.attr("__version__") = FOVEAL_VERSION;

  // foveal::MemoryError (an allocation that passed every size check but does not fit) is
  // Python's MemoryError with foveal's message.
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const foveal::MemoryError& error) {
      PyErr_SetString(PyExc_MemoryError, error.what());
    }
  });
  // Long loops (k-means) poll for Ctrl-C between steps: the check takes the GIL, and a pending
  // KeyboardInterrupt (or any exception a signal handler raised) propagates as that exception.
  foveal::set_interrupt_check([] {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  });
  m.attr("MAX_THREADS") = foveal::kMaxThreads;

  m.def("set_num_threads", &foveal::set_num_threads, py::arg("num_threads"));
  m.def("get_num_threads", &foveal::get_num_threads);
  m.def("build_info", [] {
    const foveal::BuildInfo info = foveal::build_info();
    py::dict result;
    result["version"] = info.version;
    result["compiler"] = info.compiler;
    result["compiled_levels"] = py::cast(info.compiled_levels);
    result["supported_levels"] = py::cast(info.supported_levels);
    result["requested_level"] = info.requested_level;
    result["level"] = info.level;
    return result;
  });
  bind_spade(m);
  bind_vq(m);
  bind_sparsek(m);
  bind_pde_ssm(m);

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

  m.def(
      "sliding_window_attention",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& out,
         const std::optional<py::array>& lse, double scale, bool causal, int64_t window_left,
         int64_t window_right, int64_t sink_tokens, double softcap, int64_t q_offset,
         int num_threads) {
        const auto options = make_options(scale, causal, window_left, window_right, sink_tokens,
                                          softcap, q_offset, num_threads);
        run_typed(
            "sliding_window_attention", q, k, v, out, lse, std::nullopt, {}, [&](const auto& args) {
              foveal::sliding_window_attention(args.q, args.k, args.v, args.out, options, args.lse);
            });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
      py::arg("causal"), py::arg("window_left"), py::arg("window_right"), py::arg("sink_tokens"),
      py::arg("softcap"), py::arg("q_offset"), py::arg("num_threads"));

  m.def(
      "merge_states",
      [](const py::array& out_a, const py::array& lse_a, const py::array& out_b,
         const py::array& lse_b, const py::array& out, const std::optional<py::array>& lse,
         int num_threads) {
        if (is_float64(out_a)) {
          merge_typed<double>(out_a, lse_a, out_b, lse_b, out, lse, num_threads);
        } else {
          merge_typed<float>(out_a, lse_a, out_b, lse_b, out, lse, num_threads);
        }
      },
      py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"), py::arg("out"),
      py::arg("lse"), py::arg("num_threads"));

  m.def(
      "attention_backward",
      [](bool sliding, const py::array& q, const py::array& k, const py::array& v,
         const py::array& out, const py::array& lse, const py::array& grad_out,
         const py::array& grad_q, const py::array& grad_k, const py::array& grad_v,
         const std::optional<py::array>& bias, double scale, bool causal, int64_t window_left,
         int64_t window_right, int64_t sink_tokens, double softcap, int64_t q_offset,
         int num_threads) {
        const auto options = make_options(scale, causal, window_left, window_right, sink_tokens,
                                          softcap, q_offset, num_threads);
        if (is_float64(q)) {
          backward_typed<double>(sliding, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, bias,
                                 options);
        } else {
          backward_typed<float>(sliding, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, bias,
                                options);
        }
      },
      py::arg("sliding"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("grad_out"), py::arg("grad_q"), py::arg("grad_k"), py::arg("grad_v"), py::arg("bias"),
      py::arg("scale"), py::arg("causal"), py::arg("window_left"), py::arg("window_right"),
      py::arg("sink_tokens"), py::arg("softcap"), py::arg("q_offset"), py::arg("num_threads"));

  bind_kv_cache<float>(m, "KVCacheF32");
  bind_kv_cache<double>(m, "KVCacheF64");

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
