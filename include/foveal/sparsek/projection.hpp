// foveal/sparsek/projection.hpp — the SPARSEK projection (docs/sparsek.md): the Euclidean
// projection of each row of scores onto the capped simplex {0 <= p <= 1, Σp = k}, and its
// backward. SparseK attention, which builds on it, is in foveal/sparsek/attention.hpp.
#pragma once

#include "foveal/core/tensor.hpp"

namespace foveal {

// z: [N, n]  ->  p: [N, n]  tau: [N] (may be null)
// p[r] = argmin ‖p − z[r]‖² over {0 <= p_i <= 1, Σ p_i = k}, i.e. p_i = clip(z_i − τ_r, 0, 1)
// with τ_r ∈ [z_(k) − 1, z_(k)); for k >= n every p_i = 1 and τ_r = −inf (no finite threshold
// is singled out there). Expected O(n) per row: the k-th largest score by selection, then τ
// among the breakpoints of the scores within 1 of it, solved in double on z − z_(k) so that
// ties are exact and scores up to ±max stay finite. z must be finite; k >= 1. Rows are
// independent; results are bitwise identical for any thread count.
void sparsek(TensorView<const float, 2> z, Index k, TensorView<float, 2> p,
             TensorView<float, 1> tau = {}, int num_threads = 0);
void sparsek(TensorView<const double, 2> z, Index k, TensorView<double, 2> p,
             TensorView<double, 1> tau = {}, int num_threads = 0);

// p: [N, n]  grad_p: [N, n]  ->  grad_z: [N, n]
// The vector-Jacobian product of sparsek: with F = {i : 0 < p_i < 1} per row,
// grad_z = 1_F ⊙ (grad_p − mean_F(grad_p)), zero where F is empty. grad_p must be finite.
void sparsek_backward(TensorView<const float, 2> p, TensorView<const float, 2> grad_p,
                      TensorView<float, 2> grad_z, int num_threads = 0);
void sparsek_backward(TensorView<const double, 2> p, TensorView<const double, 2> grad_p,
                      TensorView<double, 2> grad_z, int num_threads = 0);

}  // namespace foveal
