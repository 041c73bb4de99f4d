"""foveal in five lines, then a check against PyTorch when it is installed."""

import foveal
import numpy as np

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 8, 256, 64), dtype=np.float32)  # [B, Hq, Lq, D]
k = rng.standard_normal((1, 2, 256, 64), dtype=np.float32)  # [B, Hkv, Lk, D]: GQA, 4 heads/group
v = rng.standard_normal((1, 2, 256, 64), dtype=np.float32)
out, lse = foveal.attention(q, k, v, causal=True, return_lse=True)
print("out", out.shape, out.dtype, "lse", lse.shape)

try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.from_numpy(q),
        torch.from_numpy(k),
        torch.from_numpy(v),
        is_causal=True,
        enable_gqa=True,
    )
    print("max |foveal - torch| =", float(np.abs(out - expected.numpy()).max()))
