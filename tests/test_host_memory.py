"""xr_jax.cli.host_memory: freed host memory is reused (no page faults per run) once applied, and it is only
applied where it can take effect (glibc, a CPU backend that has not started, not opted out)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from xr_jax.cli import host_memory

# A fresh process: optionally apply the settings, then run a jitted op whose 64 MiB output is freed after
# each call; the median of the minor page faults per call after 10 warm-up calls (the heap may still grow
# now and then while freed outputs wait to be released).
PROBE = r"""
import json, resource, statistics, sys
from xr_jax.cli.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "apply" else False
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: x * 2.0)
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": statistics.median(faults[10:])}))
"""

glibc = pytest.mark.skipif(not host_memory.on_glibc(), reason="the settings are glibc's")


def probe(mode: str, **env) -> dict:
    run_env = {k: v for k, v in os.environ.items() if k not in ("XR_JAX_HOST_MALLOC", "XLA_FLAGS")}
    run_env.update(JAX_PLATFORMS="cpu", **env)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=run_env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    default, applied = probe("default"), probe("apply")
    assert applied["applied"] and not default["applied"]
    # 64 MiB = 16,384 pages: glibc maps and faults in every output afresh by default; reused once applied
    assert default["faults"] > 16000, default
    assert applied["faults"] < 100, applied


@glibc
def test_opt_out_keeps_glibc_defaults():
    assert probe("apply", XR_JAX_HOST_MALLOC="system") == {"applied": False, "faults": pytest.approx(
        probe("default")["faults"], rel=0.5)}


def test_not_applied_once_the_backend_has_started():
    jax.devices()  # this test process already runs JAX
    assert host_memory.reuse_freed_memory() is False


def test_cpu_backend_expected_follows_platforms_and_plugins():
    expected = host_memory.cpu_backend_expected
    assert not expected("cuda,cpu", [])
    assert not expected("tpu", [])
    assert expected("cpu", ["cuda"])  # named platforms win over installed plugins
    assert not expected("", ["cuda"])
    assert expected("", [])
