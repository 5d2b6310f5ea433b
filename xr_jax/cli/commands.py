"""`xr-jax` command line: one subcommand per job; user mistakes exit 2 with a one-line message."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def _convert(args: argparse.Namespace) -> None:
    from xr_jax.checkpoints import convert

    if bool(args.from_hf) == bool(args.from_ckpt):
        raise SystemExit("xr-jax convert: give exactly one of --from-hf HF_DIR or --from CKPT")
    source = args.from_hf or args.from_ckpt
    tokenizer = None if args.tokenizer is None else convert.load_tokenizer_for(source, args.tokenizer, "--tokenizer")
    if args.from_hf:
        if not args.to:
            raise SystemExit("xr-jax convert --from-hf needs --to OUT_DIR")
        cfg = convert.hf_to_xr(args.from_hf, args.to, dtype=args.dtype, tokenizer=tokenizer)
        print(f"wrote xr_jax checkpoint {args.to} ({'Qwen2.5-VL' if cfg.vision else 'Qwen2'}, {cfg.text.num_layers} layers)")
    else:
        if not args.to_hf:
            raise SystemExit("xr-jax convert --from needs --to-hf OUT_DIR")
        convert.xr_to_hf(args.from_ckpt, args.to_hf, tokenizer=tokenizer)
        print(f"wrote Hugging Face checkpoint {args.to_hf}")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}
TOKENIZER_HELP = ('"qwen2.5", "tiny" or a tokenizer dir (default: the checkpoint\'s own: <dir>/assets of an xr_jax '
                  'checkpoint, the HF dir itself; configs spell it model.tokenizer)')


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-hf", help="Hugging Face checkpoint directory (Qwen2.5-VL or Qwen2/Qwen2.5)")
    p.add_argument("--to", help="output xr_jax checkpoint directory (with --from-hf)")
    p.add_argument("--from", dest="from_ckpt", help="xr_jax checkpoint directory")
    p.add_argument("--to-hf", help="output Hugging Face directory (with --from)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast params (default: as stored)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP + "; written into the output")


COMMANDS["convert"] = ("HF checkpoint <-> xr_jax checkpoint (both directions, bit-exact)", _convert_args, _convert)


TRAIN_EPILOG = """\
Rerunning the same command resumes from the newest checkpoint of checkpoint.dir. Exit codes: 0 done
(train.export_dir written, "done: N steps, exported to DIR" on stdout); 2 a user error (one line);
75 stopped by SIGTERM/SIGINT with the checkpoint saved and no export (rerun to resume); 1 stopped early
for good (non-finite steps, data ran out) or an unexpected error.
"""


def _train_args(p: argparse.ArgumentParser) -> None:
    p.epilog = TRAIN_EPILOG
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=2e-5 mesh.shape=[2,2,2]")


def _train(stage: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        import importlib
        import logging

        from xr_jax import config as config_lib

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("xr_jax").setLevel(logging.INFO)
        importlib.import_module(f"xr_jax.train.{stage}").main(config_lib.load(args.config, args.overrides))

    return run


COMMANDS["sft"] = ("supervised fine-tuning, stage 1 (`--config FILE key.sub=value ...`)", _train_args, _train("sft"))
COMMANDS["grpo"] = ("GRPO with verifiable rewards, stage 2 (`--config FILE key.sub=value ...`)", _train_args,
                    _train("grpo"))


# ----------------------------------------------------------------------------- sample

SAMPLE_EPILOG = """\
The prompt is a chat: --prompt TEXT (one user turn, --image files shown before the text, --system TEXT the
system message: give the data.system a model was trained with) or --messages
FILE.jsonl, one {"messages": [...]} per line in the transformers chat format, where content is a string or
a list of {"type": "text", "text": ...} and {"type": "image", "image": PATH} items (relative image paths
are taken from the file's folder). The chat template (the checkpoint's, else the built-in Qwen2.5-VL one)
is applied with the assistant generation prompt, and each image's <|image_pad|> is expanded to its patch
count. The tokenizer comes from the checkpoint (<dir>, or <dir>/assets of an xr_jax checkpoint) unless
--tokenizer names one ("qwen2.5", "tiny" or a directory). A prompt longer than the model's positions
(max_position_embeddings) is refused.

Decoding stops at <|im_end|> or <|endoftext|>. --max-think K turns on forced exit: a sample that has not
written </think> within K tokens gets "</think>" appended there, then up to --max-answer more tokens
(output <= K + len(</think> ids) + max-answer tokens; --max-new-tokens is then unused).

Output: one JSON line per sample, in input order (prompt-major): index, sample, token_ids (generated ids,
the stop id included when one was produced), text (special tokens removed), finish_reason ("eos",
"forced_exit" or "length") and forced_exit. Each (prompt, sample) has its own random stream derived from
--seed, whatever the batching.

Streaming: the decode loop runs on the device as one compiled while_loop, so with --prompt each sample's
text is printed when generation ends (not token by token); with --messages a progress bar is shown.

Examples:
  xr-jax sample --model ckpt/X-Reasoner-7B --prompt "What is 17 * 23?" --greedy --max-new-tokens 1024
  xr-jax sample --model ckpt --prompt "Describe the image." --image cat.png --temperature 0.7 --top-p 0.9 \\
      --num-samples 4 --max-think 2048 --max-answer 256 --output out.jsonl
  xr-jax sample --model ckpt --messages chats.jsonl --greedy --max-new-tokens 512 --output out.jsonl
"""


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = SAMPLE_EPILOG
    p.add_argument("--model", required=True, help="Hugging Face checkpoint dir or xr_jax checkpoint dir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user's message (one conversation)")
    src.add_argument("--messages", metavar="FILE.jsonl", help='conversations, one {"messages": [...]} per line')
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for --prompt (repeatable)")
    p.add_argument("--system", metavar="TEXT", help="the system message for --prompt (default: the chat template's, "
                   '"You are a helpful assistant."); use the one the model was trained with (data.system)')
    how = p.add_mutually_exclusive_group()
    how.add_argument("--greedy", action="store_true", help="argmax decoding")
    how.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="output length without forced exit (default 256)")
    p.add_argument("--max-think", type=int, help="thinking budget: forced exit of </think> after this many tokens")
    p.add_argument("--max-answer", type=int, help="tokens after the forced </think> (with --max-think; default 256)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast params and compute (default: as stored)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="OUT.jsonl", help="write the samples here (required with --messages)")


def _sample(args: argparse.Namespace) -> None:
    import os

    from xr_jax.sampling import chat as cs
    from xr_jax.checkpoints import convert

    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r} is not a checkpoint directory")
    if args.image and args.messages:
        raise cs.ChatError("--image goes with --prompt; with --messages put image items in the conversations")
    if args.messages and not args.output:
        raise cs.ChatError("--messages needs --output OUT.jsonl")
    if args.max_answer is not None and args.max_think is None:
        raise cs.ChatError("--max-answer needs --max-think (forced exit)")
    if args.greedy and args.top_p != 1.0:
        raise cs.ChatError("--top-p has no effect with --greedy")
    if args.num_samples < 1 or args.batch_size < 1:
        raise cs.ChatError(f"--num-samples ({args.num_samples}) and --batch-size ({args.batch_size}) must be >= 1")
    if args.system is not None and args.messages:
        raise cs.ChatError("--system goes with --prompt; with --messages put a system message in the conversations")
    if args.output:
        from xr_jax.errors import check_writable_file

        check_writable_file(args.output, "--output")
    chats = cs.read_chats(args.messages) if args.messages else [cs.prompt_chat(args.prompt, args.image, args.system)]
    tokenizer = convert.load_tokenizer_for(args.model, args.tokenizer, "--tokenizer")
    sampler, params = _build_sampler(args, tokenizer)
    single = args.prompt is not None
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    from tqdm.auto import tqdm

    try:
        with tqdm(total=len(chats), desc="sample", unit="prompt", disable=single) as bar:
            for records in cs.sample_chats(sampler, params, tokenizer, chats, num_samples=args.num_samples,
                                           seed=args.seed, batch_size=args.batch_size):
                for r in records:
                    if out is not None:
                        out.write(r.to_json() + "\n")
                    if single:
                        print(f"--- sample {r.sample} ({r.finish_reason}, {len(r.token_ids)} tokens"
                              f"{', forced exit' if r.forced_exit else ''}) ---\n{r.text}", flush=True)
                if out is not None:
                    out.flush()
                bar.update(1)
    finally:
        if out is not None:
            out.close()
    if out is not None:
        print(f"wrote {len(chats) * args.num_samples} samples to {args.output}", file=sys.stderr)


def _build_sampler(args: argparse.Namespace, tokenizer):
    """The model (one device) and a `Sampler` for the command's decoding options."""
    from xr_jax.sampling import chat as cs
    from xr_jax.checkpoints import convert
    from xr_jax.sampling.sampler import ForcedExit, Sampler, SamplingConfig

    print(f"loading {args.model}", file=sys.stderr)
    cfg, params = convert.load_any(args.model, cast=args.dtype)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    special = tokenizer.special
    scfg = SamplingConfig(
        temperature=0.0 if args.greedy else args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        max_think=args.max_think, max_answer=256 if args.max_answer is None else args.max_answer,
        stop_ids=tuple(special.stop_ids), pad_id=special.pad,
    )
    try:
        forced = None if args.max_think is None else ForcedExit.from_tokenizer(tokenizer, cfg.text.vocab_size)
        return Sampler(cfg, scfg, forced), params
    except ValueError as e:  # bad decoding options, or a tokenizer whose ids do not fit the model
        raise cs.ChatError(str(e)) from None


COMMANDS["sample"] = ("generate from a checkpoint: chat prompts (text + images), greedy or sampled, forced exit",
                      _sample_args, _sample)


# ----------------------------------------------------------------------------- eval

EVAL_EPILOG = """\
Runs the benchmarks of the config's `eval` section (xr_jax.eval.runner.EvalSection) on the model of
`model.path` (a Hugging Face or xr_jax checkpoint; its tokenizer is the checkpoint's own unless
model.tokenizer names one: "qwen2.5", "tiny" or a directory) on the
`mesh.shape` mesh, with the paper's protocol: its prompt templates, greedy decoding (or eval.protocol=sampling
for avg/maj/pass@k), responses capped at eval.max_tokens with forced exit. A progress bar per benchmark;
at the end the table is printed and eval.output_dir gets predictions.jsonl (every response with what
scoring needs), results.json and results.md. eval.output_dir is checked writable before the model is
loaded; responses are appended to predictions.jsonl batch by batch, and rerunning the same command into
the same eval.output_dir resumes (only the missing batches are generated; changed generation settings,
kept in generation.json, are refused).

--rescore PRED.jsonl scores a saved predictions file again (no model is loaded) and writes the new
outputs to eval.output_dir.

Examples:
  xr-jax eval --config configs/eval_paper.yaml model.path=ckpt/X-Reasoner-7B
  xr-jax eval --config configs/eval_paper.yaml model.path=ckpt eval.benchmarks=[gsm8k,mmmu_val] mesh.shape=[8,1,1]
  xr-jax eval --rescore eval_out/predictions.jsonl eval.output_dir=eval_rescored
"""


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EVAL_EPILOG
    p.add_argument("--config", help="YAML config file with an `eval` section (see configs/eval_paper.yaml)")
    p.add_argument("--rescore", metavar="PRED.jsonl", help="re-score a predictions file instead of generating")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.path=DIR eval.benchmarks=[gsm8k]")


def _eval(args: argparse.Namespace) -> None:
    import dataclasses
    import logging
    import os

    from xr_jax import config as config_lib
    from xr_jax.eval import runner as evaluation

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    config = config_lib.load(args.config, args.overrides, validate=False).validate(training=False)
    if args.rescore is not None:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, rescore=args.rescore))
    try:
        config.eval.validate()
    except (ValueError, KeyError) as e:  # bad eval values; KeyError: an unknown benchmark name
        raise config_lib.ConfigError(e.args[0] if e.args else str(e)) from None
    if config.eval.rescore is not None:
        if not os.path.isfile(config.eval.rescore):
            raise FileNotFoundError(f"predictions file {config.eval.rescore!r} does not exist")
    elif not config.model.path:
        raise config_lib.ConfigError("set model.path=CHECKPOINT_DIR (or give --rescore PRED.jsonl)")
    evaluation.main(config)


COMMANDS["eval"] = ("benchmark a checkpoint with the paper's protocol (`--config FILE key.sub=value ...`)",
                    _eval_args, _eval)


# ----------------------------------------------------------------------------- plot

PLOT_EPILOG = """\
Reads RUN_DIR/metrics.jsonl of each run (the training log: one JSON object per line with "step" and the
metrics), draws one subplot per metric with one line per run, and saves a PNG. Default metrics: all that
any run logged. For a step logged twice (a resumed run), the last line counts.

Examples:
  xr-jax plot runs/sft
  xr-jax plot runs/grpo_a runs/grpo_b --metrics loss,reward_mean,response_length --out grpo.png
"""


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = PLOT_EPILOG
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (logging.dir)")
    p.add_argument("--metrics", help="comma-separated metric names (default: every metric logged)")
    p.add_argument("--out", default="curves.png", help="output PNG (default curves.png)")


def _plot(args: argparse.Namespace) -> None:
    from xr_jax.cli import plot

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    drawn = plot.plot_runs(args.runs, metrics, args.out)
    print(f"wrote {args.out} ({len(drawn)} metrics: {', '.join(drawn)})")


COMMANDS["plot"] = ("training curves of one or more runs (metrics.jsonl) as a PNG", _plot_args, _plot)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a one-minute miniature on a quiet 2-core CPU (what the tests run)")
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoints, metrics, curves.png)")


def _demo(args: argparse.Namespace) -> None:
    from xr_jax.cli import demo

    demo.main(args.out, quick=args.quick)


COMMANDS["demo"] = ("the built-in default: base -> SFT -> GRPO -> eval (text and images) on CPU, no downloads",
                    _demo_args, _demo)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from xr_jax.cli import plan

    plan.add_args(p)


def _plan(args: argparse.Namespace) -> None:
    from xr_jax.cli import plan

    plan.run(args)


COMMANDS["plan"] = ("per-device memory and FLOPs of a run on N devices, from a simulated-mesh compile",
                    _plan_args, _plan)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a user mistake: one line, exit 2. xr_jax's own derive from `UserError`; the
    built-in ones are a path that does not exist or may not be read or written."""
    from xr_jax.errors import UserError

    return (UserError, FileNotFoundError, PermissionError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xr-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)  # --help and usage errors exit here, without importing JAX
    from xr_jax.cli.host_memory import reuse_freed_memory

    reuse_freed_memory()  # before anything starts JAX's backend (a no-op off the CPU)
    from xr_jax.errors import EXIT_USER_ERROR, RunStopped

    try:
        COMMANDS[args.command][2](args)
    except RunStopped as e:  # a training run that ended early: its checkpoint is saved, no export written
        print(f"xr-jax {args.command}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except user_errors() as e:
        print(f"xr-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


