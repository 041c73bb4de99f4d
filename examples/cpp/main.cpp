// Causal GQA attention over [B, L, H, D] activations, passed without copies as [B, H, L, D].
#include <cmath>
#include <cstdio>
#include <foveal/foveal.hpp>
#include <vector>

int main() {
  const foveal::Index batch = 2, len = 100, heads_q = 8, heads_kv = 2, dim = 64;
  std::vector<float> q(batch * len * heads_q * dim), k(batch * len * heads_kv * dim),
      v(batch * len * heads_kv * dim), out(batch * len * heads_q * dim);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.01f * i);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.02f * i);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.03f * i);

  // [B, L, H, D] memory viewed as [B, H, L, D] by swapping the L and H strides.
  auto as_bhld = [&](float* data, foveal::Index heads) {
    return foveal::TensorView<float, 4>(data, {batch, len, heads, dim}).transpose(1, 2);
  };
  foveal::AttentionOptions options;
  options.causal = true;
  foveal::Tensor<float, 3> lse({batch, heads_q, len});
  foveal::attention(as_bhld(q.data(), heads_q), as_bhld(k.data(), heads_kv),
                    as_bhld(v.data(), heads_kv), as_bhld(out.data(), heads_q), options, lse);

  // Query 0 sees only key 0 under the causal mask: its output is v's row 0 of its kv head.
  std::printf("out[0, 0, 0, :3] = %.4f %.4f %.4f (v[0, 0, 0, :3] = %.4f %.4f %.4f)\n", out[0],
              out[1], out[2], v[0], v[1], v[2]);
  std::printf("lse[0, 0, 99] = %.4f\n", lse(0, 0, 99));
  try {
    foveal::AttentionOptions bad;
    bad.window_left = -3;
    foveal::attention(as_bhld(q.data(), heads_q), as_bhld(k.data(), heads_kv),
                      as_bhld(v.data(), heads_kv), as_bhld(out.data(), heads_q), bad);
  } catch (const foveal::Error& error) {
    std::printf("rejected: %s\n", error.what());
  }
  return std::fabs(out[0] - v[0]) < 1e-5f ? 0 : 1;
}
