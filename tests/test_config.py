"""Configuration: precedence defaults < YAML < CLI, unknown keys, wrong types, every preset loads."""

import importlib
import re
from pathlib import Path

import pytest

from igpt_ds.config import ConfigError, PretrainConfig, TrainConfig, load_config

PRESETS = sorted((Path(__file__).resolve().parent.parent / "launcher" / "configs").glob("*.yaml"))


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {size: igpt-s, n_px: 16}\noptim: {lr: 1.0e-3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(PretrainConfig, preset, ["--optim.lr=2e-4", "--train.name", "x", "--model.n_layer=3"])
    assert cfg.optim.warmup_steps == PretrainConfig().optim.warmup_steps  # default kept
    assert cfg.train.max_steps == 7 and cfg.model.n_px == 16  # YAML over default
    assert cfg.optim.lr == 2e-4 and cfg.train.name == "x"  # CLI over YAML
    assert (cfg.model.n_layer, cfg.model.n_embd) == (3, 512)  # explicit field over the size preset
    assert cfg.model.seq_len == 256  # derived, not a knob


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.max_step=5"], r"unknown config key\(s\) \['train.max_step'\]"),
        (["--trian.max_steps=5"], r"unknown config key\(s\) \['trian'\]"),
        (["--train.max_steps=five"], "train.max_steps must be int, got 'five'"),
        (["--train.max_steps=2.5"], "train.max_steps must be int"),
        (["--optim.lr=fast"], "optim.lr must be float"),
        (["--train.activation_checkpointing=3"], "must be bool"),
        (["--optim.betas=[0.9]"], "optim.betas must be a list of 2 values"),
        (["--model.size=igpt-huge"], "model.size='igpt-huge' is unknown"),
        (["--train.layout=tensor"], "train.layout='tensor' must be 'zero' or 'pipeline'"),
        (["--train.stop_at=500", "--train.max_steps=100"], "train.stop_at=500 must be in 0..train.max_steps"),
        (["--train.max_steps"], "needs a value"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(PretrainConfig, None, overrides)
    assert "\n" not in str(err.value)


def test_missing_or_malformed_preset(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PretrainConfig, bad)


def test_grad_accum_derives_and_must_divide():
    train = TrainConfig(global_batch=128, micro_batch=8)
    assert train.grad_accum(4) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        train.grad_accum(3)


# The config class each entry point builds, so every preset is checked against its own schema.
ENTRY_POINTS = {
    "pretrain": "igpt_ds.config:PretrainConfig",
    "finetune": "igpt_ds.finetune:FinetuneConfig",
    "linear_probe": "igpt_ds.probe:ProbeConfig",
    "extract_features": "igpt_ds.features:ExtractConfig",
    "sample": "igpt_ds.sampling:SampleConfig",
    "plan": "igpt_ds.planner:PlanConfig",
}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_states_how_to_run(preset):
    header = "".join(line for line in preset.read_text().splitlines(keepends=True) if line.startswith("#"))
    entry = re.search(r"launcher/(\w+)\.py", header)
    assert entry and "Hardware" in header and "Expected" in header, (
        f"{preset.name}: header lacks command/hardware/expected"
    )
    module, name = ENTRY_POINTS[entry.group(1)].split(":")
    cfg = load_config(getattr(importlib.import_module(module), name), preset)
    train = getattr(cfg, "train", None)
    if isinstance(train, TrainConfig):
        assert (Path(__file__).resolve().parent.parent / train.ds_config).is_file()
        train.grad_accum(2)  # batch sizes divide over 2 data-parallel replicas
