"""A non-editable install works from any directory: wheel into a fresh virtualenv, then run from a temporary folder.

The fresh virtualenv holds only igpt-ds's wheel; its dependencies (torch, DeepSpeed, ...) come from the test's own
virtualenv through a path entry, so nothing is downloaded. A path entry does not run that virtualenv's .pth files,
so the checkout's editable install stays invisible: `igpt_ds` is imported from the wheel or not at all (asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_support import REPO, free_port, scalars

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

# The checkout minus what is not source (what `git clone` would give, plus uncommitted edits).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", ".cache", "runs", "demo_out", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".ruff_cache", ".whl")  # fmt: skip

# A DeepSpeed JSON as DeepSpeedExamples / HF's integration write them: batch keys, clipping, an AdamW section and
# ZeRO buckets, some "auto", the rest agreeing with the run config below.
EXAMPLES_JSON = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with igpt-ds installed from a wheel; its bin folder."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=NOT_SOURCE)
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    (wheel,) = wheels.glob("igpt_ds-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)  # fmt: skip
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([venv / "bin" / "python", "-c", where], check=True, capture_output=True, text=True)
    purelib = purelib.stdout.strip()
    (Path(purelib) / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    shutil.rmtree(src)  # nothing may read the source tree from here on
    return venv / "bin"


def clean_env(bin_dir: Path) -> dict[str, str]:
    """No PYTHONPATH (the checkout must not be importable); the fresh venv's bin, then the test venv's (ninja)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions")
    )
    return env


def run(cmd: list, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_install_runs_from_any_directory(installed, tmp_path):
    env, work = clean_env(installed), tmp_path / "elsewhere"
    work.mkdir()
    where = run([installed / "python", "-c", "import igpt_ds; print(igpt_ds.__file__)"], work, env).stdout
    assert str(installed.parent) in where and str(REPO) not in where  # the wheel, not the checkout
    # Console scripts; presets and DeepSpeed JSONs found by name in the installed package.
    help_text = run([installed / "igpt-linear-probe", "--help"], work, env).stdout
    assert "--features" in help_text
    run([installed / "igpt-build-shards", "digits", "--out", "shards", "--n-px", "8"], work, env)
    n_vocab = json.loads((work / "shards" / "manifest.json").read_text())["n_vocab"]
    tiny = ["--model.size=igpt-tiny", "--model.n_px=8", f"--model.n_vocab={n_vocab}", "--data.shards=shards",
            "--train.global_batch=8", "--train.micro_batch=4", "--train.max_steps=2", "--train.log_every=1",
            "--train.eval_every=0", "--train.save_every=2"]  # fmt: skip
    out = run([installed / "igpt-pretrain", "--config", "demo_digits_cpu", "--train.name=console", *tiny], work, env)
    engine = next(line for line in out.stdout.splitlines() if line.startswith("engine:"))
    assert "world 1" in engine and "ZeRO stage 3" in engine and str(installed.parent) in engine  # shipped JSON
    assert (work / "demo_out" / "runs" / "console" / "checkpoints" / "latest").is_file()


def test_deepspeed_module_launch_with_a_standard_json(installed, tmp_path):
    """`deepspeed --module igpt_ds pretrain --deepspeed --deepspeed_config ds.json` on 2 ranks, from the wheel:
    a DeepSpeedExamples-style JSON with agreeing values and "auto" trains."""
    env, work = clean_env(installed), tmp_path / "elsewhere"
    work.mkdir()
    run([installed / "igpt-build-shards", "digits", "--out", "shards", "--n-px", "8"], work, env)
    n_vocab = json.loads((work / "shards" / "manifest.json").read_text())["n_vocab"]
    (work / "ds.json").write_text(json.dumps(EXAMPLES_JSON))
    cmd = [installed / "python", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", free_port(),
           "--module", "igpt_ds", "pretrain", "--deepspeed", "--deepspeed_config", "ds.json",
           "--model.size=igpt-tiny", "--model.n_px=8", f"--model.n_vocab={n_vocab}", "--data.shards=shards",
           "--train.run_root=runs", "--train.name=ds", "--train.global_batch=8", "--train.micro_batch=4",
           "--train.max_steps=3", "--train.log_every=1", "--train.eval_every=0", "--train.save_every=3"]  # fmt: skip
    out = run(cmd, work, env)
    engine = next(line for line in out.stdout.splitlines() if "engine: world 2" in line)
    assert "ZeRO stage 3" in engine and "micro-batch 4 x accumulation 1 x data-parallel 2 = global batch 8" in engine
    assert engine.endswith("DeepSpeed JSON ds.json (named by train.ds_config)")
    ds = json.loads((work / "runs" / "ds" / "ds_config.json").read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["optimizer"]["params"]["lr"] == 3e-3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32  # "auto" from igpt-tiny's width
    assert sorted(scalars(work / "runs" / "ds" / "tensorboard")["train/loss"]) == [1, 2, 3]
    assert engine.split("engine: ", 1)[1] in text_summaries(work / "runs" / "ds" / "tensorboard")["engine"]


def text_summaries(tb_dir: Path) -> dict[str, str]:
    """{tag: text} of TensorBoard's text summaries (add_text)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            if tag.endswith("/text_summary"):
                out[tag.split("/")[0]] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    return out
