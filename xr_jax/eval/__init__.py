"""Evaluation on the paper's benchmarks.

  benchmarks.py  the benchmarks by name: where their data lives and how a row becomes an item
  runner.py      the protocol: prompts, generation, scoring, metrics (avg@k, maj@k, pass@k), resumable output
  generator.py   the generation seam (EvalPrompt -> Generation) and the real generator: chat template + images
                 -> the sampler with forced exit
"""
