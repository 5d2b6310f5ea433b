"""xr_jax: the X-Reasoner post-training recipe for Qwen2.5-VL in JAX/Flax."""

__version__ = "0.1.0"
