"""Qwen2.5-VL image preprocessing in numpy/PIL: the transformers `Qwen2VLImageProcessorPil` pipeline.

image -> RGB -> `smart_resize` size -> PIL bicubic resize -> x/255 -> CLIP normalise (float32) -> patchify
-> `pixel_values` [t*h*w, 3*2*14*14] rows in merge-block order + `image_grid_thw` (t, h, w).
Rows are merge-block-major, as transformers' processor emits them and the patch merger expects: the (h/2)x(w/2)
blocks row-major, and the 2x2 patches of a block row-major, so 4 consecutive rows form one merged token; a still image is repeated
along time (T=2). tests/test_data_images.py checks values and grids against transformers.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from xr_jax.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


class ImageError(UserError, ValueError):
    """An image that cannot be read or used; the message names the sample."""


# The resolution bounds (pixels of the resized image). [xr_jax default] the released Qwen2.5-VL checkpoints'
# `preprocessor_config.json` (not the processor class defaults, 3136 / 1003520): what transformers and vLLM use
# when nothing is set. The paper does not state its resolution. The X-Reasoner-7B model card's example sets
# min = max = 262144 (512x512). Configurable: `eval.min_pixels` / `max_pixels`
# and `data.min_pixels` / `max_pixels`.
DEFAULT_MIN_PIXELS = 4 * 28 * 28  # 3136
DEFAULT_MAX_PIXELS = 16384 * 28 * 28  # 12845056
MODEL_CARD_PIXELS = 512 * 512  # 262144, the X-Reasoner-7B card's min_pixels = max_pixels


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """Defaults are the released checkpoints' `preprocessor_config.json` (not the class defaults)."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        if not (isinstance(self.min_pixels, int) and isinstance(self.max_pixels, int)
                and 0 < self.min_pixels <= self.max_pixels):
            raise ValueError(f"image pixel bounds need 0 < min_pixels <= max_pixels, got min_pixels "
                             f"{self.min_pixels!r}, max_pixels {self.max_pixels!r}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    def preprocessor_config(self) -> dict:
        """These settings as a Hugging Face `preprocessor_config.json` (Qwen2VLImageProcessor, as the released
        checkpoints carry it): what an export of a model without one writes, so that AutoProcessor loads."""
        return {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
        }


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056
) -> tuple[int, int]:
    """Size divisible by `factor`, area within [min_pixels, max_pixels], aspect ratio kept as far as possible.

    `round` is Python's half-to-even, as in transformers (70x70 -> 56x56). The min-pixels branch rounds up
    and may overshoot max_pixels when min == max (512x512 at 262144 -> 532x532), also as in transformers.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
            f"{max(height, width) / min(height, width)} for {height}x{width}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(src: Any, name: str = "image") -> Image.Image:
    """An RGB PIL image from a path, bytes, a PIL image, an HWC uint8 array, or a `datasets` Image cell
    (`{"bytes": ..., "path": ...}`). Errors name the sample (`name`)."""
    try:
        if isinstance(src, Image.Image):
            image = src
        elif isinstance(src, dict):
            if src.get("bytes") is not None:
                image = Image.open(io.BytesIO(src["bytes"]))
            elif src.get("path"):
                image = Image.open(src["path"])
            else:
                raise ImageError(f"{name}: image dict has neither 'bytes' nor 'path' (keys: {sorted(src)})")
        elif isinstance(src, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(src)))
        elif isinstance(src, (str, os.PathLike)):
            image = Image.open(src)
        elif isinstance(src, np.ndarray):
            if src.dtype != np.uint8 or src.ndim not in (2, 3):
                raise ImageError(f"{name}: an array image must be uint8 HW or HWC, got {src.dtype} {src.shape}")
            image = Image.fromarray(src)
        else:
            raise ImageError(f"{name}: cannot read an image from {type(src).__name__}")
        image.load()
        image = image.convert("RGB")
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for unreadable or truncated files
        raise ImageError(f"{name}: unreadable image ({type(e).__name__}: {e})") from e
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name}: degenerate image of size {image.width}x{image.height}")
    return image


def patchify(image_chw: np.ndarray, config: ImageConfig = ImageConfig()) -> np.ndarray:
    """[C, H, W] -> [H/14 * W/14, C*T*14*14] in merge-block order (a still image repeated T times)."""
    c, h, w = image_chw.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    gh, gw = h // p, w // p
    x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)


def preprocess_image(src: Any, config: ImageConfig = ImageConfig(), name: str = "image") -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values [h*w, 1176] float32, grid (1, h, w) in 14-px patches)."""
    image = load_image(src, name)
    try:
        height, width = smart_resize(image.height, image.width, config.factor, config.min_pixels, config.max_pixels)
    except ValueError as e:
        raise ImageError(f"{name}: {e}") from e
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
    pixel_values = patchify(x.transpose(2, 0, 1), config)
    return pixel_values, (1, height // config.patch_size, width // config.patch_size)


def preprocess_images(
    sources: Sequence[Any], config: ImageConfig = ImageConfig(), name: str = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values [sum t*h*w, 1176] float32, image_grid_thw [n, 3] int32), in order."""
    if not sources:
        return np.zeros((0, config.patch_dim), np.float32), np.zeros((0, 3), np.int32)
    out = [preprocess_image(s, config, f"{name}[image {i}]") for i, s in enumerate(sources)]
    return np.concatenate([o[0] for o in out]), np.asarray([o[1] for o in out], np.int32)


def image_pad_counts(image_grid_thw: np.ndarray, merge_size: int = 2) -> list[int]:
    """`<|image_pad|>` tokens per image: t*h*w / merge_size**2."""
    return [int(t * h * w) // merge_size**2 for t, h, w in np.asarray(image_grid_thw).reshape(-1, 3)]
