"""What machine a benchmark ran on (printed with every figure), and its measured ceilings."""

from __future__ import annotations

import os
import platform
import subprocess
import time

# datasheet HBM bandwidth (bytes/s, SXM parts), for the decode roofline beside the measured copy rate
PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def describe() -> dict:
    """Device, core count, load and library versions: the context a figure needs."""
    import jax

    dev = jax.devices()[0]
    info = {"platform": dev.platform, "device": dev.device_kind if dev.platform != "cpu" else cpu_model(),
            "devices": jax.device_count(), "cores": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "load_avg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def _best_time(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of `x + 1` over an fp32 array of `nbytes` (reads and writes it once: 2 x nbytes moved)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1)
    return 2 * nbytes / _best_time(lambda: f(x), reps)


def matmul_rate(n: int, dtype: str, reps: int = 5) -> float:
    """FLOP/s of one n x n x n matmul in `dtype` (fp32 on CPU, bf16 on GPU): the attainable peak."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.dot)
    return 2 * n**3 / _best_time(lambda: f(a, b), reps)


def datasheet_hbm(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_HBM.items() if k in device_kind), None)
