"""Configuration: precedence defaults < YAML < CLI, unknown keys, wrong types, every preset loads."""

import importlib
import re
from pathlib import Path

import pytest

from igpt_ds.config import ConfigError, ModelConfig, PretrainConfig, TrainConfig, build, load_config, origin_of
from igpt_ds.train.engine import policy_path

PRESETS = sorted((Path(__file__).resolve().parent.parent / "igpt_ds" / "presets").glob("*.yaml"))


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model: {size: igpt-s, n_px: 16}\noptim: {lr: 1.0e-3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(PretrainConfig, preset, ["--optim.lr=2e-4", "--train.name", "x", "--model.n_layer=3"])
    assert cfg.optim.warmup_steps == PretrainConfig().optim.warmup_steps  # default kept
    assert cfg.train.max_steps == 7 and cfg.model.n_px == 16  # YAML over default
    assert cfg.optim.lr == 2e-4 and cfg.train.name == "x"  # CLI over YAML
    assert (cfg.model.n_layer, cfg.model.n_embd) == (3, 512)  # explicit field over the size preset
    assert cfg.model.seq_len == 256  # derived, not a knob


def test_flags_after_the_preset_win_whatever_their_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim: {lr: 1.0e-3}\ntrain: {max_steps: 7}\n")
    cfg = load_config(PretrainConfig, None, ["--optim.lr=2e-4", "--config", str(preset)])
    assert cfg.optim.lr == 2e-4 and cfg.train.max_steps == 7


def test_size_resolves_from_the_declared_defaults_not_a_resolved_instance():
    # The parser's defaults are the declarations (n_layer=0 = "from size"), not igpt-tiny's resolved 2 layers.
    cfg = load_config(PretrainConfig, None, ["--model.size=igpt-s"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (24, 8, 512)


def test_a_section_built_by_its_own_factory_keeps_its_defaults_on_the_command_line():
    """Fine-tuning's optim and train sections differ from pretraining's (constant LR 3e-4 after 20 warmup steps;
    validation every 20 steps): a run named by flags alone gets those, not pretraining's cosine at 3e-3."""
    from igpt_ds.train.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, ["--train.init_from=x"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (3e-4, 20, "constant")
    assert (cfg.train.name, cfg.train.eval_every, cfg.train.max_steps) == ("finetune", 20, 100)
    assert cfg.optim == FinetuneConfig(train=TrainConfig(init_from="x")).optim


def test_a_shipped_preset_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_config(PretrainConfig, "igpt_s_imagenet32")
    by_docs_path = load_config(PretrainConfig, "launcher/configs/igpt_s_imagenet32.yaml")
    assert by_name == by_docs_path and by_name.model.size == "igpt-s"
    with pytest.raises(ConfigError, match=r"--config=elsewhere/igpt_s_imagenet32.yaml does not exist"):
        load_config(PretrainConfig, "elsewhere/igpt_s_imagenet32.yaml")  # another folder: no silent substitute


def test_origins_say_where_each_value_came_from(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train: {global_batch: 64}\n")
    cfg = load_config(PretrainConfig, preset, ["--train.micro_batch=4"])
    assert origin_of(cfg.train, "global_batch") == f"preset {preset}"
    assert origin_of(cfg.train, "micro_batch") == "flag --train.micro_batch"
    assert origin_of(cfg.train, "max_steps") == "default"
    assert origin_of(TrainConfig(), "max_steps") == "run config"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.max_step=5"], r"unrecognized arguments: --train.max_step=5 \(--help lists every flag\)"),
        (["--train.max_st", "5"], "unrecognized arguments: --train.max_st 5"),  # no abbreviations
        (["--trian.max_steps=5"], "unrecognized arguments: --trian.max_steps=5"),
        (["--train.max_steps=five"], "Parser key \"train.max_steps\": Expected a <class 'int'>. Got value: five"),
        (["--train.max_steps=2.5"], "train.max_steps.*Expected a <class 'int'>"),
        (["--optim.lr=fast"], "optim.lr.*Expected a <class 'float'>"),
        (["--train.activation_checkpointing=3"], "Expected a <class 'bool'>"),
        (["--optim.betas=[0.9]"], "optim.betas.*Expected a tuple with 2 elements"),
        (["--model.size=igpt-huge"], "model.size='igpt-huge' is unknown"),
        (["--train.layout=tensor"], "train.layout='tensor' must be 'zero' or 'pipeline'"),
        (["--train.stop_at=500", "--train.max_steps=100"], "train.stop_at=500 must be in 0..train.max_steps"),
        (["--train.max_steps"], "expected one argument"),
        (["stray"], "unrecognized arguments: stray"),
        (["--config"], "--config needs a value"),
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
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=f"config file {unknown}: .*'lrr'"):
        load_config(PretrainConfig, unknown)


def test_a_saved_section_is_read_back_strictly():
    saved = {"size": "igpt-s", "n_layer": 24, "n_head": 8, "n_embd": 512}
    assert build(ModelConfig, saved, "model.").n_layer == 24
    with pytest.raises(ConfigError, match="model: .*'sizee'"):
        build(ModelConfig, {"sizee": "igpt-s"}, "model.")


def test_grad_accum_derives_and_must_divide():
    train = TrainConfig(global_batch=128, micro_batch=8)
    assert train.grad_accum(4) == 4
    with pytest.raises(ConfigError, match="not divisible"):
        train.grad_accum(3)


# The config class each entry point builds, so every preset is checked against its own schema.
ENTRY_POINTS = {
    "pretrain": "igpt_ds.config:PretrainConfig",
    "finetune": "igpt_ds.train.finetune:FinetuneConfig",
    "linear_probe": "igpt_ds.eval.probe:ProbeConfig",
    "extract_features": "igpt_ds.eval.features:ExtractConfig",
    "sample": "igpt_ds.eval.sampling:SampleConfig",
    "plan": "igpt_ds.plan.training:PlanConfig",
    "plan_eval": "igpt_ds.plan.evaluation:EvalPlanConfig",
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
        assert policy_path(train).is_file()
        train.grad_accum(2)  # batch sizes divide over 2 data-parallel replicas
