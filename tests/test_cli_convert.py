"""`xr-jax convert` both ways: HF -> xr_jax checkpoint -> HF is bit-exact; bad input exits 2 with a message."""

import os

import numpy as np
from safetensors.numpy import load_file

from tests import hf_reference as ref
from xr_jax import parallel
from xr_jax.cli import commands as cli
from xr_jax.checkpoints import convert


def test_convert_round_trip_and_sharded_restore(tmp_path, capsys):
    src, ck, out = (str(tmp_path / n) for n in ("hf", "ckpt", "back"))
    ref.tiny_vl(seed=4).save_pretrained(src)
    assert cli.main(["convert", "--from-hf", src, "--to", ck]) == 0
    assert convert.is_model_checkpoint(ck)
    assert cli.main(["convert", "--from", ck, "--to-hf", out]) == 0
    a, b = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    cfg, params = convert.load_model(ck, mesh=parallel.make_mesh((2, 2, 2)))
    emb = params["model"]["embed_tokens"]["embedding"]
    assert not emb.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(emb), a["model.embed_tokens.weight"])


def test_convert_user_errors(tmp_path, capsys):
    assert cli.main(["convert", "--from-hf", str(tmp_path), "--to", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["convert", "--from", str(tmp_path), "--to-hf", str(tmp_path / "y")]) == 2
    assert "not an xr_jax model checkpoint" in capsys.readouterr().err


def test_convert_carries_tokenizer_and_config_both_ways(tmp_path, capsys):
    """--from-hf keeps the tokenizer, processor settings and config.json in assets/; --to-hf writes them
    back (config dicts equal, files world-readable); --tokenizer puts another one in."""
    import json

    from tests.tiny_checkpoint import write_tiny_checkpoint
    from xr_jax.data.tokenizer import load_tokenizer

    src, ck, out, out2 = (str(tmp_path / n) for n in ("hf", "ckpt", "back", "back2"))
    write_tiny_checkpoint(src)
    assert cli.main(["convert", "--from-hf", src, "--to", ck]) == 0
    assets = set(os.listdir(os.path.join(ck, convert.ASSETS_DIR)))
    assert {"tokenizer.json", "config.json", "generation_config.json", "preprocessor_config.json"} <= assets
    assert cli.main(["convert", "--from", ck, "--to-hf", out]) == 0
    assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(os.path.join(src, "config.json")))
    assert all(os.stat(os.path.join(out, f)).st_mode & 0o044 == 0o044 for f in os.listdir(out))
    assert load_tokenizer(out).encode("ab<|im_end|>") == [97, 98, 258]
    assert cli.main(["convert", "--from", ck, "--to-hf", out2, "--tokenizer", "qwen2.5"]) == 0
    assert load_tokenizer(out2).vocab_size == 151665  # the override's files, not the checkpoint's
