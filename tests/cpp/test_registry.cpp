// tests/cpp/test_registry.cpp — attention kernels chosen by name, including users' own.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/attention/dense.hpp"
#include "foveal/attention/registry.hpp"
#include "foveal/core/error.hpp"
#include "harness.hpp"

namespace foveal {
namespace {

using test::Shape;

// ---------------------------------------------------------------------------------------------
// Kernels a user defines outside foveal.

// Dense attention times a constant `factor` (param, default 1). Float32 only: it keeps the
// base class's float64 forward, which throws.
class ScaledDenseKernel final : public AttentionKernel {
 public:
  explicit ScaledDenseKernel(const AttentionConfig& config) : options_(config.options) {
    for (const auto& [key, value] : config.params) {
      check(key == "factor", "test_scaled_dense: unknown param '", key, "'");
      factor_ = std::stof(value);
    }
  }
  std::string name() const override { return "test_scaled_dense"; }
  using AttentionKernel::forward;
  void forward(const AttentionArgs<float>& args) const override {
    attention(args.q, args.k, args.v, args.out, options_, args.lse, args.bias);
    test::for_each_element(args.out, [&](float& element) { element *= factor_; });
  }

 private:
  AttentionOptions options_;
  float factor_ = 1;
};

// Dense attention over values gated per key: v[b, h, j, :] * key_gate[b, h, j], where the
// extra input key_gate is [B, Hkv, Lk]. Float32 and float64.
class KeyGatedDenseKernel final : public AttentionKernel {
 public:
  explicit KeyGatedDenseKernel(const AttentionConfig& config) : options_(config.options) {}
  std::string name() const override { return "test_key_gated_dense"; }
  void forward(const AttentionArgs<float>& args) const override { run(args); }
  void forward(const AttentionArgs<double>& args) const override { run(args); }

 private:
  template <typename T>
  void run(const AttentionArgs<T>& args) const {
    const auto gate = args.extras.find("key_gate");
    check(gate != args.extras.end() && args.extras.size() == 1,
          "test_key_gated_dense: needs exactly the extra input 'key_gate'");
    const TensorView<const T, 4>& v = args.v;
    Tensor<T, 4> gated_v(v.shape());
    for (Index b = 0; b < v.size(0); ++b)
      for (Index h = 0; h < v.size(1); ++h)
        for (Index j = 0; j < v.size(2); ++j)
          for (Index d = 0; d < v.size(3); ++d)
            gated_v(b, h, j, d) = v(b, h, j, d) * gate->second(b, h, j);
    attention(args.q, args.k, gated_v.view(), args.out, options_, args.lse, args.bias);
  }

  AttentionOptions options_;
};

// Registers the kernels above once per process (tests may run in any order, or repeatedly).
void register_test_kernels() {
  static const bool registered = [] {
    register_attention_kernel("test_scaled_dense", [](const AttentionConfig& config) {
      return std::make_unique<ScaledDenseKernel>(config);
    });
    register_attention_kernel("test_key_gated_dense", [](const AttentionConfig& config) {
      return std::make_unique<KeyGatedDenseKernel>(config);
    });
    register_attention_kernel("test_null_factory", [](const AttentionConfig&) {
      return std::unique_ptr<AttentionKernel>();
    });
    return true;
  }();
  (void)registered;
}

// ---------------------------------------------------------------------------------------------
// One random attention call's tensors, in T.

template <typename T>
struct Call {
  static constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 37, kLenK = 70, kDim = 16,
                         kDimV = 12;
  Tensor<T, 4> q{{kBatch, kHeadsQ, kLenQ, kDim}};
  Tensor<T, 4> k{{kBatch, kHeadsKv, kLenK, kDim}};
  Tensor<T, 4> v{{kBatch, kHeadsKv, kLenK, kDimV}};
  Tensor<T, 4> bias{{1, kHeadsQ, kLenQ, kLenK}};
  Tensor<T, 3> key_gate{{kBatch, kHeadsKv, kLenK}};

  explicit Call(std::uint64_t seed) {
    test::RandomSource random(seed);
    test::scatter(random.normal(static_cast<std::size_t>(q.numel())), q.view());
    test::scatter(random.normal(static_cast<std::size_t>(k.numel())), k.view());
    test::scatter(random.normal(static_cast<std::size_t>(v.numel())), v.view());
    test::scatter(random.normal(static_cast<std::size_t>(bias.numel())), bias.view());
    test::scatter(random.uniform(static_cast<std::size_t>(key_gate.numel()), 0, 1),
                  key_gate.view());
  }

  // Arguments writing into `out` and `lse`.
  AttentionArgs<T> args(Tensor<T, 4>& out, Tensor<T, 3>& lse) const {
    AttentionArgs<T> result;
    result.q = q.view();
    result.k = k.view();
    result.v = v.view();
    result.out = out.view();
    result.lse = lse.view();
    result.bias = bias.view();
    return result;
  }
  Tensor<T, 4> make_out() const { return Tensor<T, 4>({kBatch, kHeadsQ, kLenQ, kDimV}); }
  Tensor<T, 3> make_lse() const { return Tensor<T, 3>({kBatch, kHeadsQ, kLenQ}); }
};

AttentionConfig masked_config() {
  AttentionConfig config;
  config.options.causal = true;
  config.options.window_left = 20;
  config.options.sink_tokens = 2;
  config.options.softcap = 10;
  return config;
}

bool contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

template <typename T>
class Registry : public ::testing::Test {};

struct ElementTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};

using ElementTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Registry, ElementTypes, ElementTypeNames);

// ---------------------------------------------------------------------------------------------
// The kernels foveal registers.

TEST(RegistryNames, DenseIsRegistered) { EXPECT_TRUE(contains(attention_kernel_names(), "dense")); }

TEST(RegistryNames, NamesAreSorted) {
  register_test_kernels();
  const std::vector<std::string> names = attention_kernel_names();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
}

TEST(RegistryNames, MakeAttentionBuildsTheNamedKernel) {
  EXPECT_EQ(make_attention("dense")->name(), "dense");
}

TYPED_TEST(Registry, DenseKernelEqualsFunctionalAttention) {
  using T = TypeParam;
  const Call<T> call(1);
  const AttentionConfig config = masked_config();
  Tensor<T, 4> kernel_out = call.make_out(), direct_out = call.make_out();
  Tensor<T, 3> kernel_lse = call.make_lse(), direct_lse = call.make_lse();
  make_attention("dense", config)->forward(call.args(kernel_out, kernel_lse));
  attention(call.q.view(), call.k.view(), call.v.view(), direct_out.view(), config.options,
            direct_lse.view(), call.bias.view());
  EXPECT_TRUE(
      test::bitwise_equal(test::gather(kernel_out.view()), test::gather(direct_out.view())));
  EXPECT_TRUE(
      test::bitwise_equal(test::gather(kernel_lse.view()), test::gather(direct_lse.view())));
}

TEST(RegistryErrors, UnknownNameIsRejectedListingTheKnownNames) {
  EXPECT_TRUE(test::throws_error_with(
      [] { make_attention("flash9"); },
      {"foveal: make_attention: unknown kernel 'flash9'", "known kernels: ", "'dense'"}));
}

TEST(RegistryErrors, DenseRejectsParams) {
  AttentionConfig config;
  config.params["block_size"] = "64";
  EXPECT_TRUE(test::throws_error_with([&] { make_attention("dense", config); },
                                      {"kernel 'dense' takes no params, got 'block_size'"}));
}

TYPED_TEST(Registry, DenseRejectsExtraInputs) {
  using T = TypeParam;
  const Call<T> call(2);
  Tensor<T, 4> out = call.make_out();
  Tensor<T, 3> lse = call.make_lse();
  AttentionArgs<T> args = call.args(out, lse);
  args.extras["u"] = call.key_gate.view();
  const auto kernel = make_attention("dense");
  EXPECT_TRUE(test::throws_error_with([&] { kernel->forward(args); },
                                      {"dense: unexpected extra input 'u'"}));
}

TEST(RegistryErrors, EmptyNameCannotBeRegistered) {
  EXPECT_TRUE(test::throws_error_with(
      [] {
        register_attention_kernel("", [](const AttentionConfig& config) {
          return std::make_unique<ScaledDenseKernel>(config);
        });
      },
      {"register_attention_kernel: name must not be empty"}));
}

TEST(RegistryErrors, TakenNameCannotBeRegisteredAgain) {
  EXPECT_TRUE(test::throws_error_with(
      [] {
        register_attention_kernel("dense", [](const AttentionConfig& config) {
          return std::make_unique<ScaledDenseKernel>(config);
        });
      },
      {"register_attention_kernel: 'dense' is already registered"}));
  EXPECT_EQ(make_attention("dense")->name(), "dense");
}

TEST(RegistryErrors, EmptyFactoryCannotBeRegistered) {
  EXPECT_TRUE(test::throws_error_with(
      [] { register_attention_kernel("test_empty_factory", AttentionKernelFactory()); },
      {"register_attention_kernel: factory for 'test_empty_factory' is empty"}));
  EXPECT_FALSE(contains(attention_kernel_names(), "test_empty_factory"));
}

TEST(RegistryErrors, FactoryReturningNoKernelIsReported) {
  register_test_kernels();
  EXPECT_TRUE(test::throws_error_with(
      [] { make_attention("test_null_factory"); },
      {"make_attention: the factory of 'test_null_factory' returned no kernel"}));
}

// ---------------------------------------------------------------------------------------------
// Users' own kernels.

TEST(UserKernels, AreListedOnceRegistered) {
  register_test_kernels();
  const std::vector<std::string> names = attention_kernel_names();
  EXPECT_TRUE(contains(names, "test_scaled_dense"));
  EXPECT_TRUE(contains(names, "test_key_gated_dense"));
  EXPECT_TRUE(contains(names, "dense"));
}

TEST(UserKernels, UnknownNameMessageListsThem) {
  register_test_kernels();
  EXPECT_TRUE(
      test::throws_error_with([] { make_attention("nope"); }, {"'dense'", "'test_scaled_dense'"}));
}

TEST(UserKernels, RunThroughMakeAttentionWithTheirConfig) {
  register_test_kernels();
  const Call<float> call(3);
  AttentionConfig config = masked_config();
  config.params["factor"] = "2.5";
  const auto kernel = make_attention("test_scaled_dense", config);
  EXPECT_EQ(kernel->name(), "test_scaled_dense");
  Tensor<float, 4> scaled_out = call.make_out(), dense_out = call.make_out();
  Tensor<float, 3> scaled_lse = call.make_lse(), dense_lse = call.make_lse();
  kernel->forward(call.args(scaled_out, scaled_lse));
  make_attention("dense", masked_config())->forward(call.args(dense_out, dense_lse));
  std::vector<double> expected;
  test::for_each_element(dense_out.view(),
                         [&](float& element) { expected.push_back(element * 2.5f); });
  EXPECT_TRUE(test::bitwise_equal(test::gather(scaled_out.view()), expected));
  EXPECT_TRUE(test::bitwise_equal(test::gather(scaled_lse.view()), test::gather(dense_lse.view())));
}

TEST(UserKernels, ConfigErrorsComeFromTheirFactory) {
  register_test_kernels();
  AttentionConfig config;
  config.params["dropout"] = "0.1";
  EXPECT_TRUE(test::throws_error_with([&] { make_attention("test_scaled_dense", config); },
                                      {"test_scaled_dense: unknown param 'dropout'"}));
}

TYPED_TEST(Registry, UserKernelReadsItsExtraInput) {
  using T = TypeParam;
  register_test_kernels();
  const Call<T> call(4);
  const AttentionConfig config = masked_config();
  Tensor<T, 4> gated_out = call.make_out(), direct_out = call.make_out();
  Tensor<T, 3> gated_lse = call.make_lse(), direct_lse = call.make_lse();
  AttentionArgs<T> args = call.args(gated_out, gated_lse);
  args.extras["key_gate"] = call.key_gate.view();
  make_attention("test_key_gated_dense", config)->forward(args);
  // The same computation spelled out: gate v, then dense attention.
  Tensor<T, 4> gated_v(call.v.shape());
  for (Index b = 0; b < gated_v.size(0); ++b)
    for (Index h = 0; h < gated_v.size(1); ++h)
      for (Index j = 0; j < gated_v.size(2); ++j)
        for (Index d = 0; d < gated_v.size(3); ++d)
          gated_v(b, h, j, d) = call.v(b, h, j, d) * call.key_gate(b, h, j);
  attention(call.q.view(), call.k.view(), gated_v.view(), direct_out.view(), config.options,
            direct_lse.view(), call.bias.view());
  EXPECT_TRUE(test::bitwise_equal(test::gather(gated_out.view()), test::gather(direct_out.view())));
  EXPECT_TRUE(test::bitwise_equal(test::gather(gated_lse.view()), test::gather(direct_lse.view())));
}

TEST(UserKernels, KernelWithoutFloat64PathRejectsDoubleInputs) {
  register_test_kernels();
  const Call<double> call(5);
  Tensor<double, 4> out = call.make_out();
  Tensor<double, 3> lse = call.make_lse();
  const auto kernel = make_attention("test_scaled_dense");
  EXPECT_TRUE(test::throws_error_with(
      [&] { kernel->forward(call.args(out, lse)); },
      {"foveal: test_scaled_dense: this attention kernel has no float64 path"}));
}

}  // namespace
}  // namespace foveal
