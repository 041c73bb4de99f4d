// foveal._core's SPARSEK bindings (docs/sparsek.md). foveal/sparsek.py owns the docstrings,
// reshaping of leading dimensions, defaults and messages; these functions take numpy arrays as
// they are and release the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "_views.hpp"
#include "foveal/sparsek/attention.hpp"
#include "foveal/sparsek/cache.hpp"
#include "foveal/sparsek/projection.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::array_view;
using foveal::python::Keywords;
using foveal::python::optional_array_view;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_float_type;

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

foveal::SparseKOptions attention_options(int64_t topk, int64_t window, int64_t sink_tokens,
                                         const std::string& gate, bool causal, double scale,
                                         double softcap, int64_t q_offset, int num_threads) {
  foveal::SparseKOptions options;
  options.topk = topk;
  options.window = window;
  options.sink_tokens = sink_tokens;
  options.gate = foveal::parse_sparsek_gate(gate);
  options.causal = causal;
  options.scale = scale;
  options.softcap = softcap;
  options.q_offset = q_offset;
  options.num_threads = num_threads;
  return options;
}

template <typename T>
void select(const py::array& u, Index len_q, const foveal::SparseKOptions& options,
            const py::array& indices, const py::array& gates) {
  constexpr const char* kFunction = "sparsek_select";
  const auto u_view = array_view<const T, 3>(kFunction, "u", u);
  const auto indices_view = array_view<std::int64_t, 4>(kFunction, "indices", indices);
  const auto gates_view = array_view<T, 4>(kFunction, "gates", gates);
  py::gil_scoped_release release;
  foveal::sparsek_select(u_view, len_q, options, indices_view, gates_view);
}

template <typename T>
void prefix_thresholds(const py::array& z, Index k, const py::array& tau,
                       const std::optional<py::array>& evicted_at, int num_threads) {
  constexpr const char* kFunction = "sparsek_prefix_thresholds";
  const auto z_view = array_view<const T, 2>(kFunction, "z", z);
  const auto tau_view = array_view<T, 2>(kFunction, "tau", tau);
  const auto evicted_view =
      optional_array_view<std::int64_t, 2>(kFunction, "evicted_at", evicted_at);
  py::gil_scoped_release release;
  foveal::sparsek_prefix_thresholds(z_view, k, tau_view, evicted_view, num_threads);
}

template <typename T>
void linear_scores(const py::array& x, const py::array& w, double slope, const py::array& u,
                   int num_threads) {
  constexpr const char* kFunction = "sparsek_linear_scores";
  const auto x_view = array_view<const T, 3>(kFunction, "x", x);
  const auto w_view = array_view<const T, 2>(kFunction, "w", w);
  const auto u_view = array_view<T, 3>(kFunction, "u", u);
  py::gil_scoped_release release;
  foveal::sparsek_linear_scores(x_view, w_view, slope, u_view, num_threads);
}

bool is_double(const py::array& x) { return x.dtype().is(py::dtype::of<double>()); }

// SparseKCache<T> as the class `class_name`; foveal/sparsek.py wraps it.
template <typename T>
void bind_sparsek_cache(py::module_& m, const char* class_name) {
  using Cache = foveal::SparseKCache<T>;
  py::class_<Cache>(m, class_name)
      .def(py::init([](int64_t batch, int64_t heads_kv, int64_t dim, int64_t dim_v, int64_t topk,
                       int64_t window, int64_t sink_tokens, const std::string& gate, double scale,
                       double softcap, int num_threads) {
             return new Cache(batch, heads_kv, dim, dim_v,
                              attention_options(topk, window, sink_tokens, gate, true, scale,
                                                softcap, -1, num_threads));
           }),
           py::arg("batch"), py::arg("heads_kv"), py::arg("dim"), py::arg("dim_v"), py::arg("topk"),
           py::arg("window"), py::arg("sink_tokens"), py::arg("gate"), py::arg("scale"),
           py::arg("softcap"), py::arg("num_threads"))
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
          [](Cache& cache, const py::array& k, const py::array& v, const py::array& u) {
            constexpr const char* kFunction = "SparseKCache.append";
            const auto k_view = array_view<const T, 4>(kFunction, "k", k);
            const auto v_view = array_view<const T, 4>(kFunction, "v", v);
            const auto u_view = array_view<const T, 3>(kFunction, "u", u);
            py::gil_scoped_release release;
            cache.append(k_view, v_view, u_view);
          },
          py::arg("k"), py::arg("v"), py::arg("u"))
      .def(
          "attend",
          [](const Cache& cache, const py::array& q, const py::array& out,
             const std::optional<py::array>& lse) {
            constexpr const char* kFunction = "SparseKCache.attend";
            const auto q_view = array_view<const T, 4>(kFunction, "q", q);
            const auto out_view = array_view<T, 4>(kFunction, "out", out);
            const auto lse_view = optional_array_view<T, 3>(kFunction, "lse", lse);
            py::gil_scoped_release release;
            cache.attend(q_view, out_view, lse_view);
          },
          py::arg("q"), py::arg("out"), py::arg("lse"))
      .def("reset", &Cache::reset)
      .def(
          "selected",
          [](const Cache& cache, int64_t sequence, int64_t head) {
            const foveal::SparseKCacheSelection<T> selection = cache.selected(sequence, head);
            return py::make_tuple(
                py::array_t<int64_t>(static_cast<py::ssize_t>(selection.positions.size()),
                                     selection.positions.data()),
                py::array_t<T>(static_cast<py::ssize_t>(selection.gates.size()),
                               selection.gates.data()));
          },
          py::arg("sequence"), py::arg("head"))
      .def("threshold", &Cache::threshold, py::arg("sequence"), py::arg("head"));
}

}  // namespace

void bind_sparsek(py::module_& m) {
  m.def(
      "sparsek",
      [](const py::array& z, Index k, const py::array& p, const std::optional<py::array>& tau,
         int num_threads) {
        if (is_double(z))
          project<double>(z, k, p, tau, num_threads);
        else
          project<float>(z, k, p, tau, num_threads);
      },
      py::arg("z"), py::arg("k"), py::arg("p"), py::arg("tau"), py::arg("num_threads"));
  m.def(
      "sparsek_backward",
      [](const py::array& p, const py::array& grad_p, const py::array& grad_z, int num_threads) {
        if (is_double(p))
          backward<double>(p, grad_p, grad_z, num_threads);
        else
          backward<float>(p, grad_p, grad_z, num_threads);
      },
      py::arg("p"), py::arg("grad_p"), py::arg("grad_z"), py::arg("num_threads"));

  m.def(
      "sparsek_attention",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& u, const Tensor& out,
         const std::optional<Tensor>& lse, const py::kwargs& kwargs) {
        const char* fn = "sparsek_attention";
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
          const auto out_view = out.view<T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
          const auto lse_view = optional_view<T, 3>(lse, fn, "lse", "B, Hq, Lq", same);
          py::gil_scoped_release release;
          foveal::sparsek_attention(q_view, k_view, v_view, u_view, options, out_view, lse_view);
        });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("u"), py::arg("out"), py::arg("lse"));
  m.def(
      "sparsek_select",
      [](const py::array& u, Index len_q, const py::array& indices, const py::array& gates,
         int64_t topk, int64_t window, int64_t sink_tokens, bool causal, int64_t q_offset,
         int num_threads) {
        const auto options = attention_options(topk, window, sink_tokens, "value", causal, 0, 0,
                                               q_offset, num_threads);
        if (is_double(u))
          select<double>(u, len_q, options, indices, gates);
        else
          select<float>(u, len_q, options, indices, gates);
      },
      py::arg("u"), py::arg("len_q"), py::arg("indices"), py::arg("gates"), py::arg("topk"),
      py::arg("window"), py::arg("sink_tokens"), py::arg("causal"), py::arg("q_offset"),
      py::arg("num_threads"));
  m.def(
      "sparsek_prefix_thresholds",
      [](const py::array& z, Index k, const py::array& tau,
         const std::optional<py::array>& evicted_at, int num_threads) {
        if (is_double(z))
          prefix_thresholds<double>(z, k, tau, evicted_at, num_threads);
        else
          prefix_thresholds<float>(z, k, tau, evicted_at, num_threads);
      },
      py::arg("z"), py::arg("k"), py::arg("tau"), py::arg("evicted_at"), py::arg("num_threads"));
  m.def(
      "sparsek_linear_scores",
      [](const py::array& x, const py::array& w, double slope, const py::array& u,
         int num_threads) {
        if (is_double(x))
          linear_scores<double>(x, w, slope, u, num_threads);
        else
          linear_scores<float>(x, w, slope, u, num_threads);
      },
      py::arg("x"), py::arg("w"), py::arg("slope"), py::arg("u"), py::arg("num_threads"));

  bind_sparsek_cache<float>(m, "SparseKCacheF32");
  bind_sparsek_cache<double>(m, "SparseKCacheF64");
}
