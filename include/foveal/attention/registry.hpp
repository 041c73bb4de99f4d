// foveal/attention/registry.hpp — attention kernels chosen by name at run time.
//
// Inference code often picks the attention kind per layer from a model config. A kernel is a
// small object bound to its configuration; a process-wide registry maps names ("dense", ...)
// to factories, and users can register their own kernels without touching foveal.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// The tensors of one attention call. lse and bias are optional (null views); `extras` holds
// named kernel-specific inputs, e.g. SparseK's scores u: [B, Hkv, Lk].
template <typename T>
struct AttentionArgs {
  TensorView<const T, 4> q, k, v;  // [B, Hq, Lq, D], [B, Hkv, Lk, D], [B, Hkv, Lk, Dv]
  TensorView<T, 4> out;            // [B, Hq, Lq, Dv]
  TensorView<T, 3> lse;            // [B, Hq, Lq] or null
  TensorView<const T, 4> bias;     // [B or 1, Hq or 1, Lq, Lk] or null
  std::map<std::string, TensorView<const T, 3>> extras;
};

// Configuration a kernel is built with: the shared options plus kernel-specific settings as
// strings (each kernel parses and validates its own, and rejects names it does not know).
struct AttentionConfig {
  AttentionOptions options;
  std::map<std::string, std::string> params;
};

// An attention kernel bound to its configuration.
class AttentionKernel {
 public:
  virtual ~AttentionKernel() = default;
  // The name it was registered under.
  virtual std::string name() const = 0;
  // Computes args.out (and args.lse when given) for float32 inputs.
  virtual void forward(const AttentionArgs<float>& args) const = 0;
  // The same for float64; kernels that have no float64 path keep this default, which throws
  // a foveal::Error saying so.
  virtual void forward(const AttentionArgs<double>& args) const;
};

using AttentionKernelFactory =
    std::function<std::unique_ptr<AttentionKernel>(const AttentionConfig& config)>;

// Adds `factory` under `name`. Throws foveal::Error when the name is empty or already taken.
void register_attention_kernel(const std::string& name, AttentionKernelFactory factory);

// The registered names, sorted.
std::vector<std::string> attention_kernel_names();

// Builds the kernel registered as `name` with `config`. Throws foveal::Error for an unknown
// name (the message lists the known ones) or a configuration the kernel rejects.
std::unique_ptr<AttentionKernel> make_attention(const std::string& name,
                                                const AttentionConfig& config = {});

}  // namespace foveal
