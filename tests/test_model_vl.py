"""The whole Qwen2.5-VL (vision tower + M-RoPE decoder) vs transformers, and its VL checkpoint round trip."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import Qwen2_5_VLForConditionalGeneration

from tests import hf_reference as ref
from xr_jax.models import hf
from xr_jax.models.config import tiny_vl_config
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL, check_image_tokens, get_rope_index
from xr_jax.models.vision import vision_layout, window_count

TOL = 1e-4  # max |Δlogits| / max |logits|, fp32


@pytest.fixture(scope="module")
def vl():
    model = ref.tiny_vl(seed=3)
    return model, hf.tree_from_hf(ref.state_dict_numpy(model))


def _batch(rows_spec, seed=0):
    """rows_spec: list of (grids, text_lens) or an int (text-only length). Left-padded batch."""
    rng = np.random.RandomState(seed)
    rows, grids = [], []
    for spec in rows_spec:
        if isinstance(spec, int):
            rows.append(list(rng.randint(2, 60, size=spec)))
        else:
            g, lens = spec
            rows.append(ref.image_prompt(rng, g, lens))
            grids += g
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    am = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        am[i, length - len(r):] = 1
    grid = np.array(grids, np.int64)
    pixels = rng.randn(int(grid.prod(-1).sum()), 1176).astype(np.float32) if len(grids) else None
    return ids, am, grid, pixels


def _ours(tree, cfg, ids, am, grid, pixels, **layout_kw):
    check_image_tokens(ids, grid, cfg)
    pos, _ = get_rope_index(ids, grid, am, cfg)
    kw = {}
    if pixels is not None:
        layout = vision_layout(grid, cfg.vision, **layout_kw)
        n = layout.pos_hw.shape[0]
        padded = np.zeros((n, pixels.shape[1]), np.float32)
        padded[: len(pixels)] = pixels
        kw = dict(pixel_values=padded, vision_layout=layout)
    out, _ = Qwen2_5_VL(cfg).apply({"params": tree}, ids, pos, am, **kw)
    return np.asarray(out, np.float32), pos


CASES = {
    "one_image": [([(1, 4, 6)], [3, 4])],
    "two_images_different_sizes": [([(1, 8, 12), (1, 4, 4)], [2, 3, 5])],
    "window_padding_grids": [([(1, 10, 10), (1, 6, 22)], [1, 2, 2])],
    "padded_mixed_batch": [([(1, 4, 6)], [3, 4]), 7, ([(1, 10, 10), (1, 4, 8)], [0, 1, 3]), 21],
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(vl, case):
    model, tree = vl
    cfg = tiny_vl_config()
    ids, am, grid, pixels = _batch(CASES[case], seed=len(case))
    got, pos = _ours(tree, cfg, ids, am, grid, pixels)
    want = ref.hf_logits(model, ids, am, pos, pixels, grid)
    mask = am.astype(bool)
    err = float(np.abs(got - want)[mask].max() / np.abs(want[mask]).max())
    assert err < TOL, err


def test_static_padded_vision_buffer_gives_same_logits(vl):
    _, tree = vl
    cfg = tiny_vl_config()
    ids, am, grid, pixels = _batch(CASES["padded_mixed_batch"], seed=5)
    exact, _ = _ours(tree, cfg, ids, am, grid, pixels)
    budget = window_count(grid, cfg.vision) + 5
    padded, _ = _ours(tree, cfg, ids, am, grid, pixels, num_patches=len(pixels) + 64, num_windows=budget)
    assert np.abs(exact - padded)[am.astype(bool)].max() < 1e-5


def test_bf16_and_unrolled_variants(vl):
    model, tree = vl
    ids, am, grid, pixels = _batch(CASES["two_images_different_sizes"], seed=7)
    f32, pos = _ours(tree, tiny_vl_config(), ids, am, grid, pixels)
    unrolled, _ = _ours(tree, tiny_vl_config(scan_layers=False, remat="full"), ids, am, grid, pixels)
    assert np.abs(unrolled - f32).max() < 1e-5
    b16, _ = _ours(tree, tiny_vl_config(dtype="bfloat16"), ids, am, grid, pixels)
    want = ref.hf_logits(model, ids, am, pos, pixels, grid)
    # bf16 (8-bit mantissa, rel. step 3.9e-3) through a vision tower and 2 decoder layers
    assert np.abs(b16 - want).max() / np.abs(want).max() < 3e-2


def test_image_prompt_kv_cache_matches_full_forward(vl):
    _, tree = vl
    cfg = tiny_vl_config()
    ids, am, grid, pixels = _batch([([(1, 4, 6)], [2, 6]), 9], seed=9)
    full, pos = _ours(tree, cfg, ids, am, grid, pixels)
    got, _ = ref.cached_logits(cfg, tree, ids, pos, am, ids.shape[1] - 4, pixels, vision_layout(grid, cfg.vision))
    assert np.abs(got - full)[am.astype(bool)].max() < 1e-5


def test_image_token_count_mismatch_names_both_counts():
    cfg = tiny_vl_config()
    ids, _, grid, _ = _batch([([(1, 4, 6)], [2, 2])])
    with pytest.raises(ValueError, match="tokens 6, features 10"):
        check_image_tokens(ids, np.array([[1, 4, 10]]), cfg)
    with pytest.raises(ValueError, match="tokens 6, features 0"):
        check_image_tokens(ids, None, cfg)


def test_vl_checkpoint_round_trip_bit_exact_and_reloadable(vl, tmp_path):
    model, _ = vl
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    cfg, params = hf.load_hf(src)
    assert cfg.vision is not None and cfg.text.mrope_section == (2, 3, 3) and cfg.image_token_id == 60
    out = str(tmp_path / "out")
    hf.save_hf(params, cfg, out)  # no source config: the flat hub style
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert "text_config" not in json.load(open(os.path.join(out, "config.json")))  # flat hub style written...
    cfg_flat, params_flat = hf.load_hf(out)  # ...and read back (the source was a nested v5 save)
    assert cfg_flat == cfg and all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_flat)))
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, am, grid, pixels = _batch(CASES["one_image"], seed=11)
    pos, _ = get_rope_index(ids, grid, am, cfg)
    np.testing.assert_array_equal(
        ref.hf_logits(reloaded, ids, am, pos, pixels, grid), ref.hf_logits(model, ids, am, pos, pixels, grid)
    )
    ours, _ = _ours(jax.tree_util.tree_map(np.asarray, params), cfg, ids, am, grid, pixels)
    assert np.abs(ours - ref.hf_logits(model, ids, am, pos, pixels, grid)).max() < 1e-4


def test_vl_forward_under_mesh_rules_equals_single_device(vl):
    from xr_jax import parallel

    _, tree = vl
    cfg = tiny_vl_config()
    ids, am, grid, pixels = _batch(CASES["padded_mixed_batch"], seed=13)
    want, pos = _ours(tree, cfg, ids, am, grid, pixels)
    mesh = parallel.make_mesh((2, 2, 2))
    layout = vision_layout(grid, cfg.vision)
    with parallel.use_mesh(mesh):
        fn = jax.jit(lambda p, *a: Qwen2_5_VL(cfg).apply({"params": p}, *a)[0])
        got = fn(tree, ids, pos, am, pixels, layout)
    assert np.abs(np.asarray(got) - want)[am.astype(bool)].max() < 1e-5
