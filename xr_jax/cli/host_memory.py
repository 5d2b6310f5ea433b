"""Host memory on a CPU backend: keep freed memory in the process, so XLA:CPU's per-run buffers reuse pages.

XLA:CPU mallocs the temporaries of every run of a compiled step and frees them afterwards. By default JAX
runs them on its own dispatch thread, whose glibc arena is a set of 64 MiB heaps: larger blocks get fresh
`mmap`s, and every free unmaps them again, so each step page-faults its whole working set back in (figures
in docs/benchmarks.md).

`reuse_freed_memory` makes single-device CPU computations run on the calling thread
(`jax_cpu_enable_async_dispatch=False`), whose main arena grows by `brk`, and tells glibc (`mallopt`) never
to use `mmap` for large blocks nor to trim the heap top. Freed blocks then stay in the process for the next
step; the resident size stays at a step's peak, which training reaches anyway. Python code between steps
no longer overlaps a running step.
Computations over several CPU devices keep their own threads and glibc's behaviour.

The dispatch setting is read when JAX starts its backend, so this must run before; it is only applied when
that backend will be the CPU (on GPU and TPU hosts device memory has its own allocator).
XR_JAX_HOST_MALLOC=system leaves JAX's and glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
from importlib.metadata import entry_points
from typing import Optional

import jax

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_INT_MAX = 2**31 - 1


def accelerator_plugins() -> list[str]:
    """Names of the installed JAX accelerator plugins (CUDA, ROCm, TPU), found without starting a backend."""
    names = [ep.name for ep in entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins

        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def cpu_backend_expected(platforms: Optional[str] = None, plugins: Optional[list[str]] = None) -> bool:
    """Whether JAX's default backend will be the CPU: the platforms (JAX_PLATFORMS, else `jax_platforms`)
    name it first, or none are named and no accelerator plugin is installed."""
    if platforms is None:
        platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not (accelerator_plugins() if plugins is None else plugins)


def on_glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no os.confstr (Windows), or a libc without the name
        return False


def _backend_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def reuse_freed_memory() -> bool:
    """Apply the settings above when they can help (glibc, CPU backend, backend not started yet, not opted
    out); returns whether they were applied. Call it first thing in a process that runs JAX on the CPU."""
    if os.environ.get("XR_JAX_HOST_MALLOC", "").lower() == "system":
        return False
    if not on_glibc() or not cpu_backend_expected() or _backend_started():
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    mallopt = ctypes.CDLL(None).mallopt
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
