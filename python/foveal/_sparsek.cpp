// foveal._core's SPARSEK bindings (docs/sparsek.md). foveal/sparsek.py owns the docstrings,
// defaults and output allocation; these functions read the caller's tensors as they are
// (leading dimensions of the projection's rows merged here) and release the GIL around every
// kernel. The library checks every value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/sparsek/attention.hpp"
#include "foveal/sparsek/backward.hpp"
#include "foveal/sparsek/cache.hpp"
#include "foveal/sparsek/projection.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_float_type;
using foveal::python::with_storage_type;

// An output of the caller's must have the shape of the input it mirrors.
void require_shape_of(const char* fn, const char* name, const Tensor& tensor, const char* of,
                      const Tensor& input) {
  tensor.require_usable(fn, name);
  if (!tensor.same_shape(input))
    foveal::python::value_error(fn, ": ", name, " must have the shape of ", of, " ",
                                input.shape_string(), ", got ", tensor.shape_string());
}

// z: [..., n] -> p: [..., n] and, when given, tau: [...] (rows merged).
void sparsek(const Tensor& z, const Tensor& p, const std::optional<Tensor>& tau,
             const py::kwargs& kwargs) {
  const char* fn = "sparsek";
  const Keywords keywords(fn, kwargs);
  const Index k = keywords.integer("k");
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "z", z, [&](auto type) {
    using T = decltype(type);
    std::vector<T> z_copy, unused;
    const auto z_view = z.merged_view<const T, 1>(fn, "z", z_copy);
    require_shape_of(fn, "out", p, "z", z);
    const auto p_view = p.merged_view<T, 1>(fn, "out", unused, "the dtype of z");
    const auto tau_view = tau ? tau->merged_view<T, 0>(fn, "tau", unused, "the dtype of z")
                              : foveal::TensorView<T, 1>();
    py::gil_scoped_release release;
    foveal::sparsek(z_view, k, p_view, tau_view, num_threads);
  });
}

// p, grad_p: [..., n] -> grad_z: [..., n].
void sparsek_backward(const Tensor& p, const Tensor& grad_p, const Tensor& grad_z,
                      const py::kwargs& kwargs) {
  const char* fn = "sparsek_backward";
  const Keywords keywords(fn, kwargs);
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "p", p, [&](auto type) {
    using T = decltype(type);
    std::vector<T> p_copy, grad_copy, unused;
    const auto p_view = p.merged_view<const T, 1>(fn, "p", p_copy);
    const auto grad_p_view =
        grad_p.merged_view<const T, 1>(fn, "grad_p", grad_copy, "the dtype of p");
    require_shape_of(fn, "grad_p", grad_p, "p", p);
    require_shape_of(fn, "grad_z", grad_z, "p", p);
    const auto grad_z_view = grad_z.merged_view<T, 1>(fn, "grad_z", unused, "the dtype of p");
    py::gil_scoped_release release;
    foveal::sparsek_backward(p_view, grad_p_view, grad_z_view, num_threads);
  });
}

// z: [..., n] -> tau: [..., n] and, when given, evicted_at: int64 [..., n].
void prefix_thresholds(const Tensor& z, const Tensor& tau, const std::optional<Tensor>& evicted_at,
                       const py::kwargs& kwargs) {
  const char* fn = "sparsek_prefix_thresholds";
  const Keywords keywords(fn, kwargs);
  const Index k = keywords.integer("k");
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "z", z, [&](auto type) {
    using T = decltype(type);
    std::vector<T> z_copy, unused;
    std::vector<std::int64_t> unused_indices;
    const auto z_view = z.merged_view<const T, 1>(fn, "z", z_copy);
    require_shape_of(fn, "tau", tau, "z", z);
    const auto tau_view = tau.merged_view<T, 1>(fn, "tau", unused, "the dtype of z");
    foveal::TensorView<std::int64_t, 2> evicted_view;
    if (evicted_at) {
      require_shape_of(fn, "evicted_at", *evicted_at, "z", z);
      evicted_view = evicted_at->merged_view<std::int64_t, 1>(fn, "evicted_at", unused_indices);
    }
    py::gil_scoped_release release;
    foveal::sparsek_prefix_thresholds(z_view, k, tau_view, evicted_view, num_threads);
  });
}

void select_keys(const Tensor& u, const Tensor& indices, const Tensor& gates,
                 const py::kwargs& kwargs) {
  const char* fn = "sparsek_select";
  const Keywords keywords(fn, kwargs);
  const Index len_q = keywords.integer("len_q");
  const auto options = foveal::python::sparsek_options(keywords);
  keywords.require_all_read();
  with_float_type(fn, "u", u, [&](auto type) {
    using T = decltype(type);
    const auto u_view = u.view<const T, 3>(fn, "u", "B, Hkv, Lk");
    const auto indices_view = indices.view<std::int64_t, 4>(fn, "indices", "B, Hkv, Lq, topk");
    const auto gates_view = gates.view<T, 4>(fn, "gates", "B, Hkv, Lq, topk", "the dtype of u");
    py::gil_scoped_release release;
    foveal::sparsek_select(u_view, len_q, options, indices_view, gates_view);
  });
}

void linear_scores(const Tensor& x, const Tensor& w, const Tensor& u, const py::kwargs& kwargs) {
  const char* fn = "sparsek_linear_scores";
  const Keywords keywords(fn, kwargs);
  const double slope = keywords.number("slope", 0.0);
  const int num_threads = keywords.threads();
  keywords.require_all_read();
  with_float_type(fn, "x", x, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of x";
    const auto x_view = x.view<const T, 3>(fn, "x", "B, L, Dm");
    const auto w_view = w.view<const T, 2>(fn, "w", "H, Dm", same);
    const auto u_view = u.view<T, 3>(fn, "u", "B, H, L", same);
    py::gil_scoped_release release;
    foveal::sparsek_linear_scores(x_view, w_view, slope, u_view, num_threads);
  });
}

void attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& u,
               const Tensor& out, const std::optional<Tensor>& lse, const py::kwargs& kwargs) {
  const char* fn = "sparsek_attention";
  const Keywords keywords(fn, kwargs);
  const auto options = foveal::python::sparsek_options(keywords);
  keywords.require_all_read();
  // 16-bit q: k, v, u and out in its dtype, lse float32.
  with_storage_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of q";
    const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
    const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
    const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
    const auto u_view = u.view<const T, 3>(fn, "u", "B, Hkv, Lk", same);
    const auto out_view = out.view<T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
    const auto lse_view = optional_view<foveal::compute_type_t<T>, 3>(
        lse, fn, "lse", "B, Hq, Lq",
        foveal::is_half_dtype_v<T> ? "float32 next to 16-bit q" : same);
    py::gil_scoped_release release;
    foveal::sparsek_attention(q_view, k_view, v_view, u_view, options, out_view, lse_view);
  });
}

// The gradients of sparsek_attention; grad_u None skips the scores' gradient.
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& u,
                        const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                        const Tensor& grad_q, const Tensor& grad_k, const Tensor& grad_v,
                        const std::optional<Tensor>& grad_u, const py::kwargs& kwargs) {
  const char* fn = "sparsek_attention_backward";
  const Keywords keywords(fn, kwargs);
  const auto options = foveal::python::sparsek_options(keywords);
  keywords.require_all_read();
  with_float_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    const char* same = "the dtype of q";
    const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
    const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
    const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
    const auto u_view = u.view<const T, 3>(fn, "u", "B, Hkv, Lk", same);
    const auto out_view = out.view<const T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
    const auto lse_view = lse.view<const T, 3>(fn, "lse", "B, Hq, Lq", same);
    const auto grad_out_view = grad_out.view<const T, 4>(fn, "grad_out", "B, Hq, Lq, Dv", same);
    const auto grad_q_view = grad_q.view<T, 4>(fn, "grad_q", "B, Hq, Lq, D", same);
    const auto grad_k_view = grad_k.view<T, 4>(fn, "grad_k", "B, Hkv, Lk, D", same);
    const auto grad_v_view = grad_v.view<T, 4>(fn, "grad_v", "B, Hkv, Lk, Dv", same);
    const auto grad_u_view = optional_view<T, 3>(grad_u, fn, "grad_u", "B, Hkv, Lk", same);
    py::gil_scoped_release release;
    foveal::sparsek_attention_backward(q_view, k_view, v_view, u_view, out_view, lse_view,
                                       grad_out_view, options, grad_q_view, grad_k_view,
                                       grad_v_view, grad_u_view);
  });
}

// SparseKCache<T> as the class `class_name`; foveal/sparsek.py wraps it.
// T: the storage type of K, V, u, q and out; lse and the gates are in its compute type
// (float32 next to a 16-bit cache).
template <typename T>
void bind_sparsek_cache(py::module_& m, const char* class_name) {
  using Cache = foveal::SparseKCache<T>;
  using Compute = typename Cache::Compute;
  const char* same = "the cache's dtype";
  const char* lse_dtype = foveal::is_half_dtype_v<T> ? "float32 next to a 16-bit cache" : same;
  py::class_<Cache>(m, class_name)
      .def(py::init([](const py::kwargs& kwargs) {
        const Keywords keywords("SparseKCache", kwargs);
        const Index batch = keywords.integer("batch");
        const Index heads_kv = keywords.integer("heads_kv");
        const Index dim = keywords.integer("dim");
        const Index dim_v = keywords.integer("dim_v", dim);
        const auto options = foveal::python::sparsek_options(keywords);
        keywords.require_all_read();
        return new Cache(batch, heads_kv, dim, dim_v, options);
      }))
      .def_property_readonly("batch", &Cache::batch)
      .def_property_readonly("heads_kv", &Cache::heads_kv)
      .def_property_readonly("dim", &Cache::dim)
      .def_property_readonly("dim_v", &Cache::dim_v)
      .def_property_readonly("capacity", &Cache::capacity)
      .def_property_readonly("length", &Cache::length)
      .def_property_readonly("stored_rows", &Cache::stored_rows)
      .def_property_readonly("threshold_entries", &Cache::threshold_entries)
      .def(
          "append",
          [same](Cache& cache, const Tensor& k, const Tensor& v, const Tensor& u) {
            const char* fn = "SparseKCache.append";
            const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, n, D", same);
            const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, n, Dv", same);
            const auto u_view = u.view<const T, 3>(fn, "u", "B, Hkv, n", same);
            py::gil_scoped_release release;
            cache.append(k_view, v_view, u_view);
          },
          py::arg("k"), py::arg("v"), py::arg("u"))
      .def(
          "attend",
          [same, lse_dtype](const Cache& cache, const Tensor& q, const Tensor& out,
                            const std::optional<Tensor>& lse) {
            const char* fn = "SparseKCache.attend";
            const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, 1, D", same);
            const auto out_view = out.view<T, 4>(fn, "out", "B, Hq, 1, Dv", same);
            const auto lse_view = optional_view<Compute, 3>(lse, fn, "lse", "B, Hq, 1", lse_dtype);
            py::gil_scoped_release release;
            cache.attend(q_view, out_view, lse_view);
          },
          py::arg("q"), py::arg("out"), py::arg("lse"))
      .def("reset", &Cache::reset)
      .def("selected",
           [](const Cache& cache, const py::kwargs& kwargs) {
             const Keywords keywords("SparseKCache.selected", kwargs);
             const auto selection =
                 cache.selected(keywords.integer("sequence"), keywords.integer("head"));
             keywords.require_all_read();
             return py::make_tuple(
                 py::array_t<std::int64_t>(static_cast<py::ssize_t>(selection.positions.size()),
                                           selection.positions.data()),
                 py::array_t<Compute>(static_cast<py::ssize_t>(selection.gates.size()),
                                      selection.gates.data()));
           })
      .def("threshold", [](const Cache& cache, const py::kwargs& kwargs) {
        const Keywords keywords("SparseKCache.threshold", kwargs);
        const double tau = cache.threshold(keywords.integer("sequence"), keywords.integer("head"));
        keywords.require_all_read();
        return tau;
      });
}

}  // namespace

void bind_sparsek(py::module_& m) {
  m.def("sparsek", &sparsek, py::arg("z"), py::arg("p"), py::arg("tau"));
  m.def("sparsek_backward", &sparsek_backward, py::arg("p"), py::arg("grad_p"), py::arg("grad_z"));
  m.def("sparsek_attention", &attention, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("u"),
        py::arg("out"), py::arg("lse"));
  m.def("sparsek_attention_backward", &attention_backward, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("u"), py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("grad_q"),
        py::arg("grad_k"), py::arg("grad_v"), py::arg("grad_u"));
  m.def("sparsek_options", [](const std::string& function, const py::kwargs& kwargs) {
    const Keywords keywords(function.c_str(), kwargs);
    const auto options = foveal::python::sparsek_options(keywords);
    keywords.require_all_read();
    return foveal::python::options_dict(options);
  });
  m.def("sparsek_projection_options", [](const py::kwargs& kwargs) {
    const Keywords keywords("sparsek", kwargs);
    py::dict values;
    values["k"] = keywords.integer("k");
    const int num_threads = keywords.threads();
    values["num_threads"] = num_threads == 0 ? py::object(py::none()) : py::int_(num_threads);
    keywords.require_all_read();
    return values;
  });
  m.def("sparsek_select", &select_keys, py::arg("u"), py::arg("indices"), py::arg("gates"));
  m.def("sparsek_prefix_thresholds", &prefix_thresholds, py::arg("z"), py::arg("tau"),
        py::arg("evicted_at"));
  m.def("sparsek_linear_scores", &linear_scores, py::arg("x"), py::arg("w"), py::arg("u"));
  bind_sparsek_cache<float>(m, "SparseKCacheF32");
  bind_sparsek_cache<double>(m, "SparseKCacheF64");
  bind_sparsek_cache<foveal::bfloat16>(m, "SparseKCacheBF16");
  bind_sparsek_cache<foveal::float16>(m, "SparseKCacheF16");
}
