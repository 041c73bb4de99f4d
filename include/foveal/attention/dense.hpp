// foveal/attention/dense.hpp — exact attention, FlashAttention-tiled, with every mask option.
#pragma once

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse (optional): [B, Hq, Lq], natural log of each row's softmax denominator (-inf when the
// row sees no key). bias (optional, additive, added after the softcap): [B or 1, Hq or 1,
// Lq, Lk]. Computes out = softmax(scale * q k^T (+ softcap, + bias, masked as options say)) v
// without materializing [Lq, Lk]. Hq must be a multiple of Hkv (GQA / MQA: query head h reads
// kv head h / (Hq / Hkv)). Any strides; the innermost dimension of q, k, v and out must be
// unit stride (or size 1); bias, read element by element, may have any strides. out must not
// overlap q, k, v, bias or lse. Throws foveal::Error on any invalid argument before touching
// out. Results are bitwise identical for any thread count.
void attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
               TensorView<const float, 4> v, TensorView<float, 4> out,
               const AttentionOptions& options = {}, TensorView<float, 3> lse = {},
               TensorView<const float, 4> bias = {});
void attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
               TensorView<const double, 4> v, TensorView<double, 4> out,
               const AttentionOptions& options = {}, TensorView<double, 3> lse = {},
               TensorView<const double, 4> bias = {});
// 16-bit storage: computed in float, out rounded to the storage type; lse stays float.
void attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
               TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
               const AttentionOptions& options = {}, TensorView<float, 3> lse = {},
               TensorView<const bfloat16, 4> bias = {});
void attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
               TensorView<const float16, 4> v, TensorView<float16, 4> out,
               const AttentionOptions& options = {}, TensorView<float, 3> lse = {},
               TensorView<const float16, 4> bias = {});

}  // namespace foveal
