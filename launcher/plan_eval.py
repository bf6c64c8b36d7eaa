"""What evaluating a model costs: feature bytes on disk, per-rank memory of extraction and of the probe, probe
FLOPs; for iGPT-S/M/L/XL on CIFAR-10 and ImageNet at any rank count (igpt_ds.plan.evaluation has the formulas).

    python launcher/plan_eval.py
    python launcher/plan_eval.py --sizes '[igpt-l]' --datasets '[imagenet]' --ranks '[1, 8, 64, 1024]' --gpu false

Precedence: dataclass defaults < `--config` YAML < dotted overrides. A configuration error exits 2.
"""

from igpt_ds.cli import run_job

if __name__ == "__main__":
    run_job("plan_eval")
