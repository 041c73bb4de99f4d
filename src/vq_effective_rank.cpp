// The effective rank exp(H(σ/Σσ)) of docs/vq.md (the embedding-collapse diagnostic), by Eigen's
// SVD. A file of its own so that the warning exceptions Eigen needs stay away from the VQ kernels.
#include <Eigen/SVD>
#include <cmath>

#include "foveal/core/error.hpp"
#include "foveal/detail/validate.hpp"
#include "foveal/embedding/vq.hpp"

namespace foveal {

double effective_rank(TensorView<const float, 2> matrix) {
  constexpr const char* kFunction = "effective_rank";
  detail::require_valid_view(kFunction, "matrix", matrix);
  if (matrix.empty()) return 0;
  Eigen::MatrixXd copy(matrix.size(0), matrix.size(1));
  for (Index r = 0; r < matrix.size(0); ++r)
    for (Index d = 0; d < matrix.size(1); ++d) {
      check(std::isfinite(matrix(r, d)), kFunction, ": matrix[", r, ", ", d,
            "] must be finite, got ", matrix(r, d));
      copy(r, d) = matrix(r, d);
    }
  // Singular values only: BDCSVD computes no U or V unless asked.
  const Eigen::VectorXd singular_values = Eigen::BDCSVD<Eigen::MatrixXd>(copy).singularValues();
  const double total = singular_values.sum();
  if (!(total > 0)) return 0;
  double entropy = 0;
  for (Eigen::Index i = 0; i < singular_values.size(); ++i) {
    const double share = singular_values[i] / total;
    if (share > 0) entropy -= share * std::log(share);
  }
  return std::exp(entropy);
}

}  // namespace foveal
