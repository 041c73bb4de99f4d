// The attention-kernel registry and the kernels foveal registers itself.
#include "foveal/attention/registry.hpp"

#include <cstdint>
#include <mutex>
#include <sstream>
#include <utility>

#include "detail/sparsek_selection.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "foveal/core/error.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal {
namespace {

// Throws when `config` carries settings a kernel without any settings cannot take.
void require_no_params(const std::string& kernel, const AttentionConfig& config) {
  if (config.params.empty()) return;
  check(false, "make_attention: kernel '", kernel, "' takes no params, got '",
        config.params.begin()->first, "'");
}

// Throws when `extras` names inputs the kernel does not read.
template <typename T>
void require_no_extras(const std::string& kernel, const AttentionArgs<T>& args) {
  if (args.extras.empty()) return;
  check(false, kernel, ": unexpected extra input '", args.extras.begin()->first, "'");
}

// A kernel that calls one functional entry point with the options it was made with; Derived
// names it (kName) and makes the call (call(args, options)).
template <typename Derived>
class OptionsKernel : public AttentionKernel {
 public:
  explicit OptionsKernel(const AttentionConfig& config) : options_(config.options) {
    require_no_params(Derived::kName, config);
    // A kernel outlives the call that made it: it keeps no views of the caller's memory.
    check(options_.key_start.is_null() && options_.key_length.is_null(), "make_attention: kernel '",
          Derived::kName,
          "' keeps its options, so key_start and key_length must be null (pass per-call key "
          "ranges to foveal::attention)");
  }
  std::string name() const override { return Derived::kName; }
  void forward(const AttentionArgs<float>& args) const override { run(args); }
  void forward(const AttentionArgs<double>& args) const override { run(args); }

 protected:
  const AttentionOptions& options() const { return options_; }

 private:
  template <typename T>
  void run(const AttentionArgs<T>& args) const {
    require_no_extras(name(), args);
    Derived::call(args, options_);
  }
  AttentionOptions options_;
};

class DenseKernel final : public OptionsKernel<DenseKernel> {
 public:
  static constexpr const char* kName = "dense";
  using OptionsKernel::OptionsKernel;
  template <typename T>
  static void call(const AttentionArgs<T>& args, const AttentionOptions& options) {
    attention(args.q, args.k, args.v, args.out, options, args.lse, args.bias);
  }
};

// Sliding-window attention: the window comes from config.options and is checked at creation.
class SlidingWindowKernel final : public OptionsKernel<SlidingWindowKernel> {
 public:
  static constexpr const char* kName = "sliding_window";
  explicit SlidingWindowKernel(const AttentionConfig& config) : OptionsKernel(config) {
    detail::require_bounded_window("make_attention(\"sliding_window\")", options());
  }
  template <typename T>
  static void call(const AttentionArgs<T>& args, const AttentionOptions& options) {
    check(args.bias.is_null(), kName, ": takes no bias (it would be an [Lq, Lk] input)");
    sliding_window_attention(args.q, args.k, args.v, args.out, options, args.lse);
  }
};

// SparseK attention: params "topk" (required), "window" (default 0), "gate" (default "value");
// sinks, causal, scale, softcap, q_offset and threads from config.options; scores as the extra
// input "u" [B, Hkv, Lk].
class SparseKKernel final : public AttentionKernel {
 public:
  static constexpr const char* kName = "sparsek";
  explicit SparseKKernel(const AttentionConfig& config) {
    const char* function = "make_attention(\"sparsek\")";
    for (const auto& [key, value] : config.params)
      check(key == "topk" || key == "window" || key == "gate", function, ": unknown param '", key,
            "'; known: topk, window, gate");
    const auto found = config.params.find("topk");
    check(found != config.params.end(), function, ": the param \"topk\" is required");
    static_cast<AttentionOptions&>(options_) = config.options;
    options_.topk = parse_int(function, "topk", found->second);
    const auto window = config.params.find("window");
    if (window != config.params.end())
      options_.window = parse_int(function, "window", window->second);
    const auto gate = config.params.find("gate");
    if (gate != config.params.end()) options_.gate = parse_sparsek_gate(gate->second);
    detail::require_sparsek_options(function, options_);
  }
  std::string name() const override { return kName; }
  void forward(const AttentionArgs<float>& args) const override { run(args); }
  void forward(const AttentionArgs<double>& args) const override { run(args); }

 private:
  static std::int64_t parse_int(const char* function, const char* name, const std::string& text) {
    std::size_t used = 0;
    long long value = 0;
    try {
      value = std::stoll(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    check(used == text.size() && used > 0, function, ": param \"", name,
          "\" must be an integer, got '", text, "'");
    return value;
  }

  template <typename T>
  void run(const AttentionArgs<T>& args) const {
    check(args.bias.is_null(), kName, ": takes no bias");
    const auto u = args.extras.find("u");
    check(u != args.extras.end(), kName, ": needs the scores as the extra input 'u' [B, Hkv, Lk]");
    for (const auto& entry : args.extras)
      check(entry.first == "u", kName, ": unexpected extra input '", entry.first, "'");
    sparsek_attention(args.q, args.k, args.v, u->second, options_, args.out, args.lse);
  }

  SparseKOptions options_;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, AttentionKernelFactory> factories;

  Registry() {
    factories["dense"] = [](const AttentionConfig& config) {
      return std::make_unique<DenseKernel>(config);
    };
    factories["sliding_window"] = [](const AttentionConfig& config) {
      return std::make_unique<SlidingWindowKernel>(config);
    };
    factories["sparsek"] = [](const AttentionConfig& config) {
      return std::make_unique<SparseKKernel>(config);
    };
  }
};

Registry& registry() {
  static Registry instance;
  return instance;
}

}  // namespace

void AttentionKernel::forward(const AttentionArgs<double>&) const {
  check(false, name(), ": this attention kernel has no float64 path; pass float32 tensors");
}

void register_attention_kernel(const std::string& name, AttentionKernelFactory factory) {
  check(!name.empty(), "register_attention_kernel: name must not be empty");
  check(static_cast<bool>(factory), "register_attention_kernel: factory for '", name, "' is empty");
  Registry& instance = registry();
  std::lock_guard<std::mutex> lock(instance.mutex);
  check(instance.factories.count(name) == 0, "register_attention_kernel: '", name,
        "' is already registered");
  instance.factories.emplace(name, std::move(factory));
}

std::vector<std::string> attention_kernel_names() {
  Registry& instance = registry();
  std::lock_guard<std::mutex> lock(instance.mutex);
  std::vector<std::string> names;
  for (const auto& entry : instance.factories) names.push_back(entry.first);
  return names;
}

std::unique_ptr<AttentionKernel> make_attention(const std::string& name,
                                                const AttentionConfig& config) {
  AttentionKernelFactory factory;
  {
    Registry& instance = registry();
    std::lock_guard<std::mutex> lock(instance.mutex);
    const auto found = instance.factories.find(name);
    if (found == instance.factories.end()) {
      std::ostringstream known;
      for (const auto& entry : instance.factories)
        known << (known.tellp() > 0 ? ", " : "") << "'" << entry.first << "'";
      check(false, "make_attention: unknown kernel '", name, "'; known kernels: ", known.str());
    }
    factory = found->second;
  }
  auto kernel = factory(config);
  check(kernel != nullptr, "make_attention: the factory of '", name, "' returned no kernel");
  return kernel;
}

}  // namespace foveal
