"""The command line shared by the evaluation entry points: `--config preset.yaml` plus dotted overrides.

Precedence (igpt_ds.config): dataclass defaults < `--config` YAML < `--key=value` overrides. A
configuration or input error (`ConfigError`: missing or incompatible checkpoint, shards tokenised with
another palette than the checkpoint's, split without labels, layers out of range, ...; `ShardError`:
missing split, damaged shard) prints one line on stderr and exits with status 2, on every rank.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from igpt_ds.config import ConfigError, load_config
from igpt_ds.shards import ShardError

T = TypeVar("T")


def main(cls: type[T], run: Callable[[T], Any], description: str, argv: list[str] | None = None) -> int:
    """Parse argv into `cls`, call `run(cfg)`; 0 on success, 2 on a ConfigError."""
    parser = argparse.ArgumentParser(description=description, epilog="overrides: --key=value or --section.key=value")
    parser.add_argument("--config", help="YAML preset (launcher/configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by older DeepSpeed launchers
    args, overrides = parser.parse_known_args(argv)
    try:
        run(load_config(cls, args.config, overrides))
    except (ConfigError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:  # not imported by a configuration error in parsing
            from igpt_ds.distributed import shutdown

            shutdown()
    return 0
