"""frcnn_jax: Faster R-CNN (Ren et al., 2015) in JAX/Flax."""

__version__ = "0.1.0"
