"""Engine set-up checks that need no process group: LR table, DeepSpeed JSON, every validation error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pretrain_support import REPO, digits_shards, env, write_config

from igpt_ds.config import (
    DS_CONFIGS_DIR,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    load_config,
    load_policy,
)
from igpt_ds.train.engine import build_ds_config, lr_at, policy_path


def test_lr_table_warmup_then_cosine_to_zero():
    optim = OptimConfig(lr=1.0, warmup_steps=4)
    table = [lr_at(s, optim, total_steps=12) for s in range(13)]
    assert table[:4] == [0.25, 0.5, 0.75, 1.0]  # linear, reaching the peak on the last warmup step
    assert table[4] == 1.0 and table[8] == pytest.approx(0.5) and table[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(table[4:], table[5:], strict=False))  # monotone decay
    constant = OptimConfig(lr=1.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, constant, 12) for s in (0, 1, 2, 11)] == [0.5, 1.0, 1.0, 1.0]


def policy(tmp_path, **keys) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **keys}))
    return str(path)


# A JSON in the shape DeepSpeedExamples and HF's integration ship: batch keys, clipping, an optimizer.
EXAMPLES_STYLE = {
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": "auto", "weight_decay": 0}},
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto"},
}  # fmt: skip


def test_a_standard_json_that_agrees_or_says_auto_is_filled_from_the_run_config(tmp_path):
    train = TrainConfig(ds_config=policy(tmp_path, **EXAMPLES_STYLE), global_batch=32, micro_batch=4)
    cfg = build_ds_config(train, OptimConfig(lr=1e-3), world_size=2, model=ModelConfig(size="igpt-mini"))
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32, 4, 4)  # fmt: skip
    assert cfg["optimizer"]["params"]["lr"] == 1e-3 and cfg["optimizer"]["params"]["eps"] == 1e-8
    assert cfg["bf16"] == {"enabled": False}  # "auto" on a CPU
    zero = cfg["zero_optimization"]
    buckets = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    assert [zero[k] for k in buckets] == [64 * 64, int(0.9 * 64 * 64), 640]  # from the hidden size, as HF does


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("train_batch_size", 64, r"train_batch_size=64 in .*policy.json contradicts train.global_batch=32 \(run "),
        ("train_micro_batch_size_per_gpu", 8, "train_micro_batch_size_per_gpu=8 .* contradicts train.micro_batch=4"),
        ("gradient_accumulation_steps", 2, r"gradient_accumulation_steps=2 .* contradicts the accumulation=4 \(train"),
        ("gradient_clipping", 0.5, "gradient_clipping=0.5 .* contradicts optim.grad_clip=1.0"),
        ("optimizer", {"type": "Adam", "params": {"lr": 1e-4}}, "optimizer.params.lr=0.0001 .* contradicts optim.lr"),
        ("optimizer", {"type": "Lamb", "params": {}}, "optimizer type 'Lamb' in .* is not supported"),
        ("optimizer", {"type": "AdamW", "params": {"amsgrad": True}}, "optimizer.params.amsgrad=True .* no igpt-ds"),
        ("scheduler", {"type": "WarmupLR", "params": {}}, "scheduler section in .*optim.warmup_steps / optim.schedule"),
        ("zero_optimization", {"stage": 3, "sub_group_size": "auto"}, 'sub_group_size="auto" .* write a value'),
    ],
)
def test_a_contradiction_is_one_line_naming_both_values(tmp_path, key, value, message):
    train = TrainConfig(ds_config=policy(tmp_path, **{key: value}), global_batch=32, micro_batch=4)
    with pytest.raises(ConfigError, match=message) as err:
        build_ds_config(train, OptimConfig(), world_size=2)
    assert "\n" not in str(err.value)


def test_the_error_says_where_the_run_value_came_from(tmp_path):
    cfg = load_config(PretrainConfig, None, [f"--train.ds_config={policy(tmp_path, train_batch_size=64)}",
                                             "--train.global_batch=32"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"contradicts train.global_batch=32 \(flag --train.global_batch\)"):
        build_ds_config(cfg.train, cfg.optim, world_size=1)


class FakeAccelerator:
    def __init__(self, name: str, bf16: bool, memory_gib: float = 79.1):
        self.name, self.bf16, self.memory = name, bf16, memory_gib * 2**30

    def device_name(self) -> str:
        return self.name

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def total_memory(self) -> float:
        return self.memory


S = ModelConfig(size="igpt-s", n_px=32)


@pytest.mark.parametrize(
    "name,bf16,layout,expected",
    [
        ("cuda", True, "zero", "zero1_bf16.json"),  # iGPT-S fits an 80 GB GPU at ZeRO-1
        ("cuda", True, "pipeline", "pipeline_zero1_bf16.json"),
        ("cpu", False, "zero", "cpu.json"),
        ("cpu", False, "pipeline", "cpu.json"),
    ],
)
def test_a_run_naming_no_json_gets_the_policy_of_its_accelerator(monkeypatch, name, bf16, layout, expected):
    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator(name, bf16))
    train = TrainConfig(layout=layout, pipeline_stages=1, global_batch=128, micro_batch=16)
    path = policy_path(train, S, world_size=8)
    assert path == DS_CONFIGS_DIR / expected and path.is_file()
    ds = load_policy(path)
    assert ds.get("bf16", {}).get("enabled", False) is (name == "cuda")


def peaks(model: ModelConfig, train: TrainConfig, dp: int) -> dict[int, float]:
    """The estimate's peak bytes a GPU at ZeRO-1, 2 and 3 with the shipped JSONs."""
    from igpt_ds.plan.memory import Knobs, Layout, Shape, memory

    return {s: memory(Shape.of(model), Layout(s, micro_batch=train.micro_batch), dp, train.grad_accum(dp),
                      Knobs.from_policy(load_policy(DS_CONFIGS_DIR / f"zero{s}_bf16.json")))["peak"]
            for s in (1, 2, 3)}  # fmt: skip


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_default_policy_is_the_lowest_zero_stage_that_fits(monkeypatch, stage):
    """On a GPU whose memory lies between two stages' estimates, the lower of the stages that fit; the run's
    header line names the stage and why. ZeRO-3 only where ZeRO-1 and 2 do not fit."""
    import deepspeed.accelerator

    from igpt_ds.plan.memory import USABLE_FRACTION
    from igpt_ds.train.engine import choose_policy, describe, engine_facts

    model, train, dp = ModelConfig(size="igpt-l", n_px=32), TrainConfig(global_batch=64, micro_batch=8), 8
    peak = peaks(model, train, dp)
    assert peak[1] > peak[2] > peak[3]
    room = (peak[stage] + (peak[stage - 1] if stage > 1 else 2 * peak[1])) / 2 / USABLE_FRACTION  # fits `stage` only
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator("cuda", True, room / 2**30))
    policy = choose_policy(train, model, world_size=dp)
    assert policy.path == DS_CONFIGS_DIR / f"zero{stage}_bf16.json" and policy.follows_checkpoint
    ds_config = build_ds_config(train, OptimConfig(), dp, model=model, policy=policy)
    header = describe(engine_facts(ds_config, train, dp, policy))
    assert (
        f"ZeRO stage {stage}, bf16" in header
        and f"(default policy: ZeRO-{stage}, the lowest stage that fits: "
        f"{peak[stage] / 2**30:.1f} GiB a GPU by the estimate within 90% of {room / 2**30:.0f} GiB)"
        in header
    )


def test_a_model_no_stage_fits_gets_zero3_and_the_ways_out(monkeypatch):
    import deepspeed.accelerator

    from igpt_ds.train.engine import choose_policy

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator("cuda", True, 1.0))
    why = choose_policy(TrainConfig(global_batch=16, micro_batch=16), S).why
    assert why.startswith("default policy: ZeRO-3, though no stage fits: ") and "train.activation_checkpointing" in why


def test_a_resumed_run_naming_no_json_keeps_its_checkpoints_stage(monkeypatch):
    """The estimate may pick another stage at another GPU count, and a ZeRO checkpoint loads at its own stage only:
    a GPU run naming no JSON resumes at the checkpoint's stage; a named JSON is never overridden."""
    import deepspeed.accelerator

    from igpt_ds.train.engine import choose_policy

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator("cuda", True))
    assert choose_policy(TrainConfig(), S, stage=3).path == DS_CONFIGS_DIR / "zero3_bf16.json"
    named = TrainConfig(ds_config="zero2_bf16")
    assert choose_policy(named, S, stage=3).path == DS_CONFIGS_DIR / "zero2_bf16.json"
    assert not choose_policy(named, S).follows_checkpoint
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator("cuda", True, 2.0))
    why = choose_policy(TrainConfig(global_batch=16, micro_batch=16), S, stage=1).why  # fewer or smaller GPUs now
    assert why.startswith("default policy: ZeRO-1, the checkpoint's, though it does not fit: ") and "init_from" in why


def test_a_gpu_without_bf16_must_name_a_json(monkeypatch):
    import deepspeed.accelerator

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: FakeAccelerator("cuda", False))
    with pytest.raises(ConfigError, match="has no bf16 and no JSON was named: set train.ds_config"):
        policy_path(TrainConfig(), S)


def test_a_shipped_json_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("zero3_bf16", "zero3_bf16.json", "ds_configs/zero3_bf16.json"):
        assert policy_path(TrainConfig(ds_config=name)) == DS_CONFIGS_DIR / "zero3_bf16.json"
    with pytest.raises(ConfigError, match="train.ds_config=mine.json does not exist"):
        policy_path(TrainConfig(ds_config="mine.json"))


def test_build_ds_config_writes_batch_clipping_and_optimizer(tmp_path):
    train = TrainConfig(ds_config=policy(tmp_path), global_batch=32, micro_batch=4)
    cfg = build_ds_config(train, OptimConfig(lr=1e-3, grad_clip=0.5), world_size=2)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        32,
        4,
        4,
    )
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"] == {"stage": 3}
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0, "torch_adam": True},
    }
    assert "checkpoint" not in cfg
    assert build_ds_config(train, OptimConfig(), 2, load_universal=True)["checkpoint"] == {"load_universal": True}


def test_offload_uses_deepspeed_cpu_adam():
    train = TrainConfig(ds_config=str(REPO / "ds_configs" / "zero3_offload.json"))
    assert "torch_adam" not in build_ds_config(train, OptimConfig(), 1)["optimizer"]["params"]
    with pytest.raises(ConfigError, match="optim.fused=true with ZeRO optimizer offload .*zero3_offload.json"):
        build_ds_config(train, OptimConfig(fused=True), 1)


def test_fused_adamw_reaches_torch(tmp_path):
    params = build_ds_config(TrainConfig(ds_config=policy(tmp_path)), OptimConfig(fused=True), 1)["optimizer"]["params"]
    assert params["fused"] is True and params["torch_adam"] is True


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_builds(path):
    layout = "pipeline" if "pipeline" in path.name else "zero"
    build_ds_config(TrainConfig(ds_config=str(path), layout=layout), OptimConfig(), world_size=2)


def test_batch_sizes_that_do_not_divide(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        build_ds_config(TrainConfig(ds_config=policy(tmp_path), global_batch=16, micro_batch=3), OptimConfig(), 1)
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        build_ds_config(TrainConfig(ds_config=policy(tmp_path), global_batch=16, micro_batch=4), OptimConfig(), 3)


def test_stage_count_must_divide_world_size():
    train = TrainConfig(ds_config=str(REPO / "ds_configs" / "cpu.json"), layout="pipeline", pipeline_stages=3)
    with pytest.raises(ConfigError, match="pipeline_stages=3 does not divide the world size 2"):
        build_ds_config(train, OptimConfig(), 2)


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero3_bf16.json", "cpu_zero3.json"])
def test_pipeline_with_zero_2_or_3_is_rejected_with_the_reason(name):
    train = TrainConfig(ds_config=str(REPO / "ds_configs" / name), layout="pipeline", pipeline_stages=2)
    with pytest.raises(ConfigError, match="accepts ZeRO stage 0 or 1 only .*reduces them once per step"):
        build_ds_config(train, OptimConfig(), 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return digits_shards(tmp_path_factory.mktemp("engine") / "shards")


def test_shards_must_match_the_model(shards):
    from igpt_ds.data.shards import ShardSplit, open_shards

    n_vocab = ShardSplit(shards, "train").n_vocab
    open_shards(ModelConfig(n_px=8, n_vocab=n_vocab), DataConfig(shards=str(shards)), "train")
    with pytest.raises(ConfigError, match="8x8 images .* model.n_px=16"):
        open_shards(ModelConfig(n_px=16, n_vocab=n_vocab), DataConfig(shards=str(shards)), "train")
    with pytest.raises(ConfigError, match=f"over {n_vocab} colours .* model.n_vocab=7"):
        open_shards(ModelConfig(n_px=8, n_vocab=7), DataConfig(shards=str(shards)), "train")


def test_missing_shard_folder(tmp_path):
    from igpt_ds.data.shards import open_shards

    with pytest.raises(ConfigError, match="holds no manifest.json"):
        open_shards(ModelConfig(n_px=8), DataConfig(shards=str(tmp_path / "nowhere")), "train")


def test_launcher_reports_a_config_error_in_one_line_before_training(tmp_path, shards):
    from igpt_ds.data.shards import ShardSplit

    config = write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "runs",
        ShardSplit(shards, "train").n_vocab,
        layout="pipeline",
        pipeline_stages=1,
    )  # a ZeRO-3 JSON with the pipeline
    out = subprocess.run(
        [sys.executable, "launcher/pretrain.py", "--config", str(config)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("igpt-pretrain: error:")]
    assert len(errors) == 1 and "ZeRO stage 0 or 1" in errors[0]
    assert not (tmp_path / "runs").exists()  # nothing started
