"""torch modules built on foveal's operators (imports torch; only for users who have it).
foveal.torch is imported first: it re-exports these modules at its end, so either import order
finds both complete."""

import foveal.torch  # noqa: F401  (first: see above)
from foveal.nn.pde import PdeSsm2d  # noqa: F401
from foveal.nn.sparsek import DenseAttention, DeterministicLinear, SparseKAttention  # noqa: F401
