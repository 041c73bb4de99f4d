// tests/cpp/test_tensor.cpp — the core layer: TensorView, Tensor, byte_range, check, threads.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"
#include "harness.hpp"

namespace foveal {
namespace {

using Shape3 = std::array<Index, 3>;

// ---------------------------------------------------------------------------------------------
// TensorView

TEST(TensorView, ContiguousConstructorGivesRowMajorStrides) {
  float data[24] = {};
  const TensorView<float, 3> view(data, {2, 3, 4});
  EXPECT_EQ(view.strides(), (Shape3{12, 4, 1}));
  EXPECT_EQ(view.shape(), (Shape3{2, 3, 4}));
  EXPECT_EQ(view.size(1), 3);
  EXPECT_EQ(view.stride(0), 12);
  EXPECT_EQ(view.data(), data);
  EXPECT_EQ((TensorView<float, 3>::rank()), 3);
}

// Regression (fuzz_sparse): a KVCache over storage with no heads and a huge capacity made its
// empty page-bounds tensor [B, 0, 2^62, 2, D], whose row-major strides overflowed (undefined
// behaviour). Past the overflow the strides of such an empty view are 0.
TEST(TensorView, EmptyViewOfHugeExtentsHasNoOverflowingStride) {
  const Index huge = Index{1} << 62;
  const TensorView<float, 4> view(nullptr, {1, 0, huge, 6});
  EXPECT_EQ(view.strides(), (std::array<Index, 4>{0, 0, 6, 1}));
  EXPECT_EQ(view.numel(), 0);
  const Tensor<float, 5> bounds({1, 0, huge + 2, 2, 6});
  EXPECT_EQ(bounds.view().strides(), (std::array<Index, 5>{0, 0, 12, 6, 1}));
}

TEST(TensorView, NumelIsTheProductOfTheShape) {
  float data[1] = {};
  EXPECT_EQ((TensorView<float, 3>(data, {2, 3, 4}).numel()), 24);
  EXPECT_EQ((TensorView<float, 1>(data, {1}).numel()), 1);
  EXPECT_EQ((TensorView<float, 3>(data, {2, 0, 4}).numel()), 0);
}

TEST(TensorView, EmptyWhenAnyExtentIsZero) {
  float data[8] = {};
  EXPECT_FALSE((TensorView<float, 2>(data, {2, 4}).empty()));
  EXPECT_TRUE((TensorView<float, 2>(data, {0, 4}).empty()));
  EXPECT_TRUE((TensorView<float, 2>(data, {2, 0}).empty()));
  EXPECT_TRUE((TensorView<float, 2>().empty()));
}

TEST(TensorView, OnlyTheDefaultViewIsNull) {
  float data[4] = {};
  EXPECT_TRUE((TensorView<float, 2>().is_null()));
  EXPECT_FALSE((TensorView<float, 2>(data, {0, 0}).is_null()));
  // Null data with a shape is an invalid view, not the "not given" value.
  EXPECT_FALSE((TensorView<float, 2>(nullptr, {2, 2}).is_null()));
  EXPECT_FALSE((TensorView<float, 2>(nullptr, {0, 2}).is_null()));
}

TEST(TensorView, RowMajorViewIsContiguous) {
  float data[24] = {};
  EXPECT_TRUE((TensorView<float, 3>(data, {2, 3, 4}).is_contiguous()));
}

TEST(TensorView, TransposedOrPaddedViewIsNotContiguous) {
  float data[64] = {};
  const TensorView<float, 3> view(data, {2, 3, 4});
  EXPECT_FALSE(view.transpose(1, 2).is_contiguous());
  EXPECT_FALSE((TensorView<float, 3>(data, {2, 3, 4}, {15, 5, 1}).is_contiguous()));
  EXPECT_FALSE((TensorView<float, 3>(data, {2, 3, 4}, {12, 4, 2}).is_contiguous()));
}

TEST(TensorView, SizeOneDimensionsDoNotBreakContiguity) {
  float data[12] = {};
  EXPECT_TRUE((TensorView<float, 3>(data, {1, 3, 4}, {999, 4, 1}).is_contiguous()));
  EXPECT_TRUE((TensorView<float, 3>(data, {3, 1, 4}, {4, -7, 1}).is_contiguous()));
  EXPECT_TRUE((TensorView<float, 3>(data, {3, 4, 1}, {4, 1, 0}).is_contiguous()));
}

TEST(TensorView, IndexingFollowsTheStrides) {
  std::vector<float> data(100);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  const TensorView<float, 3> view(data.data(), {2, 3, 4}, {40, 9, 1});
  EXPECT_EQ(view(0, 0, 0), 0.0f);
  EXPECT_EQ(view(1, 2, 3), 40.0f + 18.0f + 3.0f);
  view(1, 1, 1) = -1.0f;
  EXPECT_EQ(data[50], -1.0f);
  // Negative strides: the data pointer is the element at index 0.
  const TensorView<float, 1> backwards(data.data() + 9, {10}, {-1});
  EXPECT_EQ(backwards(0), 9.0f);
  EXPECT_EQ(backwards(9), 0.0f);
}

TEST(TensorView, TransposeSwapsShapeAndStridesOverTheSameMemory) {
  std::vector<float> data(2 * 5 * 3 * 4);
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  const TensorView<float, 4> blhd(data.data(), {2, 5, 3, 4});
  const TensorView<float, 4> bhld = blhd.transpose(1, 2);
  EXPECT_EQ(bhld.data(), blhd.data());
  EXPECT_EQ(bhld.shape(), (std::array<Index, 4>{2, 3, 5, 4}));
  EXPECT_EQ(bhld.strides(), (std::array<Index, 4>{60, 4, 12, 1}));
  for (Index b = 0; b < 2; ++b)
    for (Index l = 0; l < 5; ++l)
      for (Index h = 0; h < 3; ++h)
        for (Index d = 0; d < 4; ++d) ASSERT_EQ(&bhld(b, h, l, d), &blhd(b, l, h, d));
  // The harness helper builds the same view.
  const TensorView<float, 4> helper = test::blhd_as_bhld(data.data(), {2, 3, 5, 4});
  EXPECT_EQ(helper.shape(), bhld.shape());
  EXPECT_EQ(helper.strides(), bhld.strides());
}

TEST(TensorView, ConvertsToAViewOfConst) {
  float data[6] = {};
  const TensorView<float, 2> view(data, {2, 3}, {4, 1});
  const TensorView<const float, 2> read_only = view;
  EXPECT_EQ(read_only.data(), data);
  EXPECT_EQ(read_only.shape(), view.shape());
  EXPECT_EQ(read_only.strides(), view.strides());
  static_assert(std::is_convertible_v<TensorView<float, 2>, TensorView<const float, 2>>);
  static_assert(!std::is_convertible_v<TensorView<const float, 2>, TensorView<float, 2>>);
  static_assert(!std::is_convertible_v<TensorView<double, 2>, TensorView<const float, 2>>);
}

// ---------------------------------------------------------------------------------------------
// Tensor

TEST(Tensor, StorageIs64ByteAligned) {
  for (Index extent : {1, 3, 17, 1000}) {
    Tensor<float, 2> tensor({extent, 3});
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(tensor.data()) % 64, 0u) << "extent " << extent;
    Tensor<double, 1> doubles({extent});
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(doubles.data()) % 64, 0u) << "extent " << extent;
  }
}

TEST(Tensor, StartsZeroed) {
  Tensor<double, 3> tensor({3, 5, 7});
  EXPECT_EQ(tensor.numel(), 105);
  for (Index i = 0; i < tensor.numel(); ++i) ASSERT_EQ(tensor.data()[i], 0.0);
}

TEST(Tensor, EmptyTensorHasNoStorage) {
  Tensor<float, 2> tensor({4, 0});
  EXPECT_EQ(tensor.numel(), 0);
  EXPECT_EQ(tensor.data(), nullptr);
  EXPECT_TRUE(tensor.view().empty());
}

TEST(Tensor, NegativeExtentIsRejected) {
  EXPECT_TRUE(test::throws_error_with(
      [] {
        Tensor<float, 2> tensor({3, -2});
      },
      {"foveal: Tensor: shape[1] must be >= 0, got -2"}));
}

TEST(Tensor, MoveTransfersTheStorage) {
  Tensor<float, 2> source({2, 3});
  source(1, 2) = 5.0f;
  float* const storage = source.data();
  Tensor<float, 2> moved(std::move(source));
  EXPECT_EQ(moved.data(), storage);
  EXPECT_EQ(moved.shape(), (std::array<Index, 2>{2, 3}));
  EXPECT_EQ(moved(1, 2), 5.0f);
  Tensor<float, 2> assigned;
  assigned = std::move(moved);
  EXPECT_EQ(assigned.data(), storage);
  static_assert(!std::is_copy_constructible_v<Tensor<float, 2>>);
}

TEST(Tensor, ViewIsContiguousOverTheStorage) {
  Tensor<float, 3> tensor({2, 3, 4});
  const TensorView<float, 3> view = tensor.view();
  EXPECT_EQ(view.data(), tensor.data());
  EXPECT_EQ(view.shape(), tensor.shape());
  EXPECT_TRUE(view.is_contiguous());
  view(1, 2, 3) = 7.0f;
  EXPECT_EQ(tensor(1, 2, 3), 7.0f);
  const Tensor<float, 3>& read_only = tensor;
  const TensorView<const float, 3> const_view = read_only;  // implicit conversion
  EXPECT_EQ(const_view(1, 2, 3), 7.0f);
}

// ---------------------------------------------------------------------------------------------
// byte_range

TEST(ByteRange, CoversEveryReachableByteOfAContiguousView) {
  float data[24] = {};
  const ByteRange range = byte_range(TensorView<float, 3>(data, {2, 3, 4}));
  EXPECT_EQ(range.begin, reinterpret_cast<std::uintptr_t>(data));
  EXPECT_EQ(range.end, reinterpret_cast<std::uintptr_t>(data + 24));
}

TEST(ByteRange, ExtendsBelowTheDataPointerForNegativeStrides) {
  double data[40] = {};
  // Rows walked backwards from row 3: elements 0 .. 39 reachable.
  const ByteRange range = byte_range(TensorView<double, 2>(data + 30, {4, 10}, {-10, 1}));
  EXPECT_EQ(range.begin, reinterpret_cast<std::uintptr_t>(data));
  EXPECT_EQ(range.end, reinterpret_cast<std::uintptr_t>(data + 40));
}

TEST(ByteRange, IsEmptyForEmptyOrNullViews) {
  float data[4] = {};
  const ByteRange empty = byte_range(TensorView<float, 2>(data, {0, 4}));
  EXPECT_EQ(empty.begin, empty.end);
  const ByteRange null = byte_range(TensorView<float, 2>());
  EXPECT_EQ(null.begin, null.end);
  const ByteRange whole = byte_range(TensorView<float, 2>(data, {2, 2}));
  EXPECT_FALSE(empty.overlaps(whole));
  EXPECT_FALSE(whole.overlaps(empty));
}

TEST(ByteRange, OverlapIsHalfOpen) {
  float data[16] = {};
  const ByteRange first = byte_range(TensorView<float, 1>(data, {8}));
  const ByteRange adjacent = byte_range(TensorView<float, 1>(data + 8, {8}));
  const ByteRange straddling = byte_range(TensorView<float, 1>(data + 7, {2}));
  EXPECT_FALSE(first.overlaps(adjacent));
  EXPECT_FALSE(adjacent.overlaps(first));
  EXPECT_TRUE(first.overlaps(straddling));
  EXPECT_TRUE(straddling.overlaps(adjacent));
  EXPECT_TRUE(first.overlaps(first));
}

TEST(ByteRange, StrideZeroViewCoversOneRow) {
  float data[8] = {};
  const ByteRange range = byte_range(TensorView<float, 2>(data + 2, {5, 3}, {0, 1}));
  EXPECT_EQ(range.begin, reinterpret_cast<std::uintptr_t>(data + 2));
  EXPECT_EQ(range.end, reinterpret_cast<std::uintptr_t>(data + 5));
}

// ---------------------------------------------------------------------------------------------
// check and Error

TEST(Check, PassingConditionDoesNothing) { EXPECT_NO_THROW(check(true, "never ", 1)); }

TEST(Check, FailingConditionThrowsErrorWithPrefixedConcatenatedMessage) {
  try {
    check(false, "attention: k.shape[", 3, "] must equal ", 64, ", got ", 32.5);
    FAIL() << "check(false, ...) did not throw";
  } catch (const Error& error) {
    EXPECT_EQ(std::string(error.what()), "foveal: attention: k.shape[3] must equal 64, got 32.5");
  }
}

TEST(Check, ErrorIsAnInvalidArgument) {
  static_assert(std::is_base_of_v<std::invalid_argument, Error>);
  EXPECT_THROW(check(false, "x"), std::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// Thread count

TEST(NumThreads, SetThenGetReturnsTheSetting) {
  const test::DefaultThreadsOnExit restore_default;
  for (int threads : {1, 2, 3, 7}) {
    set_num_threads(threads);
    EXPECT_EQ(get_num_threads(), threads);
  }
}

TEST(NumThreads, ZeroRestoresTheDefault) {
  const test::DefaultThreadsOnExit restore_default;
  set_num_threads(0);
  const int default_threads = get_num_threads();
  EXPECT_GE(default_threads, 1);
  set_num_threads(5);
  set_num_threads(0);
  EXPECT_EQ(get_num_threads(), default_threads);
}

TEST(NumThreads, NegativeIsRejectedAndKeepsTheSetting) {
  const test::DefaultThreadsOnExit restore_default;
  set_num_threads(2);
  EXPECT_TRUE(test::throws_error_with(
      [] { set_num_threads(-1); },
      {"foveal: set_num_threads: num_threads must be in [0, 1024] (0 = the default), got -1"}));
  EXPECT_EQ(get_num_threads(), 2);
}

// ---------------------------------------------------------------------------------------------
// parallel_for

TEST(ParallelFor, RunsEveryTaskExactlyOnce) {
  for (int threads = 1; threads <= 4; ++threads)
    for (std::int64_t num_tasks : {1, 2, 7, 100}) {
      SCOPED_TRACE(test::describe("threads=", threads, " tasks=", num_tasks));
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(num_tasks));
      std::atomic<int> highest_thread{0};
      parallel_for(num_tasks, threads, [&](std::int64_t task) {
        runs[static_cast<std::size_t>(task)].fetch_add(1);
        const int index = detail::thread_index();
        int seen = highest_thread.load();
        while (index > seen && !highest_thread.compare_exchange_weak(seen, index)) {
        }
      });
      for (std::int64_t task = 0; task < num_tasks; ++task)
        ASSERT_EQ(runs[static_cast<std::size_t>(task)].load(), 1) << "task " << task;
      EXPECT_LT(highest_thread.load(), threads);
    }
}

TEST(ParallelFor, NoTasksRunsNothing) {
  int calls = 0;
  parallel_for(0, 4, [&](std::int64_t) { ++calls; });
  parallel_for(-3, 4, [&](std::int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

}  // namespace
}  // namespace foveal
