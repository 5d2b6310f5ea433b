"""What a run writes and reads back.

  training.py  Orbax checkpoints of a training run (state, data position, config), lock, checksums, resume
  convert.py   xr_jax model checkpoints (params + model config + assets) <-> Hugging Face directories
"""
