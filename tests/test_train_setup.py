"""`train/setup.py`'s state setup: what both trainers, `plan` and the benches jit against."""

import types

import jax
import numpy as np

from xr_jax import parallel
from xr_jax.config import OptimSection
from xr_jax.models.presets import preset
from xr_jax.train import setup


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_abstract_state_is_the_fresh_state_without_values():
    """The restore target (and `plan`'s compile input) has the fresh state's tree, shapes, dtypes and shardings;
    a frozen vision tower gets no optimizer moments; `fresh(seed, params)` wraps the given params."""
    cfg = preset("tiny-vl")
    mesh = parallel.make_mesh((1, 1, 1))
    frozen = setup.frozen_subtrees(types.SimpleNamespace(freeze_vision=True), cfg)
    assert frozen == ("visual",)
    assert setup.frozen_subtrees(types.SimpleNamespace(freeze_vision=True), preset("tiny")) == ()
    st = setup.state_setup(OptimSection(lr=1e-3), cfg, mesh, 10, frozen=frozen)
    fresh, abstract = st.fresh(0), st.abstract()
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(abstract)
    for (path, a), (_, b) in zip(_leaves(fresh), _leaves(abstract)):
        assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding), path
    moments = {jax.tree_util.keystr(p) for p, _ in _leaves(fresh.opt_state)}
    assert any("'model'" in m for m in moments) and not any("'visual'" in m for m in moments)
    again = st.fresh(0, jax.tree_util.tree_map(np.asarray, fresh.params))
    for (path, a), (_, b) in zip(_leaves(fresh.params), _leaves(again.params)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

