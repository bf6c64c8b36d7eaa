"""Arrows point one way: evaluation, sampling and fine-tuning never load the pretraining loop."""

import subprocess
import sys

import pytest
from pretrain_support import REPO, env

EVALUATION = ["features", "feature_store", "logreg", "probe", "sampling", "finetune", "eval_planner"]


@pytest.mark.parametrize("module", EVALUATION)
def test_evaluation_does_not_import_the_trainer(module):
    code = f"import sys, igpt_ds.{module}; print(sorted(m for m in sys.modules if m == 'igpt_ds.trainer'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", f"igpt_ds.{module} imports igpt_ds.trainer (transitively)"


# The stages of igpt_ds/__init__.py's map, in order: a module may import its own stage and the ones above.
STAGES = [
    ["config", "atomic", "host_sync", "launchers", "distributed", "supervisor"],
    ["palette", "shards", "prefetch"],
    ["model", "pipe", "weights", "flops", "memory", "hf_interop"],
    ["engine", "checkpoint", "resume", "run", "metrics", "logreg", "plots"],
    ["trainer", "live_probe", "finetune", "planner"],
    ["features", "feature_store", "probe", "sampling", "eval_planner"],
    ["cli", "__main__"],
]


def imported_modules(path) -> set[str]:
    """igpt_ds modules `path` imports anywhere in it (module level or inside functions)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("igpt_ds"):
            out |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("igpt_ds.")}
    return out


def test_every_module_has_a_stage_and_imports_only_its_own_or_earlier_stages():
    stage_of = {m: i for i, stage in enumerate(STAGES) for m in stage}
    modules = {p.stem: p for p in (REPO / "igpt_ds").glob("*.py") if p.stem != "__init__"}
    assert set(modules) == set(stage_of), "a module without a stage: add it to igpt_ds/__init__.py's map and here"
    # evaluation (stage 5) comes after training (stage 4) in the list but must not use it either
    upward = sorted((m, dep) for m, p in modules.items() for dep in imported_modules(p)
                    if stage_of[dep] > stage_of[m] or (stage_of[m] == 5 and stage_of[dep] == 4))  # fmt: skip
    assert upward == []
