"""Every module of `xr_jax` imports on its own, and no import cycle exists.

A cycle between modules works or breaks depending on which one is imported first, so the import graph (built
with `ast` over the sources) must be acyclic and each module is imported with no other xr_jax module loaded.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys

import xr_jax

ROOT = os.path.dirname(xr_jax.__file__)


def all_modules() -> list[str]:
    """Every module and package of xr_jax but `__main__` ones (importing those runs the CLI)."""
    names = (m.name for m in pkgutil.walk_packages([ROOT], "xr_jax."))
    return ["xr_jax"] + sorted(n for n in names if not n.endswith(".__main__"))


def _path(module: str) -> str:
    rel = module.split(".")[1:]
    pkg = os.path.join(ROOT, *rel, "__init__.py")
    return pkg if os.path.exists(pkg) else os.path.join(ROOT, *rel) + ".py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module name an `ImportFrom` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _path(module).endswith("__init__.py"):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def module_imports(module: str, known: set[str]) -> set[str]:
    """The `xr_jax` modules `module` imports, at module level or inside a function: a lazy import still makes
    the two modules need each other (the cycle then breaks at call time, or by which one ran first).
    `from pkg import name` counts `pkg.name` when that is a module, else `pkg`; importing `a.b.c` also runs
    `a` and `a.b`."""
    with open(_path(module)) as f:
        tree = ast.parse(f.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
    out = set()
    for name in found:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in out if m in known and m != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None. A package's `__init__` importing its own submodules is
    not a cycle (Python imports the package first); every other edge back onto the current path is."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    return {m: module_imports(m, known) for m in modules}


def test_import_graph_has_the_edges_the_code_has():
    """Module-level and function-level imports are edges (so an empty cycle search means something)."""
    graph = import_graph()
    assert "xr_jax.train.state" in graph["xr_jax.train.sft"]
    assert "xr_jax.parallel" in graph["xr_jax.train.state"]
    assert "xr_jax.sampling.sampler" in graph["xr_jax.eval.runner"]  # inside `generate_records`
    # `from xr_jax.models import presets` counts the module, and the package above it
    assert {"xr_jax.models.presets", "xr_jax.models"} <= graph["xr_jax.train.setup"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) is None


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_every_module_imports_alone():
    """Each module imported first, with no other xr_jax module loaded: one child process drops every xr_jax
    module from `sys.modules` before each import (a process per module would cost ~3 s of start-up each on
    2 busy cores); third-party packages stay loaded, as they take no part in an xr_jax cycle."""
    script = (
        "import sys, importlib\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'xr_jax' or m.startswith('xr_jax.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script, *all_modules()], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
