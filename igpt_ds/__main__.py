"""`python -m igpt_ds JOB [flags]`: every entry point from an installed package, wherever it runs.

    python -m igpt_ds pretrain --config igpt_s_imagenet32 --train.max_steps=10
    deepspeed --num_gpus 8 --module igpt_ds pretrain --config igpt_s_imagenet32
    python -m igpt_ds linear_probe --help

JOB: pretrain, finetune, extract_features, linear_probe, sample, plan, plan_eval (the scripts of the same names
in a checkout's launcher/, and the igpt-* console scripts, run the same code).
"""

import sys

from igpt_ds.cli import JOBS, run_job

if __name__ == "__main__":
    names = list(JOBS)
    # DeepSpeed's launcher puts --local_rank=N before the script's own arguments (here: before JOB).
    args = sys.argv[1:]
    local_rank = [a for a in args[:1] if a.startswith("--local_rank")]
    args = args[len(local_rank) :]
    if not args or args[0] not in names:
        print(f"usage: python -m igpt_ds JOB [flags]   (JOB: {', '.join(names)}; JOB --help lists its flags)",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    run_job(args[0], args[1:] + local_rank)
