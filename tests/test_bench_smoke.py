"""The benchmark scripts run on CPU in CI-sized form and write well-formed results (never timings).

Each runs as a subprocess, the way bench/gpu_matrix.sh and people run them. Together ~2 minutes on 2 cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_support import digits_shards

REPO = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_train_throughput(tmp_path):
    shards = digits_shards(tmp_path / "shards")
    # ZeRO-3 by override of the CPU policy; cudnn attention does not exist on CPU: a recorded failure.
    peers = ["hf", "eager", "ds:stage=3,fused=1", "trainer:stage=3", "eager:sdpa=cudnn"]
    args = ["--size", "igpt-tiny", "--n-px", "8", "--micro-batch", "2", "--warmup", "1", "--steps", "2"]
    run("train_throughput.py", *args, "--shards", str(shards), "--peers", *peers, "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "train_throughput.json").read_text())
    assert report["shape"]["seq_len"] == 64 and report["data"] == str(shards)
    results = {r["peer"]: r for r in report["results"]}
    assert list(results) == peers
    assert "No viable backend" in results["eager:sdpa=cudnn"]["error"]
    for peer in peers[:4]:
        r = results[peer]
        assert r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and 0 <= r["data_wait_frac"] < 1, r
        assert r["mfu"] is None  # no peak rate for a CPU
        assert set(r["ratio"]) == {"x_hf", "x_eager"}
    assert results["hf"]["attn_implementation"] == "eager"
    assert results["ds:stage=3,fused=1"]["ds_config"]["zero_optimization"]["stage"] == 3
    assert results["ds:stage=3,fused=1"]["ds_config"]["optimizer"]["params"]["fused"] is True
    trainer = results["trainer:stage=3"]  # the pretraining entry point on the shards, ZeRO-3 by override
    assert trainer["ds_config"]["zero_optimization"]["stage"] == 3 and 0 < trainer["mean_loss"] < 7
    table = (tmp_path / "train_throughput.md").read_text()
    assert table.count("\n| ") == 1 + len(peers) and "failed: " in table


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_data_throughput(tmp_path, objective):
    args = ["--synthetic", "300", "--n-px", "8", "--global-batch", "8", "--dp", "2", "--micro-batch", "2"]
    args += ["--steps", "5", "--warmup", "1", "--objective", objective]
    run("data_throughput.py", *args, "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "data_throughput.json").read_text())
    assert report["per_rank_batch"] == 4 and report["n_px"] == 8 and report["objective"] == objective
    assert [r["peer"] for r in report["results"]] == ["reader", "in-memory"]
    assert all(r["tokens_per_s"] > 0 and r["x_needed"] > 0 for r in report["results"])


def test_sample_throughput(tmp_path):
    out = tmp_path / "sample.json"
    run(
        "sample_throughput.py",
        "--size",
        "igpt-tiny",
        "--n-px",
        "4",
        "--batch",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
    )
    report = json.loads(out.read_text())
    assert set(report["tokens_per_s"]) == {"cached", "full_recompute", "hf_generate"}
    assert all(v > 0 for v in report["tokens_per_s"].values())
    assert report["greedy_tokens_equal_hf"] is True  # our cached greedy decoding = HF's generate(), token for token


@pytest.mark.multiproc
def test_probe_scale(tmp_path):
    args = ["--n", "3000", "--d", "16", "--classes", "4", "--worlds", "1", "2", "--max-iter", "20"]
    run("probe_scale.py", *args, "--out-dir", str(tmp_path), "--tmp", str(tmp_path))
    report = json.loads((tmp_path / "probe_scale.json").read_text())
    (case,) = report["cases"]
    assert case["n_train"] == 3000 and set(case["ranks"]) == {"1", "2"}
    one, two = case["ranks"]["1"], case["ranks"]["2"]
    assert one["test_acc"] == two["test_acc"] and one["test_acc"] > 60  # same fit on either world size
    assert abs(case["sklearn"]["test_acc"] - one["test_acc"]) <= 0.5 and case["bayes_acc"] > 60
    assert len(two["peak_rss_gb"]) == 2 and one["predicted_bytes"] > two["predicted_bytes"] > 0
    assert (tmp_path / "probe_scale.md").read_text().count("\n| 3,000 |") == 2


def test_probe_speed(tmp_path):
    args = ["--n", "2700", "--d", "16", "--layers", "3", "--threads", "1", "--c-grid", "0.01", "1"]
    run("probe_speed.py", *args, "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "probe_speed.json").read_text())
    assert report["shape"] == {"train": 2700, "val": 300, "test": 500, "d": 16, "classes": 10, "layers": 3}
    runs = {r["solver"]: r for r in report["runs"]}
    assert set(runs) == {"torch", "sklearn"} and all(len(r["rows"]) == 3 for r in runs.values())
    for ours, ref in zip(runs["torch"]["rows"], runs["sklearn"]["rows"], strict=True):
        assert abs(ours["test_acc"] - ref["test_acc"]) <= 0.5, (ours, ref)  # the same probe, another solver
    middle = [r["test_acc"] for r in runs["sklearn"]["rows"]]
    assert middle[1] > max(middle[0], middle[2])  # the synthetic layers peak in the middle
    table = (tmp_path / "probe_speed.md").read_text()
    assert "| torch | stop after 2 worse |" in table and "| sklearn | every C |" in table
    assert all(f"\n| layer {l} | " in table for l in (0, 1)) and "\n| final norm (2) | " in table  # per layer


@pytest.mark.multiproc
def test_stop_flag(tmp_path):
    run("stop_flag.py", "--steps", "50", "--repeats", "1", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "stop_flag.json").read_text())
    assert report["world"] == 2 and set(report["step_us"]) == {"none", "gloo_async", "check_10"}
    assert report["sockets_of_a_gloo_group_per_rank"] >= 1  # gloo's mesh: a socket for each other rank


def test_shard_throughput(tmp_path):
    run("shard_throughput.py", "--images", "30", "--rss-items", "200", "--out-dir", str(tmp_path))
    report = json.loads((tmp_path / "shards.json").read_text())
    cases = ("jpeg", "jpeg_full_decode", "jpeg_views4", "parquet", "webdataset", "digits")
    assert set(report["runs"]) == {f"{n}_workers{w}" for n in cases for w in (1, 2)}
    assert "view_cpu_ms_per_image" in report and list(report["imagenet_train_minutes_per_view"]) == ["32", "64", "128"]
    assert all(r["images_per_s"] > 0 and r["images_per_cpu_s"] > 0 for r in report["runs"].values())
    assert 0.3 < report["draft_vs_full_decode"]["tokens_identical"] < 1  # close to, not the same as, full decoding
    assert list(report["imagenet_train_minutes"]) == ["32", "64", "128"]
    assert "ImageNet train" in (tmp_path / "shards.md").read_text()
    rss = report["rss_mb"]
    assert list(rss) == ["20", "200"] and all(r["workers1"] > 0 < r["workers2"] for r in rss.values())
    projected = report["projection"]["web_100m"]["nodes"]
    assert list(projected) == ["1", "16", "64"] and projected["1"]["decode_min"] > projected["64"]["decode_min"]
