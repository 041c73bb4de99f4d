// foveal._core's SPADE bindings (docs/spade.md). foveal/spade.py owns the docstrings, defaults
// and output allocation; these functions read the caller's tensors (_tensor.hpp) and options
// (_keywords.hpp), the library checks the values, and every kernel runs without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/embedding/spade.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::value_error;
using foveal::python::with_float_type;
using OptionalTensor = std::optional<Tensor>;

// One feature from the fields of a foveal.spade.Feature (a dict: dataclasses.asdict).
foveal::SpadeFeature read_feature(std::size_t index, const py::dict& fields) {
  const std::string where = "Schema: features[" + std::to_string(index) + "]";
  const auto kwargs = py::reinterpret_borrow<py::kwargs>(fields);
  const Keywords keywords(where.c_str(), kwargs);
  foveal::SpadeFeature feature;
  feature.name = keywords.text("name", "");
  const std::string kind = keywords.text("kind", "discrete");
  if (kind != "discrete" && kind != "continuous")
    value_error(where, ".kind (feature \"", feature.name,
                "\") must be 'discrete' or 'continuous', got '", kind, "'");
  feature.kind = kind == "discrete" ? foveal::SpadeFeatureKind::discrete
                                    : foveal::SpadeFeatureKind::continuous;
  feature.vocab_size = keywords.integer("vocab_size", 0);
  feature.pad_id = keywords.integer("pad_id", 0);
  feature.missing_id = keywords.integer("missing_id", 0);
  // None is the default shift; a given value never means it.
  feature.shift = keywords.integer("shift", foveal::SpadeFeature::kDefaultShift);
  if (keywords.given("shift") && feature.shift == foveal::SpadeFeature::kDefaultShift)
    value_error(where, ".shift (feature \"", feature.name, "\") must be >= 1, got ", feature.shift);
  keywords.require_all_read();
  return feature;
}

// A bool tensor as the library's byte masks.
foveal::TensorView<std::uint8_t, 3> mask_view(const Tensor& mask, const char* fn, const char* name,
                                              const char* dims) {
  const auto bits = mask.view<bool, 3>(fn, name, dims);
  return {reinterpret_cast<std::uint8_t*>(bits.data()), bits.shape(), bits.strides()};
}

// The per-sequence lengths option ([B] ints, None = all), viewed over `storage`.
foveal::TensorView<const std::int64_t, 1> lengths_view(const Keywords& keywords,
                                                       std::vector<std::int64_t>& storage) {
  const auto lengths = keywords.integers("lengths");
  if (!lengths) return {};
  storage = *lengths;
  return {storage.data(), {static_cast<Index>(storage.size())}};
}

// condition [B, T, C], or [B, C]: one vector per sequence, seen at each of the `steps` steps.
foveal::TensorView<const float, 3> condition_view(const OptionalTensor& condition, const char* fn,
                                                  Index steps) {
  if (!condition) return {};
  condition->require_usable(fn, "condition");
  if (condition->rank() == 3) return condition->view<const float, 3>(fn, "condition", "B, T, C");
  if (condition->rank() != 2)
    value_error(fn, ": condition must have 3 dimensions [B, T, C] or 2 [B, C], got ",
                condition->rank());
  const auto rows = condition->view<const float, 2>(fn, "condition", "B, C");
  return {rows.data(), {rows.size(0), steps, rows.size(1)}, {rows.stride(0), 0, rows.stride(1)}};
}

// The element type and rank of a TensorView type.
template <typename View>
struct ViewTraits;
template <typename T, int Rank>
struct ViewTraits<foveal::TensorView<T, Rank>> {
  using Element = T;
  static constexpr int kRank = Rank;
};

// Reads the tensors of one feature's dict `given` (keys as SpadeFeatureWeights' members) into
// `views` (SpadeFeatureWeights or SpadeFeatureGradients, which have the same members), naming
// each `prefix['feature']['key']`; `kept` holds the tensors the views read.
template <typename Views>
void read_feature_views(const char* fn, const char* prefix, const std::string& feature,
                        const py::dict& given, Views& views, std::vector<Tensor>& kept) {
  const auto read = [&](const char* key, auto& view, const char* dims) {
    if (!given.contains(key) || given[key].is_none()) return;
    using Traits = ViewTraits<std::decay_t<decltype(view)>>;
    const std::string name = std::string(prefix) + "['" + feature + "']['" + key + "']";
    kept.push_back(Tensor::from(given[key]));
    view = kept.back().view<typename Traits::Element, Traits::kRank>(fn, name.c_str(), dims);
  };
  read("table", views.table, "V, E");
  read("norm_weight", views.norm_weight, "E");
  read("norm_bias", views.norm_bias, "E");
  read("hidden_weight", views.hidden_weight, "H, 1");
  read("hidden_bias", views.hidden_bias, "H");
  read("output_weight", views.output_weight, "E, H");
  read("output_bias", views.output_bias, "E");
}

// The weights of one feature, `given` (a dict of tensors, keys as SpadeFeatureWeights' members):
// the views, whose tensors `kept` holds.
foveal::SpadeFeatureWeights feature_weights(const foveal::SpadeFeature& feature,
                                            const py::dict& given, std::vector<Tensor>& kept) {
  const char* fn = "SpadeEmbedding";
  const bool discrete = feature.kind == foveal::SpadeFeatureKind::discrete;
  const std::array<const char*, 4> keys =
      discrete ? std::array<const char*, 4>{"table", "norm_weight", "norm_bias", nullptr}
               : std::array<const char*, 4>{"hidden_weight", "hidden_bias", "output_weight",
                                            "output_bias"};
  py::list allowed, extra;
  for (const char* key : keys)
    if (key != nullptr) allowed.append(key);
  for (const auto item : given)
    if (!allowed.contains(item.first)) extra.append(item.first);
  extra.attr("sort")();
  if (!extra.empty())
    value_error(fn, ": feature '", feature.name, "' (", discrete ? "discrete" : "continuous",
                ") takes weights ", std::string(py::repr(allowed)), ", got also ",
                std::string(py::repr(extra)));
  foveal::SpadeFeatureWeights weights;
  read_feature_views(fn, "features", feature.name, given, weights, kept);
  return weights;
}

// The weights of an embedding from the Python arguments (views of the tensors `kept` holds);
// reads the keywords combine, condition_dim and norm_eps.
foveal::SpadeEmbeddingWeights read_weights(const foveal::SpadeSchema& schema,
                                           const py::dict& features,
                                           const OptionalTensor& projection_weight,
                                           const OptionalTensor& projection_bias,
                                           const OptionalTensor& pad_vector,
                                           const Keywords& keywords, std::vector<Tensor>& kept) {
  const char* fn = "SpadeEmbedding";
  const std::string combine = keywords.text("combine", "concat");
  if (combine != "concat" && combine != "sum")
    value_error(fn, ": combine must be \"concat\" or \"sum\", got \"", combine, "\"");
  foveal::SpadeEmbeddingWeights weights;
  weights.combine = combine == "sum" ? foveal::SpadeCombine::sum : foveal::SpadeCombine::concat;
  weights.condition_dim = keywords.integer("condition_dim", 0);
  weights.norm_eps = keywords.number("norm_eps", weights.norm_eps);

  py::set names;
  for (const auto& feature : schema.features()) names.add(feature.name);
  py::list unknown;
  for (const auto item : features)
    if (!names.contains(item.first)) unknown.append(item.first);
  unknown.attr("sort")();
  if (!unknown.empty())
    value_error(fn, ": features has no schema feature ", std::string(py::repr(unknown)));
  for (const auto& feature : schema.features()) {
    if (!features.contains(feature.name))
      value_error(fn, ": features must hold the weights of feature '", feature.name, "'");
    const py::object given = features[py::str(feature.name)];
    if (!py::isinstance<py::dict>(given))
      foveal::python::type_error(fn, ": features['", feature.name, "'] must be a dict, got ",
                                 std::string(py::str(py::type::handle_of(given).attr("__name__"))));
    weights.features.push_back(feature_weights(feature, given, kept));
  }
  weights.projection_weight =
      optional_view<const float, 2>(projection_weight, fn, "projection_weight", "d_model, F_in");
  weights.projection_bias =
      optional_view<const float, 1>(projection_bias, fn, "projection_bias", "d_model");
  weights.pad_vector = optional_view<const float, 1>(pad_vector, fn, "pad_vector", "d_model");
  return weights;
}

std::unique_ptr<foveal::SpadeEmbedding> make_embedding(const foveal::SpadeSchema& schema,
                                                       const py::dict& features,
                                                       const OptionalTensor& projection_weight,
                                                       const OptionalTensor& projection_bias,
                                                       const OptionalTensor& pad_vector,
                                                       const py::kwargs& kwargs) {
  const Keywords keywords("SpadeEmbedding", kwargs);
  std::vector<Tensor> kept;  // what the weight views read, until the weights are copied
  const foveal::SpadeEmbeddingWeights weights = read_weights(
      schema, features, projection_weight, projection_bias, pad_vector, keywords, kept);
  keywords.require_all_read();
  return std::make_unique<foveal::SpadeEmbedding>(schema, weights);
}

// spade_embedding_backward's gradient buffers: `given` maps feature names to dicts of float32
// tensors keyed as SpadeFeatureWeights' members (any subset); the views read `kept`.
foveal::SpadeEmbeddingGradients read_gradients(const foveal::SpadeSchema& schema,
                                               const py::dict& given,
                                               const OptionalTensor& projection_weight,
                                               const OptionalTensor& projection_bias,
                                               std::vector<Tensor>& kept) {
  const char* fn = "spade_embedding_backward";
  foveal::SpadeEmbeddingGradients gradients;
  for (const auto& feature : schema.features()) {
    foveal::SpadeFeatureGradients g;
    if (given.contains(feature.name))
      read_feature_views(fn, "grad_features", feature.name, py::dict(given[py::str(feature.name)]),
                         g, kept);
    gradients.features.push_back(g);
  }
  gradients.projection_weight =
      optional_view<float, 2>(projection_weight, fn, "grad_projection_weight", "d_model, F_in");
  gradients.projection_bias =
      optional_view<float, 1>(projection_bias, fn, "grad_projection_bias", "d_model");
  return gradients;
}

// A copy of a decoder's token buffer as a new numpy array.
template <typename T>
py::array_t<T> copy_of(const foveal::TensorView<const T, 3>& view) {
  py::array_t<T> array({view.size(0), view.size(1), view.size(2)});
  if (view.numel() > 0) std::memcpy(array.mutable_data(), view.data(), sizeof(T) * view.numel());
  return array;
}

void bind_functions(py::module_& m) {
  m.def("spade_binned", [](const py::kwargs& kwargs) {
    const Keywords keywords("Feature.binned", kwargs);
    const auto name = keywords.text("name", "");
    const auto num_bins = keywords.integer("num_bins");
    keywords.require_all_read();
    const auto feature = foveal::SpadeFeature::binned(name, num_bins);
    return py::make_tuple(feature.vocab_size, feature.pad_id, feature.missing_id);
  });
  m.def(
      "spade_delay",
      [](const foveal::SpadeSchema& schema, const OptionalTensor& ids, const OptionalTensor& values,
         const OptionalTensor& delayed_ids, const OptionalTensor& delayed_values,
         const Tensor& mask, const py::kwargs& kwargs) {
        const char* fn = "spade.delay";
        const Keywords keywords(fn, kwargs);
        std::vector<std::int64_t> lengths;
        const auto lengths_of = lengths_view(keywords, lengths);
        const int threads = keywords.threads();
        keywords.require_all_read();
        const auto ids_of = optional_view<const std::int64_t, 3>(ids, fn, "ids", "B, n, Fd");
        const auto values_of = optional_view<const float, 3>(values, fn, "values", "B, n, Fc");
        const auto delayed_ids_of =
            optional_view<std::int64_t, 3>(delayed_ids, fn, "delayed_ids", "B, T, Fd");
        const auto delayed_values_of =
            optional_view<float, 3>(delayed_values, fn, "delayed_values", "B, T, Fc");
        const auto mask_of = mask_view(mask, fn, "mask", "B, T, F");
        py::gil_scoped_release release;
        foveal::spade_delay(schema, ids_of, values_of, lengths_of, delayed_ids_of,
                            delayed_values_of, mask_of, threads);
      },
      py::arg("schema"), py::arg("ids"), py::arg("values"), py::arg("delayed_ids"),
      py::arg("delayed_values"), py::arg("mask"));
  m.def(
      "spade_undelay",
      [](const foveal::SpadeSchema& schema, const OptionalTensor& delayed_ids,
         const OptionalTensor& delayed_values, const OptionalTensor& ids,
         const OptionalTensor& values, const py::kwargs& kwargs) {
        const char* fn = "spade.undelay";
        const Keywords keywords(fn, kwargs);
        const int threads = keywords.threads();
        keywords.require_all_read();
        const auto delayed_ids_of =
            optional_view<const std::int64_t, 3>(delayed_ids, fn, "delayed_ids", "B, T, Fd");
        const auto delayed_values_of =
            optional_view<const float, 3>(delayed_values, fn, "delayed_values", "B, T, Fc");
        const auto ids_of = optional_view<std::int64_t, 3>(ids, fn, "ids", "B, n, Fd");
        const auto values_of = optional_view<float, 3>(values, fn, "values", "B, n, Fc");
        py::gil_scoped_release release;
        foveal::spade_undelay(schema, delayed_ids_of, delayed_values_of, ids_of, values_of,
                              threads);
      },
      py::arg("schema"), py::arg("delayed_ids"), py::arg("delayed_values"), py::arg("ids"),
      py::arg("values"));
  m.def(
      "spade_undelay_logits",
      [](const foveal::SpadeSchema& schema, const Tensor& logits, const Tensor& out,
         const py::kwargs& kwargs) {
        const char* fn = "spade.undelay_logits";
        const Keywords keywords(fn, kwargs);
        const int threads = keywords.threads();
        keywords.require_all_read();
        with_float_type(fn, "logits", logits, [&](auto type) {
          using T = decltype(type);
          const auto logits_of = logits.view<const T, 4>(fn, "logits", "B, T, F, V");
          const auto out_of = out.view<T, 4>(fn, "out", "B, n, F, V", "the dtype of logits");
          py::gil_scoped_release release;
          foveal::spade_undelay_logits(schema, logits_of, out_of, threads);
        });
      },
      py::arg("schema"), py::arg("logits"), py::arg("out"));
  m.def(
      "spade_loss_mask",
      [](const foveal::SpadeSchema& schema, const Tensor& loss_mask, const py::kwargs& kwargs) {
        const char* fn = "spade.loss_mask";
        const Keywords keywords(fn, kwargs);
        if (!keywords.given("lengths"))
          foveal::python::type_error(fn, ": lengths must be a sequence of ints, got None");
        std::vector<std::int64_t> lengths;
        const auto lengths_of = lengths_view(keywords, lengths);
        const auto num_steps = keywords.integer("num_steps");
        if (num_steps < 1) value_error(fn, ": num_steps must be >= 1, got ", num_steps);
        const bool include_stop = keywords.flag("include_stop", false);
        keywords.require_all_read();
        const auto mask_of = mask_view(loss_mask, fn, "loss_mask", "B, T - 1, F");
        foveal::check(mask_of.size(1) == num_steps - 1, fn,
                      ": loss_mask.shape[1] must equal num_steps - 1 = ", num_steps - 1, ", got ",
                      mask_of.size(1));
        py::gil_scoped_release release;
        foveal::spade_loss_mask(schema, lengths_of, mask_of, include_stop);
      },
      py::arg("schema"), py::arg("loss_mask"));
}

void bind_embedding(py::module_& m) {
  py::class_<foveal::SpadeEmbedding>(m, "SpadeEmbedding")
      .def(py::init(&make_embedding), py::arg("schema"), py::arg("features"),
           py::arg("projection_weight"), py::arg("projection_bias"), py::arg("pad_vector"))
      .def_property_readonly("d_model", &foveal::SpadeEmbedding::d_model)
      .def_property_readonly("condition_dim", &foveal::SpadeEmbedding::condition_dim)
      .def(
          "forward",
          [](const foveal::SpadeEmbedding& embedding, const OptionalTensor& ids,
             const OptionalTensor& values, const Tensor& out, const OptionalTensor& condition,
             const py::kwargs& kwargs) {
            const char* fn = "SpadeEmbedding";
            const Keywords keywords(fn, kwargs);
            const int threads = keywords.threads();
            keywords.require_all_read();
            const auto ids_of = optional_view<const std::int64_t, 3>(ids, fn, "ids", "B, T, Fd");
            const auto values_of = optional_view<const float, 3>(values, fn, "values", "B, T, Fc");
            const auto out_of = out.view<float, 3>(fn, "out", "B, T, d_model");
            const auto condition_of = condition_view(condition, fn, out_of.size(1));
            py::gil_scoped_release release;
            embedding.forward(ids_of, values_of, out_of, condition_of, threads);
          },
          py::arg("ids"), py::arg("values"), py::arg("out"), py::arg("condition"));

  m.def(
      "spade_embedding_backward",
      [](const foveal::SpadeSchema& schema, const py::dict& features,
         const OptionalTensor& projection_weight, const OptionalTensor& projection_bias,
         const OptionalTensor& ids, const OptionalTensor& values, const OptionalTensor& condition,
         const Tensor& grad_out, const py::dict& grad_features,
         const OptionalTensor& grad_projection_weight, const OptionalTensor& grad_projection_bias,
         const OptionalTensor& grad_condition, const py::kwargs& kwargs) {
        const char* fn = "spade_embedding_backward";
        const Keywords keywords(fn, kwargs);
        std::vector<Tensor> kept;
        const foveal::SpadeEmbeddingWeights weights =
            read_weights(schema, features, projection_weight, projection_bias, {}, keywords, kept);
        const int threads = keywords.threads();
        keywords.require_all_read();
        foveal::SpadeEmbeddingGradients gradients = read_gradients(
            schema, grad_features, grad_projection_weight, grad_projection_bias, kept);
        const auto ids_of = optional_view<const std::int64_t, 3>(ids, fn, "ids", "B, T, Fd");
        const auto values_of = optional_view<const float, 3>(values, fn, "values", "B, T, Fc");
        const auto grad_of = grad_out.view<const float, 3>(fn, "grad_out", "B, T, d_model");
        const auto condition_of = condition_view(condition, fn, grad_of.size(1));
        gradients.condition =
            optional_view<float, 3>(grad_condition, fn, "grad_condition", "B, T, C");
        py::gil_scoped_release release;
        foveal::spade_embedding_backward(schema, weights, ids_of, values_of, condition_of, grad_of,
                                         gradients, threads);
      },
      py::arg("schema"), py::arg("features"), py::arg("projection_weight"),
      py::arg("projection_bias"), py::arg("ids"), py::arg("values"), py::arg("condition"),
      py::arg("grad_out"), py::arg("grad_features"), py::arg("grad_projection_weight"),
      py::arg("grad_projection_bias"), py::arg("grad_condition"));
}

void bind_decoder(py::module_& m) {
  py::class_<foveal::SpadeDecoder>(m, "SpadeDecoder")
      .def(py::init([](const foveal::SpadeSchema& schema, const py::kwargs& kwargs) {
             const Keywords keywords("Decoder", kwargs);
             const auto batch = keywords.integer("batch");
             const auto max_tokens = keywords.integer("max_tokens");
             keywords.require_all_read();
             return foveal::SpadeDecoder(schema, batch, max_tokens);
           }),
           py::arg("schema"))
      .def(
          "step",
          // Holds the GIL: the work is O(B F) and it changes the decoder's state.
          [](foveal::SpadeDecoder& decoder, const OptionalTensor& ids, const OptionalTensor& values,
             const OptionalTensor& step_ids, const OptionalTensor& step_values,
             const Tensor& completed) {
            const char* fn = "Decoder.step";
            decoder.step(optional_view<const std::int64_t, 2>(ids, fn, "ids", "B, Fd"),
                         optional_view<const float, 2>(values, fn, "values", "B, Fc"),
                         optional_view<std::int64_t, 2>(step_ids, fn, "step_ids", "B, Fd"),
                         optional_view<float, 2>(step_values, fn, "step_values", "B, Fc"),
                         completed.view<std::int64_t, 1>(fn, "completed", "B"));
          },
          py::arg("ids"), py::arg("values"), py::arg("step_ids"), py::arg("step_values"),
          py::arg("completed"))
      .def_property_readonly("batch", &foveal::SpadeDecoder::batch)
      .def_property_readonly("max_tokens", &foveal::SpadeDecoder::max_tokens)
      .def_property_readonly("current_step", &foveal::SpadeDecoder::current_step)
      .def("length", &foveal::SpadeDecoder::length, py::arg("b"))
      .def("finished", &foveal::SpadeDecoder::finished, py::arg("b"))
      .def("done", &foveal::SpadeDecoder::done)
      .def("ids", [](const foveal::SpadeDecoder& decoder) { return copy_of(decoder.ids()); })
      .def("values", [](const foveal::SpadeDecoder& decoder) { return copy_of(decoder.values()); });
}

}  // namespace

void bind_spade(py::module_& m) {
  py::class_<foveal::SpadeSchema>(m, "SpadeSchema")
      .def(py::init([](const std::vector<py::dict>& features) {
             std::vector<foveal::SpadeFeature> read;
             for (std::size_t f = 0; f < features.size(); ++f)
               read.push_back(read_feature(f, features[f]));
             return foveal::SpadeSchema(std::move(read));
           }),
           py::arg("features"))
      .def_property_readonly("shifts",
                             [](const foveal::SpadeSchema& schema) {
                               std::vector<Index> shifts;
                               for (const auto& feature : schema.features())
                                 shifts.push_back(feature.shift);
                               return shifts;
                             })
      .def_property_readonly("max_shift", &foveal::SpadeSchema::max_shift);
  bind_functions(m);
  bind_embedding(m);
  bind_decoder(m);
}
