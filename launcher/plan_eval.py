"""What evaluating a model costs: feature bytes on disk, per-rank memory of extraction and of the probe, probe
FLOPs; for iGPT-S/M/L/XL on CIFAR-10 and ImageNet at any rank count (igpt_ds.eval_planner has the formulas).

    python launcher/plan_eval.py
    python launcher/plan_eval.py --sizes '[igpt-l]' --datasets '[imagenet]' --ranks '[1, 8, 64, 1024]' --gpu false

Precedence: dataclass defaults < `--config` YAML < dotted overrides. A configuration error exits 2.
"""

import sys

from igpt_ds.cli import main
from igpt_ds.eval_planner import DATASETS, PAPER_N_PX, EvalPlanConfig, eval_costs, format_table


def plan(cfg: EvalPlanConfig) -> None:
    for size in cfg.sizes:
        for dataset in cfg.datasets:
            data, n_px = DATASETS[dataset], cfg.n_px or PAPER_N_PX.get(size, 32)
            where = "GPU" if cfg.gpu else "CPU"
            print(f"\n## {size} at {n_px}x{n_px} on {dataset}: {data.n_train:,} train / {data.n_val:,} val / "
                  f"{data.n_test:,} test images, {data.n_classes} classes; probe solver on {where}")  # fmt: skip
            print(format_table(eval_costs(size, dataset, cfg)))


if __name__ == "__main__":
    sys.exit(main(EvalPlanConfig, plan, "Cost of evaluating iGPT models: disk, memory per rank, probe FLOPs"))
