"""The GPU checks cannot rot unnoticed: on CPU, CI imports and collects tests/gpu (the tests themselves need CUDA)."""

import subprocess
import sys

from pretrain_support import REPO, env

GPU_TESTS = [
    "test_bf16_autocast_step_matches_fp32",
    "test_flash_sdpa_is_selected",
    "test_nccl_initialises_on_one_gpu[local-rank-0]",
    "test_nccl_initialises_on_one_gpu[one-gpu-per-task]",
    "test_compile_under_zero1_trains",
    "test_cached_decoding_equals_recompute[dtype0-0.0001]",
    "test_cached_decoding_equals_recompute[dtype1-0.1]",
    "test_pretraining_syncs_only_where_it_means_to[zero1-ar]",
    "test_pretraining_syncs_only_where_it_means_to[zero1-bert]",
    "test_pretraining_syncs_only_where_it_means_to[zero3-ar]",
    "test_pretraining_syncs_only_where_it_means_to[pipeline-ar]",
    "test_pretraining_syncs_only_where_it_means_to[pipeline-bert]",
    "test_fine_tuning_syncs_only_where_it_means_to",
    "test_sampling_syncs_once_per_batch",
    "test_feature_extraction_syncs_once_per_batch",
]


def test_gpu_tests_import_and_collect_on_cpu():
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/gpu"]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = [line.split("::")[-1] for line in out.stdout.splitlines() if line.startswith("tests/gpu/")]
    assert collected == GPU_TESTS
