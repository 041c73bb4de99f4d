// foveal._core's sparse prefill bindings, block_sparse_*, token_topk_* and vertical_slash_*,
// and SnapKV's snapkv_select / snapkv_gather
// (docs/sparse_attention.md). foveal/sparse.py owns the docstrings, defaults, output allocation
// and the BlockSelection / TokenSelection classes; these read the caller's tensors as they are
// and release the GIL around every kernel. The library checks every value.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "_keywords.hpp"
#include "_tensor.hpp"
#include "foveal/attention/block_sparse.hpp"
#include "foveal/attention/snapkv.hpp"
#include "foveal/attention/token_topk.hpp"
#include "foveal/attention/vertical_slash.hpp"

namespace py = pybind11;

namespace {

using foveal::python::Keywords;
using foveal::python::optional_view;
using foveal::python::Tensor;
using foveal::python::with_storage_type;

using IndexArray = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// What the two selections differ in: their options, the name of their extent (key blocks or
// keys) and of their items.
template <typename Selection>
struct SelectionFields;

template <>
struct SelectionFields<foveal::BlockSelection> {
  static constexpr const char* kExtent = "key_blocks";
  static constexpr const char* kItems = "blocks";
  static std::int64_t& extent(foveal::BlockSelection& s) { return s.key_blocks; }
  static std::vector<std::int64_t>& items(foveal::BlockSelection& s) { return s.blocks; }
};

template <>
struct SelectionFields<foveal::TokenSelection> {
  static constexpr const char* kExtent = "len_k";
  static constexpr const char* kItems = "keys";
  static std::int64_t& extent(foveal::TokenSelection& s) { return s.len_k; }
  static std::vector<std::int64_t>& items(foveal::TokenSelection& s) { return s.keys; }
};

// The sparse options of a selection method from the call's keywords.
template <typename Options>
Options sparse_options(const Keywords& keywords) {
  Options sparse;
  sparse.budget = keywords.number("budget", sparse.budget);
  sparse.threshold = keywords.number("threshold", 0.0);
  sparse.block_size = keywords.integer("block_size", sparse.block_size);
  if constexpr (std::is_same_v<Options, foveal::BlockSparseOptions>) {
    sparse.local_blocks = keywords.integer("local_blocks", sparse.local_blocks);
  } else {
    sparse.local_tokens = keywords.integer("local_tokens", sparse.local_tokens);
  }
  if constexpr (std::is_same_v<Options, foveal::VerticalSlashOptions>)
    sparse.last_queries = keywords.integer("last_queries", sparse.last_queries);
  if constexpr (std::is_same_v<Options, foveal::TokenTopkOptions>)
    sparse.outliers = keywords.integer("outliers", sparse.outliers);
  return sparse;
}

IndexArray to_array(const std::vector<std::int64_t>& values) {
  IndexArray result(static_cast<py::ssize_t>(values.size()));
  std::copy(values.begin(), values.end(), result.mutable_data());
  return result;
}

template <typename Selection>
py::dict selection_dict(Selection& selection) {
  using Fields = SelectionFields<Selection>;
  py::dict result;
  result["block_size"] = selection.block_size;
  result["batch"] = selection.batch;
  result["heads_kv"] = selection.heads_kv;
  result["first_query_block"] = selection.first_query_block;
  result["query_blocks"] = selection.query_blocks;
  result[Fields::kExtent] = Fields::extent(selection);
  result["offsets"] = to_array(selection.offsets);
  result[Fields::kItems] = to_array(Fields::items(selection));
  return result;
}

// The selection the Python layer passes as keywords (block_size, batch, heads_kv,
// first_query_block, query_blocks and the extent) and two int64 arrays.
template <typename Selection>
Selection selection_from(const Keywords& keywords, const IndexArray& offsets,
                         const IndexArray& items) {
  using Fields = SelectionFields<Selection>;
  Selection selection;
  selection.block_size = keywords.integer("block_size");
  selection.batch = keywords.integer("batch");
  selection.heads_kv = keywords.integer("heads_kv");
  selection.first_query_block = keywords.integer("first_query_block");
  selection.query_blocks = keywords.integer("query_blocks");
  Fields::extent(selection) = keywords.integer(Fields::kExtent);
  selection.offsets.assign(offsets.data(), offsets.data() + offsets.size());
  Fields::items(selection).assign(items.data(), items.data() + items.size());
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

// Binds `select_name`(q, k, **options) -> dict and `attend_name`(q, k, v, out, lse, offsets,
// items, **options): select(q, k, options, sparse) and attend(q, k, v, out, options, selection or
// sparse, lse) are the library's overload sets; `Options` is the sparse options' type.
template <typename Selection, typename Options, typename Select, typename Attend>
void bind_sparse_prefill(py::module_& m, const char* select_name, const char* attend_name,
                         Select select, Attend attend) {
  using Fields = SelectionFields<Selection>;
  m.def(
      select_name,
      [select_name, select](const Tensor& q, const Tensor& k, const py::kwargs& kwargs) {
        const char* fn = select_name;
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords, true);
        const auto sparse = sparse_options<Options>(keywords);
        keywords.require_all_read();
        return with_storage_type(fn, "q", q, [&](auto type) {
          using T = decltype(type);
          const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
          const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", "the dtype of q");
          Selection selection;
          {
            py::gil_scoped_release release;
            selection = select(q_view, k_view, options, sparse);
          }
          return selection_dict(selection);
        });
      },
      py::arg("q"), py::arg("k"));

  m.def(
      attend_name,
      [attend_name, attend](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                            const std::optional<Tensor>& lse,
                            const std::optional<IndexArray>& offsets,
                            const std::optional<IndexArray>& items, const py::kwargs& kwargs) {
        const char* fn = attend_name;
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords, true);
        if (offsets && items) {
          const auto selection = selection_from<Selection>(keywords, *offsets, *items);
          keywords.require_all_read();
          with_attention_views(fn, q, k, v, out, lse,
                               [&](auto q_, auto k_, auto v_, auto out_, auto lse_) {
                                 attend(q_, k_, v_, out_, options, selection, lse_);
                               });
          return;
        }
        const auto sparse = sparse_options<Options>(keywords);
        keywords.require_all_read();
        with_attention_views(fn, q, k, v, out, lse,
                             [&](auto q_, auto k_, auto v_, auto out_, auto lse_) {
                               attend(q_, k_, v_, out_, options, sparse, lse_);
                             });
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("offsets"),
      py::arg(Fields::kItems));
}

}  // namespace

void bind_block_sparse(py::module_& m) {
  bind_sparse_prefill<foveal::BlockSelection, foveal::BlockSparseOptions>(
      m, "block_sparse_select", "block_sparse_attention",
      [](auto q, auto k, const auto& options, const auto& sparse) {
        return foveal::block_sparse_select(q, k, options, sparse);
      },
      [](auto q, auto k, auto v, auto out, const auto& options, const auto& how, auto lse) {
        foveal::block_sparse_attention(q, k, v, out, options, how, lse);
      });
  bind_sparse_prefill<foveal::TokenSelection, foveal::TokenTopkOptions>(
      m, "token_topk_select", "token_topk_attention",
      [](auto q, auto k, const auto& options, const auto& sparse) {
        return foveal::token_topk_select(q, k, options, sparse);
      },
      [](auto q, auto k, auto v, auto out, const auto& options, const auto& how, auto lse) {
        foveal::token_topk_attention(q, k, v, out, options, how, lse);
      });
  // vertical_slash_attention with a selection is token_topk_attention over it.
  bind_sparse_prefill<foveal::TokenSelection, foveal::VerticalSlashOptions>(
      m, "vertical_slash_select", "vertical_slash_attention",
      [](auto q, auto k, const auto& options, const auto& sparse) {
        return foveal::vertical_slash_select(q, k, options, sparse);
      },
      [](auto q, auto k, auto v, auto out, const auto& options, const auto& how, auto lse) {
        if constexpr (std::is_same_v<std::decay_t<decltype(how)>, foveal::TokenSelection>) {
          foveal::token_topk_attention(q, k, v, out, options, how, lse);
        } else {
          foveal::vertical_slash_attention(q, k, v, out, options, how, lse);
        }
      });

  // snapkv_select(q, k, **options) -> dict(batch, heads_kv, len_k, kept, keys).
  m.def(
      "snapkv_select",
      [](const Tensor& q, const Tensor& k, const py::kwargs& kwargs) {
        const char* fn = "snapkv_select";
        const Keywords keywords(fn, kwargs);
        const auto options = foveal::python::attention_options(keywords, true);
        foveal::SnapKVOptions snap;
        snap.budget = keywords.number("budget", snap.budget);
        snap.threshold = keywords.number("threshold", 0.0);
        snap.window = keywords.integer("window", snap.window);
        snap.pool = keywords.integer("pool", snap.pool);
        snap.local_tokens = keywords.integer("local_tokens", snap.local_tokens);
        keywords.require_all_read();
        return with_storage_type(fn, "q", q, [&](auto type) {
          using T = decltype(type);
          const auto q_view = q.view<const T, 4>(fn, "q", "B, Hq, Lq, D");
          const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D", "the dtype of q");
          foveal::SnapKVSelection selection;
          {
            py::gil_scoped_release release;
            selection = foveal::snapkv_select(q_view, k_view, options, snap);
          }
          py::dict result;
          result["batch"] = selection.batch;
          result["heads_kv"] = selection.heads_kv;
          result["len_k"] = selection.len_k;
          result["kept"] = selection.kept;
          result["keys"] = to_array(selection.keys);
          return result;
        });
      },
      py::arg("q"), py::arg("k"));

  // snapkv_gather(k, v, out_k, out_v, keys, batch=, heads_kv=, len_k=, kept=).
  m.def(
      "snapkv_gather",
      [](const Tensor& k, const Tensor& v, const Tensor& out_k, const Tensor& out_v,
         const IndexArray& keys, const py::kwargs& kwargs) {
        const char* fn = "snapkv_gather";
        const Keywords keywords(fn, kwargs);
        foveal::SnapKVSelection selection;
        selection.batch = keywords.integer("batch");
        selection.heads_kv = keywords.integer("heads_kv");
        selection.len_k = keywords.integer("len_k");
        selection.kept = keywords.integer("kept");
        keywords.require_all_read();
        selection.keys.assign(keys.data(), keys.data() + keys.size());
        with_storage_type(fn, "k", k, [&](auto type) {
          using T = decltype(type);
          const char* same = "the dtype of k";
          const auto k_view = k.view<const T, 4>(fn, "k", "B, Hkv, Lk, D");
          const auto v_view = v.view<const T, 4>(fn, "v", "B, Hkv, Lk, Dv", same);
          const auto out_k_view = out_k.view<T, 4>(fn, "out_k", "B, Hkv, kept, D", same);
          const auto out_v_view = out_v.view<T, 4>(fn, "out_v", "B, Hkv, kept, Dv", same);
          py::gil_scoped_release release;
          foveal::snapkv_gather(selection, k_view, v_view, out_k_view, out_v_view);
        });
      },
      py::arg("k"), py::arg("v"), py::arg("out_k"), py::arg("out_v"), py::arg("keys"));
}
