"""numpy/PIL image preprocessing against transformers' Qwen2-VL image processor (PIL backend)."""

import io

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
