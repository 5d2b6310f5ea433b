"""What a run writes and reads back.

  training.py   Orbax checkpoints of a training run (state, data position, config), resume, corrupt steps aside
  integrity.py  the directory's lock, the config fingerprint (what may change on resume), SHA-256 checksums
  convert.py    xr_jax model checkpoints (params + model config + assets) <-> Hugging Face directories
"""
