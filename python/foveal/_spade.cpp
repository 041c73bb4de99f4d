// foveal._core's SPADE bindings (OPERATORS.md §6). foveal/spade.py owns the docstrings,
// defaults, conversions and messages; these functions take numpy arrays as they are and
// release the GIL around every kernel.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "_views.hpp"
#include "foveal/embedding/spade.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::array_view;
using foveal::python::optional_array_view;
using Arrays = std::optional<py::array>;

foveal::SpadeSchema make_schema(const std::vector<std::string>& names,
                                const std::vector<bool>& discrete,
                                const std::vector<Index>& vocab_sizes,
                                const std::vector<Index>& pad_ids,
                                const std::vector<Index>& missing_ids,
                                const std::vector<std::optional<Index>>& shifts) {
  const std::size_t count = names.size();
  foveal::check(discrete.size() == count && vocab_sizes.size() == count &&
                    pad_ids.size() == count && missing_ids.size() == count &&
                    shifts.size() == count,
                "SpadeSchema: every feature list must have one entry per name (", count, ")");
  std::vector<foveal::SpadeFeature> features(count);
  for (std::size_t f = 0; f < count; ++f) {
    features[f].name = names[f];
    features[f].kind =
        discrete[f] ? foveal::SpadeFeatureKind::discrete : foveal::SpadeFeatureKind::continuous;
    features[f].vocab_size = vocab_sizes[f];
    features[f].pad_id = pad_ids[f];
    features[f].missing_id = missing_ids[f];
    features[f].shift = shifts[f].value_or(foveal::SpadeFeature::kDefaultShift);  // None: default
  }
  return foveal::SpadeSchema(std::move(features));
}

// The weights of one feature from a dict of arrays (keys as SpadeFeatureWeights' members).
foveal::SpadeFeatureWeights feature_weights(const std::map<std::string, py::array>& arrays) {
  constexpr const char* kFunction = "SpadeEmbedding";
  const auto matrix = [&](const char* key) {
    const auto found = arrays.find(key);
    return found == arrays.end() ? foveal::TensorView<const float, 2>()
                                 : array_view<const float, 2>(kFunction, key, found->second);
  };
  const auto vector = [&](const char* key) {
    const auto found = arrays.find(key);
    return found == arrays.end() ? foveal::TensorView<const float, 1>()
                                 : array_view<const float, 1>(kFunction, key, found->second);
  };
  foveal::SpadeFeatureWeights weights;
  weights.table = matrix("table");
  weights.norm_weight = vector("norm_weight");
  weights.norm_bias = vector("norm_bias");
  weights.hidden_weight = matrix("hidden_weight");
  weights.hidden_bias = vector("hidden_bias");
  weights.output_weight = matrix("output_weight");
  weights.output_bias = vector("output_bias");
  return weights;
}

std::unique_ptr<foveal::SpadeEmbedding> make_embedding(
    const foveal::SpadeSchema& schema,
    const std::vector<std::map<std::string, py::array>>& features, const std::string& combine,
    const Arrays& projection_weight, const Arrays& projection_bias, Index condition_dim,
    double norm_eps, const Arrays& pad_vector) {
  constexpr const char* kFunction = "SpadeEmbedding";
  foveal::check(combine == "concat" || combine == "sum", kFunction,
                ": combine must be \"concat\" or \"sum\", got \"", combine, "\"");
  foveal::SpadeEmbeddingWeights weights;
  for (const auto& arrays : features) weights.features.push_back(feature_weights(arrays));
  weights.combine = combine == "sum" ? foveal::SpadeCombine::sum : foveal::SpadeCombine::concat;
  weights.projection_weight =
      optional_array_view<const float, 2>(kFunction, "projection_weight", projection_weight);
  weights.projection_bias =
      optional_array_view<const float, 1>(kFunction, "projection_bias", projection_bias);
  weights.condition_dim = condition_dim;
  weights.norm_eps = norm_eps;
  weights.pad_vector = optional_array_view<const float, 1>(kFunction, "pad_vector", pad_vector);
  return std::make_unique<foveal::SpadeEmbedding>(schema, weights);
}

// A copy of a decoder's token buffer as a new numpy array.
template <typename T>
py::array_t<T> copy_of(const foveal::TensorView<const T, 3>& view) {
  py::array_t<T> array({view.size(0), view.size(1), view.size(2)});
  if (view.numel() > 0) std::memcpy(array.mutable_data(), view.data(), sizeof(T) * view.numel());
  return array;
}

}  // namespace

void bind_spade(py::module_& m) {
  py::class_<foveal::SpadeSchema>(m, "SpadeSchema")
      .def(py::init(&make_schema), py::arg("names"), py::arg("discrete"), py::arg("vocab_sizes"),
           py::arg("pad_ids"), py::arg("missing_ids"), py::arg("shifts"))
      .def_property_readonly("shifts",
                             [](const foveal::SpadeSchema& schema) {
                               std::vector<Index> shifts;
                               for (const auto& feature : schema.features())
                                 shifts.push_back(feature.shift);
                               return shifts;
                             })
      .def_property_readonly("max_shift", &foveal::SpadeSchema::max_shift);

  m.def(
      "spade_delay",
      [](const foveal::SpadeSchema& schema, const Arrays& ids, const Arrays& values,
         const Arrays& lengths, const Arrays& delayed_ids, const Arrays& delayed_values,
         const py::array& mask, int num_threads) {
        constexpr const char* kFunction = "spade_delay";
        const auto ids_view = optional_array_view<const std::int64_t, 3>(kFunction, "ids", ids);
        const auto values_view = optional_array_view<const float, 3>(kFunction, "values", values);
        const auto lengths_view =
            optional_array_view<const std::int64_t, 1>(kFunction, "lengths", lengths);
        const auto delayed_ids_view =
            optional_array_view<std::int64_t, 3>(kFunction, "delayed_ids", delayed_ids);
        const auto delayed_values_view =
            optional_array_view<float, 3>(kFunction, "delayed_values", delayed_values);
        const auto mask_view = array_view<std::uint8_t, 3>(kFunction, "mask", mask);
        py::gil_scoped_release release;
        foveal::spade_delay(schema, ids_view, values_view, lengths_view, delayed_ids_view,
                            delayed_values_view, mask_view, num_threads);
      },
      py::arg("schema"), py::arg("ids"), py::arg("values"), py::arg("lengths"),
      py::arg("delayed_ids"), py::arg("delayed_values"), py::arg("mask"), py::arg("num_threads"));

  m.def(
      "spade_undelay",
      [](const foveal::SpadeSchema& schema, const Arrays& delayed_ids, const Arrays& delayed_values,
         const Arrays& ids, const Arrays& values, int num_threads) {
        constexpr const char* kFunction = "spade_undelay";
        const auto delayed_ids_view =
            optional_array_view<const std::int64_t, 3>(kFunction, "delayed_ids", delayed_ids);
        const auto delayed_values_view =
            optional_array_view<const float, 3>(kFunction, "delayed_values", delayed_values);
        const auto ids_view = optional_array_view<std::int64_t, 3>(kFunction, "ids", ids);
        const auto values_view = optional_array_view<float, 3>(kFunction, "values", values);
        py::gil_scoped_release release;
        foveal::spade_undelay(schema, delayed_ids_view, delayed_values_view, ids_view, values_view,
                              num_threads);
      },
      py::arg("schema"), py::arg("delayed_ids"), py::arg("delayed_values"), py::arg("ids"),
      py::arg("values"), py::arg("num_threads"));

  m.def(
      "spade_undelay_logits",
      [](const foveal::SpadeSchema& schema, const py::array& logits, const py::array& out,
         int num_threads) {
        constexpr const char* kFunction = "spade_undelay_logits";
        const auto run = [&](auto element) {
          using T = decltype(element);
          const auto logits_view = array_view<const T, 4>(kFunction, "logits", logits);
          const auto out_view = array_view<T, 4>(kFunction, "out", out);
          py::gil_scoped_release release;
          foveal::spade_undelay_logits(schema, logits_view, out_view, num_threads);
        };
        if (logits.dtype().is(py::dtype::of<double>())) {
          run(double{});
        } else {
          run(float{});
        }
      },
      py::arg("schema"), py::arg("logits"), py::arg("out"), py::arg("num_threads"));

  m.def(
      "spade_loss_mask",
      [](const foveal::SpadeSchema& schema, const Arrays& lengths, const py::array& loss_mask,
         bool include_stop) {
        constexpr const char* kFunction = "spade_loss_mask";
        const auto lengths_view =
            optional_array_view<const std::int64_t, 1>(kFunction, "lengths", lengths);
        const auto mask_view = array_view<std::uint8_t, 3>(kFunction, "loss_mask", loss_mask);
        py::gil_scoped_release release;
        foveal::spade_loss_mask(schema, lengths_view, mask_view, include_stop);
      },
      py::arg("schema"), py::arg("lengths"), py::arg("loss_mask"), py::arg("include_stop"));

  py::class_<foveal::SpadeEmbedding>(m, "SpadeEmbedding")
      .def(py::init(&make_embedding), py::arg("schema"), py::arg("features"), py::arg("combine"),
           py::arg("projection_weight"), py::arg("projection_bias"), py::arg("condition_dim"),
           py::arg("norm_eps"), py::arg("pad_vector"))
      .def_property_readonly("d_model", &foveal::SpadeEmbedding::d_model)
      .def_property_readonly("condition_dim", &foveal::SpadeEmbedding::condition_dim)
      .def(
          "forward",
          [](const foveal::SpadeEmbedding& embedding, const Arrays& ids, const Arrays& values,
             const py::array& out, const Arrays& condition, int num_threads) {
            constexpr const char* kFunction = "SpadeEmbedding.forward";
            const auto ids_view = optional_array_view<const std::int64_t, 3>(kFunction, "ids", ids);
            const auto values_view =
                optional_array_view<const float, 3>(kFunction, "values", values);
            const auto out_view = array_view<float, 3>(kFunction, "out", out);
            const auto condition_view =
                optional_array_view<const float, 3>(kFunction, "condition", condition);
            py::gil_scoped_release release;
            embedding.forward(ids_view, values_view, out_view, condition_view, num_threads);
          },
          py::arg("ids"), py::arg("values"), py::arg("out"), py::arg("condition"),
          py::arg("num_threads"));

  py::class_<foveal::SpadeDecoder>(m, "SpadeDecoder")
      .def(py::init<foveal::SpadeSchema, Index, Index>(), py::arg("schema"), py::arg("batch"),
           py::arg("max_tokens"))
      .def(
          "step",
          [](foveal::SpadeDecoder& decoder, const Arrays& predicted_ids,
             const Arrays& predicted_values, const Arrays& step_ids, const Arrays& step_values,
             const py::array& completed) {
            constexpr const char* kFunction = "SpadeDecoder.step";
            decoder.step(
                optional_array_view<const std::int64_t, 2>(kFunction, "ids", predicted_ids),
                optional_array_view<const float, 2>(kFunction, "values", predicted_values),
                optional_array_view<std::int64_t, 2>(kFunction, "step_ids", step_ids),
                optional_array_view<float, 2>(kFunction, "step_values", step_values),
                array_view<std::int64_t, 1>(kFunction, "completed", completed));
          },
          py::arg("predicted_ids"), py::arg("predicted_values"), py::arg("step_ids"),
          py::arg("step_values"), py::arg("completed"))
      .def_property_readonly("current_step", &foveal::SpadeDecoder::current_step)
      .def("length", &foveal::SpadeDecoder::length, py::arg("b"))
      .def("finished", &foveal::SpadeDecoder::finished, py::arg("b"))
      .def("done", &foveal::SpadeDecoder::done)
      .def("ids", [](const foveal::SpadeDecoder& decoder) { return copy_of(decoder.ids()); })
      .def("values", [](const foveal::SpadeDecoder& decoder) { return copy_of(decoder.values()); });
}
