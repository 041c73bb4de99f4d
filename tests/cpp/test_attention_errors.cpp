// tests/cpp/test_attention_errors.cpp — foveal::attention rejects every invalid argument.
//
// Each test makes one argument of an otherwise valid call wrong and expects a foveal::Error
// whose message names the argument, what was expected and what came, thrown before out (or
// lse) is touched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "foveal/attention/dense.hpp"
#include "harness.hpp"

namespace foveal {
namespace {

using test::Shape;

// B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6: every extent distinct where the
// messages must tell them apart.
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 5, kLenK = 7, kDim = 3, kDimV = 6;
constexpr float kSentinel = 12345.0f;

// A valid call whose arguments the tests break one at a time. Buffers are twice the size the
// valid shapes need, so doubled strides stay inside them.
class AttentionErrors : public ::testing::Test {
 protected:
  AttentionErrors()
      : q_storage_(2 * kBatch * kHeadsQ * kLenQ * kDim, 0.5f),
        k_storage_(2 * kBatch * kHeadsKv * kLenK * kDim, 0.25f),
        v_storage_(2 * kBatch * kHeadsKv * kLenK * kDimV, 1.0f),
        out_storage_(2 * kBatch * kHeadsQ * kLenQ * kDimV, kSentinel),
        lse_storage_(2 * kBatch * kHeadsQ * kLenQ, kSentinel),
        bias_storage_(2 * kBatch * kHeadsQ * kLenQ * kLenK, 0.0f) {
    q = TensorView<const float, 4>(q_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim});
    k = TensorView<const float, 4>(k_storage_.data(), {kBatch, kHeadsKv, kLenK, kDim});
    v = TensorView<const float, 4>(v_storage_.data(), {kBatch, kHeadsKv, kLenK, kDimV});
    out = TensorView<float, 4>(out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
    lse = TensorView<float, 3>(lse_storage_.data(), {kBatch, kHeadsQ, kLenQ});
    bias = TensorView<const float, 4>(bias_storage_.data(), {kBatch, kHeadsQ, kLenQ, kLenK});
  }

  // The valid call with whatever the test changed.
  void call() const { attention(q, k, v, out, options, lse, bias); }

  // call() throws foveal::Error naming every piece, and out and lse keep their sentinel.
  void expect_rejected(std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(test::throws_error_with([&] { call(); }, pieces));
    EXPECT_TRUE(untouched(out_storage_)) << "out was written before the error";
    EXPECT_TRUE(untouched(lse_storage_)) << "lse was written before the error";
  }

  static bool untouched(const std::vector<float>& storage) {
    for (float value : storage)
      if (value != kSentinel) return false;
    return true;
  }

  // A view of `storage` with `shape` and row-major strides.
  template <typename T, int Rank>
  static TensorView<T, Rank> resized(std::vector<float>& storage, const Shape<Rank>& shape) {
    return TensorView<T, Rank>(storage.data(), shape);
  }

  // `view` with the stride of its last dimension set to `stride` (others unchanged).
  template <typename T>
  static TensorView<T, 4> with_inner_stride(const TensorView<T, 4>& view, Index stride) {
    Shape<4> strides = view.strides();
    strides[3] = stride;
    return TensorView<T, 4>(view.data(), view.shape(), strides);
  }

  std::vector<float> q_storage_, k_storage_, v_storage_, out_storage_, lse_storage_, bias_storage_;

 public:
  TensorView<const float, 4> q, k, v;
  TensorView<float, 4> out;
  TensorView<float, 3> lse;
  TensorView<const float, 4> bias;
  AttentionOptions options;
};

TEST_F(AttentionErrors, ValidCallIsAccepted) {
  EXPECT_NO_THROW(call());
  EXPECT_FALSE(untouched(out_storage_));
}

// ---------------------------------------------------------------------------------------------
// Shapes that do not fit together.

TEST_F(AttentionErrors, KeyBatchMustMatchQuery) {
  k = resized<const float, 4>(k_storage_, {kBatch + 1, kHeadsKv, kLenK, kDim});
  expect_rejected({"foveal: attention: ", "k.shape[0]", "q.shape[0] (B) = 2", "got 3"});
}

TEST_F(AttentionErrors, ValueBatchMustMatchQuery) {
  v = resized<const float, 4>(v_storage_, {1, kHeadsKv, kLenK, kDimV});
  expect_rejected({"v.shape[0]", "q.shape[0] (B) = 2", "got 1"});
}

TEST_F(AttentionErrors, OutBatchMustMatchQuery) {
  out = resized<float, 4>(out_storage_, {1, kHeadsQ, kLenQ, kDimV});
  expect_rejected({"out.shape[0]", "q.shape[0] (B) = 2", "got 1"});
}

TEST_F(AttentionErrors, ValueHeadsMustMatchKey) {
  v = resized<const float, 4>(v_storage_, {kBatch, 1, kLenK, kDimV});
  expect_rejected({"v.shape[1]", "k.shape[1] (Hkv) = 2", "got 1"});
}

TEST_F(AttentionErrors, OutHeadsMustMatchQuery) {
  out = resized<float, 4>(out_storage_, {kBatch, kHeadsKv, kLenQ, kDimV});
  expect_rejected({"out.shape[1]", "q.shape[1] (Hq) = 4", "got 2"});
}

TEST_F(AttentionErrors, KeyHeadDimMustMatchQuery) {
  k = resized<const float, 4>(k_storage_, {kBatch, kHeadsKv, kLenK, kDim + 2});
  expect_rejected({"k.shape[3]", "q.shape[3] (D) = 3", "got 5"});
}

TEST_F(AttentionErrors, OutHeadDimMustMatchValue) {
  out = resized<float, 4>(out_storage_, {kBatch, kHeadsQ, kLenQ, kDimV - 1});
  expect_rejected({"out.shape[3]", "v.shape[3] (Dv) = 6", "got 5"});
}

TEST_F(AttentionErrors, ValueLengthMustMatchKey) {
  v = resized<const float, 4>(v_storage_, {kBatch, kHeadsKv, kLenK + 1, kDimV});
  expect_rejected({"v.shape[2]", "k.shape[2] (Lk) = 7", "got 8"});
}

TEST_F(AttentionErrors, OutLengthMustMatchQuery) {
  out = resized<float, 4>(out_storage_, {kBatch, kHeadsQ, kLenQ + 1, kDimV});
  expect_rejected({"out.shape[2]", "q.shape[2] (Lq) = 5", "got 6"});
}

TEST_F(AttentionErrors, QueryHeadsMustBeAMultipleOfKeyHeads) {
  k = resized<const float, 4>(k_storage_, {kBatch, 3, kLenK, kDim});
  v = resized<const float, 4>(v_storage_, {kBatch, 3, kLenK, kDimV});
  expect_rejected({"q.shape[1] (Hq = 4)", "multiple of k.shape[1] (Hkv = 3)"});
}

TEST_F(AttentionErrors, ZeroKeyHeadsNeedZeroQueryHeads) {
  k = resized<const float, 4>(k_storage_, {kBatch, 0, kLenK, kDim});
  v = resized<const float, 4>(v_storage_, {kBatch, 0, kLenK, kDimV});
  expect_rejected({"q.shape[1] (Hq = 4)", "multiple of k.shape[1] (Hkv = 0)"});
}

TEST_F(AttentionErrors, HeadDimMustBePositive) {
  q = resized<const float, 4>(q_storage_, {kBatch, kHeadsQ, kLenQ, 0});
  k = resized<const float, 4>(k_storage_, {kBatch, kHeadsKv, kLenK, 0});
  expect_rejected({"q.shape[3] (D) must be >= 1", "got 0"});
}

TEST_F(AttentionErrors, NegativeExtentIsRejected) {
  k = resized<const float, 4>(k_storage_, {kBatch, kHeadsKv, -1, kDim});
  expect_rejected({"k.shape[2] must be >= 0", "got -1"});
}

TEST_F(AttentionErrors, NegativeExtentOfOutIsRejected) {
  out = resized<float, 4>(out_storage_, {kBatch, -kHeadsQ, kLenQ, kDimV});
  expect_rejected({"out.shape[1] must be >= 0", "got -4"});
}

// ---------------------------------------------------------------------------------------------
// Memory the kernels cannot use.

TEST_F(AttentionErrors, QueryNeedsUnitInnerStride) {
  q = with_inner_stride(q, 2);
  expect_rejected({"q must have stride 1 in its last dimension", "got stride 2"});
}

TEST_F(AttentionErrors, KeyNeedsUnitInnerStride) {
  k = with_inner_stride(k, 2);
  expect_rejected({"k must have stride 1 in its last dimension", "got stride 2"});
}

TEST_F(AttentionErrors, ValueNeedsUnitInnerStride) {
  v = with_inner_stride(v, -1);
  expect_rejected({"v must have stride 1 in its last dimension", "got stride -1"});
}

TEST_F(AttentionErrors, OutNeedsUnitInnerStride) {
  // Every stride doubled: the elements stay distinct (an output may not overlap itself), only
  // the last dimension is not contiguous.
  std::vector<float> wide(static_cast<std::size_t>(2 * out.numel()));
  Shape<4> strides = out.strides();
  for (Index& stride : strides) stride *= 2;
  out = TensorView<float, 4>(wide.data(), out.shape(), strides);
  expect_rejected({"out must have stride 1 in its last dimension", "got stride 2"});
}

TEST_F(AttentionErrors, StridesBeyondAddressableMemoryAreRejected) {
  Shape<4> strides = k.strides();
  strides[0] = std::numeric_limits<Index>::max() / 2;
  k = TensorView<const float, 4>(k.data(), k.shape(), strides);
  expect_rejected({"k's shape and strides reach beyond what a 64-bit byte offset can address"});
}

TEST_F(AttentionErrors, ElementCountBeyondIndexRangeIsRejected) {
  const Index huge = Index(1) << 40;
  v = TensorView<const float, 4>(v.data(), {huge, huge, 7, 6}, {0, 0, 6, 1});
  expect_rejected({"v's shape and strides reach beyond what a 64-bit byte offset can address"});
}

TEST_F(AttentionErrors, NullQueryWithElementsIsRejected) {
  q = TensorView<const float, 4>(nullptr, q.shape());
  expect_rejected({"q has 120 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, NullKeyWithElementsIsRejected) {
  k = TensorView<const float, 4>(nullptr, k.shape());
  expect_rejected({"k has 84 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, NullValueWithElementsIsRejected) {
  v = TensorView<const float, 4>(nullptr, v.shape());
  expect_rejected({"v has 168 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, NullOutWithElementsIsRejected) {
  out = TensorView<float, 4>(nullptr, out.shape());
  expect_rejected({"out has 240 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, NullLseWithElementsIsRejected) {
  lse = TensorView<float, 3>(nullptr, lse.shape());
  expect_rejected({"lse has 40 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, NullBiasWithElementsIsRejected) {
  bias = TensorView<const float, 4>(nullptr, bias.shape());
  expect_rejected({"bias has 280 elements but its data pointer is null"});
}

TEST_F(AttentionErrors, OutMustNotOverlapQuery) {
  // out and q are the same buffer (q is all 0.5; out shares its shape when Dv = D).
  v = resized<const float, 4>(v_storage_, {kBatch, kHeadsKv, kLenK, kDim});
  q = TensorView<const float, 4>(out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim});
  out = TensorView<float, 4>(out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim});
  expect_rejected({"out must not overlap q in memory"});
}

TEST_F(AttentionErrors, OutMustNotOverlapKey) {
  k = TensorView<const float, 4>(out_storage_.data() + 10, {kBatch, kHeadsKv, kLenK, kDim});
  expect_rejected({"out must not overlap k in memory"});
}

TEST_F(AttentionErrors, OutMustNotOverlapValue) {
  v = TensorView<const float, 4>(out_storage_.data() + out.numel() - 1,
                                 {kBatch, kHeadsKv, kLenK, kDimV});
  expect_rejected({"out must not overlap v in memory"});
}

TEST_F(AttentionErrors, OutMustNotOverlapBias) {
  bias = TensorView<const float, 4>(out_storage_.data(), {1, 1, kLenQ, kLenK});
  expect_rejected({"out must not overlap bias in memory"});
}

TEST_F(AttentionErrors, LseMustNotOverlapOut) {
  lse = TensorView<float, 3>(out_storage_.data() + 3, {kBatch, kHeadsQ, kLenQ});
  expect_rejected({"lse must not overlap out in memory"});
}

TEST_F(AttentionErrors, LseMustNotOverlapQuery) {
  // Every query row reads the same kDim elements at the start of lse (stride 0).
  q = TensorView<const float, 4>(lse_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim}, {0, 0, 0, 1});
  expect_rejected({"lse must not overlap q in memory"});
}

// ---------------------------------------------------------------------------------------------
// Optional outputs and inputs of the wrong shape.

TEST_F(AttentionErrors, LseBatchMustMatchQuery) {
  lse = resized<float, 3>(lse_storage_, {kBatch + 1, kHeadsQ, kLenQ});
  expect_rejected({"lse.shape[0]", "q.shape[0] (B) = 2", "got 3"});
}

TEST_F(AttentionErrors, LseHeadsMustMatchQuery) {
  lse = resized<float, 3>(lse_storage_, {kBatch, 1, kLenQ});
  expect_rejected({"lse.shape[1]", "q.shape[1] (Hq) = 4", "got 1"});
}

TEST_F(AttentionErrors, LseLengthMustMatchQuery) {
  lse = resized<float, 3>(lse_storage_, {kBatch, kHeadsQ, kLenQ - 1});
  expect_rejected({"lse.shape[2]", "q.shape[2] (Lq) = 5", "got 4"});
}

TEST_F(AttentionErrors, BiasBatchMustBeOneOrBatch) {
  bias = resized<const float, 4>(bias_storage_, {3, kHeadsQ, kLenQ, kLenK});
  expect_rejected({"bias.shape[0] must be 1 or q.shape[0] (B) = 2", "got 3"});
}

TEST_F(AttentionErrors, BiasHeadsMustBeOneOrQueryHeads) {
  bias = resized<const float, 4>(bias_storage_, {kBatch, kHeadsKv, kLenQ, kLenK});
  expect_rejected({"bias.shape[1] must be 1 or q.shape[1] (Hq) = 4", "got 2"});
}

TEST_F(AttentionErrors, BiasRowsMustMatchQueryLength) {
  bias = resized<const float, 4>(bias_storage_, {1, 1, 1, kLenK});
  expect_rejected({"bias.shape[2]", "q.shape[2] (Lq) = 5", "got 1"});
}

TEST_F(AttentionErrors, BiasColumnsMustMatchKeyLength) {
  bias = resized<const float, 4>(bias_storage_, {1, 1, kLenQ, 1});
  expect_rejected({"bias.shape[3]", "k.shape[2] (Lk) = 7", "got 1"});
}

// ---------------------------------------------------------------------------------------------
// Options out of range.

TEST_F(AttentionErrors, WindowLeftBelowMinusOneIsRejected) {
  options.window_left = -2;
  expect_rejected({"window_left must be >= 0 or -1 (unbounded)", "got -2"});
}

TEST_F(AttentionErrors, WindowRightBelowMinusOneIsRejected) {
  options.window_right = -5;
  expect_rejected({"window_right must be >= 0 or -1 (unbounded)", "got -5"});
}

TEST_F(AttentionErrors, CausalWithPositiveRightWindowIsRejected) {
  options.causal = true;
  options.window_right = 2;
  expect_rejected({"causal=true means window_right = 0", "window_right = 2"});
}

TEST_F(AttentionErrors, NegativeSinkTokensAreRejected) {
  options.sink_tokens = -1;
  expect_rejected({"sink_tokens must be >= 0", "got -1"});
}

TEST_F(AttentionErrors, NanScaleIsRejected) {
  options.scale = std::numeric_limits<float>::quiet_NaN();
  expect_rejected({"scale must be finite and >= 0", "nan"});
}

TEST_F(AttentionErrors, InfiniteScaleIsRejected) {
  options.scale = std::numeric_limits<float>::infinity();
  expect_rejected({"scale must be finite and >= 0", "got inf"});
}

TEST_F(AttentionErrors, NegativeScaleIsRejected) {
  options.scale = -0.5f;
  expect_rejected({"scale must be finite and >= 0", "got -0.5"});
}

TEST_F(AttentionErrors, ScaleBeyondFloatRangeIsRejected) {
  options.scale = 1e39;  // finite as a double option, infinite once it reaches float32 logits
  expect_rejected({"scale = 1e+39 with softcap = 0 is out of the range of float32"});
}

TEST_F(AttentionErrors, SoftcapBelowFloatRangeIsRejected) {
  options.softcap = 1e-50;
  expect_rejected({"with softcap = 1e-50 is out of the range of float32"});
}

TEST_F(AttentionErrors, NanSoftcapIsRejected) {
  options.softcap = std::numeric_limits<float>::quiet_NaN();
  expect_rejected({"softcap must be finite and >= 0", "nan"});
}

TEST_F(AttentionErrors, NegativeSoftcapIsRejected) {
  options.softcap = -1.0f;
  expect_rejected({"softcap must be finite and >= 0", "got -1"});
}

TEST_F(AttentionErrors, QueryOffsetBelowMinusOneIsRejected) {
  options.q_offset = -2;
  expect_rejected(
      {"q_offset must be in [0, 1152921504606846975] (the position of query 0) or -1", "got -2"});
}

TEST_F(AttentionErrors, QueryOffsetNearOverflowIsRejected) {
  options.q_offset = std::numeric_limits<Index>::max() / 4;
  expect_rejected({"q_offset must be in [0, 1152921504606846975]", "got 2305843009213693951"});
}

TEST_F(AttentionErrors, NegativeThreadCountIsRejected) {
  options.num_threads = -1;
  expect_rejected({"num_threads must be in [0, 1024]", "got -1"});
}

// Key ranges (variable-length batches): one entry per batch row, inside [0, Lk].
TEST_F(AttentionErrors, KeyRangesOfTheWrongLengthAreRejected) {
  const std::int64_t starts[3] = {0, 1, 2};
  options.key_start = TensorView<const std::int64_t, 1>(starts, {3});
  expect_rejected({"key_start.shape[0] must equal q.shape[0] (B) = 2", "got 3"});
  options.key_start = {};
  options.key_length = TensorView<const std::int64_t, 1>(starts, {1});
  expect_rejected({"key_length.shape[0] must equal q.shape[0] (B) = 2", "got 1"});
}

TEST_F(AttentionErrors, KeyStartOutsideTheKeysIsRejected) {
  for (const std::int64_t bad : {std::int64_t{-1}, std::int64_t{8}}) {
    const std::int64_t starts[2] = {0, bad};
    options.key_start = TensorView<const std::int64_t, 1>(starts, {2});
    expect_rejected({"key_start[1] must be in [0, Lk = 7]", "got " + std::to_string(bad)});
  }
}

TEST_F(AttentionErrors, KeyLengthPastTheKeysIsRejected) {
  const std::int64_t starts[2] = {3, 0};
  for (const std::int64_t bad : {std::int64_t{-1}, std::int64_t{5}}) {
    const std::int64_t lengths[2] = {bad, 7};
    options.key_start = TensorView<const std::int64_t, 1>(starts, {2});
    options.key_length = TensorView<const std::int64_t, 1>(lengths, {2});
    expect_rejected(
        {"key_length[0] must be in [0, Lk - key_start[0] = 4]", "got " + std::to_string(bad)});
  }
}

TEST_F(AttentionErrors, ValidKeyRangesAreAccepted) {
  const std::int64_t starts[2] = {7, 2};
  const std::int64_t lengths[2] = {0, 5};
  options.key_start = TensorView<const std::int64_t, 1>(starts, {2});
  options.key_length = TensorView<const std::int64_t, 1>(lengths, {2});
  EXPECT_NO_THROW(call());
}

}  // namespace
}  // namespace foveal
