// tests/cpp/test_isa.cpp — the ISA levels: the choice (FOVEAL_ISA), build_info, and each level's
// kernels against the float64 reference, bitwise identical across thread counts.
//
// The level is chosen once per process, so the tests that force a level run this binary again
// with FOVEAL_ISA set (EveryLevelInItsOwnProcess, BadLevelIsAClearError); the others check
// whatever level this process runs (CI runs the whole suite under every level the CPU has).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/foveal.hpp"
#include "foveal_isa_levels.hpp"
#include "harness.hpp"

// "sse4.2", "avx2", ...: the names of the levels this build compiled.
#define FOVEAL_TEST_LEVEL_NAME(ns, name, check) name,
#define FOVEAL_TEST_COMPILED_LEVELS FOVEAL_ISA_LEVELS(FOVEAL_TEST_LEVEL_NAME)

namespace foveal::test {
namespace {

bool contains(const std::vector<std::string>& list, const std::string& value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

std::string environment(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

// Runs this test binary with `assignment` (NAME=value) in the environment and `filter`; returns
// its exit status.
int run_self(const std::string& assignment, const std::string& filter) {
  char self[4096] = {};
  const ssize_t length = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (length <= 0) return -1;
  const std::string command = "env " + assignment + " '" + std::string(self, length) +
                              "' --gtest_brief=1 --gtest_filter=" + filter + " > /dev/null 2>&1";
  return std::system(command.c_str());
}

TEST(IsaLevels, BuildInfoDescribesTheLevelInUse) {
  const BuildInfo info = build_info();
  EXPECT_EQ(info.version, FOVEAL_VERSION);
  EXPECT_FALSE(info.compiler.empty());
  ASSERT_FALSE(info.compiled_levels.empty());
  for (const std::string& level : info.supported_levels)
    EXPECT_TRUE(contains(info.compiled_levels, level)) << level;
  EXPECT_TRUE(contains(info.supported_levels, info.level)) << info.level;
  const std::string requested = environment("FOVEAL_ISA");
  if (requested.empty() || requested == "auto") {
    EXPECT_EQ(info.requested_level, "auto");
    EXPECT_EQ(info.level, info.supported_levels.back()) << "auto picks the highest level";
  } else {
    EXPECT_EQ(info.requested_level, requested);
    EXPECT_EQ(info.level, requested);
  }
}

// Attention forward, decode-like (one query row) and backward-free shapes on the level in use:
// the reference within the usual tolerance, and the same bits for 1, 2 and 3 threads.
template <typename T>
void expect_level_matches_reference_for_any_thread_count() {
  Problem p;
  p.batch = 2;
  p.heads_q = 4;
  p.heads_kv = 2;
  p.len_q = 130;
  p.len_k = 257;
  p.dim = 67;
  p.dim_v = 33;
  p.seed = 17;
  const Problem decode = [&] {
    Problem d = p;
    d.len_q = 1;
    d.len_k = 2100;  // several split-KV chunks
    return d;
  }();
  for (const Problem& problem : {p, decode}) {
    for (const bool causal : {false, true}) {
      AttentionOptions o;
      o.causal = causal;
      o.softcap = causal ? 0.0 : 20.0;
      SCOPED_TRACE(describe(problem_string(problem), "\n  ", options_string(o)));
      const Inputs in = random_inputs(problem);
      const Outputs want = reference_outputs(problem, in, o);
      o.num_threads = 1;
      const Outputs one = run_attention<T>(problem, in, o);
      EXPECT_TRUE(matches_reference(one.out, want.out, kTolerance<T>)) << "out";
      EXPECT_TRUE(matches_reference(one.lse, want.lse, kTolerance<T>)) << "lse";
      for (const int threads : {2, 3}) {
        o.num_threads = threads;
        expect_identical(run_attention<T>(problem, in, o), one);
      }
    }
  }
}

TEST(IsaLevels, LevelInUseMatchesTheReferenceBitwiseForAnyThreadCountFloat) {
  expect_level_matches_reference_for_any_thread_count<float>();
}

TEST(IsaLevels, LevelInUseMatchesTheReferenceBitwiseForAnyThreadCountDouble) {
  expect_level_matches_reference_for_any_thread_count<double>();
}

TEST(IsaLevels, EverySupportedLevelPassesInItsOwnProcess) {
  if (!environment("FOVEAL_ISA_TEST_CHILD").empty()) GTEST_SKIP() << "a child run";
  const BuildInfo info = build_info();
  for (const std::string& level : info.supported_levels)
    EXPECT_EQ(run_self("FOVEAL_ISA_TEST_CHILD=1 FOVEAL_ISA=" + level,
                       "IsaLevels.BuildInfo*:IsaLevels.LevelInUse*"),
              0)
        << "FOVEAL_ISA=" << level;
  EXPECT_EQ(run_self("FOVEAL_ISA_TEST_CHILD=1 FOVEAL_ISA=auto",
                     "IsaLevels.BuildInfo*:IsaLevels.LevelInUse*"),
            0);
}

// Run by BadLevelIsAClearError in a process whose FOVEAL_ISA is bad (skipped otherwise): every
// call that needs a kernel, and build_info, throws an Error naming the variable, the value and
// the accepted levels, and writes nothing.
TEST(IsaLevels, BadLevelChild) {
  const std::string bad = environment("FOVEAL_ISA_TEST_BAD");
  if (bad.empty()) GTEST_SKIP() << "run by BadLevelIsAClearError";
  const auto expect_clear_error = [&](const std::string& message) {
    EXPECT_NE(message.find("FOVEAL_ISA=" + bad), std::string::npos) << message;
    EXPECT_NE(message.find("accepted: auto, "), std::string::npos) << message;
    // The compiled levels, as build_info would list them (it throws here).
    for (const char* level : {FOVEAL_TEST_COMPILED_LEVELS})
      EXPECT_NE(message.find(level), std::string::npos) << message;
  };
  for (int attempt = 0; attempt < 2; ++attempt) {  // the choice is retried, and fails again
    Tensor<float, 4> q({1, 2, 3, 8}), k({1, 2, 5, 8}), v({1, 2, 5, 8}), out({1, 2, 3, 8});
    for (Tensor<float, 4>* t : {&q, &k, &v}) std::fill(t->data(), t->data() + t->numel(), 0.5f);
    std::fill(out.data(), out.data() + out.numel(), 7.0f);
    try {
      attention(q.view(), k.view(), v.view(), out.view());
      ADD_FAILURE() << "attention ran with FOVEAL_ISA=" << bad;
    } catch (const Error& error) {
      expect_clear_error(error.what());
    }
    EXPECT_TRUE(std::all_of(out.data(), out.data() + out.numel(), [](float x) { return x == 7; }))
        << "attention wrote its output";
  }
  try {
    build_info();
    ADD_FAILURE() << "build_info ran with FOVEAL_ISA=" << bad;
  } catch (const Error& error) {
    expect_clear_error(error.what());
  }
  // Validation comes first: a bad argument is reported as such.
  Tensor<float, 4> q({1, 2, 3, 8}), out({1, 2, 3, 8});
  AttentionOptions negative_scale;
  negative_scale.scale = -1;
  try {
    attention(q.view(), q.view(), q.view(), out.view(), negative_scale);
    ADD_FAILURE() << "a negative scale was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("scale"), std::string::npos) << error.what();
  }
}

TEST(IsaLevels, BadLevelIsAClearError) {
  if (!environment("FOVEAL_ISA_TEST_CHILD").empty()) GTEST_SKIP() << "a child run";
  // Unknown names, and "native" where it is not the one level of a FOVEAL_NATIVE build.
  std::vector<std::string> bad = {"avx1024", "AVX2", "sse2"};
  if (!contains(build_info().compiled_levels, "native")) bad.push_back("native");
  for (const std::string& level : bad)
    EXPECT_EQ(
        run_self("FOVEAL_ISA_TEST_CHILD=1 FOVEAL_ISA_TEST_BAD=" + level + " FOVEAL_ISA=" + level,
                 "IsaLevels.BadLevelChild"),
        0)
        << "FOVEAL_ISA=" << level;
}

}  // namespace
}  // namespace foveal::test
