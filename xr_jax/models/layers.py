"""Building blocks shared by the text decoder and the vision tower.

Casts follow transformers exactly where parity depends on them (the parity tests compare logits with it).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> Dtype:
    return DTYPES[name_or_dtype] if isinstance(name_or_dtype, str) else name_or_dtype


def dense_init(axes: Sequence[str], init=nn.initializers.normal(0.02)):
    return nn.with_logical_partitioning(init, tuple(axes))


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def matmul_grads(x, w, g):
    """(dx, dw) of x [..., K] @ w [K, N] for the output cotangent g [..., N] (see `matmul`)."""
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    xt = rows(x).T
    if jax.default_backend() == "cpu":
        # the barrier keeps x^T a real (small) array: without it XLA folds the transpose into the dot and,
        # on CPU, transposes the (large) output gradient instead and runs a slow non-canonical dot
        xt = jax.lax.optimization_barrier(xt)
    return jnp.dot(g, w.T), jnp.dot(xt, rows(g))


def _matmul_bwd(res, g):
    return matmul_grads(*res, g)


@jax.custom_vjp
def _matmul_cpu(x, w):
    return jnp.dot(x, w)


_matmul_cpu.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x, w):
    """x [..., K] @ w [K, N]. On CPU the backward computes the weight gradient as (x^T) @ g with x^T
    materialised: XLA:CPU otherwise transposes the large output gradient and runs a non-canonical dot
    (figures in docs/benchmarks.md). Elsewhere plain autodiff (GPU/TPU gemms take transposes for free)."""
    if jax.default_backend() == "cpu":
        return _matmul_cpu(x, w)
    return jnp.dot(x, w)


class Dense(nn.Module):
    """y = x @ kernel (+ bias), kernel (in, out) with logical axes; computes in `dtype`."""

    features: int
    axes: tuple[str, str]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", dense_init(self.axes), (x.shape[-1], self.features), self.param_dtype)
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,), self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); biases only in the vision tower's variant."""

    hidden: int
    intermediate: int
    axes: tuple[str, str] = ("embed", "mlp")
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda f, axes, name: Dense(f, axes, self.use_bias, self.dtype, self.param_dtype, name=name)  # noqa: E731
        g = dense(self.intermediate, self.axes, "gate_proj")(x)
        u = dense(self.intermediate, self.axes, "up_proj")(x)
        # leading dims ([B, T] in the decoder, [P] in the vision tower) keep their own sharding
        lead = ("act_batch", "act_length") if x.ndim == 3 else (None,) * (x.ndim - 1)
        h = nn.with_logical_constraint(jax.nn.silu(g) * u, lead + ("act_" + self.axes[1],))
        return dense(self.hidden, self.axes[::-1], "down_proj")(h)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, *then* scale.

    The weight is cast to the compute dtype first, which is what a bf16 transformers run does.
    """

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],), self.param_dtype,
        )
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * h.astype(in_dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """x * cos + rotate_half(x) * sin, in the dtype of `cos` (callers choose fp32 or compute dtype)."""
    return x * cos + rotate_half(x) * sin


def remat_policy(name: str):
    """`nn.remat` policy for ModelConfig.remat (called only when it is not "none"): "full" saves nothing,
    "dots" keeps weight matmul outputs."""
    return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]
