"""The attention kernels in programs lowered for CUDA and compiled for TPU, on a host with neither.

Needs the CUDA plugin (and nvidia-cudnn-cu12 for cuDNN's version query) and libtpu, so it is skipped on
CPU-only jax; run it in a venv that has them (README, "Attention kernels"):
    PYTHONPATH=$PWD /work/venv-accel/bin/python -m pytest -q tests/test_attention_lowering.py
"""

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax_cuda12_plugin")

from bench import attention_lowering as L  # noqa: E402
from xr_jax.models import attention  # noqa: E402


def test_sft_loss_and_grad_for_hopper_use_causal_cudnn_without_bias():
    report = L.cuda_attention_report(L.lower_cuda(*L.sft_loss_and_grad(L.lowering_model("bfloat16", "cudnn"), 2, 256)))
    assert report == {"triton_kernels": [], "cudnn_calls": ["fmhaSoftmax", "fmhaSoftmaxBackward"],
                      "mask_types": ["CAUSAL"], "bias": False, "dbias": False}


def test_sft_loss_and_grad_for_ampere_use_triton_flash_attention_not_a_cudnn_bias():
    """sm_80 (A100): jax's packed cuDNN layout needs Hopper, so "auto"/"cudnn" take the Triton kernel; one
    forward, one backward and its preprocessing (in the scanned layer body), no cuDNN call, no bias."""
    program = L.sft_loss_and_grad(L.lowering_model("bfloat16", "cudnn"), 2, 256)
    report = L.cuda_attention_report(L.lower_cuda(*program, capability="8.0"))
    assert report == {"triton_kernels": ["mha_backward", "mha_forward", "mha_preprocess_backward"],
                      "cudnn_calls": [], "mask_types": [], "bias": False, "dbias": False}


def test_the_report_sees_a_mask_turned_into_a_bias():
    """What jax offers before Hopper through cuDNN (the mask as a bias): the check must flag it."""
    q = jax.ShapeDtypeStruct((1, 128, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 128, 2, 64), jnp.bfloat16)
    seg = jnp.ones((1, 128), jnp.int32)
    idx = jnp.arange(128)

    def loss(q, k, v):
        mask = attention.attention_mask(seg, seg, idx, idx)
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn").astype(jnp.float32))

    report = L.cuda_attention_report(L.lower_cuda(jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv), capability="8.0"))
    assert report["bias"] and report["dbias"] and report["mask_types"] == ["NO_MASK"]


def test_decode_for_cuda_is_one_pallas_kernel():
    text = L.lower_cuda(*L.decode_step_args(L.lowering_model("bfloat16", "cudnn"), 8, 384))
    # jax's Pallas decode kernel (`decode_attention.py`) is named "mha_forward" too
    assert L.triton_kernels(text) == ["mha_forward"] and not L.cudnn_attention_calls(text)


def test_deviceless_tpu_compiles_use_splash_and_the_decode_kernel():
    pytest.importorskip("libtpu")
    cfg = L.lowering_model("bfloat16", "splash")
    assert L.tpu_kernels(L.compile_tpu(*L.sft_loss_and_grad(cfg, 2, 256))) == [
        "splash_mha_dkv_segmented_no_residuals", "splash_mha_dq_segmented_no_residuals",
        "splash_mha_fwd_segmented_residuals"]
    assert L.tpu_kernels(L.compile_tpu(*L.decode_step_args(cfg, 8, 384))) == ["decode_attention_tpu"]


def test_splash_runs_per_device_on_an_fsdp_mesh():
    """On 4 TPU devices with rows sharded, each device runs Splash on its rows: nothing is all-gathered
    (a Pallas call left to XLA's partitioner does not compile: "Mosaic kernels cannot be automatically
    partitioned")."""
    pytest.importorskip("libtpu")
    hlo = L.compile_tpu_sft_fsdp(L.lowering_model("bfloat16", "splash"), 4, 256)
    assert "splash_mha_fwd_segmented_residuals" in L.tpu_kernels(hlo)
    assert "all-gather(" not in hlo and "all-reduce(" in hlo
