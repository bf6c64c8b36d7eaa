"""Plan a pretraining run on a cluster: memory per GPU, communication, step time, fastest layout
(igpt_ds.plan.training).

    python launcher/plan.py --config launcher/configs/igpt_s_imagenet32.yaml --cluster.gpus '[1,8,64,512,1024]'
    python launcher/plan.py --model.size igpt-xl --model.n_px 64 --train.global_batch 128 \\
        --train.ds_config ds_configs/zero3_bf16.json --cluster.tokens_per_s 530000 --top 10 --json plan.json

Reads the same YAML presets as launcher/pretrain.py plus a `cluster` section (igpt_ds.plan.training.ClusterConfig);
the DeepSpeed policy JSON (train.ds_config) supplies bucket sizes and the gradient accumulation dtype.
For each GPU count it prints the layout the config describes, then the fastest layouts that fit.
Precedence: dataclass defaults < `--config` YAML < dotted overrides. A configuration error exits 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("plan")
