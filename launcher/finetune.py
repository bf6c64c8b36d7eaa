"""Fine-tune a pretrained iGPT classifier (L_CLF + λ·L_GEN, early stopping) on DeepSpeed; see igpt_ds.finetune.

    deepspeed --num_gpus 8 launcher/finetune.py --config launcher/configs/finetune_cifar10.yaml \\
        --train.init_from=runs/igpt_s
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launcher/finetune.py --config launcher/configs/finetune_digits_cpu.yaml

Configuration: defaults < `--config` YAML < dotted overrides (`--finetune.gen_weight=0`). Rerunning a
command resumes from the run's latest checkpoint. Errors: one line, exit 2.
"""

import sys

from igpt_ds.cli import main
from igpt_ds.finetune import FinetuneConfig, finetune

if __name__ == "__main__":
    sys.exit(main(FinetuneConfig, finetune, "Fine-tune a pretrained iGPT for classification"))
