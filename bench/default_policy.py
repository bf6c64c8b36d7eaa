"""The engine policy a GPU run gets when it names no DeepSpeed JSON (`igpt_ds.plan.memory.default_policy`), per model
size, GPU memory and GPU count: the lowest ZeRO stage whose estimated peak memory per GPU (`igpt_ds.plan.memory`, the
estimate `launcher/plan.py` prints) fits 90% of the device. An estimate, not a measurement: bench/gpu_matrix.sh
measures the chosen policy against the others (group s_policy) the first time a GPU runs it.

    python bench/default_policy.py          # prints the table, writes bench/results/default_policy.{md,json}

Shapes: each size's preset (micro-batch, activation checkpointing; iGPT-XL at 64x64 like iGPT-L's preset, micro-batch
4 with checkpointing); global batch = micro-batch x GPUs (one micro-batch a GPU per step; more accumulation does not
change the estimate's peak). GPU memory as torch reports it: an 80 GB H100 ~79 GiB, a 141 GB H200 ~131 GiB.
"""

from __future__ import annotations

import json
from pathlib import Path

from igpt_ds.config import ModelConfig, TrainConfig
from igpt_ds.plan.memory import GIB, default_policy

OUT = Path(__file__).resolve().parent / "results"
SIZES = [  # (size, n_px, micro-batch, activation checkpointing): the presets' shapes
    ("igpt-s", 32, 16, False),
    ("igpt-m", 32, 16, False),
    ("igpt-l", 32, 8, True),
    ("igpt-xl", 64, 4, True),
]
GPUS = {"H100 80 GB": 79.1, "H200 141 GB": 131.3}  # GiB as torch.cuda reports them
COUNTS = [1, 8, 64]


def main() -> None:
    rows = []
    for size, n_px, micro, ckpt in SIZES:
        model = ModelConfig(size=size, n_px=n_px)
        for gpu, gib in GPUS.items():
            for n in COUNTS:
                train = TrainConfig(global_batch=micro * n, micro_batch=micro, activation_checkpointing=ckpt)
                name, why = default_policy(model, train, n, gib * GIB)
                rows.append({"model": f"{size} {n_px}x{n_px}", "micro_batch": micro, "checkpointing": ckpt,
                             "gpu": gpu, "gpus": n, "policy": name, "why": why})  # fmt: skip
    lines = ["| model | micro-batch, checkpointing | GPU | GPUs | default policy | why |", "|---" * 6 + "|"]
    for r in rows:
        why = r["why"].removeprefix("default policy: ")
        lines.append(f"| {r['model']} | {r['micro_batch']}, {'on' if r['checkpointing'] else 'off'} | {r['gpu']} | "
                     f"{r['gpus']} | `{r['policy']}` | {why} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    OUT.mkdir(exist_ok=True)
    (OUT / "default_policy.md").write_text(f"    python bench/default_policy.py\n\n{table}\n")
    (OUT / "default_policy.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
