// foveal._core's vector-quantization bindings (docs/vq.md). foveal/vq.py owns the
// docstrings, defaults, conversions and messages; these functions take numpy arrays as they are
// and release the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "_views.hpp"
#include "foveal/embedding/vq.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::array_view;
using foveal::python::optional_array_view;
using Arrays = std::optional<py::array>;

foveal::VqMetric metric_of(bool cosine) {
  return cosine ? foveal::VqMetric::cosine : foveal::VqMetric::l2;
}

foveal::VqOptions make_options(bool cosine, double decay, double epsilon, double dead_threshold) {
  foveal::VqOptions options;
  options.metric = metric_of(cosine);
  options.decay = decay;
  options.epsilon = epsilon;
  options.dead_threshold = dead_threshold;
  return options;
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

template <typename T>
void assign(const py::array& x, const py::array& codebook, const py::array& indices,
            const Arrays& sq_distances, bool cosine, int num_threads) {
  constexpr const char* kFunction = "vq_assign";
  const auto x_view = array_view<const T, 2>(kFunction, "x", x);
  const auto codebook_view = array_view<const T, 2>(kFunction, "codebook", codebook);
  const auto indices_view = array_view<std::int64_t, 1>(kFunction, "indices", indices);
  const auto distances_view = optional_array_view<T, 1>(kFunction, "sq_distances", sq_distances);
  py::gil_scoped_release release;
  foveal::vq_assign(x_view, codebook_view, indices_view, distances_view, metric_of(cosine),
                    num_threads);
}

}  // namespace

void bind_vq(py::module_& m) {
  m.def(
      "vq_assign",
      [](const py::array& x, const py::array& codebook, const py::array& indices,
         const Arrays& sq_distances, bool cosine, int num_threads) {
        if (x.dtype().is(py::dtype::of<double>()))
          assign<double>(x, codebook, indices, sq_distances, cosine, num_threads);
        else
          assign<float>(x, codebook, indices, sq_distances, cosine, num_threads);
      },
      py::arg("x"), py::arg("codebook"), py::arg("indices"), py::arg("sq_distances"),
      py::arg("cosine"), py::arg("num_threads"));
  m.def(
      "vq_perplexity",
      [](const py::array& counts) {
        return foveal::vq_perplexity(
            array_view<const std::int64_t, 1>("vq_perplexity", "counts", counts));
      },
      py::arg("counts"));
  m.def(
      "effective_rank",
      [](const py::array& matrix) {
        const auto view = array_view<const float, 2>("effective_rank", "matrix", matrix);
        py::gil_scoped_release release;
        return foveal::effective_rank(view);
      },
      py::arg("matrix"));

  constexpr const char* kQuantizer = "VectorQuantizer";
  py::class_<foveal::VectorQuantizer>(m, "VectorQuantizer")
      .def(py::init([](const py::array& codebook, bool cosine, double decay, double epsilon,
                       double dead_threshold) {
             return foveal::VectorQuantizer(
                 array_view<const float, 2>(kQuantizer, "codebook", codebook),
                 make_options(cosine, decay, epsilon, dead_threshold));
           }),
           py::arg("codebook"), py::arg("cosine"), py::arg("decay"), py::arg("epsilon"),
           py::arg("dead_threshold"))
      .def_property_readonly("num_codes", &foveal::VectorQuantizer::num_codes)
      .def_property_readonly("dim", &foveal::VectorQuantizer::dim)
      .def_property_readonly("cosine",
                             [](const foveal::VectorQuantizer& self) {
                               return self.options().metric == foveal::VqMetric::cosine;
                             })
      .def_property_readonly(
          "decay", [](const foveal::VectorQuantizer& self) { return self.options().decay; })
      .def_property_readonly(
          "epsilon", [](const foveal::VectorQuantizer& self) { return self.options().epsilon; })
      .def_property_readonly(
          "dead_threshold",
          [](const foveal::VectorQuantizer& self) { return self.options().dead_threshold; })
      .def("codebook",
           [](const foveal::VectorQuantizer& self) { return to_numpy(self.codebook()); })
      .def(
          "set_codebook",
          [](foveal::VectorQuantizer& self, const py::array& codebook) {
            self.set_codebook(
                array_view<const float, 2>("VectorQuantizer.set_codebook", "codebook", codebook));
          },
          py::arg("codebook"))
      .def(
          "quantize",
          [](const foveal::VectorQuantizer& self, const py::array& x, const py::array& indices,
             const Arrays& quantized, const Arrays& sq_distances, int num_threads) {
            constexpr const char* kFunction = "VectorQuantizer.quantize";
            const auto x_view = array_view<const float, 2>(kFunction, "x", x);
            const auto indices_view = array_view<std::int64_t, 1>(kFunction, "indices", indices);
            const auto quantized_view =
                optional_array_view<float, 2>(kFunction, "quantized", quantized);
            const auto distances_view =
                optional_array_view<float, 1>(kFunction, "sq_distances", sq_distances);
            py::gil_scoped_release release;
            self.quantize(x_view, indices_view, quantized_view, distances_view, num_threads);
          },
          py::arg("x"), py::arg("indices"), py::arg("quantized"), py::arg("sq_distances"),
          py::arg("num_threads"))
      .def(
          "init_kmeans",
          [](foveal::VectorQuantizer& self, const py::array& x, Index lloyd_iterations,
             std::uint64_t seed, int num_threads) {
            const auto x_view = array_view<const float, 2>("VectorQuantizer.init_kmeans", "x", x);
            py::gil_scoped_release release;
            self.init_kmeans(x_view, lloyd_iterations, seed, num_threads);
          },
          py::arg("x"), py::arg("lloyd_iterations"), py::arg("seed"), py::arg("num_threads"))
      .def(
          "update",
          [](foveal::VectorQuantizer& self, const py::array& x, const Arrays& indices,
             bool update_codebook, int num_threads) {
            constexpr const char* kFunction = "VectorQuantizer.update";
            const auto x_view = array_view<const float, 2>(kFunction, "x", x);
            const auto indices_view =
                optional_array_view<std::int64_t, 1>(kFunction, "indices", indices);
            py::gil_scoped_release release;
            self.update(x_view, indices_view, update_codebook, num_threads);
          },
          py::arg("x"), py::arg("indices"), py::arg("update_codebook"), py::arg("num_threads"))
      .def(
          "restart_dead_codes",
          [](foveal::VectorQuantizer& self, const py::array& x, std::uint64_t seed) {
            return self.restart_dead_codes(
                array_view<const float, 2>("VectorQuantizer.restart_dead_codes", "x", x), seed);
          },
          py::arg("x"), py::arg("seed"))
      .def("usage_counts",
           [](const foveal::VectorQuantizer& self) { return to_numpy(self.usage_counts()); })
      .def("cluster_size",
           [](const foveal::VectorQuantizer& self) { return to_numpy(self.cluster_size()); })
      .def("reset_usage", &foveal::VectorQuantizer::reset_usage)
      .def("perplexity", &foveal::VectorQuantizer::perplexity)
      .def("num_dead_codes", &foveal::VectorQuantizer::num_dead_codes)
      .def("codebook_effective_rank", &foveal::VectorQuantizer::codebook_effective_rank);

  constexpr const char* kResidual = "ResidualVQ";
  py::class_<foveal::ResidualVQ>(m, "ResidualVQ")
      .def(py::init([](Index num_stages, Index num_codes, Index dim, bool cosine, double decay,
                       double epsilon, double dead_threshold) {
             return foveal::ResidualVQ(num_stages, num_codes, dim,
                                       make_options(cosine, decay, epsilon, dead_threshold));
           }),
           py::arg("num_stages"), py::arg("num_codes"), py::arg("dim"), py::arg("cosine"),
           py::arg("decay"), py::arg("epsilon"), py::arg("dead_threshold"))
      .def_property_readonly("num_stages", &foveal::ResidualVQ::num_stages)
      .def_property_readonly("dim", &foveal::ResidualVQ::dim)
      .def(
          "stage",
          [](foveal::ResidualVQ& self, Index s) -> foveal::VectorQuantizer& {
            foveal::check(s >= 0 && s < self.num_stages(), "ResidualVQ.stage: s must be in [0, ",
                          self.num_stages(), "), got ", s);
            return self.stage(s);
          },
          py::arg("s"), py::return_value_policy::reference_internal)
      .def(
          "encode",
          [](const foveal::ResidualVQ& self, const py::array& x, const py::array& codes,
             const Arrays& quantized, int num_threads) {
            constexpr const char* kFunction = "ResidualVQ.encode";
            const auto x_view = array_view<const float, 2>(kFunction, "x", x);
            const auto codes_view = array_view<std::int64_t, 2>(kFunction, "codes", codes);
            const auto quantized_view =
                optional_array_view<float, 2>(kFunction, "quantized", quantized);
            py::gil_scoped_release release;
            self.encode(x_view, codes_view, quantized_view, num_threads);
          },
          py::arg("x"), py::arg("codes"), py::arg("quantized"), py::arg("num_threads"))
      .def(
          "decode",
          [](const foveal::ResidualVQ& self, const py::array& codes, const py::array& out) {
            constexpr const char* kFunction = "ResidualVQ.decode";
            const auto codes_view = array_view<const std::int64_t, 2>(kFunction, "codes", codes);
            const auto out_view = array_view<float, 2>(kFunction, "out", out);
            py::gil_scoped_release release;
            self.decode(codes_view, out_view);
          },
          py::arg("codes"), py::arg("out"))
      .def(
          "init_kmeans",
          [](foveal::ResidualVQ& self, const py::array& x, Index lloyd_iterations,
             std::uint64_t seed, int num_threads) {
            const auto x_view = array_view<const float, 2>("ResidualVQ.init_kmeans", "x", x);
            py::gil_scoped_release release;
            self.init_kmeans(x_view, lloyd_iterations, seed, num_threads);
          },
          py::arg("x"), py::arg("lloyd_iterations"), py::arg("seed"), py::arg("num_threads"))
      .def(
          "update",
          [](foveal::ResidualVQ& self, const py::array& x, bool update_codebook, int num_threads) {
            const auto x_view = array_view<const float, 2>("ResidualVQ.update", "x", x);
            py::gil_scoped_release release;
            self.update(x_view, update_codebook, num_threads);
          },
          py::arg("x"), py::arg("update_codebook"), py::arg("num_threads"));
}
