"""Typed model configuration for Qwen2 / Qwen2.5 / Qwen2.5-VL.

Architecture fields mirror the Hugging Face `config.json` (see `xr_jax.models.hf` for reading
and writing it); runtime fields (dtypes, scan, remat, attention kernel) are xr_jax choices that
do not change the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

# The runtime choices; `xr_jax.config` checks a run's values against these when it loads the config.
DType = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "full", "dots"]
Attention = Literal["auto", "einsum", "cudnn", "pallas_gpu", "splash"]


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 decoder. `mrope_section` None means plain 1-D RoPE (text-only Qwen2/Qwen2.5)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: Optional[tuple[int, ...]] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151645

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text.hidden_size {self.hidden_size} is not divisible by text.num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"text.num_heads {self.num_heads} is not divisible by text.num_kv_heads {self.num_kv_heads}"
            )
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"text.mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}"
            )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower (values of the 7B/3B checkpoints by default)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # hard-coded in transformers' vision modules
    tokens_per_second: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (112 / 14 / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(
                f"vision.hidden_size/num_heads = {self.hidden_size}/{self.num_heads} must give a head_dim "
                "divisible by 4 (axial 2-D rotary)"
            )
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(
                f"vision.window_size {self.window_size} must be a multiple of patch_size*spatial_merge_size "
                f"= {self.patch_size * self.spatial_merge_size}"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Qwen2.5-VL model (vision set) or a text-only Qwen2/Qwen2.5 model (vision None).

    Runtime fields:
      dtype: compute dtype of activations ("float32" or "bfloat16").
      param_dtype: dtype params are created/loaded in (fp32 master weights by default).
      scan_layers: run decoder/vision layers under `nn.scan` (stacked params) — faster compiles.
      remat: "none", "full" (recompute each layer) or "dots" (save matmul outputs only).
      attention: "auto" (cuDNN flash attention on Hopper+ GPUs, Triton flash attention before, Splash on
        TPU, einsum on CPU; decode with the backend's Pallas kernel), "einsum", "cudnn", "pallas_gpu" (the
        Triton kernel on any GPU) or "splash" (`models.attention.resolve_attention`).
    """

    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: Optional[VisionConfig] = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    scan_layers: bool = True
    remat: Remat = "none"
    attention: Attention = "auto"

    def validate(self) -> None:
        self.text.validate()
        if self.vision is not None:
            self.vision.validate()
            if self.vision.out_hidden_size != self.text.hidden_size:
                raise ValueError(
                    f"vision.out_hidden_size {self.vision.out_hidden_size} must equal text.hidden_size "
                    f"{self.text.hidden_size}"
                )
            if self.text.mrope_section is None:
                raise ValueError("a vision model needs text.mrope_section (M-RoPE)")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def tiny_vl_config(**changes) -> ModelConfig:
    """The tiny random Qwen2.5-VL used by tests and benches (`changes` override any field)."""
    cfg = ModelConfig(
        text=TextConfig(
            vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(2, 3, 3),
            tie_word_embeddings=False, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        ),
        vision=VisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=(1,),
        ),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63,
    )
    return cfg.replace(**changes)


def config_to_dict(cfg: ModelConfig) -> dict:
    """JSON-ready dict (saved next to every xr_jax checkpoint)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    """Inverse of `config_to_dict`; unknown keys fail, naming the key."""

    def build(cls, values):
        if values is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown model config key(s) for {cls.__name__}: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    d = dict(d)
    text = build(TextConfig, d.pop("text", {}))
    vision = build(VisionConfig, d.pop("vision", None))
    cfg = build(ModelConfig, d).replace(text=text, vision=vision)
    cfg.validate()
    return cfg
