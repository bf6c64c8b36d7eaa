"""Pretrain an iGPT with DeepSpeed (ZeRO-3 data parallel or pipeline parallel); see igpt_ds.train.pretrain.

    deepspeed --num_gpus 8 launcher/pretrain.py --config launcher/configs/igpt_s_imagenet32.yaml
    deepspeed --hostfile hosts launcher/pretrain.py --config launcher/configs/igpt_l_pipeline.yaml
    srun python launcher/pretrain.py --config ...            (Slurm: one task per GPU)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/pretrain.py \\
        --config launcher/configs/demo_digits_cpu.yaml --train.max_steps=50

Configuration: dataclass defaults < `--config` YAML < dotted overrides (`--optim.lr=3e-4`).
A configuration error prints one line and exits with status 2. SIGTERM, SIGINT or SIGUSR1 to the launched
command (or the launcher's exit) saves a checkpoint on every rank and exits with 128 + the signal number.
Rerunning a command resumes the run from its latest complete checkpoint.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("pretrain")
