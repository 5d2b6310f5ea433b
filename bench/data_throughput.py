"""Examples/s and tokens/s of the SFT data pipeline (read, template, tokenize, pack, batch) on GSM8K.

    python -m bench.data_throughput                              # the 50-row test fixture, repeated
    python -m bench.data_throughput --data PATH/gsm8k/train.jsonl --threads 1 2

Prints one line per setting and a markdown table for docs/benchmarks.md. The question it answers: can one
host's loader feed the trainer? (the paper's SFT step eats 128 x 4096 tokens).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

from xr_jax.data import pipeline as P
from xr_jax.data.sources import load_source
from xr_jax.data.tokenizer import load_tokenizer

from bench.machine import cpu_model

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "gsm8k_test_50.jsonl"


def measure(source, tokenizer, config: P.SFTConfig, min_examples: int) -> dict:
    """Run the pipeline until `min_examples` examples went through; time from iterator creation."""
    pipe = P.sft_pipeline(source, tokenizer, config, process_index=0, process_count=1)
    start = time.perf_counter()
    iterator = iter(pipe)
    tokens = rows = 0
    while pipe.stats.examples < min_examples:
        batch = next(iterator)
        tokens += int((batch["segment_ids"] > 0).sum())
        rows += len(batch["input_ids"])
    seconds = time.perf_counter() - start
    return {"examples": pipe.stats.examples, "seconds": seconds, "examples_per_s": pipe.stats.examples / seconds,
            "tokens_per_s": tokens / seconds, "fill": tokens / (rows * config.max_len)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(FIXTURE), help="a GSM8K jsonl file (default: the 50-row fixture)")
    parser.add_argument("--examples", type=int, default=3000, help="examples to push through per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="grain reader threads to try")
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    source = load_source(args.data, "gsm8k")
    settings = []
    for tokenizer_name in ("qwen2.5", "tiny"):
        tokenizer = load_tokenizer(tokenizer_name)
        for pack in (True, False):
            for threads in args.threads:
                config = P.SFTConfig(max_len=args.max_len if pack else 512, batch_size=args.batch_size, pack=pack,
                                     num_epochs=None, num_threads=threads)
                result = measure(source, tokenizer, config, args.examples)
                settings.append((tokenizer_name, "pack" if pack else "pad", config.max_len, threads, result))
                print(f"{tokenizer_name:8s} {'pack' if pack else 'pad':4s} L={config.max_len:5d} threads={threads}: "
                      f"{result['examples_per_s']:8.0f} examples/s {result['tokens_per_s']:10.0f} tokens/s "
                      f"fill {result['fill']:.2f}", flush=True)

    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores visible; data: {os.path.basename(args.data)} "
          f"({len(source)} rows); batch {args.batch_size} rows\n")
    print("| tokenizer | mode | L | threads | examples/s | tokens/s | row fill |")
    print("|---|---|---|---|---|---|---|")
    for name, mode, max_len, threads, r in settings:
        print(f"| {name} | {mode} | {max_len} | {threads} | {r['examples_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['fill']:.2f} |")


if __name__ == "__main__":
    main()
