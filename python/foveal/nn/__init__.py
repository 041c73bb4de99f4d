"""Trainable torch modules built on foveal's operators (imports torch; only for users who have
it). One import line per module file."""

from foveal.nn.pde import PdeSsm2d  # noqa: F401
from foveal.nn.spade import SpadeEmbedding  # noqa: F401
from foveal.nn.sparsek import DenseAttention, DeterministicLinear, SparseKAttention  # noqa: F401
from foveal.nn.vq import ResidualVQ, VectorQuantize  # noqa: F401
