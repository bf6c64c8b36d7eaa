"""Every entry point describes itself: `--help` lists every field of its config class, generated from the dataclass."""

from __future__ import annotations

import dataclasses
import importlib
import re
import subprocess
import sys
import typing

import pytest
from pretrain_support import REPO, env

from igpt_ds.cli import JOBS


def dotted_fields(cls: type, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass as its flag name (`train.max_steps`)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def config_class(job: str) -> type:
    module, config, *_ = JOBS[job]
    return getattr(importlib.import_module(module), config)


def help_of(job: str) -> str:
    out = subprocess.run([sys.executable, f"launcher/{job}.py", "--help"], cwd=REPO, env=env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("job", list(JOBS))
def test_help_lists_every_field_with_type_and_default(job):
    text = help_of(job)
    flags = dotted_fields(config_class(job))
    assert len(flags) >= 5
    for flag in flags:
        # The flag's own entry: "  --train.max_steps MAX_STEPS" ... "(type: int, default: 100)".
        entry = re.search(rf"^  --{re.escape(flag)}\b.*?(?=^  --|\Z)", text, re.M | re.S)
        assert entry, f"--{flag} missing from {job} --help"
        assert "type:" in entry.group(0) and "default:" in entry.group(0), f"--{flag}: {entry.group(0)}"
    assert "--config" in text and "Precedence" in text


def test_help_carries_field_docstrings_and_deepspeed_flags():
    text = " ".join(help_of("pretrain").split())
    assert "Steps between the ranks' agreement on a stop request" in text  # TrainConfig.stop_check_every's docstring
    assert "--deepspeed_config FILE" in text and "--deepspeed " in text
    probe = " ".join(help_of("linear_probe").split())
    assert "--features FEATURES Folder written by extract_features" in probe


def test_deepspeed_config_flag_is_train_ds_config_and_both_is_an_error(tmp_path):
    cmd = [sys.executable, "launcher/pretrain.py", "--deepspeed_config", "cpu", "--train.ds_config", "cpu_zero3"]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "igpt-pretrain: error: --deepspeed_config and --train.ds_config both given; keep one"
    )
    assert "Traceback" not in out.stderr


def test_an_unknown_flag_is_one_line_exit_2():
    out = subprocess.run([sys.executable, "launcher/linear_probe.py", "--featurs", "x"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip().splitlines()[-1]
        == "igpt-linear-probe: error: unrecognized arguments: --featurs x (--help lists every flag)"
    )
