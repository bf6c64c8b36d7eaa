"""Pretrain an iGPT with DeepSpeed (ZeRO-3 data parallel or pipeline parallel); see igpt_ds.trainer.

    deepspeed --num_gpus 8 launcher/pretrain.py --config launcher/configs/igpt_s_imagenet32.yaml
    deepspeed --hostfile hosts launcher/pretrain.py --config launcher/configs/igpt_l_pipeline.yaml
    srun python launcher/pretrain.py --config ...            (Slurm: one task per GPU)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/pretrain.py \\
        --config launcher/configs/demo_digits_cpu.yaml --train.max_steps=50

Configuration: dataclass defaults < `--config` YAML < dotted overrides (`--train.lr=3e-4`).
A configuration error prints one line and exits with status 2. Rerunning a command resumes the run
from its latest complete checkpoint.
"""

import argparse
import sys

from igpt_ds.config import ConfigError, PretrainConfig, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="iGPT pretraining on DeepSpeed", epilog="overrides: --section.key=value"
    )
    parser.add_argument("--config", help="YAML preset (launcher/configs/*.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by older DeepSpeed launchers
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, overrides)
        from igpt_ds.trainer import train  # after parsing: importing DeepSpeed is slow

        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            from igpt_ds.distributed import shutdown

            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
