"""Test setup: 8 simulated CPU devices (must be set before jax is imported) and fp32 matmuls."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # kept with e.g. --xla_cpu_max_isa
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xr_jax.cli.host_memory import reuse_freed_memory  # noqa: E402

reuse_freed_memory()  # as `xr-jax` does on a CPU backend: before JAX starts it

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
