"""The evaluation capacity planner: its disk formula is what extraction writes; per-rank probe memory falls with
the rank count down to the replicated solver state; the entry point prints every size and dataset."""

import numpy as np
from eval_support import check, run_entry

from igpt_ds.eval import logreg
from igpt_ds.eval.feature_store import FEATURES_FILE, PARTS_DIR, PIXELS_FILE, write_features
from igpt_ds.plan.evaluation import EvalPlanConfig, eval_costs, feature_disk_bytes, probe_bytes


def test_disk_formula_is_what_extraction_writes(tmp_path):
    n, layers, dim, seq_len, channels = 1000, [0, 3, 5], 24, 16, 3
    rows = lambda a, b: (
        np.zeros((len(layers), b - a, dim), np.float32),
        np.zeros((b - a, seq_len * channels), np.uint8),
    )
    out = write_features(tmp_path / "train", n, layers, dim, rows, np.zeros(n, np.int64), seq_len, channels,
                         {"n_layer": 5}, part_rows=128)  # fmt: skip
    files = [f for part in (out / PARTS_DIR).iterdir() for f in (part / FEATURES_FILE, part / PIXELS_FILE)]
    header = 128 * len(files)  # a .npy v1 header (small shapes) is 128 bytes
    assert sum(f.stat().st_size for f in files) - header == feature_disk_bytes(n, dim, len(layers), seq_len, channels)


def test_probe_memory_shrinks_with_ranks_down_to_the_solver_state():
    one, many = (probe_bytes(1_229_920, 51_247, 50_000, 1536, 1000, w, gpu=True) for w in (1, 1024))
    solver = logreg.SOLVER_COPIES * (1536 * 1000 + 1000) * 4
    assert one > 8 * many and solver < many < 2 * solver
    rows = eval_costs("igpt-l", "imagenet", EvalPlanConfig(ranks=[1, 8, 64, 1024]))
    assert [r["ranks"] for r in rows] == [1, 8, 64, 1024]
    assert all(a["probe_layer_gb"] > b["probe_layer_gb"] for a, b in zip(rows, rows[1:], strict=False))
    assert rows[0]["disk_per_layer_gb"] == (1_229_920 + 51_247 + 50_000) * 1536 * 4 / 1e9


def test_plan_eval_prints_every_size_and_dataset():
    out = check(run_entry("plan_eval"))
    for size in ("igpt-s", "igpt-m", "igpt-l", "igpt-xl"):
        for dataset in ("cifar10", "imagenet"):
            assert f"## {size} at" in out and f"on {dataset}:" in out
    assert out.count("| 1,024 |") == 8
    bad = run_entry("plan_eval", "--sizes", "[igpt-xxl]")
    assert bad.returncode == 2 and "unknown sizes" in bad.stderr
