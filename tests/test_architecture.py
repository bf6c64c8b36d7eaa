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
