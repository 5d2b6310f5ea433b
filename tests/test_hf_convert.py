"""HF checkpoint <-> xr_jax: bit-exact round trips, transformers reloads the export, clear errors."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from tests import hf_reference as ref
from xr_jax import parallel
from xr_jax.models import hf
from xr_jax.models.qwen2_5_vl import Qwen2_5_VL


def _all_tensors(path):
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(path, f)))
    return out


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    model = ref.tiny_text(seed=0, tie=True)
    model.save_pretrained(path)
    return path, model


def _text_logits(cfg, params, ids):
    am = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return np.asarray(Qwen2_5_VL(cfg).apply({"params": params}, ids, pos, am)[0])


def test_qwen2_text_load_matches_and_round_trips(text_ckpt, tmp_path):
    path, model = text_ckpt
    cfg, params = hf.load_hf(path)
    assert cfg.vision is None and cfg.text.tie_word_embeddings and cfg.text.mrope_section is None
    ids = np.random.RandomState(0).randint(0, 64, size=(2, 11))
    want = ref.hf_logits(model, ids, np.ones_like(ids))
    np.testing.assert_allclose(_text_logits(cfg, params, ids), want, atol=1e-5)
    out = str(tmp_path / "export")
    hf.save_hf(params, cfg, out)
    src, dst = _all_tensors(path), _all_tensors(out)
    assert set(dst) == set(src) - {"lm_head.weight"}  # tied: lm_head not written
    for k in dst:
        assert dst[k].dtype == src[k].dtype and np.array_equal(dst[k], src[k]), k
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_array_equal(ref.hf_logits(reloaded, ids, np.ones_like(ids)), want)


def test_sharded_index_and_direct_to_mesh_load(text_ckpt, tmp_path):
    path, _ = text_ckpt
    cfg, params = hf.load_hf(path)
    out = str(tmp_path / "sharded")
    hf.save_hf(params, cfg, out, max_shard_bytes=20_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    mesh = parallel.make_mesh((2, 2, 2))
    cfg2, sharded = hf.load_hf(out, shardings=parallel.path_shardings(cfg, mesh))
    emb = sharded["model"]["embed_tokens"]["embedding"]
    assert isinstance(emb, jax.Array) and not emb.sharding.is_fully_replicated
    q = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 64, 64) and len(q.addressable_shards) == 8
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_load(text_ckpt):
    path, _ = text_ckpt
    _, params = hf.load_hf(path, dtype="bfloat16")
    leaf = params["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert str(leaf.dtype) == "bfloat16"


def _broken_copy(src, dst, edit):
    os.makedirs(dst)
    for f in os.listdir(src):
        if f != "model.safetensors":
            with open(os.path.join(src, f), "rb") as i, open(os.path.join(dst, f), "wb") as o:
                o.write(i.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_errors_name_the_problem(text_ckpt, tmp_path):
    path, _ = text_ckpt
    with pytest.raises(hf.ModelCheckpointError, match="no config.json"):
        hf.load_hf(str(tmp_path))
    bad_type = tmp_path / "llama"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(hf.ModelCheckpointError, match="model_type 'llama'"):
        hf.load_hf(str(bad_type))
    missing = _broken_copy(path, str(tmp_path / "missing"), lambda t: t.pop("model.norm.weight"))
    with pytest.raises(hf.ModelCheckpointError, match="missing tensors for: model/norm/scale"):
        hf.load_hf(missing)
    extra = _broken_copy(path, str(tmp_path / "extra"), lambda t: t.update({"model.extra.weight": np.ones((2, 2), np.float32)}))
    with pytest.raises(hf.ModelCheckpointError, match="unexpected tensors: model.extra.weight"):
        hf.load_hf(extra)

    def shrink(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.ones((100, 64), np.float32)
        t["model.layers.0.mlp.up_proj.weight"] = np.ones((100, 64), np.float32)

    wrong = _broken_copy(path, str(tmp_path / "shape"), shrink)
    with pytest.raises(hf.ModelCheckpointError, match=r"model.layers.0.mlp.up_proj.weight has shape \(2, 64, 100\).*needs \(2, 64, 128\)"):
        hf.load_hf(wrong)


def test_config_round_trips_keep_every_key(tmp_path):
    """A text model keeps its image ids and M-RoPE sections through HF (268 stays 268), and an export's
    config.json is the source's dict with only what changed written, where the source keeps it."""
    from xr_jax.models import presets

    cfg = presets.preset("tiny").replace(image_token_id=268, video_token_id=269, vision_start_token_id=265,
                                         vision_end_token_id=266)
    assert cfg.vision is None and cfg.text.mrope_section is not None
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    ref.tiny_vl(seed=1).save_pretrained(str(tmp_path))
    source = json.load(open(tmp_path / "config.json"))
    vl = hf.config_from_hf(source)
    assert hf.hf_config(vl, source, source.get("dtype", "float32")) == source
    changed = hf.hf_config(vl.replace(text=vl.text.__class__(**{**vl.text.__dict__, "vocab_size": 96})), source,
                           "bfloat16")
    assert changed["text_config"]["vocab_size"] == 96 and "vocab_size" not in changed
    rest = lambda d: {k: v for k, v in d.items() if k not in ("text_config", "dtype")}  # noqa: E731
    assert changed["dtype"] == "bfloat16" and rest(changed) == rest(source)
