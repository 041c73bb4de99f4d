// tests/cpp/test_sparsek_varlen.cpp — sparsek_attention and its backward over variable-length
// batches (AttentionOptions::key_start / key_length): each batch row gives exactly the bits of
// the call on its own keys and scores (which the other SparseK tests hold to the reference),
// and padding keys get zero gradients.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/sparsek/attention.hpp"
#include "foveal/sparsek/backward.hpp"
#include "harness.hpp"

namespace foveal::test {
namespace {

// `view` with dimension `dim` narrowed to [begin, begin + count).
template <typename T, int Rank>
TensorView<T, Rank> narrowed(const TensorView<T, Rank>& view, int dim, Index begin, Index count) {
  auto shape = view.shape();
  shape[static_cast<std::size_t>(dim)] = count;
  return TensorView<T, Rank>(view.data() + begin * view.stride(dim), shape, view.strides());
}

template <typename T, int Rank>
Tensor<T, Rank> random_tensor(RandomSource& random, const Shape<Rank>& shape) {
  Tensor<T, Rank> tensor(shape);
  const std::vector<double> values = random.normal(static_cast<std::size_t>(tensor.numel()));
  for (Index i = 0; i < tensor.numel(); ++i)
    tensor.data()[i] = static_cast<T>(values[static_cast<std::size_t>(i)]);
  return tensor;
}

template <typename T, int Rank>
std::vector<T> elements(const TensorView<T, Rank>& view) {
  std::vector<T> values;
  for_each_element(view, [&](T& value) { values.push_back(value); });
  return values;
}

template <typename T, int Rank>
void expect_same_bits(const TensorView<T, Rank>& got, const TensorView<T, Rank>& want,
                      const char* what) {
  const std::vector<T> a = elements(got), b = elements(want);
  ASSERT_EQ(a.size(), b.size()) << what;
  for (std::size_t i = 0; i < a.size(); ++i)
    ASSERT_TRUE(std::memcmp(&a[i], &b[i], sizeof(T)) == 0)
        << what << "[" << i << "]: " << a[i] << " vs " << b[i];
}

template <typename T>
class SparseKVarlen : public ::testing::Test {};
TYPED_TEST_SUITE(SparseKVarlen, ElementTypes, ElementTypeNames);

// Left padding under the default (bottom-right) q_offset, and ranges of any kind under an
// explicit q_offset past every start; causal with a window and sinks, and non-causal.
TYPED_TEST(SparseKVarlen, RowsGiveTheBitsOfCallsOnTheirOwnKeys) {
  using T = TypeParam;
  constexpr Index kBatch = 3, kHeadsKv = 2, kHeadsQ = 4, kLenQ = 40, kLenK = 100, kDim = 8;
  RandomSource random(41000);
  const auto q = random_tensor<T, 4>(random, {kBatch, kHeadsQ, kLenQ, kDim});
  const auto k = random_tensor<T, 4>(random, {kBatch, kHeadsKv, kLenK, kDim});
  const auto v = random_tensor<T, 4>(random, {kBatch, kHeadsKv, kLenK, kDim});
  const auto u = random_tensor<T, 3>(random, {kBatch, kHeadsKv, kLenK});
  const auto grad_out = random_tensor<T, 4>(random, {kBatch, kHeadsQ, kLenQ, kDim});
  struct Case {
    std::vector<std::int64_t> start, length;
    std::int64_t q_offset;
    bool causal;
  };
  const Case cases[] = {{{0, 30, 100}, {100, 70, 0}, -1, true},
                        {{0, 10, 0}, {50, 60, 0}, 100, true},
                        {{5, 0, 99}, {90, 100, 1}, -1, false}};
  for (const Case& c : cases) {
    SparseKOptions options;
    options.topk = 8;
    options.causal = c.causal;
    options.window = c.causal ? 4 : 0;
    options.sink_tokens = 2;
    options.q_offset = c.q_offset;
    SparseKOptions ranged = options;
    ranged.key_start = TensorView<const std::int64_t, 1>(c.start.data(), {kBatch});
    ranged.key_length = TensorView<const std::int64_t, 1>(c.length.data(), {kBatch});
    SCOPED_TRACE(describe("causal=", c.causal, " q_offset=", c.q_offset,
                          " key_start=", index_string(ranged.key_start)));

    Tensor<T, 4> out({kBatch, kHeadsQ, kLenQ, kDim});
    Tensor<T, 3> lse({kBatch, kHeadsQ, kLenQ});
    sparsek_attention(q.view(), k.view(), v.view(), u.view(), ranged, out.view(), lse.view());
    Tensor<T, 4> grad_q(q.shape()), grad_k(k.shape()), grad_v(v.shape());
    Tensor<T, 3> grad_u(u.shape());
    for_each_element(grad_k.view(), [](T& value) { value = T(7); });  // padding must be zeroed
    sparsek_attention_backward(q.view(), k.view(), v.view(), u.view(), out.view(), lse.view(),
                               grad_out.view(), ranged, grad_q.view(), grad_k.view(), grad_v.view(),
                               grad_u.view());

    for (Index b = 0; b < kBatch; ++b) {
      SCOPED_TRACE(describe("row ", b));
      const Index first = c.start[static_cast<std::size_t>(b)];
      const Index count = c.length[static_cast<std::size_t>(b)];
      const auto row = [&](auto view) { return narrowed(view, 0, b, 1); };
      const auto keys = [&](auto view) {
        return narrowed(narrowed(view, 0, b, 1), 2, first, count);
      };
      SparseKOptions alone = options;
      if (c.q_offset >= 0) alone.q_offset = c.q_offset - first;
      Tensor<T, 4> own_out({1, kHeadsQ, kLenQ, kDim});
      Tensor<T, 3> own_lse({1, kHeadsQ, kLenQ});
      const TensorView<const T, 4> own_q = row(q.view()), own_k = keys(k.view());
      const TensorView<const T, 4> own_v = keys(v.view());
      const TensorView<const T, 3> own_u = keys(u.view());
      sparsek_attention(own_q, own_k, own_v, own_u, alone, own_out.view(), own_lse.view());
      expect_same_bits(row(out.view()), own_out.view(), "out");
      expect_same_bits(row(lse.view()), own_lse.view(), "lse");

      Tensor<T, 4> own_grad_q({1, kHeadsQ, kLenQ, kDim}), own_grad_k({1, kHeadsKv, count, kDim});
      Tensor<T, 4> own_grad_v({1, kHeadsKv, count, kDim});
      Tensor<T, 3> own_grad_u({1, kHeadsKv, count});
      sparsek_attention_backward(own_q, own_k, own_v, own_u, own_out.view(), own_lse.view(),
                                 row(grad_out.view()), alone, own_grad_q.view(), own_grad_k.view(),
                                 own_grad_v.view(), own_grad_u.view());
      expect_same_bits(row(grad_q.view()), own_grad_q.view(), "grad_q");
      expect_same_bits(keys(grad_k.view()), own_grad_k.view(), "grad_k");
      expect_same_bits(keys(grad_v.view()), own_grad_v.view(), "grad_v");
      expect_same_bits(keys(grad_u.view()), own_grad_u.view(), "grad_u");
      for (Index h = 0; h < kHeadsKv; ++h)
        for (Index j = 0; j < kLenK; ++j) {
          if (j >= first && j < first + count) continue;
          for (Index d = 0; d < kDim; ++d) {
            ASSERT_EQ(grad_k.view()(b, h, j, d), T(0)) << "padding key " << j;
            ASSERT_EQ(grad_v.view()(b, h, j, d), T(0)) << "padding key " << j;
          }
          ASSERT_EQ(grad_u.view()(b, h, j), T(0)) << "padding key " << j;
        }
    }
  }
}

}  // namespace
}  // namespace foveal::test
