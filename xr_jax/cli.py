"""`xr-jax` command line: `xr-jax sft --config FILE key.sub=value ...`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xr-jax", description="X-Reasoner post-training in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning (stage 1)")
    sft.add_argument("--config", help="YAML config file (see configs/)")
    sft.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=2e-5 mesh.shape=[2,2,2]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("xr_jax").setLevel(logging.INFO)

    from xr_jax import config as config_lib

    try:
        cfg = config_lib.load(args.config, args.overrides)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    if args.command == "sft":
        from xr_jax.train import sft as sft_lib

        sft_lib.main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
