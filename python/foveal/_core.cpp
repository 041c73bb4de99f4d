// foveal._core — the compiled half of the Python package. The pure-Python layer
// (foveal/__init__.py) owns docstrings, defaults and output allocation; this module maps the
// caller's tensors onto views without copying (_tensor.hpp), reads the options (_keywords.hpp)
// and releases the GIL around every kernel. The library validates everything else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/foveal.hpp"

namespace py = pybind11;
void bind_sparsek(py::module_& m);       // _sparsek.cpp
void bind_spade(py::module_& m);         // _spade.cpp
void bind_vq(py::module_& m);            // _vq.cpp
void bind_pde_ssm(py::module_& m);       // _pde_ssm.cpp
void bind_paged(py::module_& m);         // _paged.cpp
void bind_block_sparse(py::module_& m);  // _block_sparse.cpp

namespace {

using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_float_type;
using foveal::python::with_storage_type;

// True for a 16-bit q; a dtype foveal does not store is a TypeError naming all four.
bool is_half(const char* fn, const Tensor& q) {
  with_storage_type(fn, "q", q, [](auto) {});
  return q.dtype() == foveal::python::DType::bfloat16 ||
         q.dtype() == foveal::python::DType::float16;
}

// An additive bias [B or 1, Hq or 1, Lq, Lk], also given as [Lq, Lk] or [Hq, Lq, Lk], of q's
// dtype; a boolean mask (True = attend) becomes 0 / -inf in `mask`, which the view then reads.
template <typename T>
foveal::TensorView<const T, 4> bias_view(const char* fn, const std::optional<Tensor>& bias,
                                         std::vector<T>& mask) {
  if (!bias) return {};
  const char* dims = "[Lq, Lk], [Hq, Lq, Lk] or [B, Hq, Lq, Lk], size-1 B and Hq broadcast";
  bias->require_usable(fn, "bias");
  if (bias->dtype() != foveal::python::DType::boolean) {
    if (bias->dtype() != foveal::python::dtype_of<T>())
      foveal::python::type_error(fn, ": bias must have dtype ",
                                 foveal::python::dtype_name(foveal::python::dtype_of<T>()),
                                 " (the dtype of q) or bool, got ", bias->dtype_name());
    return bias->view_leading_ones<const T, 4>(fn, "bias", 2, dims, nullptr);
  }
  const auto allowed = bias->view_leading_ones<const bool, 4>(fn, "bias", 2, dims, nullptr);
  const auto shape = allowed.shape();
  if (allowed.empty()) {
    // Nothing to convert, whatever the other extents (a loop over them could run for hours).
    mask.resize(1);
    return foveal::TensorView<const T, 4>(mask.data(), shape, {});
  }
  mask.resize(static_cast<std::size_t>(shape[0] * shape[1] * shape[2] * shape[3]));
  std::size_t at = 0;
  for (foveal::Index b = 0; b < shape[0]; ++b)
    for (foveal::Index h = 0; h < shape[1]; ++h)
      for (foveal::Index i = 0; i < shape[2]; ++i)
        for (foveal::Index j = 0; j < shape[3]; ++j)
          mask[at++] = foveal::to_storage<T>(
              allowed(b, h, i, j) ? 0.0f : -std::numeric_limits<float>::infinity());
  return foveal::TensorView<const T, 4>(mask.data(), shape);
}

// The views of one attention call, for element type T.
template <typename T>
foveal::AttentionArgs<T> attention_args(const char* fn, const Tensor& q, const Tensor& k,
                                        const Tensor& v, const Tensor& out,
                                        const std::optional<Tensor>& lse,
                                        const std::optional<Tensor>& bias, std::vector<T>& mask) {
  const char* same = "the dtype of q";
  foveal::AttentionArgs<T> args;
  args.q = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
  args.k = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
  args.v = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
  args.out = out.view<T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
  args.lse = optional_view<T, 3>(lse, fn, "lse", "B, Hq, Lq", same);
  args.bias = bias_view<T>(fn, bias, mask);
  return args;
}

// Runs attention-shaped call `run(args)` with views typed after q's dtype, the GIL released.
template <typename Run>
void run_attention(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                   const Tensor& out, const std::optional<Tensor>& lse,
                   const std::optional<Tensor>& bias, const std::map<std::string, Tensor>& extras,
                   Run&& run) {
  with_float_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    std::vector<T> mask;
    auto args = attention_args<T>(fn, q, k, v, out, lse, bias, mask);
    for (const auto& [name, extra] : extras)
      args.extras[name] =
          extra.template view<const T, 3>(fn, name.c_str(), nullptr, "the dtype of q");
    py::gil_scoped_release release;
    run(args);
  });
}

// Runs attention-shaped call run(q, k, v, out, lse, bias) on views of a 16-bit q's dtype (lse
// float32), the GIL released.
template <typename Run>
void run_half_attention(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const std::optional<Tensor>& lse,
                        const std::optional<Tensor>& bias, Run&& run) {
  with_storage_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    if constexpr (foveal::is_half_dtype_v<T>) {
      const char* same = "the dtype of q";
      std::vector<T> mask;
      const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
      const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
      const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
      const auto out_view = out.view<T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
      const auto lse_view =
          optional_view<float, 3>(lse, fn, "lse", "B, Hq, Lq", "float32 next to 16-bit q");
      const auto bias_view_ = bias_view<T>(fn, bias, mask);
      py::gil_scoped_release release;
      run(q_view, k_view, v_view, out_view, lse_view, bias_view_);
    }
  });
}

// Runs run(q, out, lse) of an attention call over a cache of element type T on views of the
// caller's tensors (lse float32 next to a 16-bit cache), the GIL released.
// T: the cache's element type; q and out are its input_type (float for an 8-bit cache).
template <typename T, typename Run>
void run_over_cache(const char* fn, const Tensor& q, const Tensor& out,
                    const std::optional<Tensor>& lse, Run&& run) {
  using Q = typename foveal::KVCache<T>::input_type;
  constexpr bool kQuantized = std::is_same_v<T, foveal::q8_block>;
  const char* same = kQuantized ? "an 8-bit cache takes float32" : "the cache's dtype";
  const auto q_view = q.view<const Q, 4>(fn, "q", "B, Hq, Lq, D", same);
  const auto out_view = out.view<Q, 4>(fn, "out", "B, Hq, Lq, Dv", same);
  const auto lse_view = optional_view<foveal::compute_type_t<Q>, 3>(
      lse, fn, "lse", "B, Hq, Lq",
      foveal::is_half_dtype_v<T> ? "float32 next to a 16-bit cache" : same);
  py::gil_scoped_release release;
  run(q_view, out_view, lse_view);
}

// A KVCache and, when it wraps caller memory, what owns that memory.
template <typename T>
struct PyKVCache {
  foveal::KVCache<T> cache;
  py::object keys_owner;
  py::object values_owner;
};

// The storage of a cache: read-only numpy over it, or a dequantized copy for an 8-bit cache.
template <typename T>
py::object storage_of(py::object self, bool keys) {
  const auto& cache = self.cast<const PyKVCache<T>&>().cache;
  return keys ? foveal::python::storage_array<T>(cache.keys(), cache.dim(), self)
              : foveal::python::storage_array<T>(cache.values(), cache.dim_v(), self);
}

template <typename T>
void bind_kv_cache(py::module_& m, const char* class_name) {
  using Cache = PyKVCache<T>;
  using Input = typename foveal::KVCache<T>::input_type;
  const char* same =
      std::is_same_v<T, foveal::q8_block> ? "an 8-bit cache takes float32" : "the cache's dtype";
  py::class_<Cache>(m, class_name)
      .def(py::init([](const py::kwargs& kwargs) {
        const Keywords keywords("KVCache", kwargs);
        const auto batch = keywords.integer("batch");
        const auto heads_kv = keywords.integer("heads_kv");
        const auto capacity = keywords.integer("capacity");
        const auto dim = keywords.integer("dim");
        const auto dim_v = keywords.integer("dim_v", dim);
        const foveal::KVCacheOptions options{keywords.flag("ring", false),
                                             keywords.integer("sink_tokens", 0),
                                             keywords.integer("page_bounds", 0)};
        keywords.require_all_read();
        return new Cache{foveal::KVCache<T>(batch, heads_kv, capacity, dim, dim_v, options),
                         py::none(), py::none()};
      }))
      .def_property_readonly("batch", [](const Cache& c) { return c.cache.batch(); })
      .def_property_readonly("heads_kv", [](const Cache& c) { return c.cache.heads_kv(); })
      .def_property_readonly("capacity", [](const Cache& c) { return c.cache.capacity(); })
      .def_property_readonly("dim", [](const Cache& c) { return c.cache.dim(); })
      .def_property_readonly("dim_v", [](const Cache& c) { return c.cache.dim_v(); })
      .def_property_readonly("ring", [](const Cache& c) { return c.cache.ring(); })
      .def_property_readonly("sink_tokens", [](const Cache& c) { return c.cache.sink_tokens(); })
      .def_property_readonly("lengths", [](const Cache& c) { return c.cache.lengths(); })
      .def("first_retained",
           [](const Cache& c, const py::kwargs& kwargs) {
             const Keywords keywords("KVCache.first_retained", kwargs);
             return c.cache.first_retained(keywords.integer("sequence"));
           })
      .def_property_readonly("keys", [](py::object self) { return storage_of<T>(self, true); })
      .def_property_readonly("values", [](py::object self) { return storage_of<T>(self, false); })
      .def(
          "append",
          [same](Cache& c, const Tensor& k, const Tensor& v, const py::kwargs& kwargs) {
            const char* fn = "KVCache.append";
            const Keywords keywords(fn, kwargs);
            const auto counts = keywords.integers("counts");
            keywords.require_all_read();
            const auto k_view = k.view<const Input, 4>(fn, "k", "B, Hkv, n, D", same);
            const auto v_view = v.view<const Input, 4>(fn, "v", "B, Hkv, n, Dv", same);
            py::gil_scoped_release release;
            if (counts) {
              c.cache.append(k_view, v_view,
                             std::vector<foveal::Index>(counts->begin(), counts->end()));
            } else {
              c.cache.append(k_view, v_view);
            }
          },
          py::arg("k"), py::arg("v"))
      .def("truncate",
           [](Cache& c, const py::kwargs& kwargs) {
             const Keywords keywords("KVCache.truncate", kwargs);
             const auto length = keywords.integer("length");
             if (keywords.given("sequence")) {
               c.cache.truncate(keywords.integer("sequence"), length);
             } else {
               c.cache.truncate(length);
             }
           })
      .def("reset", [](Cache& c) { c.cache.reset(); })
      .def_property_readonly("page_size", [](const Cache& c) { return c.cache.page_size(); })
      .def_property_readonly(
          "page_bounds",
          [](const Cache& c) {
            using C = foveal::compute_type_t<T>;
            const auto bounds = c.cache.page_bounds();
            py::array_t<C> copy(
                {bounds.size(0), bounds.size(1), bounds.size(2), bounds.size(3), bounds.size(4)});
            // Widened: bfloat16 bounds become float32 exactly.
            if (bounds.numel() > 0)
              std::transform(bounds.data(), bounds.data() + bounds.numel(), copy.mutable_data(),
                             [](auto x) {
                               if constexpr (std::is_same_v<decltype(x), foveal::bfloat16>) {
                                 return static_cast<C>(foveal::to_float(x));
                               } else {
                                 return static_cast<C>(x);
                               }
                             });
            return copy;
          })
      .def("refresh_page_bounds", [](Cache& c) { c.cache.refresh_page_bounds(); })
      .def(
          "quest",
          [](const Cache& c, const Tensor& q, const Tensor& out, const std::optional<Tensor>& lse,
             const py::kwargs& kwargs) {
            const char* fn = "quest_decode_attention";
            const Keywords keywords(fn, kwargs);
            const auto options = foveal::python::attention_options(keywords);
            foveal::QuestOptions quest;
            quest.budget = keywords.number("budget", quest.budget);
            quest.local_pages = keywords.integer("local_pages", quest.local_pages);
            keywords.require_all_read();
            run_over_cache<T>(fn, q, out, lse, [&](auto q_view, auto out_view, auto lse_view) {
              foveal::quest_decode_attention(q_view, c.cache, options, quest, out_view, lse_view);
            });
          },
          py::arg("q"), py::arg("out"), py::arg("lse"))
      .def(
          "decode",
          [](const Cache& c, const Tensor& q, const Tensor& out, const std::optional<Tensor>& lse,
             const py::kwargs& kwargs) {
            const char* fn = "decode_attention";
            const Keywords keywords(fn, kwargs);
            const auto options = foveal::python::attention_options(keywords);
            keywords.require_all_read();
            run_over_cache<T>(fn, q, out, lse, [&](auto q_view, auto out_view, auto lse_view) {
              foveal::decode_attention(q_view, c.cache, options, out_view, lse_view);
            });
          },
          py::arg("q"), py::arg("out"), py::arg("lse"));
}

// A KVCache over the caller's keys and values, of their dtype.
py::object wrap_kv_cache(const Tensor& keys, const Tensor& values, const py::kwargs& kwargs) {
  const char* fn = "KVCache.wrap";
  const Keywords keywords(fn, kwargs);
  const foveal::KVCacheOptions options{keywords.flag("ring", false),
                                       keywords.integer("sink_tokens", 0),
                                       keywords.integer("page_bounds", 0)};
  const auto lengths = keywords.integers("lengths").value_or(std::vector<std::int64_t>{});
  keywords.require_all_read();
  const std::vector<foveal::Index> initial(lengths.begin(), lengths.end());
  if (keys.dtype() == foveal::python::DType::uint8) {  // 8-bit storage: blocks of 36 bytes
    constexpr const char* kDims = "B, Hkv, capacity, blocks, 36";
    return py::cast(
        new PyKVCache<foveal::q8_block>{
            foveal::KVCache<foveal::q8_block>(
                foveal::python::q8_view<4>(keys, fn, "keys", kDims),
                foveal::python::q8_view<4>(values, fn, "values", kDims), options, initial),
            keys.owner(), values.owner()},
        py::return_value_policy::take_ownership);
  }
  return with_storage_type(fn, "keys", keys, [&](auto type) -> py::object {
    using T = decltype(type);
    return py::cast(
        new PyKVCache<T>{foveal::KVCache<T>(keys.view<T, 4>(fn, "keys", "B, Hkv, capacity, D"),
                                            values.view<T, 4>(fn, "values", "B, Hkv, capacity, Dv",
                                                              "the dtype of keys"),
                                            options, initial),
                         keys.owner(), values.owner()},
        py::return_value_policy::take_ownership);
  });
}

// The gradients of attention (sliding = false) or sliding_window_attention (sliding = true).
void attention_backward(bool sliding, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                        const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v,
                        const std::optional<Tensor>& bias, const std::optional<Tensor>& grad_bias,
                        const std::optional<Tensor>& grad_lse, const py::kwargs& kwargs) {
  const char* fn = sliding ? "sliding_window_attention_backward" : "attention_backward";
  const Keywords keywords(fn, kwargs);
  const auto options = foveal::python::attention_options(keywords);
  keywords.require_all_read();
  with_float_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of q";
    std::vector<T> mask;
    const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
    const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
    const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
    const auto out_view = out.view<const T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
    const auto lse_view = lse.view<const T, 3>(fn, "lse", "B, Hq, Lq", same);
    const auto grad_out_view = grad_out.view<const T, 4>(fn, "grad_out", "B, Hq, Lq, Dv", same);
    const auto grad_q_view = grad_q.view<T, 4>(fn, "grad_q", "B, Hq, Lq, D", same);
    const auto grad_k_view = grad_k.view<T, 4>(fn, "grad_k", "B, Hkv, Lk, D", same);
    const auto grad_v_view = grad_v.view<T, 4>(fn, "grad_v", "B, Hkv, Lk, Dv", same);
    const auto bias_view_ = bias_view<T>(fn, bias, mask);
    foveal::TensorView<T, 4> grad_bias_view;
    if (grad_bias) {
      if (!mask.empty() || (bias && bias->dtype() == foveal::python::DType::boolean))
        foveal::python::value_error(fn, ": a boolean mask bias has no gradient (grad_bias)");
      grad_bias_view =
          grad_bias->view_leading_ones<T, 4>(fn, "grad_bias", 2, "the bias's shape", same);
    }
    foveal::TensorView<const T, 3> grad_lse_view;
    if (grad_lse) grad_lse_view = grad_lse->view<const T, 3>(fn, "grad_lse", "B, Hq, Lq", same);
    py::gil_scoped_release release;
    if (sliding) {
      foveal::sliding_window_attention_backward(q_view, k_view, v_view, out_view, lse_view,
                                                grad_out_view, grad_q_view, grad_k_view,
                                                grad_v_view, options, grad_lse_view);
    } else {
      foveal::attention_backward(q_view, k_view, v_view, out_view, lse_view, grad_out_view,
                                 grad_q_view, grad_k_view, grad_v_view, options, bias_view_,
                                 grad_bias_view, grad_lse_view);
    }
  });
}

void merge_states(const Tensor& out_a, const Tensor& lse_a, const Tensor& out_b,
                  const Tensor& lse_b, const Tensor& out, const std::optional<Tensor>& lse,
                  const py::kwargs& kwargs) {
  const char* fn = "merge_states";
  const Keywords keywords(fn, kwargs);
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "out_a", out_a, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of out_a";
    const auto out_a_view = out_a.view<const T, 4>(fn, "out_a", "B, H, L, Dv");
    const auto lse_a_view = lse_a.view<const T, 3>(fn, "lse_a", "B, H, L", same);
    const auto out_b_view = out_b.view<const T, 4>(fn, "out_b", "B, H, L, Dv", same);
    const auto lse_b_view = lse_b.view<const T, 3>(fn, "lse_b", "B, H, L", same);
    const auto out_view = out.view<T, 4>(fn, "out", "B, H, L, Dv", same);
    const auto lse_view = optional_view<T, 3>(lse, fn, "lse", "B, H, L", same);
    py::gil_scoped_release release;
    foveal::merge_states(out_a_view, lse_a_view, out_b_view, lse_b_view, out_view, lse_view,
                         num_threads);
  });
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

  m.def("set_num_threads", [](const py::kwargs& kwargs) {
    const Keywords keywords("set_num_threads", kwargs);
    const int num_threads = keywords.threads();
    keywords.require_all_read();
    foveal::set_num_threads(num_threads);
  });
  m.def("get_num_threads", &foveal::get_num_threads);
  // For bench/thread_threshold.py and the tests: the work per thread below which a loop runs on
  // one thread (0: no threshold); returns the previous value.
  m.def(
      "_set_min_work_per_thread",
      [](std::int64_t work) { return foveal::detail::set_min_work_per_thread(work); },
      py::arg("work"));
  m.def("_min_work_per_thread", &foveal::detail::min_work_per_thread);
  m.attr("_MIN_WORK_PER_THREAD") = foveal::detail::kMinWorkPerThread;
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
  bind_paged(m);
  bind_block_sparse(m);

  m.def(
      "attention",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
         const std::optional<Tensor>& lse, const std::optional<Tensor>& bias,
         const py::kwargs& kwargs) {
        const Keywords keywords("attention", kwargs);
        const auto options = foveal::python::attention_options(keywords);
        keywords.require_all_read();
        if (is_half("attention", q)) {
          run_half_attention("attention", q, k, v, out, lse, bias,
                             [&](auto q_, auto k_, auto v_, auto out_, auto lse_, auto bias_) {
                               foveal::attention(q_, k_, v_, out_, options, lse_, bias_);
                             });
          return;
        }
        run_attention("attention", q, k, v, out, lse, bias, {}, [&](const auto& args) {
          foveal::attention(args.q, args.k, args.v, args.out, options, args.lse, args.bias);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"));

  m.def(
      "sliding_window_attention",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
         const std::optional<Tensor>& lse, const py::kwargs& kwargs) {
        const char* fn = "sliding_window_attention";
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords);
        keywords.require_all_read();
        if (is_half(fn, q)) {
          run_half_attention(fn, q, k, v, out, lse, std::nullopt,
                             [&](auto q_, auto k_, auto v_, auto out_, auto lse_, auto) {
                               foveal::sliding_window_attention(q_, k_, v_, out_, options, lse_);
                             });
          return;
        }
        run_attention(fn, q, k, v, out, lse, std::nullopt, {}, [&](const auto& args) {
          foveal::sliding_window_attention(args.q, args.k, args.v, args.out, options, args.lse);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"));

  m.def("merge_states", &merge_states, py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"),
        py::arg("lse_b"), py::arg("out"), py::arg("lse"));
  m.def("attention_backward", &attention_backward, py::arg("sliding"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("grad_q"),
        py::arg("grad_k"), py::arg("grad_v"), py::arg("bias"), py::arg("grad_bias"),
        py::arg("grad_lse"));

  bind_kv_cache<float>(m, "KVCacheF32");
  bind_kv_cache<double>(m, "KVCacheF64");
  bind_kv_cache<foveal::bfloat16>(m, "KVCacheBF16");
  bind_kv_cache<foveal::float16>(m, "KVCacheF16");
  bind_kv_cache<foveal::q8_block>(m, "KVCacheQ8");
  m.def("wrap_kv_cache", &wrap_kv_cache, py::arg("keys"), py::arg("values"));

  // The attention options of a call as plain values (None where the default applies), their
  // types checked: for callers that forward them to another typed interface (torch custom ops).
  m.def("attention_options", [](const std::string& function, const py::kwargs& kwargs) {
    const Keywords keywords(function.c_str(), kwargs);
    const foveal::AttentionOptions options = foveal::python::attention_options(keywords);
    keywords.require_all_read();
    return foveal::python::options_dict(options);
  });

  m.def("attention_kernel_names", &foveal::attention_kernel_names);

  py::class_<foveal::AttentionKernel>(m, "AttentionKernel")
      .def_property_readonly("name", &foveal::AttentionKernel::name)
      .def(
          "forward",
          [](const foveal::AttentionKernel& kernel, const Tensor& q, const Tensor& k,
             const Tensor& v, const Tensor& out, const std::optional<Tensor>& lse,
             const std::optional<Tensor>& bias, const std::map<std::string, Tensor>& extras) {
            const std::string fn = kernel.name() + " attention";
            run_attention(fn.c_str(), q, k, v, out, lse, bias, extras,
                          [&](const auto& args) { kernel.forward(args); });
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
          py::arg("extras"));

  m.def(
      "make_attention",
      [](const std::string& name, const std::map<std::string, std::string>& params,
         const py::kwargs& kwargs) {
        const Keywords keywords("make_attention", kwargs);
        foveal::AttentionConfig config;
        config.options = foveal::python::attention_options(keywords);
        keywords.require_all_read();
        config.params = params;
        return foveal::make_attention(name, config);
      },
      py::arg("name"), py::arg("params"));
}
