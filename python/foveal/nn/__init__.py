"""Trainable torch modules built on foveal's operators (imports torch; only for users who have
it). One import line per module file."""

from foveal.nn.vq import ResidualVQ, VectorQuantize  # noqa: F401
