"""Which attention kernels the lowered programs use, for a GPU or a TPU, checked on a CPU-only host.

    python -m bench.attention_lowering            # in a venv with jax-cuda12-plugin and libtpu (see README)

CUDA: `jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))` needs only the CUDA plugin (cuDNN's
version query), no GPU. The cuDNN custom calls are read from the StableHLO text: their target names the
variant (`fmhaSoftmax` = no bias, `fmhaScaleBiasSoftmax` = an additive bias, `...Backward` with a dbias
output when it has one) and their backend config the mask type. Without a GPU jax cannot ask the device's
compute capability, so `as_gpu` answers for the target named: sm_90 (H100/H200), where cuDNN's packed-segment
path runs, or sm_80 (A100), where the Triton flash kernel (`pallas_gpu`) does; its custom calls
(`__gpu$xla.gpu.triton`) carry the kernel's name.

TPU: a deviceless compile against a libtpu topology (`jax.experimental.topologies`); the Mosaic custom
calls in the compiled HLO name the Pallas kernels (`splash_*`, `decode_attention_tpu`).

`bench.compiled` (the compiled-program checker) imports these functions.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Iterator

import jax
import jax.numpy as jnp

from xr_jax.models.config import ModelConfig, TextConfig

_CUDNN_CALL = re.compile(r"stablehlo\.custom_call @__cudnn\$(fmha\w+)\(.*\}\s*:\s*\((.*)\)\s*->\s*(.*)$")


def lowering_model(dtype: str = "bfloat16", attention: str = "cudnn") -> ModelConfig:
    """A 2-layer text model with Qwen2.5's head shape (head_dim 64, GQA 7:1) for lowering checks."""
    return ModelConfig(
        text=TextConfig(vocab_size=512, hidden_size=448, intermediate_size=896, num_layers=2, num_heads=7,
                        num_kv_heads=1, max_position_embeddings=4096, mrope_section=None,
                        tie_word_embeddings=True),
        vision=None, dtype=dtype, param_dtype="float32", attention=attention)


def sft_loss_and_grad(cfg: ModelConfig, batch: int, seq: int):
    """(function, abstract args) of the SFT objective's value and gradient (`train.sft.make_loss_fn`)."""
    from xr_jax.models.qwen2_5_vl import abstract_params
    from xr_jax.train.sft import make_loss_fn

    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    rows = {"input_ids": ids, "targets": ids, "segment_ids": ids,
            "positions": jax.ShapeDtypeStruct((batch, 3, seq), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    params = abstract_params(cfg.replace(attention="einsum"))  # the param tree does not depend on the kernel
    grad = jax.value_and_grad(make_loss_fn(cfg), has_aux=True)
    return grad, (params, rows, jax.ShapeDtypeStruct((), jnp.float32))


@contextlib.contextmanager
def as_gpu(capability: str) -> Iterator[None]:
    """Lower for a GPU of this compute capability ("9.0", "8.0") while no GPU is attached (jax asks the
    local device)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    target = tuple(map(int, capability.split(".")))
    saved = cudnn.check_compute_capability
    cudnn.check_compute_capability = lambda needed: tuple(map(int, needed.split("."))) <= target
    try:
        yield
    finally:
        cudnn.check_compute_capability = saved


def lower_cuda(fn, args, capability: str = "9.0") -> str:
    """StableHLO text of `fn(*args)` lowered for CUDA (a GPU of that compute capability) without a GPU."""
    with as_gpu(capability):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def cudnn_attention_calls(stablehlo: str) -> list[dict]:
    """The cuDNN fused-attention custom calls of a lowered program: target, mask type, operand and result
    types (a bias is a 4-D operand besides q, k, v; a dbias a 4-D result of the backward besides dq, dk, dv)."""
    calls = []
    for line in stablehlo.splitlines():
        call = _CUDNN_CALL.search(line)
        if call:
            mask = re.search(r"mask_type(?:\\22|\")\s*:\s*(?:\\22|\")(\w+)", line)
            calls.append({"target": call.group(1), "mask_type": mask.group(1) if mask else None,
                          "operands": re.findall(r"tensor<([^>]*)>", call.group(2)),
                          "results": re.findall(r"tensor<([^>]*)>", call.group(3))})
    return calls


def triton_kernels(stablehlo: str) -> list[str]:
    """Names of the Triton (Pallas GPU) kernels a lowered program calls, sorted, one per call."""
    return sorted(re.search(r'name = "(\w+)"', line).group(1) for line in stablehlo.splitlines()
                  if "@__gpu$xla.gpu.triton" in line)


def cuda_attention_report(stablehlo: str) -> dict:
    """Summary a check can assert on: cuDNN call targets, mask types, whether any has a bias/dbias, and the
    Triton kernels."""
    calls = cudnn_attention_calls(stablehlo)
    return {
        "triton_kernels": triton_kernels(stablehlo),
        "cudnn_calls": [c["target"] for c in calls],
        "mask_types": sorted({c["mask_type"] for c in calls if c["mask_type"]}),
        "bias": any("Bias" in c["target"] for c in calls),
        "dbias": any("Bias" in c["target"] and c["target"].endswith("Backward") for c in calls),
    }


def tpu_topology(name: str = "v5e:2x2"):
    """A libtpu topology to compile against without a TPU (`jax.experimental.topologies`)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=name)


def compile_tpu(fn, args, topology_name: str = "v5e:2x2") -> str:
    """The compiled HLO text of `fn(*args)` for a TPU topology's first device (deviceless)."""
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(tpu_topology(topology_name).devices[0])
    return _compile_tpu(fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args))


def compile_tpu_sft_fsdp(cfg: ModelConfig, batch: int, seq: int, topology_name: str = "v5e:2x2") -> str:
    """The SFT loss+grad compiled for all devices of a TPU topology as one FSDP axis, rows sharded over it
    (params replicated: only the attention's partitioning is at stake)."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from xr_jax.parallel import MESH_AXES, use_mesh

    devices = tpu_topology(topology_name).devices
    mesh = Mesh(np.array(devices).reshape(1, len(devices), 1), MESH_AXES)
    fn, (params, rows, count) = sft_loss_and_grad(cfg, batch, seq)
    place = lambda a, *spec: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P(*spec)))  # noqa: E731
    rows = {k: place(v, ("data", "fsdp")) for k, v in rows.items()}
    with use_mesh(mesh):
        return _compile_tpu(fn, (jax.tree.map(place, params), rows, place(count)))


def _compile_tpu(fn, args) -> str:
    # Mosaic rejects bf16 dots at HIGHEST precision ("Bad lhs type"), which the test suite sets globally
    with jax.default_matmul_precision("default"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile().as_text()


def tpu_kernels(hlo: str) -> list[str]:
    """Names of the Pallas TPU (Mosaic) kernels in a compiled TPU program: the instruction names of its
    `tpu_custom_call`s, which XLA takes from the kernels' names (`splash_mha_fwd_segmented...`)."""
    return sorted({re.sub(r"\.\d+$", "", m) for m in
                   re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = .*custom_call_target=\"tpu_custom_call\"", hlo, re.M)})


def decode_step_args(cfg: ModelConfig, batch: int, slots: int):
    """(function, abstract args) of one layer's decode attention at the contract's shapes."""
    from xr_jax.models.attention import decode_attention

    tc = cfg.text
    dt = jnp.dtype(cfg.dtype)
    q = jax.ShapeDtypeStruct((batch, tc.num_heads, tc.head_dim), dt)
    kv = jax.ShapeDtypeStruct((batch, tc.num_kv_heads, slots, tc.head_dim), dt)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    impl = {"cudnn": "pallas_gpu", "splash": "pallas_tpu"}.get(cfg.attention, "einsum")
    return (lambda q, k, v, s, e: decode_attention(q, k, v, s, e, impl=impl)), (q, kv, kv, rows, rows)


def main() -> None:
    out = {}
    cfg = lowering_model("bfloat16", "cudnn")
    out["cuda_sft_loss_grad"] = {  # a fresh program per target: the kernel is chosen while tracing
        f"sm_{c.replace('.', '')}": cuda_attention_report(lower_cuda(*sft_loss_and_grad(cfg, 2, 256), c))
        for c in ("9.0", "8.0")}
    fn, args = decode_step_args(cfg, 8, 384)
    text = lower_cuda(fn, args)
    out["cuda_decode"] = {"triton_kernels": triton_kernels(text),
                          "cudnn_calls": len(cudnn_attention_calls(text))}
    tcfg = lowering_model("bfloat16", "splash")
    try:
        out["tpu_sft_loss_grad"] = tpu_kernels(compile_tpu(*sft_loss_and_grad(tcfg, 2, 256)))
        out["tpu_decode"] = tpu_kernels(compile_tpu(*decode_step_args(tcfg, 8, 384)))
        hlo = compile_tpu_sft_fsdp(tcfg, 4, 256)
        out["tpu_sft_loss_grad_fsdp4"] = {"kernels": tpu_kernels(hlo), "all_gathers": hlo.count("all-gather(")}
    except Exception as e:  # noqa: BLE001 -- report why the deviceless TPU compile is not available
        out["tpu"] = f"{type(e).__name__}: {e}"[:400]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
