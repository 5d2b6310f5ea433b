"""Named model shapes for random-init runs, tests and benches (`model.preset` in a run config).

Real runs load a checkpoint (`model.path`); these shapes follow the published configs so that FLOPs,
memory and timings measured on them are those of the real models.
"""

from __future__ import annotations

from xr_jax.models.config import ModelConfig, TextConfig, VisionConfig, tiny_vl_config

_QWEN25_0_5B = TextConfig(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
    rope_theta=1e6, mrope_section=None, tie_word_embeddings=True, max_position_embeddings=32768,
)
_QWEN25_1_5B = TextConfig(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
    rope_theta=1e6, mrope_section=None, tie_word_embeddings=True, max_position_embeddings=32768,
)
_QWEN25_3B = TextConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
    rope_theta=1e6, mrope_section=None, tie_word_embeddings=True, max_position_embeddings=32768,
)
_QWEN25_VL_3B = TextConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
    mrope_section=(16, 24, 24), tie_word_embeddings=True,
)

# Qwen2.5-7B(-Instruct), text only: the 7B decoder shapes (TextConfig's defaults) with plain 1-D RoPE.
_QWEN25_7B = TextConfig(mrope_section=None, max_position_embeddings=32768)

PRESETS = {
    # text-only tiny Qwen2.5 (the shape of tests/hf_reference.py)
    "tiny": lambda: tiny_vl_config(vision=None),
    "tiny-vl": tiny_vl_config,
    # the built-in demo's VLM (`xr-jax demo`): tiny-vl at twice the width, with RoPE base 1e4 (at head_dim 32 the
    # 1e6 base leaves almost no rotation between tokens a few positions apart)
    "demo-vl": lambda: tiny_vl_config(
        text=TextConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=1e4, mrope_section=(4, 6, 6), tie_word_embeddings=False,
                        max_position_embeddings=512, bos_token_id=0, eos_token_id=1),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            fullatt_block_indexes=(1,))),
    # a CPU-benchable text model: big enough that matmuls dominate, small enough for 2 cores
    "small": lambda: tiny_vl_config(vision=None).replace(text=TextConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=2,
        mrope_section=(4, 6, 6), max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
    )),
    "qwen2.5-0.5b": lambda: ModelConfig(text=_QWEN25_0_5B, vision=None),
    "qwen2.5-1.5b": lambda: ModelConfig(text=_QWEN25_1_5B, vision=None),
    "qwen2.5-3b": lambda: ModelConfig(text=_QWEN25_3B, vision=None),
    "qwen2.5-7b": lambda: ModelConfig(text=_QWEN25_7B, vision=None),
    "qwen2.5-vl-3b": lambda: ModelConfig(
        text=_QWEN25_VL_3B, vision=VisionConfig(out_hidden_size=2048)),
    "qwen2.5-vl-7b": ModelConfig,
}


def preset(name: str, **runtime) -> ModelConfig:
    """The named shape with runtime fields (dtype, scan_layers, ...) replaced."""
    if name not in PRESETS:
        from xr_jax.config import ConfigError  # lazily: the config module imports far more than presets need

        raise ConfigError(f"unknown model preset {name!r} (model.preset); known: {', '.join(PRESETS)}")
    cfg = PRESETS[name]().replace(**runtime)
    cfg.validate()
    return cfg
