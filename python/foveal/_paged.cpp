// foveal._core's paged KV cache bindings (docs/serving.md). foveal/paged.py owns the docstrings,
// defaults and output allocation; these read the caller's tensors as they are and release the
// GIL around every append and attention call. The library checks every value.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/attention/batch_attention.hpp"
#include "foveal/attention/paged_kv_cache.hpp"

namespace py = pybind11;

namespace {

using foveal::Index;
using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_storage_type;

// Where lse's dtype comes from next to a 16-bit pool.
constexpr const char* kHalfLse = "float32 next to a 16-bit pool";

// A PagedKVCache and, when it wraps caller memory, what owns that memory.
template <typename T>
struct PyPagedCache {
  foveal::PagedKVCache<T> cache;
  py::object keys_owner;
  py::object values_owner;
};

std::vector<Index> ids(const Keywords& keywords, const char* name) {
  const auto values = keywords.integers(name);
  if (!values) return {};
  return std::vector<Index>(values->begin(), values->end());
}

foveal::PrefixSharing sharing(const Keywords& keywords) {
  return keywords.flag("share_prefixes", true) ? foveal::PrefixSharing::detect
                                               : foveal::PrefixSharing::off;
}

py::dict info_dict(const foveal::BatchAttentionInfo& info) {
  py::dict result;
  result["tasks"] = info.tasks;
  result["chunks"] = info.chunks;
  result["shared_groups"] = info.shared_groups;
  result["shared_tokens"] = info.shared_tokens;
  return result;
}

// T: the pool's element type; q, k, v and out are its input_type (float for an 8-bit pool).
template <typename T>
void bind_paged_cache(py::module_& m, const char* class_name) {
  using Cache = PyPagedCache<T>;
  using Input = typename foveal::PagedKVCache<T>::input_type;
  const char* same =
      std::is_same_v<T, foveal::q8_block> ? "an 8-bit pool takes float32" : "the cache's dtype";
  // The integer keyword `name` of a method.
  const auto integer = [](const char* method, const py::kwargs& kwargs, const char* name) {
    const Keywords keywords(method, kwargs);
    const Index value = keywords.integer(name);
    keywords.require_all_read();
    return value;
  };
  py::class_<Cache>(m, class_name)
      .def(py::init([](const py::kwargs& kwargs) {
        const Keywords keywords("PagedKVCache", kwargs);
        const auto num_pages = keywords.integer("num_pages");
        const auto page_size = keywords.integer("page_size");
        const auto heads_kv = keywords.integer("heads_kv");
        const auto dim = keywords.integer("dim");
        const auto dim_v = keywords.integer("dim_v", dim);
        keywords.require_all_read();
        return new Cache{foveal::PagedKVCache<T>(num_pages, page_size, heads_kv, dim, dim_v),
                         py::none(), py::none()};
      }))
      .def_property_readonly("num_pages", [](const Cache& c) { return c.cache.num_pages(); })
      .def_property_readonly("page_size", [](const Cache& c) { return c.cache.page_size(); })
      .def_property_readonly("heads_kv", [](const Cache& c) { return c.cache.heads_kv(); })
      .def_property_readonly("dim", [](const Cache& c) { return c.cache.dim(); })
      .def_property_readonly("dim_v", [](const Cache& c) { return c.cache.dim_v(); })
      .def_property_readonly("free_pages", [](const Cache& c) { return c.cache.free_pages(); })
      .def_property_readonly("pages_in_use", [](const Cache& c) { return c.cache.pages_in_use(); })
      .def_property_readonly("page_bytes", [](const Cache& c) { return c.cache.page_bytes(); })
      .def_property_readonly("sequences", [](const Cache& c) { return c.cache.sequences(); })
      .def_property_readonly("keys",
                             [](py::object self) {
                               const auto& cache = self.cast<const Cache&>().cache;
                               return foveal::python::storage_array<T>(cache.keys(), cache.dim(),
                                                                       self);
                             })
      .def_property_readonly("values",
                             [](py::object self) {
                               const auto& cache = self.cast<const Cache&>().cache;
                               return foveal::python::storage_array<T>(cache.values(),
                                                                       cache.dim_v(), self);
                             })
      .def("add_sequence", [](Cache& c) { return c.cache.add_sequence(); })
      .def("fork",
           [integer](Cache& c, const py::kwargs& kwargs) {
             return c.cache.fork(integer("PagedKVCache.fork", kwargs, "sequence"));
           })
      .def("remove",
           [integer](Cache& c, const py::kwargs& kwargs) {
             c.cache.remove(integer("PagedKVCache.remove", kwargs, "sequence"));
           })
      .def("contains",
           [integer](const Cache& c, const py::kwargs& kwargs) {
             return c.cache.contains(integer("PagedKVCache.contains", kwargs, "sequence"));
           })
      .def("length",
           [integer](const Cache& c, const py::kwargs& kwargs) {
             return c.cache.length(integer("PagedKVCache.length", kwargs, "sequence"));
           })
      .def("page_table",
           [integer](const Cache& c, const py::kwargs& kwargs) {
             return c.cache.page_table(integer("PagedKVCache.page_table", kwargs, "sequence"));
           })
      .def("references",
           [integer](const Cache& c, const py::kwargs& kwargs) {
             return c.cache.references(integer("PagedKVCache.references", kwargs, "page"));
           })
      .def("truncate",
           [](Cache& c, const py::kwargs& kwargs) {
             const Keywords keywords("PagedKVCache.truncate", kwargs);
             const Index sequence = keywords.integer("sequence");
             const Index length = keywords.integer("length");
             keywords.require_all_read();
             c.cache.truncate(sequence, length);
           })
      .def("release",
           [](Cache& c, const py::kwargs& kwargs) {
             const Keywords keywords("PagedKVCache.release", kwargs);
             const Index sequence = keywords.integer("sequence");
             const Index begin = keywords.integer("begin");
             const Index end = keywords.integer("end");
             keywords.require_all_read();
             return c.cache.release(sequence, begin, end);
           })
      .def("holds",
           [](const Cache& c, const py::kwargs& kwargs) {
             const Keywords keywords("PagedKVCache.holds", kwargs);
             const Index sequence = keywords.integer("sequence");
             const Index position = keywords.integer("position");
             keywords.require_all_read();
             return c.cache.holds(sequence, position);
           })
      .def("released_pages",
           [integer](const Cache& c, const py::kwargs& kwargs) {
             return c.cache.released_pages(
                 integer("PagedKVCache.released_pages", kwargs, "sequence"));
           })
      .def(
          "append",
          [same](Cache& c, const Tensor& k, const Tensor& v, const py::kwargs& kwargs) {
            const char* fn = "PagedKVCache.append";
            const Keywords keywords(fn, kwargs);
            const std::vector<Index> sequences = ids(keywords, "sequences");
            const std::vector<Index> counts = ids(keywords, "counts");
            keywords.require_all_read();
            const auto k_view = k.view<const Input, 4>(fn, "k", "S, Hkv, n, D", same);
            const auto v_view = v.view<const Input, 4>(fn, "v", "S, Hkv, n, Dv", same);
            py::gil_scoped_release release;
            c.cache.append(sequences, k_view, v_view, counts);
          },
          py::arg("k"), py::arg("v"))
      .def(
          "decode",
          [same](const Cache& c, const Tensor& q, const Tensor& out,
                 const std::optional<Tensor>& lse, const py::kwargs& kwargs) {
            const char* fn = "batch_decode_attention";
            const Keywords keywords(fn, kwargs);
            const std::vector<Index> sequences = ids(keywords, "sequences");
            const foveal::PrefixSharing share = sharing(keywords);
            const auto options = foveal::python::attention_options(keywords);
            keywords.require_all_read();
            const auto q_view = q.view<const Input, 4>(fn, "q", "S, Hq, Lq, D", same);
            const auto out_view = out.view<Input, 4>(fn, "out", "S, Hq, Lq, Dv", same);
            const auto lse_view = optional_view<foveal::compute_type_t<Input>, 3>(
                lse, fn, "lse", "S, Hq, Lq", foveal::is_half_dtype_v<T> ? kHalfLse : same);
            foveal::BatchAttentionInfo info;
            {
              py::gil_scoped_release release;
              foveal::batch_decode_attention(q_view, c.cache, sequences, options, out_view,
                                             lse_view, share, &info);
            }
            return info_dict(info);
          },
          py::arg("q"), py::arg("out"), py::arg("lse"))
      .def(
          "prefill",
          [same](Cache& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                 const std::optional<Tensor>& lse, const py::kwargs& kwargs) {
            const char* fn = "batch_prefill_attention";
            const Keywords keywords(fn, kwargs);
            const std::vector<Index> sequences = ids(keywords, "sequences");
            const std::vector<Index> counts = ids(keywords, "counts");
            const foveal::PrefixSharing share = sharing(keywords);
            const auto options = foveal::python::attention_options(keywords);
            keywords.require_all_read();
            const auto q_view = q.view<const Input, 4>(fn, "q", "S, Hq, n, D", same);
            const auto k_view = k.view<const Input, 4>(fn, "k", "S, Hkv, n, D", same);
            const auto v_view = v.view<const Input, 4>(fn, "v", "S, Hkv, n, Dv", same);
            const auto out_view = out.view<Input, 4>(fn, "out", "S, Hq, n, Dv", same);
            const auto lse_view = optional_view<foveal::compute_type_t<Input>, 3>(
                lse, fn, "lse", "S, Hq, n", foveal::is_half_dtype_v<T> ? kHalfLse : same);
            foveal::BatchAttentionInfo info;
            {
              py::gil_scoped_release release;
              foveal::batch_prefill_attention(q_view, k_view, v_view, c.cache, sequences, counts,
                                              options, out_view, lse_view, share, &info);
            }
            return info_dict(info);
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"));
}

// A paged cache over the caller's pool halves, of their dtype (uint8 [..., blocks, 36]: 8-bit
// blocks).
py::object wrap_paged_kv_cache(const Tensor& keys, const Tensor& values) {
  const char* fn = "PagedKVCache.wrap";
  if (keys.dtype() == foveal::python::DType::uint8) {
    constexpr const char* kDims = "num_pages, Hkv, page_size, blocks, 36";
    return py::cast(
        new PyPagedCache<foveal::q8_block>{
            foveal::PagedKVCache<foveal::q8_block>(
                foveal::python::q8_view<4>(keys, fn, "keys", kDims),
                foveal::python::q8_view<4>(values, fn, "values", kDims)),
            keys.owner(), values.owner()},
        py::return_value_policy::take_ownership);
  }
  return with_storage_type(fn, "keys", keys, [&](auto type) -> py::object {
    using T = decltype(type);
    return py::cast(
        new PyPagedCache<T>{
            foveal::PagedKVCache<T>(keys.view<T, 4>(fn, "keys", "num_pages, Hkv, page_size, D"),
                                    values.view<T, 4>(fn, "values", "num_pages, Hkv, page_size, Dv",
                                                      "the dtype of keys")),
            keys.owner(), values.owner()},
        py::return_value_policy::take_ownership);
  });
}

}  // namespace

void bind_paged(py::module_& m) {
  bind_paged_cache<float>(m, "PagedKVCacheF32");
  bind_paged_cache<double>(m, "PagedKVCacheF64");
  bind_paged_cache<foveal::bfloat16>(m, "PagedKVCacheBF16");
  bind_paged_cache<foveal::float16>(m, "PagedKVCacheF16");
  bind_paged_cache<foveal::q8_block>(m, "PagedKVCacheQ8");
  m.def("wrap_paged_kv_cache", &wrap_paged_kv_cache, py::arg("keys"), py::arg("values"));
}
