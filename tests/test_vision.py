"""Vision tower parity with transformers' Qwen2.5-VL (fp32 eager, tiny random config) + HF tree conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from tests import hf_reference as ref
from xr_jax.models import hf_tree, naming, vision
from xr_jax.models.config import VisionConfig

CFG = VisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=(1,))
BUDGET = dict(num_patches=512, num_windows=12)  # one compiled shape for all padded-buffer checks


@pytest.fixture(scope="module")
def hf_model():
    vision_cfg = dict(depth=CFG.depth, hidden_size=CFG.hidden_size, intermediate_size=CFG.intermediate_size,
                      num_heads=CFG.num_heads, out_hidden_size=CFG.out_hidden_size, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=list(CFG.fullatt_block_indexes), tokens_per_second=2)
    text_cfg = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rms_norm_eps=1e-6, rope_theta=1e6,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, bos_token_id=0, eos_token_id=1)
    config = Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_id=60,
                              video_token_id=61, vision_start_token_id=62, vision_end_token_id=63)
    config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # HF init leaves biases 0 and norms 1; randomise everything so every mapping is exercised.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if torch.all(p == 1) else 0.0) + 0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
    return model


@pytest.fixture(scope="module")
def params(hf_model):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    return jax.tree.map(jnp.asarray, ref.vision_params_from_hf(sd))


def hf_merged(hf_model, pixels, grid):
    with torch.no_grad():
        out = hf_model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grid))
    return out.pooler_output.numpy()


def pixels_for(grid, num_patches=None, seed=0):
    n = int(np.prod(np.asarray(grid), axis=1).sum())
    pv = np.zeros((num_patches or n, CFG.patch_dim), np.float32)
    pv[:n] = np.random.RandomState(seed).randn(n, CFG.patch_dim)
    return pv, n


_towers = {}


def run_tower(params, pv, layout, dtype=jnp.float32, **kw):
    """One jitted function per tower variant, shared across tests (compile once per shape)."""
    key = (jnp.dtype(dtype).name, tuple(sorted(kw.items())))
    if key not in _towers:
        tower = vision.VisionTower(CFG, dtype=dtype, **kw)
        _towers[key] = jax.jit(lambda p, x, lay: tower.apply({"params": p}, x, lay))
    return np.asarray(_towers[key](params, jnp.asarray(pv), layout).astype(jnp.float32))


# ---------------------------------------------------------------------------------------------- layout

WINDOW_GRIDS = [
    [(1, 8, 12)], [(1, 10, 10)], [(1, 4, 4)], [(1, 16, 16)], [(1, 6, 22)], [(1, 2, 2)],
    [(1, 8, 12), (1, 4, 4)], [(2, 8, 12)], [(2, 6, 10), (1, 10, 10), (1, 2, 2), (1, 16, 18)],
]


@pytest.mark.parametrize("grid", WINDOW_GRIDS, ids=str)
def test_window_index_and_seqlens_match_transformers(grid):
    g = torch.tensor(grid)
    want_index, want_cu_win = get_vision_window_index(g, spatial_merge_size=2, window_size=112, patch_size=14)
    index, cu_win = ref.hf_window_index(np.array(grid), CFG)
    np.testing.assert_array_equal(index, want_index.numpy())
    np.testing.assert_array_equal(cu_win, want_cu_win.numpy())
    cu = ref.hf_cu_seqlens(np.array(grid), CFG)
    np.testing.assert_array_equal(cu, get_vision_cu_seqlens(g).numpy())

    # The layout encodes exactly these windows/segments/positions.
    lay = vision.vision_layout(np.array(grid), CFG)
    n = int(cu[-1])
    slots = lay.window_patches[lay.window_valid]
    np.testing.assert_array_equal(slots, (index[:, None] * 4 + np.arange(4)).reshape(-1))
    np.testing.assert_array_equal(np.cumsum(lay.window_valid.sum(1)), cu_win[1:])
    np.testing.assert_array_equal(lay.window_patches.reshape(-1)[lay.patch_slot], np.arange(n))
    np.testing.assert_array_equal(np.flatnonzero(np.diff(lay.segment_ids)) + 1, cu[1:-1])
    np.testing.assert_array_equal(lay.pos_hw, get_vision_position_ids(g, 2).numpy())
    assert vision.window_count(np.array(grid), CFG) == len(cu_win) - 1


def test_window_index_reference_examples():
    """The measured examples of reference §3.4."""
    index, cu_win = ref.hf_window_index(np.array([[1, 8, 12]]), CFG)
    assert index.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22, 23]
    assert cu_win.tolist() == [0, 64, 96]
    assert ref.hf_cu_seqlens(np.array([[1, 8, 12]]), CFG).tolist() == [0, 96]
    index, cu_win = ref.hf_window_index(np.array([[1, 10, 10]]), CFG)
    assert index.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 4, 9, 14, 19, 20, 21, 22, 23,
                              24]
    assert cu_win.tolist() == [0, 64, 80, 96, 100]
    index, cu_win = ref.hf_window_index(np.array([[1, 8, 12], [1, 4, 4]]), CFG)
    assert index[24:].tolist() == [24, 25, 26, 27]
    assert cu_win.tolist() == [0, 64, 96, 112]
    assert ref.hf_cu_seqlens(np.array([[1, 8, 12], [1, 4, 4]]), CFG).tolist() == [0, 96, 112]


def test_padded_layout_shapes_and_padding():
    lay = vision.vision_layout(np.array([[1, 8, 12]]), CFG, **BUDGET)
    assert lay.pos_hw.shape == (512, 2) and lay.window_patches.shape == (12, 64)
    assert (lay.segment_ids[96:] == vision.PADDING_SEGMENT).all() and (lay.segment_ids[:96] == 0).all()
    assert lay.window_valid.sum() == 96 and not lay.window_valid[2:].any()


@pytest.mark.parametrize("grid, kwargs, match", [
    ([(1, 5, 4)], {}, r"grid_thw\[0\] = \(1, 5, 4\)"),
    ([(1, 4)], {}, "shape"),
    ([(1, 8, 12)], {"num_patches": 64}, "num_patches 64"),
    ([(1, 8, 12)], {"num_patches": 98}, "multiple of 4"),
    ([(1, 8, 12)], {"num_windows": 1}, "num_windows 1 is less than the 2 windows"),
])
def test_layout_rejects_bad_input(grid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        vision.vision_layout(np.array(grid), CFG, **kwargs)


# ---------------------------------------------------------------------------------------------- tower

def test_param_tree_matches_hf_and_has_logical_axes(hf_model, params):
    pv, _ = pixels_for([(1, 4, 4)])
    lay = vision.vision_layout(np.array([[1, 4, 4]]), CFG)
    boxed = jax.eval_shape(vision.VisionTower(CFG).init, jax.random.key(0), pv, lay)
    init = nn.unbox(boxed["params"])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), init) == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    axes = jax.tree.map(tuple, nn.get_partition_spec(boxed)["params"], is_leaf=lambda x: isinstance(x, P))
    assert axes["blocks"]["attn"]["qkv"]["kernel"] == ("vision_layers", "vision_embed", "vision_qkv")
    assert axes["blocks"]["attn"]["qkv"]["bias"] == ("vision_layers", "vision_qkv")
    assert axes["blocks"]["mlp"]["down_proj"]["kernel"] == ("vision_layers", "vision_mlp", "vision_embed")
    assert axes["blocks"]["norm1"]["scale"] == ("vision_layers", "vision_embed")
    assert axes["patch_embed"]["proj"]["kernel"] == ("vision_patch", "vision_embed")
    assert axes["merger"]["mlp_2"]["kernel"] == ("vision_merge_mlp", "embed")
    # The init tree maps 1:1 onto transformers' visual.* tensors, shapes included.
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), init)
    hf = hf_tree.tree_to_hf({"visual": zeros}, patch_shape=(3, 2, 14, 14))
    want = {naming.canonical_hf_name(k): tuple(v.shape) for k, v in hf_model.state_dict().items() if ".visual." in k}
    assert {k: v.shape for k, v in hf.items()} == want


@pytest.mark.parametrize("grid", [
    [(1, 8, 12)],                      # one image, two windows (64 + 32 patches)
    [(1, 10, 10), (1, 6, 22)],         # two sizes; both need window padding (5x5 and 3x11 merged)
    [(2, 8, 8), (1, 2, 2)],            # a 2-frame video + a one-token image
], ids=str)
def test_tower_matches_transformers_fp32(hf_model, params, grid):
    grid = np.array(grid)
    pv, n = pixels_for(grid)
    want = hf_merged(hf_model, pv, grid)
    exact = run_tower(params, pv, vision.vision_layout(grid, CFG))
    err = np.abs(exact - want).max()
    assert exact.shape == want.shape and err < 1e-5, err

    # Same images in the shared padded buffer: identical real rows, finite padding rows.
    pv_pad, _ = pixels_for(grid, BUDGET["num_patches"])
    padded = run_tower(params, pv_pad, vision.vision_layout(grid, CFG, **BUDGET))
    assert padded.shape == (BUDGET["num_patches"] // 4, CFG.out_hidden_size)
    print(f"fp32 {grid.tolist()}: exact {err:.2e}, padded {np.abs(padded[: n // 4] - want).max():.2e}, "
          f"padded-exact {np.abs(padded[: n // 4] - exact).max():.2e}, max|ref| {np.abs(want).max():.2f}")
    assert np.abs(padded[: n // 4] - want).max() < 1e-5
    np.testing.assert_allclose(padded[: n // 4], exact, rtol=0, atol=5e-6)  # reduction order only
    assert np.isfinite(padded).all()


def test_unrolled_and_remat_variants_agree(params):
    grid = np.array([[1, 10, 10], [1, 6, 22]])
    pv, _ = pixels_for(grid, BUDGET["num_patches"])
    lay = vision.vision_layout(grid, CFG, **BUDGET)
    base = run_tower(params, pv, lay)
    for kw in ({"scan_layers": False}, {"remat": "full"}, {"remat": "dots"}):
        np.testing.assert_allclose(run_tower(params, pv, lay, **kw), base, rtol=0, atol=5e-6, err_msg=str(kw))


def test_remat_gradients_match_and_padding_stays_finite(params):
    grid = np.array([[1, 10, 10], [1, 6, 22]])
    pv, n = pixels_for(grid, BUDGET["num_patches"])
    lay = vision.vision_layout(grid, CFG, **BUDGET)

    def grads(remat):
        tower = vision.VisionTower(CFG, remat=remat)
        loss = lambda p: jnp.sum(tower.apply({"params": p}, pv, lay)[: n // 4] ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    plain, rematted = grads("none"), grads("full")
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), plain, rematted)


def test_tower_bf16_close_to_fp32_reference(hf_model, params):
    grid = np.array([[1, 10, 10], [1, 6, 22]])
    pv, n = pixels_for(grid, BUDGET["num_patches"])
    want = hf_merged(hf_model, pv[:n], grid)
    got = run_tower(params, pv, vision.vision_layout(grid, CFG, **BUDGET), dtype=jnp.bfloat16)[: n // 4]
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"bf16 normalised max err {err:.2e}")
    # bf16 keeps 8 mantissa bits (eps 7.8e-3); 4 blocks + merger accumulate a few eps.
    assert err < 3e-2, err


def test_jit_compiles_once_per_buffer_size(params):
    traces = []
    tower = vision.VisionTower(CFG)

    @jax.jit
    def run(p, x, lay):
        traces.append(1)
        return tower.apply({"params": p}, x, lay)

    for grid in ([(1, 8, 12)], [(1, 16, 16), (1, 2, 2)], [(2, 6, 10)]):
        pv, _ = pixels_for(grid, BUDGET["num_patches"])
        run(params, pv, vision.vision_layout(np.array(grid), CFG, **BUDGET))
    assert len(traces) == 1 and run._cache_size() == 1


def test_params_from_hf_rejects_missing_tower():
    with pytest.raises(ValueError, match="no tensor named visual"):
        ref.vision_params_from_hf({"model.norm.weight": np.ones(3)})


# ---------------------------------------------------------------------------------------------- hf_tree

def test_tree_round_trip_is_bit_exact_for_both_naming_schemes(hf_model):
    v5 = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.visual.") for k in v5) and any(k.startswith("model.language_model.") for k in v5)
    legacy = {naming.canonical_hf_name(k): v for k, v in v5.items()}
    tree = hf_tree.tree_from_hf(v5)
    assert tree["visual"]["blocks"]["attn"]["qkv"]["kernel"].shape == (CFG.depth, 32, 96)
    assert tree["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == 2
    back = hf_tree.tree_to_hf(tree, patch_shape=(3, 2, 14, 14))
    assert set(back) == set(legacy)
    for name, w in legacy.items():
        assert back[name].dtype == w.dtype and np.array_equal(back[name], w), name
    jax.tree.map(np.testing.assert_array_equal, hf_tree.tree_from_hf(legacy), tree)


def test_tree_from_hf_errors_name_the_tensor():
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"layers \[1\] .* missing"):
        hf_tree.tree_from_hf({"model.layers.0.mlp.up_proj.weight": w, "model.layers.2.mlp.up_proj.weight": w})
    with pytest.raises(ValueError, match="given twice"):
        hf_tree.tree_from_hf({"visual.merger.ln_q.weight": w[0], "model.visual.merger.ln_q.weight": w[0]})
    with pytest.raises(ValueError, match="in the same stack"):
        hf_tree.tree_from_hf({"model.layers.0.mlp.up_proj.weight": w, "model.layers.1.mlp.up_proj.weight": w,
                              "model.layers.0.mlp.down_proj.weight": w})
    with pytest.raises(ValueError, match="patch_shape"):
        hf_tree.tree_to_hf({"visual": {"patch_embed": {"proj": {"kernel": w}}}})
