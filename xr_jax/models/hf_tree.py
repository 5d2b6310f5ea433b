"""Whole-model conversion between flat HF tensor dicts and xr_jax nested param trees.

Per-tensor renaming and layout changes live in `naming` (the one rule); this module only groups
tensors into a nested dict and stacks per-layer tensors (`...layers.{i}...`, `...blocks.{i}...`)
along a new leading axis in layer order — the layout `nn.scan` uses. It knows nothing about any
particular model, so the text decoder and the vision tower share it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from xr_jax.models import naming


def set_leaf(tree: dict, path: tuple[str, ...], value: Any, source: str) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{source}: param path {'/'.join(path)} runs through a leaf")
    if path[-1] in node:
        raise ValueError(f"{source}: param {'/'.join(path)} given twice (both HF naming schemes present?)")
    node[path[-1]] = value


def _stack_root(path: tuple[str, ...]) -> tuple[str, ...]:
    """The module path up to the stacked container, e.g. ('visual', 'blocks')."""
    for i, key in enumerate(path):
        if key in naming.STACKED:
            return path[: i + 1]
    raise AssertionError(f"{path} has no stacked component")


def tree_from_hf(tensors: Mapping[str, np.ndarray]) -> dict:
    """Flat HF tensors (either naming scheme) -> nested param dict, layers stacked on axis 0.

    Every layer index 0..n-1 of a stack must be present, and all leaves of one stack must have the
    same n; anything else is an incomplete checkpoint and raises, naming the tensor.
    """
    tree: dict = {}
    layered: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    names: dict[tuple[str, ...], str] = {}
    for name, w in tensors.items():
        module, layer, suffix = naming.split_hf_name(name)
        path, leaf = naming.hf_to_leaf(module, suffix, np.asarray(w))
        if layer is None:
            set_leaf(tree, path, leaf, name)
            continue
        per_layer = layered.setdefault(path, {})
        if layer in per_layer:
            raise ValueError(f"{name}: layer {layer} of {'/'.join(path)} given twice")
        per_layer[layer] = leaf
        names[path] = name

    depths: dict[tuple[str, ...], tuple[int, str]] = {}
    for path, per_layer in layered.items():
        n = max(per_layer) + 1
        missing = sorted(set(range(n)) - set(per_layer))
        if missing:
            raise ValueError(f"{names[path]}: layers {missing} of {'/'.join(path)} are missing")
        root = _stack_root(path)
        if depths.setdefault(root, (n, names[path]))[0] != n:
            raise ValueError(
                f"{names[path]}: {n} layers, but {depths[root][1]} has {depths[root][0]} in the same stack"
            )
        set_leaf(tree, path, np.stack([per_layer[i] for i in range(n)]), names[path])
    return tree


def flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def tree_to_hf(tree: Mapping, patch_shape: tuple[int, ...] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `tree_from_hf`: nested params -> legacy-named HF tensors (stacks split per layer).

    `patch_shape` = (C, T, P, P) restores the Conv3d layout of `patch_embed.proj.weight`; it is
    required only when the tree has a vision tower.
    """
    out: dict[str, np.ndarray] = {}
    for path, w in flatten(tree).items():
        w = np.asarray(w)
        if path[-2:] == ("proj", "kernel") and "patch_embed" in path and patch_shape is None:
            raise ValueError(f"{'/'.join(path)}: pass patch_shape=(C, T, P, P) to export the patch embedding")
        if any(key in naming.STACKED for key in path):
            items = [naming.leaf_to_hf(path, w[i], i, patch_shape) for i in range(w.shape[0])]
        else:
            items = [naming.leaf_to_hf(path, w, None, patch_shape)]
        for name, value in items:
            if name in out:
                raise ValueError(f"{'/'.join(path)}: HF name {name} produced twice")
            out[name] = value
    return out
