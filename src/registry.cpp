// The attention-kernel registry and the kernels foveal registers itself.
#include "foveal/attention/registry.hpp"

#include <mutex>
#include <sstream>
#include <utility>

#include "foveal/attention/dense.hpp"
#include "foveal/core/error.hpp"

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

class DenseKernel final : public AttentionKernel {
 public:
  explicit DenseKernel(const AttentionConfig& config) : options_(config.options) {
    require_no_params(name(), config);
  }
  std::string name() const override { return "dense"; }
  void forward(const AttentionArgs<float>& args) const override { run(args); }
  void forward(const AttentionArgs<double>& args) const override { run(args); }

 private:
  template <typename T>
  void run(const AttentionArgs<T>& args) const {
    require_no_extras(name(), args);
    attention(args.q, args.k, args.v, args.out, options_, args.lse, args.bias);
  }
  AttentionOptions options_;
};

struct Registry {
  std::mutex mutex;
  std::map<std::string, AttentionKernelFactory> factories;

  Registry() {
    factories["dense"] = [](const AttentionConfig& config) {
      return std::make_unique<DenseKernel>(config);
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
