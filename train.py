#!/usr/bin/env python
"""Train a ConchShell stage (tcnn, vqvae or gan) on one CPU/GPU or under torchrun.

    python train.py --config configs/tiny.yaml --out runs/tiny [train.max_steps=10 ...]
    torchrun --nproc_per_node=4 train.py --config configs/conchshell.yaml --out runs/deep

An existing checkpoint in --out is resumed automatically; ``--resume`` insists on one
(``--resume PATH`` names it). Without --config, ``<out>/config.yaml`` of the earlier run is
used. Errors in the config, the data or a checkpoint print one ``error:`` line; a config
error exits with status 2, any other with 1.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from conchshell.config import load_config
from conchshell.errors import ConchShellError, ConfigError

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (default: <out>/config.yaml when resuming)")
    parser.add_argument("--out", required=True, help="output folder: checkpoints, exports, logs")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                        help="resume from PATH, or from the latest checkpoint in --out (required to exist)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.batch_size=4 loss.lambda_mel=0")
    args = parser.parse_args(argv)
    # `--resume` takes an optional path, so argparse hands it an override that follows it
    # (`--resume train.max_steps=10`); such a value is an override, not a checkpoint.
    if isinstance(args.resume, str) and OVERRIDE.match(args.resume) and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config_path = args.config or Path(args.out) / "config.yaml"
        if args.config is None and not Path(config_path).is_file():
            raise ConfigError(f"--config is required: {config_path} does not exist yet")
        config = load_config(config_path, args.overrides)
        # Imported after the config is known good: torch and the models take seconds to load.
        from conchshell.training.trainer import train
        from conchshell.utils.host_memory import keep_freed_memory

        keep_freed_memory()

        train(config, args.out, args.resume)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConchShellError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
