"""Benchmarks of xr_jax beside transformers + PyTorch on the same machine and shapes.

`python -m bench` (bench/__main__.py) runs the suite and prints one table; `bench/gpu.sh` is the script
for a lent GPU. The pieces are importable: `bench.machine` (device, ceilings), `bench.train_step` (SFT
step), `bench.sampler` (prefill/decode), `bench.grpo` (rollout/update). bench/data_throughput.py
(the data loader, needs grain) stands apart.
"""
