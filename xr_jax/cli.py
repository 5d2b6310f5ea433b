"""`xr-jax` command line: one subcommand per job; user mistakes exit 2 with a one-line message."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def _convert(args: argparse.Namespace) -> None:
    from xr_jax import convert

    if bool(args.from_hf) == bool(args.from_ckpt):
        raise SystemExit("xr-jax convert: give exactly one of --from-hf HF_DIR or --from CKPT")
    if args.from_hf:
        if not args.to:
            raise SystemExit("xr-jax convert --from-hf needs --to OUT_DIR")
        cfg = convert.hf_to_xr(args.from_hf, args.to, dtype=args.dtype)
        print(f"wrote xr_jax checkpoint {args.to} ({'Qwen2.5-VL' if cfg.vision else 'Qwen2'}, {cfg.text.num_layers} layers)")
    else:
        if not args.to_hf:
            raise SystemExit("xr-jax convert --from needs --to-hf OUT_DIR")
        convert.xr_to_hf(args.from_ckpt, args.to_hf)
        print(f"wrote Hugging Face checkpoint {args.to_hf}")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-hf", help="Hugging Face checkpoint directory (Qwen2.5-VL or Qwen2/Qwen2.5)")
    p.add_argument("--to", help="output xr_jax checkpoint directory (with --from-hf)")
    p.add_argument("--from", dest="from_ckpt", help="xr_jax checkpoint directory")
    p.add_argument("--to-hf", help="output Hugging Face directory (with --from)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="cast params (default: as stored)")


COMMANDS["convert"] = ("HF checkpoint <-> xr_jax checkpoint (both directions, bit-exact)", _convert_args, _convert)


def _sft_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=2e-5 mesh.shape=[2,2,2]")


def _sft(args: argparse.Namespace) -> None:
    import logging

    from xr_jax import config as config_lib
    from xr_jax.train import sft

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("xr_jax").setLevel(logging.INFO)
    sft.main(config_lib.load(args.config, args.overrides))


COMMANDS["sft"] = ("supervised fine-tuning, stage 1 (`--config FILE key.sub=value ...`)", _sft_args, _sft)


def _plan_args(p: argparse.ArgumentParser) -> None:
    from xr_jax import plan

    plan.add_args(p)


def _plan(args: argparse.Namespace) -> None:
    from xr_jax import plan

    plan.run(args)


COMMANDS["plan"] = ("per-device memory and FLOPs of a run on N devices, from a simulated-mesh compile",
                    _plan_args, _plan)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a user mistake (bad path, config, checkpoint, mesh): one line, exit 2."""
    from xr_jax.config import ConfigError
    from xr_jax.models.hf import CheckpointError
    from xr_jax.parallel import MeshError
    from xr_jax.plan import PlanError

    return (CheckpointError, ConfigError, MeshError, PlanError, FileNotFoundError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xr-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][2](args)
    except user_errors() as e:
        print(f"xr-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
