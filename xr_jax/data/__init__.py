"""What the model reads: tokenizers, chat/prompt templates, image preprocessing, dataset readers, grain pipelines.

  tokenizer.py  load_tokenizer("qwen2.5" | "tiny" | checkpoint dir): encode, decode, apply_chat_template,
                special ids, vocab_size, token_bytes
  templates.py  the Qwen2.5-VL chat template, image-pad expansion, the X-Reasoner prompt templates
  images.py     smart_resize, resize/normalise/patchify -> pixel_values + image_grid_thw (numpy/PIL)
  files.py      read_rows(path or hub id): the JSON / JSONL / parquet / arrow / csv reader sources and benchmarks share
  sources.py    load_source(path, "openthoughts" | "orz_math" | "orz_eval" | "gsm8k") -> Example per row
  synthetic.py  the built-in multi-step arithmetic task (text or rendered images)
  pipeline.py   sft_pipeline / rl_pipeline (batch formats in its docstring)
"""
