// foveal._core's vector-quantization bindings (docs/vq.md). foveal/vq.py owns the docstrings,
// defaults and output allocation; these functions read the caller's tensors (_tensor.hpp) and
// options (_keywords.hpp), the library checks the values, and every kernel runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/embedding/vq.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::value_error;
using foveal::python::with_float_type;
using OptionalTensor = std::optional<Tensor>;

// The "metric" option: "l2" (the default) or "cosine".
foveal::VqMetric metric_of(const Keywords& keywords) {
  const std::string metric = keywords.text("metric", "l2");
  if (metric != "l2" && metric != "cosine")
    value_error(keywords.function(), ": metric must be 'l2' or 'cosine', got '", metric, "'");
  return metric == "cosine" ? foveal::VqMetric::cosine : foveal::VqMetric::l2;
}

// metric, decay, epsilon, dead_threshold (the library checks their values).
foveal::VqOptions options_of(const Keywords& keywords) {
  foveal::VqOptions options;
  options.metric = metric_of(keywords);
  options.decay = keywords.number("decay", options.decay);
  options.epsilon = keywords.number("epsilon", options.epsilon);
  options.dead_threshold = keywords.number("dead_threshold", options.dead_threshold);
  return options;
}

// The "seed" option: an int in [0, 2**63) (default 0).
std::uint64_t seed_of(const Keywords& keywords) {
  const std::int64_t seed = keywords.integer("seed", 0);
  if (seed < 0) value_error(keywords.function(), ": seed must be >= 0, got ", seed);
  return static_cast<std::uint64_t>(seed);
}

// x [N, D] as float32 rows.
foveal::TensorView<const float, 2> rows(const Tensor& x, const char* fn, const char* name = "x") {
  return x.view<const float, 2>(fn, name, "N, D");
}

// A numpy copy of a contiguous view.
template <typename T, int Rank>
py::array_t<T> to_numpy(foveal::TensorView<const T, Rank> view) {
  std::vector<py::ssize_t> shape(view.shape().begin(), view.shape().end());
  py::array_t<T> copy(shape);
  if (!view.empty())
    std::memcpy(copy.mutable_data(), view.data(), sizeof(T) * static_cast<size_t>(view.numel()));
  return copy;
}

// init_kmeans(x, lloyd_iterations=, seed=, num_threads=) of a VectorQuantizer or ResidualVQ.
template <typename Quantizer>
void init_kmeans(Quantizer& quantizer, const char* fn, const Tensor& x, const py::kwargs& kwargs) {
  const Keywords keywords(fn, kwargs);
  const auto lloyd_iterations = keywords.integer("lloyd_iterations", 10);
  const auto seed = seed_of(keywords);
  const int threads = keywords.threads();
  keywords.require_all_read();
  const auto x_view = rows(x, fn);
  py::gil_scoped_release release;
  quantizer.init_kmeans(x_view, lloyd_iterations, seed, threads);
}

// update(x, update_codebook=, num_threads=) of a VectorQuantizer (which also writes the
// optional indices) or a ResidualVQ.
template <typename Quantizer>
void update(Quantizer& quantizer, const char* fn, const Tensor& x, const OptionalTensor& indices,
            const py::kwargs& kwargs) {
  const Keywords keywords(fn, kwargs);
  const bool update_codebook = keywords.flag("update_codebook", true);
  const int threads = keywords.threads();
  keywords.require_all_read();
  const auto x_view = rows(x, fn);
  const auto indices_view = optional_view<std::int64_t, 1>(indices, fn, "indices", "N");
  py::gil_scoped_release release;
  if constexpr (std::is_same_v<Quantizer, foveal::ResidualVQ>) {
    quantizer.update(x_view, update_codebook, threads);
  } else {
    quantizer.update(x_view, indices_view, update_codebook, threads);
  }
}

void bind_functions(py::module_& m) {
  m.def(
      "vq_assign",
      [](const Tensor& x, const Tensor& codebook, const Tensor& indices,
         const OptionalTensor& sq_distances, const py::kwargs& kwargs) {
        const char* fn = "vq.assign";
        const Keywords keywords(fn, kwargs);
        const auto metric = metric_of(keywords);
        const int threads = keywords.threads();
        keywords.require_all_read();
        with_float_type(fn, "x", x, [&](auto type) {
          using T = decltype(type);
          const char* same = "the dtype of x";
          const auto x_view = x.view<const T, 2>(fn, "x", "N, D");
          const auto codebook_view = codebook.view<const T, 2>(fn, "codebook", "K, D", same);
          const auto indices_view = indices.view<std::int64_t, 1>(fn, "indices", "N");
          const auto distances_view =
              optional_view<T, 1>(sq_distances, fn, "sq_distances", "N", same);
          py::gil_scoped_release release;
          foveal::vq_assign(x_view, codebook_view, indices_view, distances_view, metric, threads);
        });
      },
      py::arg("x"), py::arg("codebook"), py::arg("indices"), py::arg("sq_distances"));
  m.def(
      "vq_perplexity",
      [](const Tensor& counts) {
        const auto view = counts.view<const std::int64_t, 1>("vq.perplexity", "counts", "K");
        py::gil_scoped_release release;
        return foveal::vq_perplexity(view);
      },
      py::arg("counts"));
  m.def(
      "effective_rank",
      [](const Tensor& matrix) {
        const auto view = matrix.view<const float, 2>("vq.effective_rank", "matrix", "M, D");
        py::gil_scoped_release release;
        return foveal::effective_rank(view);
      },
      py::arg("matrix"));
}

void bind_vector_quantizer(py::module_& m) {
  using foveal::VectorQuantizer;
  py::class_<VectorQuantizer>(m, "VectorQuantizer")
      .def(py::init([](const Tensor& codebook, const py::kwargs& kwargs) {
             const char* fn = "VectorQuantizer";
             const Keywords keywords(fn, kwargs);
             const auto options = options_of(keywords);
             keywords.require_all_read();
             return VectorQuantizer(rows(codebook, fn, "codebook"), options);
           }),
           py::arg("codebook"))
      .def_static(
          "from_data",
          [](const Tensor& x, const py::kwargs& kwargs) {
            const char* fn = "VectorQuantizer.from_data";
            const Keywords keywords(fn, kwargs);
            const auto num_codes = keywords.integer("num_codes");
            const auto lloyd_iterations = keywords.integer("lloyd_iterations", 10);
            const auto seed = seed_of(keywords);
            const int threads = keywords.threads();
            const auto options = options_of(keywords);
            keywords.require_all_read();
            const auto x_view = rows(x, fn);
            auto quantizer = std::make_unique<VectorQuantizer>(num_codes, x_view.size(1), options);
            py::gil_scoped_release release;
            quantizer->init_kmeans(x_view, lloyd_iterations, seed, threads);
            return quantizer;
          },
          py::arg("x"))
      .def_property_readonly("num_codes", &VectorQuantizer::num_codes)
      .def_property_readonly("dim", &VectorQuantizer::dim)
      .def_property_readonly("cosine",
                             [](const VectorQuantizer& self) {
                               return self.options().metric == foveal::VqMetric::cosine;
                             })
      .def_property_readonly("decay",
                             [](const VectorQuantizer& self) { return self.options().decay; })
      .def_property_readonly("epsilon",
                             [](const VectorQuantizer& self) { return self.options().epsilon; })
      .def_property_readonly(
          "dead_threshold",
          [](const VectorQuantizer& self) { return self.options().dead_threshold; })
      .def("codebook", [](const VectorQuantizer& self) { return to_numpy(self.codebook()); })
      .def(
          "set_codebook",
          [](VectorQuantizer& self, const Tensor& codebook) {
            self.set_codebook(rows(codebook, "VectorQuantizer.codebook", "codebook"));
          },
          py::arg("codebook"))
      .def(
          "quantize",
          [](const VectorQuantizer& self, const Tensor& x, const Tensor& indices,
             const OptionalTensor& quantized, const OptionalTensor& sq_distances,
             const py::kwargs& kwargs) {
            const char* fn = "VectorQuantizer.quantize";
            const Keywords keywords(fn, kwargs);
            const int threads = keywords.threads();
            keywords.require_all_read();
            const auto x_view = rows(x, fn);
            const auto indices_view = indices.view<std::int64_t, 1>(fn, "indices", "N");
            const auto quantized_view = optional_view<float, 2>(quantized, fn, "quantized", "N, D");
            const auto distances_view =
                optional_view<float, 1>(sq_distances, fn, "sq_distances", "N");
            py::gil_scoped_release release;
            self.quantize(x_view, indices_view, quantized_view, distances_view, threads);
          },
          py::arg("x"), py::arg("indices"), py::arg("quantized"), py::arg("sq_distances"))
      .def(
          "init_kmeans",
          [](VectorQuantizer& self, const Tensor& x, const py::kwargs& kwargs) {
            init_kmeans(self, "VectorQuantizer.init_kmeans", x, kwargs);
          },
          py::arg("x"))
      .def(
          "update",
          [](VectorQuantizer& self, const Tensor& x, const OptionalTensor& indices,
             const py::kwargs& kwargs) {
            update(self, "VectorQuantizer.update", x, indices, kwargs);
          },
          py::arg("x"), py::arg("indices"))
      .def(
          "restart_dead_codes",
          [](VectorQuantizer& self, const Tensor& x, const py::kwargs& kwargs) {
            const char* fn = "VectorQuantizer.restart_dead_codes";
            const Keywords keywords(fn, kwargs);
            const auto seed = seed_of(keywords);
            keywords.require_all_read();
            const auto x_view = rows(x, fn);
            py::gil_scoped_release release;
            return self.restart_dead_codes(x_view, seed);
          },
          py::arg("x"))
      .def("usage_counts",
           [](const VectorQuantizer& self) { return to_numpy(self.usage_counts()); })
      .def("cluster_size",
           [](const VectorQuantizer& self) { return to_numpy(self.cluster_size()); })
      .def("reset_usage", &VectorQuantizer::reset_usage)
      .def("perplexity", &VectorQuantizer::perplexity)
      .def("num_dead_codes", &VectorQuantizer::num_dead_codes)
      .def("codebook_effective_rank", &VectorQuantizer::codebook_effective_rank);
}

void bind_residual_vq(py::module_& m) {
  using foveal::ResidualVQ;
  py::class_<ResidualVQ>(m, "ResidualVQ")
      .def(py::init([](const py::kwargs& kwargs) {
        const Keywords keywords("ResidualVQ", kwargs);
        const auto num_stages = keywords.integer("num_stages");
        const auto num_codes = keywords.integer("num_codes");
        const auto dim = keywords.integer("dim");
        const auto options = options_of(keywords);
        keywords.require_all_read();
        return ResidualVQ(num_stages, num_codes, dim, options);
      }))
      .def_property_readonly("num_stages", &ResidualVQ::num_stages)
      .def_property_readonly("dim", &ResidualVQ::dim)
      .def(
          "stage",
          [](ResidualVQ& self, const py::kwargs& kwargs) -> foveal::VectorQuantizer& {
            const Keywords keywords("ResidualVQ.stage", kwargs);
            const auto s = keywords.integer("s");
            keywords.require_all_read();
            foveal::check(s >= 0 && s < self.num_stages(), "ResidualVQ.stage: s must be in [0, ",
                          self.num_stages(), "), got ", s);
            return self.stage(s);
          },
          py::return_value_policy::reference_internal)
      .def(
          "encode",
          [](const ResidualVQ& self, const Tensor& x, const Tensor& codes,
             const OptionalTensor& quantized, const py::kwargs& kwargs) {
            const char* fn = "ResidualVQ.encode";
            const Keywords keywords(fn, kwargs);
            const int threads = keywords.threads();
            keywords.require_all_read();
            const auto x_view = rows(x, fn);
            const auto codes_view = codes.view<std::int64_t, 2>(fn, "codes", "N, S");
            const auto quantized_view = optional_view<float, 2>(quantized, fn, "quantized", "N, D");
            py::gil_scoped_release release;
            self.encode(x_view, codes_view, quantized_view, threads);
          },
          py::arg("x"), py::arg("codes"), py::arg("quantized"))
      .def(
          "decode",
          [](const ResidualVQ& self, const Tensor& codes, const Tensor& out) {
            const char* fn = "ResidualVQ.decode";
            const auto codes_view = codes.view<const std::int64_t, 2>(fn, "codes", "N, S");
            const auto out_view = out.view<float, 2>(fn, "out", "N, D");
            py::gil_scoped_release release;
            self.decode(codes_view, out_view);
          },
          py::arg("codes"), py::arg("out"))
      .def(
          "init_kmeans",
          [](ResidualVQ& self, const Tensor& x, const py::kwargs& kwargs) {
            init_kmeans(self, "ResidualVQ.init_kmeans", x, kwargs);
          },
          py::arg("x"))
      .def(
          "update",
          [](ResidualVQ& self, const Tensor& x, const py::kwargs& kwargs) {
            update(self, "ResidualVQ.update", x, std::nullopt, kwargs);
          },
          py::arg("x"));
}

}  // namespace

void bind_vq(py::module_& m) {
  bind_functions(m);
  bind_vector_quantizer(m);
  bind_residual_vq(m);
}
