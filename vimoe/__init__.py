"""vimoe: Mixture-of-Experts in JAX/Flax NNX for vision and language."""

__version__ = "0.1.0"
