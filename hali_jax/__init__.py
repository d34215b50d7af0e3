"""hali_jax: Hierarchical Adversarially Learned Inference (Belghazi et al.) in JAX/Flax."""
