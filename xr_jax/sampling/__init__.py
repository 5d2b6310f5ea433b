"""Generation: the jitted KV-cache sampler with forced exit, the byte-level stop matcher, chat sampling.

  sampler.py     Sampler: bucketed prefill, token loop, forced exit at a static max length, group sampling
  byte_match.py  find a byte string (`</think>`) in generated text one token at a time
  chat.py        `xr-jax sample`: chat messages + images -> prompts -> sampler -> records
"""
