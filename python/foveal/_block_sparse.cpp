// foveal._core's block-sparse bindings (docs/sparse_attention.md). foveal/sparse.py owns the
// docstrings, defaults, output allocation and the BlockSelection class; these read the caller's
// tensors as they are and release the GIL around every kernel. The library checks every value.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/attention/block_sparse.hpp"

namespace py = pybind11;

namespace {

using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_storage_type;

using IndexArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

foveal::BlockSparseOptions sparse_options(const Keywords& keywords) {
  foveal::BlockSparseOptions sparse;
  sparse.budget = keywords.number("budget", sparse.budget);
  sparse.threshold = keywords.number("threshold", 0.0);
  sparse.block_size = keywords.integer("block_size", sparse.block_size);
  sparse.local_blocks = keywords.integer("local_blocks", sparse.local_blocks);
  return sparse;
}

IndexArray to_array(const std::vector<std::int64_t>& values) {
  IndexArray result(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), result.mutable_data());
  return result;
}

py::dict selection_dict(const foveal::BlockSelection& selection) {
  py::dict result;
  result["block_size"] = selection.block_size;
  result["batch"] = selection.batch;
  result["heads_kv"] = selection.heads_kv;
  result["first_query_block"] = selection.first_query_block;
  result["query_blocks"] = selection.query_blocks;
  result["key_blocks"] = selection.key_blocks;
  result["offsets"] = to_array(selection.offsets);
  result["blocks"] = to_array(selection.blocks);
  return result;
}

// The selection the Python layer passes as keywords (block_size, batch, heads_kv,
// first_query_block, query_blocks, key_blocks) and two int64 arrays.
foveal::BlockSelection selection_from(const Keywords& keywords, const IndexArray& offsets,
                                      const IndexArray& blocks) {
  foveal::BlockSelection selection;
  selection.block_size = keywords.integer("block_size");
  selection.batch = keywords.integer("batch");
  selection.heads_kv = keywords.integer("heads_kv");
  selection.first_query_block = keywords.integer("first_query_block");
  selection.query_blocks = keywords.integer("query_blocks");
  selection.key_blocks = keywords.integer("key_blocks");
  selection.offsets.assign(offsets.data(), offsets.data() + offsets.size());
  selection.blocks.assign(blocks.data(), blocks.data() + blocks.size());
  return selection;
}

// Runs run(q, k, v, out, lse) on views typed after q's dtype (lse in its compute type), the GIL
// released.
template <typename Run>
void with_attention_views(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const std::optional<Tensor>& lse, Run&& run) {
  with_storage_type(fn, "q", q, [&](auto type) {
    using T = decltype(type);
    using Lse = foveal::compute_type_t<T>;
    const char* same = "the dtype of q";
    const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
    const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", same);
    const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
    const auto out_view = out.view<T, 4>(fn, "out", "B, Hq, Lq, Dv", same);
    const auto lse_view = optional_view<Lse, 3>(
        lse, fn, "lse", "B, Hq, Lq",
        foveal::is_half_dtype_v<T> ? "float32 next to 16-bit q" : "the dtype of q");
    py::gil_scoped_release release;
    run(q_view, k_view, v_view, out_view, lse_view);
  });
}

}  // namespace

void bind_block_sparse(py::module_& m) {
  m.def(
      "block_sparse_select",
      [](const Tensor& q, const Tensor& k, const py::kwargs& kwargs) {
        const char* fn = "block_sparse_select";
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords, true);
        const auto sparse = sparse_options(keywords);
        keywords.require_all_read();
        return with_storage_type(fn, "q", q, [&](auto type) {
          using T = decltype(type);
          const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
          const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", "the dtype of q");
          foveal::BlockSelection selection;
          {
            py::gil_scoped_release release;
            selection = foveal::block_sparse_select(q_view, k_view, options, sparse);
          }
          return selection_dict(selection);
        });
      },
      py::arg("q"), py::arg("k"));

  m.def(
      "block_sparse_attention",
      [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
         const std::optional<Tensor>& lse, const std::optional<IndexArray>& offsets,
         const std::optional<IndexArray>& blocks, const py::kwargs& kwargs) {
        const char* fn = "block_sparse_attention";
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords, true);
        if (offsets && blocks) {
          const foveal::BlockSelection selection = selection_from(keywords, *offsets, *blocks);
          keywords.require_all_read();
          with_attention_views(
              fn, q, k, v, out, lse, [&](auto q_, auto k_, auto v_, auto out_, auto lse_) {
                foveal::block_sparse_attention(q_, k_, v_, out_, options, selection, lse_);
              });
          return;
        }
        const auto sparse = sparse_options(keywords);
        keywords.require_all_read();
        with_attention_views(
            fn, q, k, v, out, lse, [&](auto q_, auto k_, auto v_, auto out_, auto lse_) {
              foveal::block_sparse_attention(q_, k_, v_, out_, options, sparse, lse_);
            });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("offsets"),
      py::arg("blocks"));
}
