"""Fine-tune a pretrained iGPT classifier (L_CLF + λ·L_GEN, early stopping) on DeepSpeed; see igpt_ds.train.finetune.

    deepspeed --num_gpus 8 launcher/finetune.py --config launcher/configs/finetune_cifar10.yaml \\
        --train.init_from=runs/igpt_s
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/finetune.py --config launcher/configs/finetune_digits_cpu.yaml

Configuration: defaults < `--config` YAML < dotted overrides (`--finetune.gen_weight=0`). Rerunning a
command resumes from the run's latest checkpoint. Errors: one line, exit 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("finetune")
