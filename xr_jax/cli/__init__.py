"""The user-facing commands: `xr-jax` and its subcommands (`python -m xr_jax.cli`).

  commands.py     argument parsing, one function per subcommand, user errors -> one line and exit 2
  demo.py         `xr-jax demo`: the whole recipe in miniature on CPU
  plan.py         `xr-jax plan`: per-device memory and FLOPs of a run before renting devices
  plot.py         `xr-jax plot`: training curves from metrics.jsonl
  host_memory.py  keep freed host memory in the process on a CPU backend (set up before JAX starts)
"""

from xr_jax.cli.commands import main

__all__ = ["main"]
