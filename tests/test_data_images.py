"""numpy/PIL image preprocessing against transformers' Qwen2-VL image processor (PIL backend)."""

import dataclasses
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from xr_jax.data import images

# Measured with transformers 5.24.0 (reference qwen2_5_vl.md §5.1).
SMART_RESIZE_TABLE = [
    ((480, 640), 3136, 12845056, (476, 644)),
    ((1080, 1920), 3136, 12845056, (1092, 1932)),
    ((1080, 1920), 3136, 1003520, (728, 1316)),
    ((4000, 3000), 3136, 1003520, (1148, 840)),
    ((4000, 3000), 3136, 12845056, (4004, 2996)),
    ((512, 512), 262144, 262144, (532, 532)),
    ((1024, 768), 262144, 262144, (588, 420)),
    ((100, 150), 3136, 12845056, (112, 140)),
    ((70, 70), 3136, 12845056, (56, 56)),
    ((20, 30), 3136, 12845056, (56, 84)),
]
PIXEL_TOLERANCE = 1e-5  # float32 rounding of (x/255 - mean)/std; measured max 4.8e-7


@pytest.mark.parametrize("size,min_pixels,max_pixels,expected", SMART_RESIZE_TABLE)
def test_smart_resize_table(size, min_pixels, max_pixels, expected):
    assert images.smart_resize(*size, 28, min_pixels, max_pixels) == expected


def test_smart_resize_equals_transformers_on_a_grid_of_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h in [1, 13, 28, 41, 56, 99, 224, 333, 1000, 5000]:
        for w in [1, 14, 27, 70, 250, 800, 4321]:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError, match="aspect ratio"):
                    images.smart_resize(h, w)
                continue
            for lo, hi in [(3136, 12845056), (3136, 1003520), (262144, 262144)]:
                assert images.smart_resize(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


# (height, width, min_pixels, max_pixels): extreme aspect ratios, tiny and huge, min == max.
SIZES = [(100, 150, 3136, 12845056), (5, 5, 3136, 12845056), (10, 1900, 3136, 12845056), (1900, 12, 3136, 12845056),
         (512, 512, 262144, 262144), (1080, 1920, 3136, 1003520), (3000, 2000, 3136, 1003520), (56, 56, 3136, 12845056),
         (57, 83, 3136, 12845056)]


@pytest.mark.parametrize("height,width,min_pixels,max_pixels", SIZES)
def test_pixel_values_match_transformers(height, width, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.default_rng(height * 7 + width)
    picture = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[picture], return_tensors="np")
    pixel_values, grid = images.preprocess_images([picture], images.ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels))
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=PIXEL_TOLERANCE)


def test_merge_block_order():
    """Rows follow the (1, 4, 6) order of reference §3.1: (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) …"""
    h, w = 4 * 14, 6 * 14
    chw = np.zeros((3, h, w), np.float32)
    for r in range(4):
        for c in range(6):
            chw[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 10 * r + c
    rows = images.patchify(chw)
    order = [(int(v) // 10, int(v) % 10) for v in rows[:, 0]]
    assert order[:8] == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert order[12:16] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert np.all(rows == rows[:, :1])  # every pixel of a row comes from that one patch (both time copies)


def test_image_inputs_of_every_kind(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    grey = Image.fromarray(array).convert("L")
    expected, grid = images.preprocess_images([array])
    for src in [str(path), path, buffer.getvalue(), Image.fromarray(array), {"bytes": buffer.getvalue(), "path": None},
                {"bytes": None, "path": str(path)}, Image.fromarray(array).convert("RGBA")]:
        pv, g = images.preprocess_images([src])
        np.testing.assert_array_equal(g, grid)
        np.testing.assert_array_equal(pv, expected)
    pv, _ = images.preprocess_images([grey])  # grey -> RGB: three equal channels
    assert pv.shape == expected.shape
    assert images.image_pad_counts(np.array([[1, 4, 6], [1, 8, 10]])) == [6, 20]


def test_bad_images_name_the_sample(tmp_path):
    with pytest.raises(images.ImageError, match=r"row-7\[image 0\]: unreadable image"):
        images.preprocess_images([b"not an image"], name="row-7")
    with pytest.raises(images.ImageError, match="row-8.*unreadable"):
        images.preprocess_images([str(tmp_path / "missing.png")], name="row-8")
    with pytest.raises(images.ImageError, match="row-9.*aspect ratio"):
        images.preprocess_images([np.zeros((1, 300, 3), np.uint8)], name="row-9")
    with pytest.raises(images.ImageError, match="row-10.*cannot read an image from int"):
        images.preprocess_images([3], name="row-10")
    with pytest.raises(images.ImageError, match="row-11.*uint8"):
        images.preprocess_images([np.zeros((4, 4, 3), np.float32)], name="row-11")
    truncated = io.BytesIO()
    Image.new("RGB", (64, 64)).save(truncated, format="PNG")
    with pytest.raises(images.ImageError, match="row-12: unreadable"):
        images.preprocess_image(truncated.getvalue()[:40], name="row-12")


# (min_pixels, max_pixels): the default (checkpoint preprocessor_config.json), the X-Reasoner-7B card's
# 512x512, and a low cap.
RESOLUTIONS = [(images.DEFAULT_MIN_PIXELS, images.DEFAULT_MAX_PIXELS), (images.MODEL_CARD_PIXELS,) * 2,
               (3136, 200704)]


def test_resolution_settings_set_image_grid_thw_as_transformers(tmp_path):
    """`eval.min_pixels/max_pixels` (through the evaluation generator) and `data.min_pixels/max_pixels`
    (through the training pipeline's image rows) give the grid of transformers' processor at the same bounds,
    and results.json records them."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tests.eval_fakes import ScriptedGenerator, gen, tag_scorer
    from xr_jax import config as config_lib
    from xr_jax.eval import runner as ev
    from xr_jax.data import pipeline
    from xr_jax.data.sources import Example
    from xr_jax.data.tokenizer import load_tokenizer
    from xr_jax.eval.generator import ModelGenerator
    from xr_jax.models.config import tiny_vl_config
    from xr_jax.train.setup import image_config

    tok = load_tokenizer("tiny")
    base = tiny_vl_config()
    model_cfg = tiny_vl_config(text=dataclasses.replace(base.text, vocab_size=tok.vocab_size))
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 1000, 3), dtype=np.uint8))
    grids = []
    for lo, hi in RESOLUTIONS:
        want = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(images=[picture], return_tensors="np")
        want = want["image_grid_thw"].tolist()
        cfg = config_lib.load(None, [f"eval.min_pixels={lo}", f"eval.max_pixels={hi}", f"data.min_pixels={lo}",
                                     f"data.max_pixels={hi}", "train.steps=1"])
        generator = ModelGenerator(model_cfg, None, tok, image_config=cfg.eval.image_config())
        prompt = generator.encode(ev.EvalPrompt("x", "What is shown?", (picture,)))
        assert np.asarray(prompt.grid_thw).tolist() == want, (lo, hi)
        scfg = pipeline.SFTConfig(max_len=8192, pack=False, image=image_config(cfg.data))
        row = pipeline.encode_sft(Example("e", "What is shown?", "<answer>x</answer>", images=(picture,)), tok, scfg)
        assert np.asarray(row["image_grid_thw"]).tolist() == want, (lo, hi)
        grids.append(want[0])
    assert grids == [[1, 50, 72], [1, 30, 42], [1, 26, 38]]  # 700x1000 at 12.8M, 262144 and 200704 pixels

    cfg = ev.EvalSection(benchmarks=("gsm8k",), sources={"gsm8k": {"path": os.path.join(
        os.path.dirname(__file__), "fixtures", "eval", "gsm8k_test.jsonl"), "limit": 1}},
        output_dir=str(tmp_path / "out"), min_pixels=images.MODEL_CARD_PIXELS, max_pixels=images.MODEL_CARD_PIXELS)
    ev.evaluate(cfg, ScriptedGenerator(respond=lambda p, b: gen("18")), tag_scorer, progress=False)
    info = json.load(open(tmp_path / "out" / "results.json"))["info"]
    assert (info["min_pixels"], info["max_pixels"]) == (262144, 262144)
    mismatched = ModelGenerator(model_cfg, None, tok)  # default resolution, but the config says 262144
    with pytest.raises(ValueError, match="record the wrong resolution"):
        ev.evaluate(cfg, mismatched, tag_scorer, progress=False)
    with pytest.raises(config_lib.ConfigError, match="min_pixels <= max_pixels"):
        config_lib.load(None, ["data.min_pixels=1000", "data.max_pixels=999", "train.steps=1"])
    with pytest.raises(ValueError, match="eval.min_pixels"):
        dataclasses.replace(cfg, max_pixels=0).validate()
